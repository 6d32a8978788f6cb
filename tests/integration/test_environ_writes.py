"""A cache variable pointing under the read-only model folder (issue 18): HF_HOME=/models/hf is valid
but fails at the first download, so the validator, the create API (``warnings``), the launcher and the
service's event log at start say so, from the folder's ``service-definition.toml`` or the launcher's
environment alike. Real database, real Redis, a real replica on the local engine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from serving.folders import validate_model_folder
from serving.models import Endpoint, Node, Route, ServiceEvent
from serving.node import engine as node_engine
from serving.node import routes
from serving.node.engines.local.engine import LocalEngine
from tests.factories import FolderFactory

pytestmark = pytest.mark.django_db

DEFINITION = """\
models:
  - name: env
    model_path: /models
    service:
      start_command: exec sleep 60
      shell: /bin/sh
      port: 8000
"""
SERVICE_DEFINITION = """\
[custom.environ]
HF_HOME = "/models/hf"
XDG_CACHE_HOME = "/home/work/.cache"
"""


@pytest.fixture
def folder(personas: dict[str, Any]) -> Any:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="envwrites",
        files={"model-definition.yaml": DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )


def test_the_validator_names_the_folders_variable_under_the_model_folder(folder: Any) -> None:
    result = validate_model_folder(folder.host_path, runtime="custom")
    assert result.ok, [str(p) for p in result.problems]
    [warning] = result.warnings
    assert (warning.file, warning.field) == ("service-definition.toml", "custom.environ.HF_HOME")
    assert "(HF_HOME=/models/hf)" in warning.message and "/home/work/.cache" in warning.message
    # Mounted elsewhere, /models/hf is not under the model folder.
    assert validate_model_folder(folder.host_path, runtime="custom", model_mount="/mnt/model").warnings == ()


def test_create_answers_with_warnings_and_logs_them(api: Any, folder: Any, personas: dict[str, Any]) -> None:
    body = {
        "name": "env-one",
        "project": personas["project"].pk,
        "folder": str(folder.pk),
        "runtime": "custom",
        "replicas": 0,
        "environ": {"TRANSFORMERS_CACHE": "/models/tc"},
    }
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    warnings = created.json()["warnings"]
    assert len(warnings) == 2, warnings  # the folder's HF_HOME and the launcher's TRANSFORMERS_CACHE
    assert any("(HF_HOME=/models/hf)" in w for w in warnings)
    assert any("(TRANSFORMERS_CACHE=/models/tc)" in w for w in warnings)
    events = ServiceEvent.objects.filter(endpoint_id=created.json()["id"], kind="config_warning")
    assert sorted(e.message for e in events) == sorted(warnings)
    assert {e.level for e in events} == {ServiceEvent.Level.WARNING}
    # The teammate reads them on the service's events; a stranger sees no service at all.
    url = f"/api/v1/services/{created.json()['id']}/"
    assert api("teammate").get(url).status_code == 200
    seen = api("teammate").get(url + "events/")
    assert seen.status_code == 200, seen.content
    assert "(TRANSFORMERS_CACHE=/models/tc)" in seen.content.decode()
    assert api("stranger").get(url).status_code == 404
    # The launcher's own value wins over the folder's: HF_HOME in the cache, no warning left.
    body = {**body, "name": "env-two", "environ": {"HF_HOME": "/home/work/.cache/hf"}}
    fixed = api("owner").post("/api/v1/services/", body, format="json")
    assert fixed.status_code == 201, fixed.json()
    assert fixed.json()["warnings"] == []
    assert not ServiceEvent.objects.filter(endpoint_id=fixed.json()["id"], kind="config_warning").exists()


@pytest.fixture
def engine(settings: Any) -> Iterator[LocalEngine]:
    local = LocalEngine(state_dir=settings.ENGINE_STATE_DIR / "local-envwrites", netns_prefix="me")
    node_engine.set_engine(local)
    try:
        yield local
    finally:
        for info in local.list():
            local.stop(info.replica_id, grace=0)
        node_engine.set_engine(None)


@pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0, reason="the local engine needs root and bubblewrap"
)
def test_the_event_log_says_it_when_a_replica_starts(api: Any, folder: Any, engine: LocalEngine) -> None:
    body = {"name": "env-start", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    endpoint = Endpoint.objects.get(pk=created.json()["id"])
    here = Node.objects.create(name=node_engine.node_name(), address="127.0.0.1")
    route = Route.objects.create(endpoint=endpoint, node=here, spec_version=endpoint.spec_version)
    routes.start_route(str(route.pk))
    route.refresh_from_db()
    assert route.container_id and route.status != Route.Status.FAILED_TO_START, route.error
    [event] = ServiceEvent.objects.filter(endpoint=endpoint, kind="replica_warning")
    assert event.level == ServiceEvent.Level.WARNING
    assert event.message.startswith(f"Replica {str(route.pk)[:8]}: environment: The environment variable ")
    assert "(HF_HOME=/models/hf)" in event.message
