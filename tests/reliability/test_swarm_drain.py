"""A drained Swarm node's replica is replaced on another node of the group (issue 19), with the real
one-node swarm drained for a few seconds: a node worker on the Swarm engine (node "local", pinned to
the manager's own host) runs a replica; a second node worker ("b", the local engine) joins; the
Swarm node is drained. Its heartbeat marks node "local" unavailable, its sync sees the task ended,
and the platform starts the replacement on "b"; once the Swarm node is active again the mark clears.

Draining the swarm's only node stops every task on it, other runs' too: the drain lasts only until
the replacement is placed, and ``active`` is restored in a ``finally`` whatever happens.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from serving.models import Endpoint, Node, Route, ServiceEvent
from tests.live import wait_for
from tests.reliability.conftest import create_service, healthy_routes, monotonic, report_line
from tests.reliability.load import Load
from tests.reliability.test_swarm_service import simple_folder, swarm_or_skip


def set_availability(node_id: str, availability: str) -> None:
    subprocess.run(
        ["docker", "node", "update", "--availability", availability, node_id], check=True, capture_output=True
    )


@pytest.mark.slow
@pytest.mark.docker
def test_a_drained_swarm_nodes_replica_is_replaced_on_another_node(
    live: Any, api: Any, personas: dict[str, Any], settings: Any
) -> None:
    client = swarm_or_skip(settings)
    swarm = client.info()["Swarm"]
    node_id = swarm["NodeID"]
    hostname = client.nodes.get(node_id).attrs["Description"]["Hostname"]
    assert client.nodes.get(node_id).attrs["Spec"]["Availability"] == "active", "the swarm's node is not active"
    system = live(SERVING_ENGINE="swarm")
    created = create_service(
        api, simple_folder(personas["owner"]), replicas=1, name="drained-svc", resources={"cpu": 0.25, "mem": "256m"}
    )
    sid = created["id"]
    [first] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=120, what="a healthy Swarm replica")
    assert first["node"] == "local"
    system.start_node("b", SERVING_ENGINE="local")
    wait_for(lambda: Node.objects.filter(name="b", heartbeat_at__isnull=False).exists(), timeout=30, what="node b")

    with Load(created["url"], concurrency=1) as load:
        load.wait_requests(20)
        drained_at = monotonic()
        try:
            set_availability(node_id, "drain")
            placed = wait_for(
                lambda: Route.objects.filter(endpoint_id=sid, node__name="b").first(),
                timeout=60,
                what="the replacement placed on node b",
            )
            # The heartbeat may come a tick after the sync that saw the task end (the drain fell
            # between the two): the mark follows within a heartbeat.
            marked = wait_for(
                lambda: Node.objects.get(name="local").unavailable, timeout=15, what="node local marked drained"
            )
        finally:
            set_availability(node_id, "active")
        drained_for = monotonic() - drained_at
        replaced = wait_for(
            lambda: (r := healthy_routes(api, sid, 1)) and r[0]["id"] == str(placed.pk) and r,
            timeout=60,
            what="the replacement healthy on node b",
        )
        recovered = monotonic() - drained_at
        load.wait_requests(20)
    report_line(f"swarm: drain the replica's Swarm node ({drained_for:.1f} s drained)", load.report, recovered)

    said = list(ServiceEvent.objects.filter(endpoint_id=sid).order_by("created_at").values_list("kind", "message"))
    print("\n".join(f"  {kind}: {message}" for kind, message in said))  # the service's log, for the report
    assert replaced[0]["node"] == "b"
    assert marked == f"the Swarm node {hostname} is drained"
    # The sync says the node was drained, or (its look at the node a moment old) that Swarm shut the
    # task down there: either way the replica is recorded as ended because of the Swarm node.
    assert any(
        kind == "route_exited"
        and (
            f"the Swarm node {hostname} was drained" in message or f"Swarm shut its task down on {hostname}" in message
        )
        for kind, message in said
    ), said
    # Nothing was placed on the drained node meanwhile (its old route may be forgotten by now).
    on_drained = {
        str(pk) for pk in Route.objects.filter(endpoint_id=sid, node__name="local").values_list("pk", flat=True)
    }
    assert on_drained <= {first["id"]}
    assert Endpoint.objects.get(pk=sid).retries == 0, "a drained node is not the service's failed start"
    # Active again: the next heartbeat clears the mark by itself.
    wait_for(lambda: Node.objects.get(name="local").unavailable == "", timeout=15, what="the mark to clear")
    assert Node.objects.get(name="local").schedulable
