"""The metrics store, the proxy collector, the node sampler and the autoscaling tick against the real
Redis and DB, with an injected clock (no workers, no replicas: those are in test_autoscaling_live)."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from django.conf import settings

from serving.bus import metrics
from serving.bus.routing import get_redis
from serving.control import autoscaling
from serving.models import AutoScalingRule, Endpoint, Node, Route, RouteMember, ScalingEvent, ServiceEvent
from serving.node.engines.base import ReplicaStats
from serving.node.sampler import NodeSampler

pytestmark = pytest.mark.django_db

T0 = 1_800_000_000.0


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, tz=UTC)


@pytest.fixture
def endpoint(personas: dict[str, Any]) -> Endpoint:
    return Endpoint.objects.create(name="scaled", owner=personas["owner"], project=personas["project"])


@pytest.fixture(autouse=True)
def _no_reconcile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    kicked: list[str] = []
    monkeypatch.setattr("serving.bus.dispatch.enqueue_reconcile", kicked.append)
    return kicked


def add_rule(endpoint: Endpoint, **fields: Any) -> AutoScalingRule:
    values = {
        "direction": "out",
        "source": "proxy",
        "metric": "in_flight",
        "comparator": "GREATER_THAN",
        "threshold": 5,
        "step": 1,
        "min_replicas": 1,
        "max_replicas": 3,
        "cooldown": 30,
        "window": 20,
        **fields,
    }
    return AutoScalingRule.objects.create(endpoint=endpoint, **values)


def feed(endpoint: Endpoint, metric: str, values: list[tuple[float, float]], source: str = "proxy") -> None:
    metrics.record(
        [metrics.Point(source, str(endpoint.pk), metric, T0 + t, v) for t, v in values], now=T0 + values[-1][0]
    )


# --- the store ------------------------------------------------------------------------------------


def test_points_round_trip_and_old_ones_are_trimmed(endpoint: Endpoint) -> None:
    eid = str(endpoint.pk)
    metrics.record([metrics.Point("kernel", eid, "cpu_percent", T0, 10.0, "r1")], now=T0)
    metrics.record(
        [
            metrics.Point("kernel", eid, "cpu_percent", T0 + 700, 20.0, "r1"),
            metrics.Point("kernel", eid, "cpu_percent", T0 + 700, 40.0, "r2"),  # same time, other replica
        ],
        now=T0 + 700,
    )
    [samples] = metrics.read_many([(eid, "kernel", "cpu", T0 - 1000)], T0 + 1000)  # "cpu" is an alias
    assert sorted(samples) == [(T0 + 700, 20.0), (T0 + 700, 40.0)]  # the point 700 s old is gone
    key = metrics.series_key(settings.REDIS_PREFIX, "kernel", eid, "cpu_percent")
    assert 0 < get_redis().ttl(key) <= settings.METRICS_RETENTION + 60


def test_reading_values_alone_gives_the_values_of_the_same_window(endpoint: Endpoint) -> None:
    """The tick's read (values only, one string per window from Redis) selects exactly what the
    read with times does, bounds included, and skips a member it cannot read the same way."""
    eid = str(endpoint.pk)
    values = [0.1, 1e-05, 2.5e20, -3.0, 7.0, 0.30000000000000004]
    metrics.record([metrics.Point("proxy", eid, "rps", T0 + i, v) for i, v in enumerate(values)], now=T0 + 10)
    key = metrics.series_key(settings.REDIS_PREFIX, "proxy", eid, "rps")
    get_redis().zadd(key, {"garbage|x|": T0 + 2.5, "|T0|": T0 + 3.5})  # a foreign writer's members
    wanted = [(eid, "proxy", "rps", T0 + 1), (eid, "proxy", "rps", T0 + 100), (eid, "proxy", "nothing", T0)]
    with_times = metrics.read_many(wanted, T0 + 4)
    alone = metrics.read_many(wanted, T0 + 4, with_times=False)
    assert alone == [[v for _, v in samples] for samples in with_times]
    assert alone == [[1e-05, 2.5e20, -3.0, 7.0], [], []]  # T0 + 1 and T0 + 4 are inside


def test_the_chart_contract(endpoint: Endpoint, api: Any) -> None:
    eid = str(endpoint.pk)
    now = time.time()
    metrics.record(
        [
            metrics.Point("inference", eid, "llm_echo_requests_waiting", now - 10, 2.0, "r1"),
            metrics.Point("inference", eid, "llm_echo_requests_waiting", now - 10, 4.0, "r2"),
            metrics.Point("inference", eid, "llm_echo_requests_waiting", now - 5, 1.0, "r1"),
            metrics.Point("proxy", eid, "rps", now - 5, 7.5),
            metrics.Point("proxy", eid, "rps", now - 900, 1.0),  # outside any window
        ],
        now=now,
    )
    body = api("teammate").get(f"/api/v1/services/{eid}/metrics/?source=inference&window=600").json()
    assert list(body) == ["series"]
    series = body["series"]["inference:llm_echo_requests_waiting"]
    assert [v for _, v in series] == [3.0, 1.0]  # replicas of a round averaged
    assert all(isinstance(t, float) and now - 11 < t <= now for t, _ in series)
    assert "proxy:rps" not in body["series"]
    everything = api("owner").get(f"/api/v1/services/{eid}/metrics/").json()["series"]
    assert [v for _, v in everything["proxy:rps"]] == [7.5]
    assert set(everything) == {"proxy:rps", "inference:llm_echo_requests_waiting"}
    short = api("owner").get(f"/api/v1/services/{eid}/metrics/?window=7").json()["series"]
    assert [v for _, v in short["inference:llm_echo_requests_waiting"]] == [1.0]
    assert api("stranger").get(f"/api/v1/services/{eid}/metrics/").status_code == 404
    assert api(None).get(f"/api/v1/services/{eid}/metrics/").status_code in (401, 403)
    bad = api("owner").get(f"/api/v1/services/{eid}/metrics/?source=gpu&window=9999")
    assert bad.status_code == 400 and {"source", "window"} <= set(bad.json())


def test_proxy_stats_become_series_and_idle_endpoints_read_zero(endpoint: Endpoint, personas: dict[str, Any]) -> None:
    idle = Endpoint.objects.create(name="idle-one", owner=personas["owner"])
    client, prefix = get_redis(), settings.REDIS_PREFIX
    sample = {"t": T0, "window": 2.0, "rps": 4.0, "in_flight": 3, "p95_ms": 12.5, "errors_per_s": 0.0}
    client.hset(f"{prefix}:proxy:stats:{endpoint.slug}", mapping={"p1": json.dumps(sample), "p2": json.dumps(sample)})
    assert metrics.collect_proxy(now=T0 + 1) == 10
    got = metrics.read_many(
        [(str(endpoint.pk), "proxy", "in_flight", T0), (str(idle.pk), "proxy", "in_flight", T0)], T0 + 2
    )
    assert got == [[(T0 + 1, 6.0)], [(T0 + 1, 0.0)]]
    client.delete(f"{prefix}:proxy:stats:{endpoint.slug}")
    assert metrics.collect_proxy(now=T0 + 3) == 0  # no proxy reports at all: no data, not zeros


# --- the node sampler -----------------------------------------------------------------------------


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b"# TYPE llm_echo_requests_waiting gauge\nllm_echo_requests_waiting 4\n"

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/metrics" else 404)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[tuple[int, int]]:
    """(a /metrics server, a port that accepts connections and never answers)."""
    good = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=good.serve_forever, daemon=True).start()
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        yield good.server_address[1], hung.getsockname()[1]
    finally:
        good.shutdown()
        hung.close()


class FakeEngine:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def stats(self, replica_id: str) -> ReplicaStats:
        self.calls.append(replica_id)
        if replica_id == "hung":
            self.release.wait(10)
        return ReplicaStats(cpu_percent=50.0, mem_bytes=100, mem_limit_bytes=400)


@pytest.mark.django_db(transaction=True)  # the sampler reads the routes from its own threads
def test_the_node_sampler_is_bounded_by_hung_replicas(
    endpoint: Endpoint, servers: tuple[int, int], settings: Any
) -> None:
    settings.METRICS_TIMEOUT = 0.5
    good_port, hung_port = servers
    node = Node.objects.create(name="n1")
    other = Node.objects.create(name="n2")
    common = {"endpoint": endpoint, "host": "127.0.0.1"}
    ok = Route.objects.create(node=node, status="healthy", container_id="ok", port=good_port, **common)
    Route.objects.create(node=node, status="healthy", container_id="hung", port=hung_port, **common)
    Route.objects.create(node=node, status="degraded", container_id="young", port=good_port, **common)
    Route.objects.create(node=other, status="healthy", container_id="elsewhere", port=good_port, **common)
    engine = FakeEngine()
    sampler = NodeSampler("n1", engine=lambda: engine, clock=lambda: T0)

    async def rounds() -> tuple[list[metrics.Point], list[metrics.Point], float]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            first = await sampler.sample(session)
            took = time.monotonic() - started
            second = await sampler.sample(session)
        return first, second, took

    try:
        first, second, took = asyncio.run(rounds())
    finally:
        engine.release.set()
        sampler.stop()
    assert took < 1.5  # the hung scrape and the hung engine call each cost one timeout, at once
    inference = [p for p in first if p.source == "inference"]
    assert [(p.metric, p.value, p.replica) for p in inference] == [("llm_echo_requests_waiting", 4.0, str(ok.pk)[:8])]
    kernel = {(p.replica, p.metric): p.value for p in first if p.source == "kernel"}
    assert len(kernel) == 6  # ok and young (degraded: kernel only); the hung one timed out
    assert all(p.t == T0 and p.endpoint_id == str(endpoint.pk) for p in first)
    assert engine.calls.count("hung") == 1  # round two skipped the replica whose call still hangs
    assert "elsewhere" not in engine.calls
    assert len([p for p in second if p.source == "kernel"]) == 6


# --- the tick -------------------------------------------------------------------------------------


def events(endpoint: Endpoint) -> list[tuple[Any, ...]]:
    return [
        (e.rule_id, e.acted, e.old_replicas, e.new_replicas, e.reason.split(" (")[0])
        for e in ScalingEvent.objects.filter(endpoint=endpoint).order_by("created_at", "id")
    ]


def test_the_tick_scales_by_compare_and_set_and_records_each_decision_once(
    endpoint: Endpoint, _no_reconcile: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    out = add_rule(endpoint)
    scale_in = add_rule(endpoint, direction="in", comparator="LESS_THAN", threshold=1, step=-1, cooldown=60, window=20)
    # No data yet: nothing moves, each rule says so once.
    assert autoscaling.tick(at(0)) == 0
    assert autoscaling.tick(at(5)) == 0
    assert events(endpoint) == [
        (out.pk, False, 1, 1, "no data for in_flight in the last 20 s"),
        (scale_in.pk, False, 1, 1, "no data for in_flight in the last 20 s"),
    ]
    # Load: 1 -> 2 at once, the reconcile is kicked, the rule and the endpoint remember when.
    feed(endpoint, "in_flight", [(6, 8.0), (8, 9.0)])
    with django_capture_on_commit_callbacks(execute=True):
        assert autoscaling.tick(at(10)) == 1
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 2 and endpoint.last_scaled_at == at(10)
    assert _no_reconcile == [str(endpoint.pk)]
    acted = ScalingEvent.objects.get(endpoint=endpoint, acted=True)
    assert (acted.observed, acted.window, acted.metric) == (8.5, 20, "proxy:in_flight")
    assert acted.reason == "in_flight 8.5 > 5 (average over 20 s): replicas 1 -> 2"
    assert ServiceEvent.objects.filter(endpoint=endpoint, kind="scaled").exists()
    out.refresh_from_db()
    assert out.last_triggered_at == at(10) and out.last_decision.startswith("in_flight 8.5")
    # Still loaded, inside the rule's cooldown: one "rule cooldown" record, not one per tick.
    feed(endpoint, "in_flight", [(12, 9.0)])
    assert autoscaling.tick(at(15)) == 0
    assert autoscaling.tick(at(20)) == 0
    assert [e[4] for e in events(endpoint)].count("rule cooldown") == 1
    out.refresh_from_db()
    assert out.last_decision == "rule cooldown"
    # Cooldown over: 2 -> 3; then the maximum holds it.
    feed(endpoint, "in_flight", [(40, 9.0)])
    assert autoscaling.tick(at(41)) == 1
    feed(endpoint, "in_flight", [(75, 9.0)])
    assert autoscaling.tick(at(76)) == 0
    assert events(endpoint)[-1][4] == "already at the rule's maximum"
    # Idle: scale-in waits the service cooldown (60 s, the longest rule's) after the last scaling.
    feed(endpoint, "in_flight", [(95, 0.0)])
    assert autoscaling.tick(at(99)) == 0
    assert events(endpoint)[-1][4] == "service cooldown after the last scaling"
    feed(endpoint, "in_flight", [(101, 0.0)])
    assert autoscaling.tick(at(102)) == 1
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 2
    scale_in.refresh_from_db()
    assert scale_in.last_triggered_at == at(102)


def test_a_count_changed_meanwhile_is_not_overwritten(endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    rule = add_rule(endpoint)
    feed(endpoint, "in_flight", [(1, 9.0)])
    read = metrics.read_many

    def user_scales_meanwhile(*args: Any, **kwargs: Any) -> Any:
        Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=3)
        return read(*args, **kwargs)

    monkeypatch.setattr(metrics, "read_many", user_scales_meanwhile)
    assert autoscaling.tick(at(2)) == 0
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 3
    assert events(endpoint) == [(rule.pk, False, 1, 1, "the count changed meanwhile")]
    rule.refresh_from_db()
    assert rule.last_triggered_at is None


def test_disabled_rules_and_destroyed_services(endpoint: Endpoint, personas: dict[str, Any]) -> None:
    rule = add_rule(endpoint, enabled=False)
    feed(endpoint, "in_flight", [(1, 9.0)])
    assert autoscaling.tick(at(2)) == 0
    assert events(endpoint) == [(rule.pk, False, 1, 1, "the rule is disabled")]
    gone = Endpoint.objects.create(name="gone-svc", owner=personas["owner"], lifecycle="destroyed")
    add_rule(gone)
    feed(gone, "in_flight", [(1, 9.0)])
    assert autoscaling.tick(at(3)) == 0
    assert not ScalingEvent.objects.filter(endpoint=gone).exists()


def test_the_service_cooldown_setting_and_rules_through_the_api(endpoint: Endpoint, api: Any) -> None:
    eid = str(endpoint.pk)
    response = api("owner").patch(f"/api/v1/services/{eid}/", {"scaling_cooldown": 5}, format="json")
    assert response.status_code == 200 and response.json()["scaling_cooldown"] == 5
    bad = api("owner").post(
        f"/api/v1/services/{eid}/rules/",
        {"direction": "out", "source": "proxy", "metric": "rps", "comparator": "GREATER_THAN", "threshold": "x"},
        format="json",
    )
    assert bad.status_code == 400 and {"threshold", "step"} <= set(bad.json())
    created = api("owner").post(
        f"/api/v1/services/{eid}/rules/",
        {
            "direction": "out",
            "source": "inference",
            "metric": "llm_echo_requests_waiting",
            "comparator": "GREATER_THAN_OR_EQUAL",
            "threshold": 2,
            "step": 2,
            "max_replicas": 4,
            "aggregation": "max",
            "window": 10,
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert created.json()["cooldown"] == 300 and created.json()["last_decision"] == ""
    feed(endpoint, "llm_echo_requests_waiting", [(1, 0.0), (2, 2.0)], source="inference")
    assert autoscaling.tick(at(3)) == 1
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 3
    rule = api("owner").get(f"/api/v1/services/{eid}/rules/{created.json()['id']}/").json()
    assert rule["last_decision"].startswith("llm_echo_requests_waiting 2 >= 2 (maximum over 10 s)")
    shown = api("teammate").get(f"/api/v1/services/{eid}/scaling-events/").json()
    assert shown[0]["acted"] and shown[0]["observed"] == 2.0 and shown[0]["window"] == 10
    assert shown[0]["rule"]["metric"] == "llm_echo_requests_waiting"
    schema = api("owner").get("/api/schema/").content.decode()
    assert "clamped" in schema


@pytest.mark.django_db(transaction=True)
def test_the_node_sampler_counts_every_container_of_a_cluster(endpoint: Endpoint, servers: tuple[int, int]) -> None:
    """S6.1: kernel metrics are over every container backing the endpoint, so a cluster's sub members
    on this node are sampled too (kernel only: main alone serves and has /metrics)."""
    good_port, _ = servers
    here = Node.objects.create(name="n1")
    there = Node.objects.create(name="n2")
    route = Route.objects.create(
        endpoint=endpoint, node=there, status="healthy", container_id="main", host="127.0.0.1", port=good_port
    )
    RouteMember.objects.create(route=route, idx=1, node=here, status="running", container_id="sub-1", port=good_port)
    RouteMember.objects.create(route=route, idx=2, node=here, status="pending")
    RouteMember.objects.create(route=route, idx=3, node=there, status="running", container_id="sub-3")
    gone = Route.objects.create(endpoint=endpoint, node=there, status="terminating", container_id="old")
    RouteMember.objects.create(route=gone, idx=1, node=here, status="running", container_id="sub-old")
    engine = FakeEngine()
    sampler = NodeSampler("n1", engine=lambda: engine, clock=lambda: T0)

    async def one_round() -> list[metrics.Point]:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await sampler.sample(session)

    try:
        points = asyncio.run(one_round())
    finally:
        sampler.stop()
    assert engine.calls == ["sub-1"]
    assert {(p.source, p.replica) for p in points} == {("kernel", f"{str(route.pk)[:8]}.sub1")}
    assert {p.metric for p in points} == {"cpu_percent", "mem_bytes", "mem_percent"}


@pytest.mark.parametrize("count", [20, 120])
def test_a_tick_costs_a_bounded_number_of_queries(
    personas: dict[str, Any],
    _no_reconcile: list[str],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
) -> None:
    """However many services scale in one tick, the tick's writes are a handful of bulk queries
    (issue 21), and each scaled service gets what a tick that scales one gets; a count a user
    changed meanwhile is still left alone, the others of the batch scale."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    endpoints = [
        Endpoint.objects.create(name=f"fleet-{i:03d}", owner=personas["owner"], project=personas["project"])
        for i in range(count)
    ]
    rules = {e.pk: add_rule(e) for e in endpoints}
    for e in endpoints:
        feed(e, "in_flight", [(1, 1.0)])
    autoscaling.tick(at(2))  # every rule's first state

    with CaptureQueriesContext(connection) as steady:
        assert autoscaling.tick(at(3)) == 0
    assert len(steady.captured_queries) <= 4

    hot, meddled = endpoints[: count // 4], endpoints[0]
    for e in hot:
        feed(e, "in_flight", [(4, 50.0)])
    read = metrics.read_many

    def user_scales_meanwhile(*args: Any, **kwargs: Any) -> Any:
        Endpoint.objects.filter(pk=meddled.pk).update(desired_replicas=3)
        return read(*args, **kwargs)

    monkeypatch.setattr(metrics, "read_many", user_scales_meanwhile)
    with CaptureQueriesContext(connection) as scaling, django_capture_on_commit_callbacks(execute=True):
        assert autoscaling.tick(at(5)) == len(hot) - 1
    assert len(scaling.captured_queries) <= 16, [q["sql"][:80] for q in scaling.captured_queries]

    scaled = [e for e in hot if e is not meddled]
    assert sorted(_no_reconcile) == sorted(str(e.pk) for e in scaled)
    assert set(Endpoint.objects.filter(desired_replicas=2).values_list("pk", flat=True)) == {e.pk for e in scaled}
    assert Endpoint.objects.get(pk=meddled.pk).desired_replicas == 3
    for e in scaled:
        assert events(e)[-1] == (rules[e.pk].pk, True, 1, 2, "in_flight 25.5 > 5")
        rule = AutoScalingRule.objects.get(pk=rules[e.pk].pk)
        assert rule.last_triggered_at == at(5) and rule.last_decision.startswith("in_flight 25.5 > 5")
        [line] = ServiceEvent.objects.filter(endpoint=e, kind="scaled")
        assert line.data == {"old": 1, "new": 2, "rule_id": rule.pk}
    assert events(meddled)[-1] == (rules[meddled.pk].pk, False, 1, 1, "the count changed meanwhile")
    assert AutoScalingRule.objects.get(pk=rules[meddled.pk].pk).last_triggered_at is None
    assert not ServiceEvent.objects.filter(endpoint=meddled, kind="scaled").exists()


class _NoMetrics(http.server.BaseHTTPRequestHandler):
    """A server without /metrics (python -m http.server, most custom ones): counts what it is asked."""

    asked: list[str] = []

    def do_GET(self) -> None:
        self.asked.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.django_db(transaction=True)  # the sampler reads the routes from its own threads
def test_a_replica_without_metrics_is_asked_again_only_now_and_then(endpoint: Endpoint) -> None:
    """Every round asked it, and each 404 was a line in the owner's replica log (12 a minute)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node = Node.objects.create(name="n1")
    Route.objects.create(
        endpoint=endpoint, node=node, status="healthy", container_id="plain", host="127.0.0.1",
        port=server.server_address[1],
    )  # fmt: skip
    now = [T0]
    sampler = NodeSampler("n1", engine=FakeEngine, clock=lambda: now[0])

    async def round_at(t: float) -> None:
        import aiohttp

        now[0] = t
        async with aiohttp.ClientSession() as session:
            await sampler.sample(session)

    try:
        for t in (0.0, 5.0, 10.0, 59.0):
            asyncio.run(round_at(T0 + t))
        assert _NoMetrics.asked == ["/metrics"]  # once, then not every 5 s round
        asyncio.run(round_at(T0 + 60.0))
        assert _NoMetrics.asked == ["/metrics", "/metrics"]  # a minute later, in case it gained one
    finally:
        sampler.stop()
        server.shutdown()
