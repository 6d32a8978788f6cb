"""The reconcile tick over many endpoints (``lifecycle.reconcile_many``, issue 21): its cost is a
bounded number of queries however many endpoints it covers or replaces replicas of, and batching
the work changes nothing a single reconcile would do (capacity, spread, events, what is sent).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from serving.bus import dispatch, events
from serving.control import lifecycle, scheduler
from serving.models import Endpoint, Node, Route, ServiceEvent

pytestmark = pytest.mark.django_db

# Queries of one tick, whatever the number of endpoints: the bulk read (6), then per batch of
# lifecycle.BATCH endpoints with work the locked read, the node pool and the bulk writes (~12).
MAX_QUERIES_STEADY = 8
MAX_QUERIES_CHURNED = 25


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """The tick's messages to nodes, proxies and pages, recorded instead of sent."""
    out: dict[str, list[Any]] = {"start": [], "stop": [], "changed": []}
    monkeypatch.setattr(dispatch, "send_start", out["start"].append)
    monkeypatch.setattr(dispatch, "send_stop", lambda route, countdown=0.0: out["stop"].append((route, countdown)))
    monkeypatch.setattr(events, "after_routes_changed", out["changed"].append)
    return out


@pytest.fixture
def tick(django_capture_on_commit_callbacks: Any) -> Callable[[list[Any] | None], int]:
    """One reconcile tick (over every live endpoint, or ``ids``), its on-commit work run."""

    def run(ids: list[Any] | None = None) -> int:
        with django_capture_on_commit_callbacks(execute=True):
            return lifecycle.reconcile_many(lifecycle.active_endpoint_ids() if ids is None else ids)

    return run


def make_fleet(owner: Any, count: int, routes_per: int, nodes: list[Node]) -> list[Any]:
    now = timezone.now()
    rows = [
        Endpoint(
            name=f"fleet-{i:04d}",
            slug=f"f{uuid.uuid4().hex[:12]}",
            owner=owner,
            desired_replicas=routes_per,
            resources={"cpu": 1.0, "mem": 1.0},
        )
        for i in range(count)
    ]
    Endpoint.objects.bulk_create(rows)
    Route.objects.bulk_create(
        Route(
            endpoint=endpoint,
            node=nodes[n % len(nodes)],
            status=Route.Status.HEALTHY,
            container_id=f"c-{endpoint.pk}-{n}",
            host="127.0.0.1",
            port=20000 + n,
            resources={"cpu": 1.0, "mem": 1.0},
            started_at=now,
            healthy_since=now,
        )
        for endpoint in rows
        for n in range(routes_per)
    )
    return [e.pk for e in rows]


def big_node(name: str) -> Node:
    return Node.objects.create(name=name, capacity={"cpu": 1e6, "mem": 1e15}, heartbeat_at=timezone.now())


def lose_one_replica(endpoint_ids: list[Any]) -> None:
    first = [Route.objects.filter(endpoint_id=pk).values_list("pk", flat=True).first() for pk in endpoint_ids]
    Route.objects.filter(pk__in=first).delete()


@pytest.mark.parametrize("count", [30, 250])
def test_a_tick_costs_a_bounded_number_of_queries(
    personas: dict[str, Any], sent: dict[str, list[Any]], tick: Callable[..., int], count: int
) -> None:
    node = big_node("fake")
    ids = make_fleet(personas["owner"], count, 3, [node])
    assert tick(ids) == count  # settle (nothing to do)

    with CaptureQueriesContext(connection) as steady:
        assert tick() == count
    assert len(steady.captured_queries) <= MAX_QUERIES_STEADY
    assert sent == {"start": [], "stop": [], "changed": []}

    victims = ids[: count // 10]
    lose_one_replica(victims)
    with CaptureQueriesContext(connection) as churned:
        assert tick() == count
    assert len(churned.captured_queries) <= MAX_QUERIES_CHURNED, [q["sql"][:80] for q in churned.captured_queries]

    # What one reconcile per endpoint did: a new replica for each victim, on the node, started once,
    # announced once, with its event.
    created = Route.objects.filter(status=Route.Status.PROVISIONING)
    assert sorted(str(r.endpoint_id) for r in created) == sorted(str(v) for v in victims)
    assert {r.node_id for r in created} == {node.pk}
    assert sorted(str(r.pk) for r in sent["start"]) == sorted(str(r.pk) for r in created)
    assert sorted(sent["changed"]) == sorted(str(v) for v in victims)
    events = ServiceEvent.objects.filter(kind="route_created")
    assert sorted(str(e.route_id) for e in events) == sorted(str(r.pk) for r in created)
    assert all(e.message == f"Replica {str(e.route_id)[:8]} placed on node fake." for e in events)

    # And the next tick has nothing left to do.
    sent["start"].clear()
    sent["changed"].clear()
    tick()
    assert sent == {"start": [], "stop": [], "changed": []}


def test_a_batch_never_places_more_than_the_nodes_hold(
    personas: dict[str, Any], sent: dict[str, list[Any]], tick: Callable[..., int]
) -> None:
    """Placements of one batch count against each other: 5 free CPUs, 8 replicas asked -> 5 placed."""
    small = Node.objects.create(name="small", capacity={"cpu": 6.0, "mem": 1e15}, heartbeat_at=timezone.now())
    ids = make_fleet(personas["owner"], 8, 1, [small])
    Route.objects.filter(endpoint_id__in=ids[1:]).delete()  # one replica holds 1 CPU; 7 lost theirs
    Endpoint.objects.filter(pk=ids[0]).update(desired_replicas=2)
    tick(ids)
    placed = Route.objects.filter(status=Route.Status.PROVISIONING)
    failed = Route.objects.filter(status=Route.Status.FAILED_TO_START)
    assert placed.count() == 5 and failed.count() == 3
    assert all("Not enough resources" in r.error["message"] for r in failed)
    assert len(sent["start"]) == 5


def test_a_batch_spreads_an_endpoints_replicas(
    personas: dict[str, Any], sent: dict[str, list[Any]], tick: Callable[..., int]
) -> None:
    """The replicas one endpoint gets in a batch go to different nodes, as one by one (S4.4)."""
    nodes = [big_node("n1"), big_node("n2"), big_node("n3")]
    ids = make_fleet(personas["owner"], 4, 0, nodes)
    Endpoint.objects.filter(pk__in=ids).update(desired_replicas=3)
    tick(ids)
    for pk in ids:
        assert sorted(Route.objects.filter(endpoint_id=pk).values_list("node__name", flat=True)) == ["n1", "n2", "n3"]


def test_one_failing_endpoint_does_not_stop_the_others(
    personas: dict[str, Any], sent: dict[str, list[Any]], tick: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails is rolled back and its endpoints are reconciled one by one: only the
    broken one is left for the next tick."""
    big_node("fake")
    ids = make_fleet(personas["owner"], 5, 0, [])
    Endpoint.objects.filter(pk__in=ids).update(desired_replicas=1)
    broken = str(ids[2])
    real = scheduler.replica_request

    def replica_request(endpoint: Endpoint) -> dict[str, float]:
        if str(endpoint.pk) == broken:
            raise RuntimeError("boom")
        return real(endpoint)

    monkeypatch.setattr(scheduler, "replica_request", replica_request)
    assert tick(ids) == 4
    assert sorted(str(pk) for pk in Route.objects.values_list("endpoint_id", flat=True)) == sorted(
        str(pk) for pk in ids if str(pk) != broken
    )
    assert len(sent["start"]) == 4
