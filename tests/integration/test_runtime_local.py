"""Runtime through the REST API with real workers and real replicas on the local engine (S4.3-S4.6)."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from serving.models import Endpoint, Route, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import LiveSystem, wait_for

BROKEN_DEFINITION = "models:\n  - name: x\n    model_path: /models\n    service:\n      port: 99999\n"


def service(api: Any, folder: Folder, **extra: Any) -> dict[str, Any]:
    body = {"name": "svc-live", "folder": str(folder.pk), "replicas": 2, **extra}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def get(api: Any, service_id: str) -> dict[str, Any]:
    return api("owner").get(f"/api/v1/services/{service_id}/").json()


def healthy_routes(api: Any, service_id: str, count: int) -> list[dict[str, Any]] | None:
    routes = [r for r in get(api, service_id)["routes"] if r["status"] == "healthy"]
    return routes if len(routes) == count else None


def local_engine() -> Any:
    from serving.node.engines.local.engine import LocalEngine

    return LocalEngine(state_dir=Path(settings.ENGINE_STATE_DIR) / "local-local")


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "index.html": "hello from the model folder"},
    )


def test_create_serve_recover_scale_terminate(live_system: LiveSystem, api: Any, folder: Folder) -> None:
    created = service(api, folder)
    sid = created["id"]
    routes = wait_for(lambda: healthy_routes(api, sid, 2), timeout=30, what="2 healthy routes")
    assert get(api, sid)["status"] == "HEALTHY"
    # Each replica really serves the model folder, mounted read-only at /models.
    route = Route.objects.get(pk=routes[0]["id"])
    with urllib.request.urlopen(f"http://{route.host}:{route.port}/index.html", timeout=5) as answer:
        assert answer.read() == b"hello from the model folder"

    # Kill one replica's process: a new one replaces it.
    engine = local_engine()
    victim = Route.objects.get(pk=routes[0]["id"])
    pid = (
        int((Path(engine.state_dir) / victim.container_id / "pid").read_text().split()[0])
        if (Path(engine.state_dir) / victim.container_id / "pid").exists()
        else None
    )
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    else:  # the engine keeps no pid file: stop it behind the platform's back
        engine.stop(victim.container_id, grace=0)
    wait_for(
        lambda: not Route.objects.filter(pk=victim.pk, status="healthy").exists(),
        timeout=10,
        what="the killed replica to be noticed",
    )
    wait_for(lambda: healthy_routes(api, sid, 2), timeout=30, what="a replacement replica")
    assert ServiceEvent.objects.filter(endpoint_id=sid, kind="route_exited").exists()

    # Scale up and down.
    api("owner").patch(f"/api/v1/services/{sid}/", {"replicas": 3}, format="json")
    wait_for(lambda: healthy_routes(api, sid, 3), timeout=30, what="3 healthy routes")
    api("owner").patch(f"/api/v1/services/{sid}/", {"replicas": 1}, format="json")
    wait_for(lambda: len(get(api, sid)["routes"]) == 1, timeout=30, what="scale in to 1")

    # Terminate: destroyed, and no replica left in the engine (checked against the engine, not the DB).
    assert api("owner").delete(f"/api/v1/services/{sid}/").status_code == 202
    wait_for(lambda: Endpoint.objects.get(pk=sid).lifecycle == "destroyed", timeout=30, what="destroyed")
    wait_for(
        lambda: not [i for i in engine.list() if i.labels.get("serving.endpoint") == sid],
        timeout=10,
        what="no replica left in the engine",
    )
    assert api("owner").get(f"/api/v1/services/{sid}/").status_code == 404


def reconcile_ticks(system: LiveSystem) -> int:
    """How many reconcile ticks the control worker has finished (its log says each one)."""
    return len(re.findall(r"Task serving\.tasks\.reconcile_all\[[^\]]+\] succeeded", system.log("control")))


def test_bad_definition_fails_then_clear_and_retry_recovers(
    live_system: LiveSystem, api: Any, personas: dict[str, Any], settings: Any
) -> None:
    folder = FolderFactory(owner=personas["owner"], name="broken", files={"model-definition.yaml": BROKEN_DEFINITION})
    created = service(api, folder, replicas=1)
    sid = created["id"]
    wait_for(lambda: get(api, sid)["retries"] >= settings.MAX_START_FAILURES, timeout=30, what="5 failed starts")
    body = get(api, sid)
    assert body["status"] == "UNHEALTHY"
    errors = [r["error"] for r in body["routes"] if r["status"] == "failed_to_start"]
    assert errors and "models[0].service.port" in errors[0]
    # It gave up: no new attempts while the file stays broken.
    attempts = ServiceEvent.objects.filter(endpoint_id=sid, kind="route_failed").count()
    done = reconcile_ticks(live_system)
    wait_for(lambda: reconcile_ticks(live_system) >= done + 3, timeout=10, what="three more reconcile ticks")
    assert ServiceEvent.objects.filter(endpoint_id=sid, kind="route_failed").count() == attempts

    (folder.host_path / "model-definition.yaml").write_text(SIMPLE_DEFINITION)
    assert api("owner").post(f"/api/v1/services/{sid}/clear-errors/").status_code == 202
    wait_for(lambda: healthy_routes(api, sid, 1), timeout=30, what="healthy after clear-and-retry")
    assert get(api, sid)["status"] == "HEALTHY"


def test_impossible_resources_say_what_was_asked_and_what_is_free(
    live_system: LiveSystem, api: Any, folder: Folder
) -> None:
    created = service(api, folder, replicas=1, resources={"cpu": 512, "mem": "1g"})
    sid = created["id"]
    wait_for(lambda: get(api, sid)["status"] == "UNHEALTHY", timeout=30, what="UNHEALTHY")
    error = next(r["error"] for r in get(api, sid)["routes"] if r["error"])
    assert "Not enough resources" in error
    assert "cpu 512" in error
    assert "node local" in error
