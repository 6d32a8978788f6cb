"""A node worker whose Swarm node can take no replica says so with its heartbeat, and the platform
places the replicas on another node of the group (issue 19), against the real one-node swarm.

Its one Swarm node is the manager's own, and other runs use it: these tests never drain it. A node
worker pinned (``SWARM_NODE``) to a host name the swarm does not have stands for an unavailable
Swarm node here: the engine, the heartbeat, the scheduler and the start are the same as for a
drained one (``tests/reliability/test_swarm_drain.py`` drains the real node, briefly, once).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from serving.models import Endpoint, Node, Route
from serving.node import agent, routes
from serving.node import engine as node_engine
from serving.node.engines.swarm.engine import SwarmEngine
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import LiveSystem, wait_for

pytestmark = pytest.mark.docker

RUN_ID = uuid.uuid4().hex[:8]
NOWHERE = f"ms-drain-nowhere-{RUN_ID}"  # a host name no node of the swarm has


def swarm_or_skip() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=30)
        swarm = client.info().get("Swarm") or {}
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc} (start one with scripts/docker-up.sh as root)")
    if not swarm.get("ControlAvailable"):
        pytest.skip(f"the Docker engine is not a swarm manager ({swarm.get('LocalNodeState')}): docker swarm init")
    return client


def test_the_engine_says_whether_its_swarm_node_takes_replicas() -> None:
    swarm_or_skip()
    said = SwarmEngine(placement_node=NOWHERE).unavailable()
    assert said.startswith(f"the Swarm node {NOWHERE} is not in the swarm"), said
    # Pinned to the manager's own host (the default), which is ready and active.
    assert SwarmEngine().unavailable() == ""


@pytest.mark.django_db
def test_heartbeats_mark_the_node_and_a_start_placed_there_fails_without_counting(
    settings: Any, api: Any, personas: Any, tmp_path: Any
) -> None:
    client = swarm_or_skip()
    settings.NODE_NAME = f"sw-{RUN_ID}"
    engine = SwarmEngine(placement_node=NOWHERE, installation=settings.REDIS_PREFIX, state_dir=tmp_path / "swarm")
    node_engine.set_engine(engine)
    try:
        first = timezone.now()
        agent.heartbeat(first)
        agent.heartbeat(first + timedelta(seconds=10))
        here = Node.objects.get(name=settings.NODE_NAME)
        assert here.unavailable.startswith(f"the Swarm node {NOWHERE} is not in the swarm")
        assert here.unavailable_since == first, "since when it is unavailable, not since the last heartbeat"
        assert here.schedulable, "the engine never writes the operator's flag"

        # A route placed before the scheduler knew (here: by hand) is failed at once, not counted.
        folder = FolderFactory(
            owner=personas["owner"], name="nowhere", files={"model-definition.yaml": SIMPLE_DEFINITION}
        )
        body = {"name": "nowhere", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
        created = api("owner").post("/api/v1/services/", body, format="json")
        assert created.status_code == 201, created.json()
        endpoint = Endpoint.objects.get(pk=created.json()["id"])
        route = Route.objects.create(endpoint=endpoint, node=here)
        routes.start_route(str(route.pk))
    finally:
        node_engine.set_engine(None)
    route.refresh_from_db()
    endpoint.refresh_from_db()
    assert route.status == Route.Status.FAILED_TO_START
    assert route.error["kind"] == "node_unavailable"
    assert f"node {settings.NODE_NAME} can take no new replicas now: the Swarm node {NOWHERE}" in route.error["message"]
    assert endpoint.retries == 0
    assert not client.services.list(filters={"label": f"serving.endpoint={endpoint.pk}"}), "no service was made"

    # The node is back (here: the engine pinned to the manager's own host): the mark clears.
    node_engine.set_engine(SwarmEngine(installation=settings.REDIS_PREFIX, state_dir=tmp_path / "swarm"))
    try:
        agent.heartbeat()
    finally:
        node_engine.set_engine(None)
    here.refresh_from_db()
    assert here.unavailable == "" and here.unavailable_since is None


def test_a_service_goes_to_the_other_node_while_the_swarm_node_is_unavailable(
    live_factory: Callable[..., LiveSystem], api: Any, personas: Any
) -> None:
    """Two real node workers: "sw" on the Swarm engine, pinned nowhere, and "b" on the local engine."""
    swarm_or_skip()
    live_factory(nodes={"sw": {"SERVING_ENGINE": "swarm", "SWARM_NODE": NOWHERE}, "b": {"SERVING_ENGINE": "local"}})
    wait_for(
        lambda: Node.objects.filter(name="sw").exclude(unavailable="").exists(),
        timeout=30,
        what="node sw's heartbeat to say its Swarm node is not in the swarm",
    )
    folder = FolderFactory(
        owner=personas["owner"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "index.html": "hello from node b"},
    )
    body = {"name": "elsewhere", "folder": str(folder.pk), "replicas": 2}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    sid = created.json()["id"]

    def healthy() -> list[dict[str, Any]] | None:
        shown = [r for r in api("owner").get(f"/api/v1/services/{sid}/").json()["routes"] if r["status"] == "healthy"]
        return shown if len(shown) == 2 else None

    shown = wait_for(healthy, timeout=60, what="2 healthy replicas")
    assert {r["node"] for r in shown} == {"b"}
    # Nothing was ever placed on sw (not even a failed start).
    assert not Route.objects.filter(endpoint_id=sid, node__name="sw").exists()
    assert Node.objects.get(name="sw").unavailable.startswith(f"the Swarm node {NOWHERE} is not in the swarm")
    assert Node.objects.get(name="sw").is_alive(), "alive, only unavailable"
