"""A Swarm node worker that does not share the web app's storage (issue 15 on the Swarm engine): with
``NODE_CACHE_ROOT`` it copies the model folder from the web app into a snapshot before the replica
starts, and the replica's Swarm service bind-mounts that snapshot, so on a swarm of several hosts a
node worker on each Swarm node's host (``SWARM_NODE``) gives its replicas their folders.

Real control worker, beat, proxy, web process (daphne: the snapshot's manifest and files) and a
node worker with ``SERVING_ENGINE=swarm``, its own empty ``STORAGE_ROOT`` and a cache root; the
replica on the one-node swarm of test_swarm_service.py serves a file of the folder through the proxy.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest

from serving.models import Route
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import LiveSystem, free_port, wait_for
from tests.reliability.conftest import create_service, healthy_routes
from tests.reliability.test_swarm_service import swarm_or_skip


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.docker
def test_a_swarm_replica_serves_its_folder_from_the_node_workers_snapshot(
    live: Any, api: Any, personas: dict[str, Any], settings: Any, tmp_path: Path
) -> None:
    client = swarm_or_skip(settings)
    system = live(SERVING_ENGINE="swarm")
    port = free_port()
    LiveSystem.start_web(system, port=port)
    far = {name: tmp_path / f"swarm-node-{name}" for name in ("storage", "cache")}
    for directory in far.values():
        directory.mkdir()
    # The node worker as on a Swarm node's host of its own: nothing of the web app's storage, a
    # cache root for snapshots, the web app over HTTP.
    system.stop("node-local")
    system.start_node(
        "local",
        STORAGE_ROOT=str(far["storage"]),
        NODE_CACHE_ROOT=str(far["cache"]),
        NODE_WEB_URL=f"http://127.0.0.1:{port}",
    )
    folder = FolderFactory(
        owner=personas["owner"],
        name="swarm-snap",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "hello.txt": "from the snapshot"},
    )
    created = create_service(api, folder, replicas=1, name="swarm-snap", resources={"cpu": 0.25, "mem": "256m"})
    sid = created["id"]
    by_endpoint = {"label": [f"serving.installation={settings.REDIS_PREFIX}", f"serving.endpoint={sid}"]}
    try:
        [route] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=120, what="a healthy Swarm replica")
        wait_for(lambda: system.proxy_routes(created["slug"]) == {route["id"]}, timeout=10, what="the proxy")
        assert fetch(f"{created['url']}/hello.txt") == "from the snapshot"

        # What it serves is the node worker's snapshot, not the web app's storage.
        snapshot = route["snapshot"]
        assert snapshot["state"] == "ready" and snapshot["folder"] == str(folder.pk)
        copy = far["cache"] / "snapshots" / str(folder.pk) / snapshot["digest"]
        assert (copy / "hello.txt").read_text() == "from the snapshot"
        assert not any(far["storage"].iterdir())
        service = client.services.get(Route.objects.get(pk=route["id"]).container_id)
        mounts = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Mounts"]
        [model] = [m for m in mounts if m["Target"] == "/models"]
        assert model["Source"] == str(copy) and model["ReadOnly"] is True
        assert not model["Source"].startswith(str(settings.STORAGE_ROOT))
    finally:
        system.stop_all()
        for service in client.services.list(filters=by_endpoint):
            service.remove()
        client.close()
