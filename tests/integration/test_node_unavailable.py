"""A node whose engine says it can take no replica now (``Node.unavailable``: a drained Swarm node) gets
none; the replicas go to another node of the group, or wait saying why; the mark is shown to the
operator (admin, API, /metrics) and clears by itself (issue 19). Real database and Redis; the
Swarm parts are in test_engine_swarm.py and tests/reliability/test_swarm_drain.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from serving.control import lifecycle
from serving.models import Endpoint, Node, Route, ServiceEvent
from serving.node import agent
from serving.node import engine as node_engine
from serving.node.engines.local.engine import LocalEngine

pytestmark = pytest.mark.django_db

DRAINED = "the Swarm node worker-2 is drained"


def node(name: str, unavailable: str = "", **fields: Any) -> Node:
    now = timezone.now()
    return Node.objects.create(
        name=name,
        capacity={"cpu": 8.0, "mem": 2.0**34},
        heartbeat_at=now,
        unavailable=unavailable,
        unavailable_since=now - timedelta(minutes=3) if unavailable else None,
        **fields,
    )


def service(personas: dict[str, Any], replicas: int, **fields: Any) -> Endpoint:
    return Endpoint.objects.create(
        name="drained", owner=personas["owner"], project=personas["project"], desired_replicas=replicas, **fields
    )


def placed(endpoint: Endpoint) -> list[str]:
    return sorted(
        r.node.name for r in Route.objects.filter(endpoint=endpoint, status=Route.Status.PROVISIONING) if r.node
    )


def waiting(endpoint: Endpoint) -> list[str]:
    return list(
        ServiceEvent.objects.filter(endpoint=endpoint, kind="waiting_for_node")
        .order_by("created_at")
        .values_list("message", flat=True)
    )


def test_an_unavailable_node_gets_no_new_replica_and_another_node_gets_them(personas: dict[str, Any]) -> None:
    node("sw", DRAINED)
    node("b")
    endpoint = service(personas, 2)
    lifecycle.reconcile(str(endpoint.pk))
    # The scheduler spreads a service's replicas: only the mark keeps the second one off "sw".
    assert placed(endpoint) == ["b", "b"]
    assert not waiting(endpoint)

    # The Swarm node is active again: its next heartbeat clears the mark, and sw takes replicas.
    Node.objects.filter(name="sw").update(unavailable="", unavailable_since=None)
    Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=3)
    lifecycle.reconcile(str(endpoint.pk))
    assert placed(endpoint) == ["b", "b", "sw"]


@pytest.mark.parametrize("cluster_size", [1, 2])
def test_with_every_node_unavailable_the_replicas_wait_and_say_why(personas: dict[str, Any], cluster_size: int) -> None:
    node("sw", DRAINED)
    node("cordoned", schedulable=False)  # the operator's cordon is not named: the operator chose it
    endpoint = service(personas, 2, cluster_size=cluster_size)
    now = timezone.now()
    for tick in range(3):
        lifecycle.reconcile(str(endpoint.pk), now=now + timedelta(seconds=5 * tick))
    endpoint.refresh_from_db()
    assert not Route.objects.filter(endpoint=endpoint).exists()
    assert endpoint.retries == 0 and not endpoint.gave_up, "waiting is not a failed start"
    [said] = waiting(endpoint)  # once, not at every tick
    assert said.startswith("No node can take this replica in resource group 'default' now")
    assert f"node sw: {DRAINED}" in said and "cordoned" not in said
    assert said.endswith("Its replicas are placed as soon as a node can take them.")

    Node.objects.filter(name="sw").update(unavailable="", unavailable_since=None)
    lifecycle.reconcile(str(endpoint.pk), now=now + timedelta(seconds=20))
    assert placed(endpoint) == ["sw", "sw"]


def test_a_full_node_beside_an_unavailable_one_makes_the_replica_wait_not_fail(personas: dict[str, Any]) -> None:
    """The drained node comes back: failing meanwhile would count towards giving up (S4.4)."""
    node("sw", DRAINED)
    Node.objects.create(name="small", capacity={"cpu": 0.5, "mem": 2.0**34}, heartbeat_at=timezone.now())
    endpoint = service(personas, 1)
    lifecycle.reconcile(str(endpoint.pk))
    assert not Route.objects.filter(endpoint=endpoint).exists()
    [said] = waiting(endpoint)
    assert f"node sw: {DRAINED}" in said and "the others (small) have not enough free for cpu 1" in said


def test_a_new_reason_to_wait_is_said_at_once(personas: dict[str, Any]) -> None:
    endpoint = service(personas, 1)
    now = timezone.now()
    lifecycle.reconcile(str(endpoint.pk), now=now)  # no node at all
    node("sw", DRAINED)  # a node reports in, drained
    lifecycle.reconcile(str(endpoint.pk), now=now + timedelta(seconds=5))
    first, second = waiting(endpoint)
    assert first.startswith("No node is available") and DRAINED in second


def test_a_heartbeat_writes_what_the_engine_says_and_clears_a_stale_mark(settings: Any, tmp_path: Any) -> None:
    """The local engine always takes replicas: its heartbeat clears a mark left by an engine before."""
    settings.NODE_NAME = "here"
    node("here", DRAINED)
    node_engine.set_engine(LocalEngine(state_dir=tmp_path / "local"))
    try:
        agent.heartbeat()
    finally:
        node_engine.set_engine(None)
    here = Node.objects.get(name="here")
    assert here.unavailable == "" and here.unavailable_since is None


def test_admin_api_and_metrics_show_the_mark(api: Any, browser: Any, personas: dict[str, Any]) -> None:
    node("sw", DRAINED)
    node("b")
    listed = browser("admin").get("/admin/serving/node/")
    assert listed.status_code == 200
    page = listed.content.decode()
    assert DRAINED in page and "(since " in page
    assert browser("owner").get("/admin/serving/node/").status_code == 302  # staff only
    for who in ("owner", "teammate", "stranger", "admin"):
        shown = {n["name"]: n for n in api(who).get("/api/v1/nodes/").json()}
        assert shown["sw"]["unavailable"] == DRAINED and shown["sw"]["unavailable_since"]
        assert shown["sw"]["schedulable"] is True, "the engine never writes the operator's flag"
        assert shown["b"]["unavailable"] == "" and shown["b"]["unavailable_since"] is None
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(Client().get("/metrics").content.decode())
        for sample in family.samples
    }
    assert samples[("modelserve_node_schedulable", (("node", "sw"),))] == 0
    assert samples[("modelserve_node_unavailable", (("node", "sw"),))] == 1
    assert samples[("modelserve_node_schedulable", (("node", "b"),))] == 1
    assert samples[("modelserve_node_unavailable", (("node", "b"),))] == 0
