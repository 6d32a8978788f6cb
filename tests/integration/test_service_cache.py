"""Each service's writable cache (issue 18): /home/work/.cache on the node, HF_HOME inside it, kept
across replica restarts, counted against the owner's storage limit, removed once destroyed.

Real replicas on the local engine (root and bwrap; skipped otherwise), the real database and Redis,
and uploads through the real streaming upload path."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from accounts.actions import do_issue_api_key
from serving.core import slots
from serving.models import Endpoint, Node, Route, ServiceCache, ServiceEvent
from serving.node import caches, replicas
from serving.node import engine as node_engine
from serving.node.engine import node_name
from serving.node.engines.local.engine import LocalEngine
from tests.factories import FolderFactory
from tests.live import wait_for
from tests.security.test_parallel_upload_quota import MB, Upload, length

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or os.geteuid() != 0, reason="the local engine needs root and bubblewrap"
    ),
]

# The first replica writes HF_HOME into its cache; a later one copies what it finds there.
DEFINITION = """\
models:
  - name: cached
    model_path: /models
    service:
      start_command: >-
        if [ -f /home/work/.cache/marker ]; then cp /home/work/.cache/marker /home/work/.cache/seen;
        else printf %s "$HF_HOME" > /home/work/.cache/marker; fi; exec sleep 60
      shell: /bin/sh
      port: 8000
"""


@pytest.fixture
def engine(settings: Any) -> Iterator[LocalEngine]:
    local = LocalEngine(state_dir=settings.ENGINE_STATE_DIR / "local-cachetest", netns_prefix="mc")
    node_engine.set_engine(local)
    try:
        yield local
    finally:
        for info in local.list():
            local.stop(info.replica_id, grace=0)
        node_engine.set_engine(None)


def create(api: Any, folder: Any, name: str) -> Endpoint:
    body = {"name": name, "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    return Endpoint.objects.get(pk=created.json()["id"])


def start_replica(engine: LocalEngine, endpoint: Endpoint, node: Node) -> str:
    route = Route.objects.create(
        endpoint=endpoint, node=node, resources=slots.replica_request(endpoint.resources), spec_version=1
    )
    route.spec_version = endpoint.spec_version
    spec, _ = replicas.build_spec(route)
    return engine.start(spec).replica_id


def test_a_service_cache_survives_restarts_counts_in_the_quota_and_goes_with_the_service(
    api: Any, personas: dict[str, Any], engine: LocalEngine, settings: Any
) -> None:
    owner = personas["owner"]
    folder = FolderFactory(owner=owner, name="cached-model", files={"model-definition.yaml": DEFINITION})
    endpoint = create(api, folder, "cached")
    node = Node.objects.create(name=node_name(), heartbeat_at=timezone.now())
    directory = caches.node_root() / str(endpoint.pk)

    first = start_replica(engine, endpoint, node)
    wait_for((directory / "marker").exists, what="the first replica writes its cache")
    # HF_HOME points into the cache; the directory belongs to the replicas' user, not root.
    assert (directory / "marker").read_text() == "/home/work/.cache/huggingface"
    assert directory.stat().st_uid == settings.LOCAL_ENGINE_UID and directory.stat().st_uid != 0
    engine.stop(first, grace=0)

    start_replica(engine, endpoint, node)
    wait_for((directory / "seen").exists, what="the next replica finds the cache")
    assert (directory / "seen").read_text() == "/home/work/.cache/huggingface"

    # The user's own HF_HOME wins.
    endpoint.environ = {"HF_HOME": "/data/hf"}
    spec, _ = replicas.build_spec(Route(endpoint=endpoint, node=node, resources={"cpu": 1, "mem": 1024**3}))
    assert spec.env["HF_HOME"] == "/data/hf"
    assert any(m.target == "/home/work/.cache" and not m.read_only for m in spec.mounts)


def test_caches_count_against_the_owners_storage_limit(
    api: Any, personas: dict[str, Any], engine: LocalEngine, settings: Any
) -> None:
    settings.USER_STORAGE_LIMIT = 10 * MB
    settings.SERVICE_CACHE_LIMIT = 4 * MB
    owner = personas["owner"]
    folder = FolderFactory(owner=owner, name="cached-model", files={"model-definition.yaml": DEFINITION})
    endpoint = create(api, folder, "cached")
    node = Node.objects.create(name=node_name(), heartbeat_at=timezone.now())
    mount = caches.prepare(endpoint.pk, engine)
    Path(mount.source, "weights.bin").write_bytes(b"w" * (8 * MB))

    counts = caches.sweep()
    assert counts["measured"] == 1 and counts["over_limit"] == 1
    assert ServiceCache.objects.get(endpoint=endpoint, node=node).bytes == 8 * MB
    warning = ServiceEvent.objects.get(endpoint=endpoint, kind="cache_over_limit")
    assert warning.level == ServiceEvent.Level.WARNING and "Nothing was deleted" in warning.message
    # Measured once a minute at most, and warned once.
    assert caches.sweep()["measured"] == 0
    assert ServiceEvent.objects.filter(endpoint=endpoint, kind="cache_over_limit").count() == 1

    target = FolderFactory(owner=owner, name="uploads", usage_mode="general")
    token = do_issue_api_key(owner, name="uploads")[1]

    async def upload(name: str, size: int) -> tuple[int | None, Any]:
        request = Upload(f"/api/v1/folders/{target.pk}/files/{name}", token, length(size))
        await request.send(b"u" * size, more=False)
        return await request.answer()

    status, body = async_to_sync(upload)("big.bin", 3 * MB)
    assert status == 413, body
    assert "storage limit" in body["detail"] and "caches of their services" in body["detail"]
    status, body = async_to_sync(upload)("small.bin", 1 * MB)
    assert status == 201, body

    # The API shows the cache per node to those who see the service.
    shown = api("owner").get(f"/api/v1/services/{endpoint.pk}/").json()
    assert shown["caches"] == [{"node": node.name, "bytes": 8 * MB, "measured_at": shown["caches"][0]["measured_at"]}]
    assert api("admin").get(f"/api/v1/services/{endpoint.pk}/").json()["caches"][0]["bytes"] == 8 * MB
    # A private service: the teammate and a stranger get the same 404 as for a missing one.
    for who in ("teammate", "stranger"):
        assert api(who).get(f"/api/v1/services/{endpoint.pk}/").status_code == 404

    # Destroyed: the directory and its row go at the next sweep.
    Endpoint.objects.filter(pk=endpoint.pk).update(lifecycle=Endpoint.Lifecycle.DESTROYED)
    assert caches.sweep()["removed"] == 1
    assert not Path(mount.source).exists() and not ServiceCache.objects.filter(endpoint=endpoint).exists()
