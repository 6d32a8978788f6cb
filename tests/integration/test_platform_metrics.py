"""The platform's /metrics and /metrics/sd (serving/web/metrics.py, serving/bus/telemetry.py) and the
Grafana dashboard (docs/grafana/modelserve.json): real database, real Redis, a real proxy process."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from serving.bus import telemetry
from serving.control import lifecycle
from serving.models import Endpoint, Node, Route

pytestmark = pytest.mark.django_db

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "modelserve.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Client | None = None, **extra: str) -> Samples:
    response = (client or Client()).get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def service(owner: Any, name: str, group: str = "default", **fields: Any) -> Endpoint:
    return Endpoint.objects.create(
        name=name, slug=f"{name}-{uuid.uuid4().hex[:6]}", owner=owner, resource_group=group, **fields
    )


def route(endpoint: Endpoint, node: Node | None, status: str, port: int | None = None, **fields: Any) -> Route:
    return Route.objects.create(
        endpoint=endpoint,
        node=node,
        status=status,
        host="127.0.0.1" if port else "",
        port=port,
        resources={"cpu": 1.0, "mem": 1024.0},
        container_id=f"c-{uuid.uuid4().hex[:8]}",
        **fields,
    )


def test_replicas_and_node_slots_come_from_the_database(personas: dict[str, Any]) -> None:
    node = Node.objects.create(name="m-a", capacity={"cpu": 4, "mem": 8192}, heartbeat_at=timezone.now())
    lost = Node.objects.create(name="m-lost", capacity={"cpu": 2}, heartbeat_at=None)
    chat = service(personas["owner"], "chat", desired_replicas=3)
    route(chat, node, Route.Status.HEALTHY, 20001)
    route(chat, node, Route.Status.HEALTHY, 20002)
    route(chat, node, Route.Status.PROVISIONING)
    route(chat, None, Route.Status.FAILED_TO_START)
    gone = service(personas["owner"], "gone", lifecycle=Endpoint.Lifecycle.DESTROYED)
    route(gone, node, Route.Status.TERMINATING)

    samples = scrape()

    assert value(samples, "modelserve_service_desired_replicas", service=chat.slug) == 3
    assert value(samples, "modelserve_replicas", service=chat.slug, status="healthy", node="m-a") == 2
    assert value(samples, "modelserve_replicas", service=chat.slug, status="provisioning", node="m-a") == 1
    assert value(samples, "modelserve_replicas", service=chat.slug, status="failed_to_start", node="") == 1
    assert not [key for key in samples if ("service", gone.slug) in key[1]], "a destroyed service is not listed"
    # Four routes hold 1 CPU and 1024 mem each (healthy, provisioning, and the destroyed service's
    # terminating one until it is gone); the failed one holds none.
    assert value(samples, "modelserve_node_slots_capacity", node="m-a", slot="cpu") == 4
    assert value(samples, "modelserve_node_slots_used", node="m-a", slot="cpu") == 4
    assert value(samples, "modelserve_node_slots_free", node="m-a", slot="cpu") == 0
    assert value(samples, "modelserve_node_slots_free", node="m-a", slot="mem") == 8192 - 4 * 1024
    assert value(samples, "modelserve_node_up", node="m-a") == 1
    assert value(samples, "modelserve_node_up", node=lost.name) == 0


def test_requests_are_counted_by_view_name_not_path(personas: dict[str, Any]) -> None:
    client = Client()
    before = scrape(client)
    client.get("/healthz")
    client.get("/healthz")
    client.get(f"/no-such-page-{uuid.uuid4().hex}")
    after = scrape(client)
    ok = {"view": "healthz", "method": "GET", "code": "200"}
    assert (
        value(after, "modelserve_http_requests_total", **ok) - value(before, "modelserve_http_requests_total", **ok)
        == 2
    )
    lost = {"view": "unresolved", "method": "GET", "code": "404"}
    assert (
        value(after, "modelserve_http_requests_total", **lost) - value(before, "modelserve_http_requests_total", **lost)
        == 1
    )
    assert value(after, "modelserve_http_request_duration_seconds_count", view="healthz", method="GET") >= 2
    assert not [key for key in after if any("no-such-page" in v for _, v in key[1])], "a raw path became a label"


def test_the_workers_counters_reach_the_scrape(
    personas: dict[str, Any], django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"  # counters live in Redis for the whole session: a group of its own
    Node.objects.create(
        name=f"small-{group}", resource_group=group, capacity={"cpu": 1, "mem": 1 << 30}, heartbeat_at=timezone.now()
    )
    big = service(personas["owner"], "big", group=group, resources={"cpu": 64.0, "mem": 1024.0})
    waiting = service(personas["owner"], "waiting", group=f"{group}-empty")
    before = scrape()
    with django_capture_on_commit_callbacks(execute=True):
        lifecycle.reconcile_many([big.pk, waiting.pk])
    telemetry.count_decision(big.slug, 1, 2, True)
    telemetry.count_pull("m-a", 1000, 2.0)
    telemetry.count_pull("m-a", 500, 40.0)
    after = scrape()

    assert value(after, "modelserve_scheduling_failures_total", reason="resources", resource_group=group) == 1
    assert value(after, "modelserve_scheduling_failures_total", reason="no_node", resource_group=f"{group}-empty") == 1
    assert value(after, "modelserve_reconcile_backlog") == 2
    assert value(after, "modelserve_reconcile_last_tick_timestamp_seconds") > 0
    ticks = value(after, "modelserve_reconcile_duration_seconds_count", kind="tick")
    assert ticks - value(before, "modelserve_reconcile_duration_seconds_count", kind="tick") == 1
    assert value(after, "modelserve_reconcile_duration_seconds_bucket", kind="tick", le="+Inf") == ticks
    assert value(after, "modelserve_autoscaling_decisions_total", service=big.slug, direction="out", acted="true") == 1
    pulled = value(after, "modelserve_image_pull_bytes_total", node="m-a") - value(
        before, "modelserve_image_pull_bytes_total", node="m-a"
    )
    assert pulled == 1500
    # Cumulative buckets: the 2 s pull is under le=5, the 40 s one only from le=60.
    five = value(after, "modelserve_image_pull_duration_seconds_bucket", node="m-a", le="5.0")
    sixty = value(after, "modelserve_image_pull_duration_seconds_bucket", node="m-a", le="60.0")
    assert sixty - five >= 1 and five >= 1


def test_undeclared_metrics_or_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="not a declared counter"):
        telemetry.count("modelserve_whatever_total")
    with pytest.raises(ValueError, match="takes the labels"):
        telemetry.count("modelserve_scheduling_failures_total", reason="resources")


def test_service_discovery_lists_healthy_replicas_with_labels(personas: dict[str, Any]) -> None:
    node = Node.objects.create(name="sd-a", capacity={"cpu": 4}, heartbeat_at=timezone.now())
    chat = service(personas["owner"], "chat", spec_version=3)
    healthy = route(chat, node, Route.Status.HEALTHY, 21001, spec_version=3)
    route(chat, node, Route.Status.UNHEALTHY, 21002)
    route(chat, node, Route.Status.PROVISIONING)
    gone = service(personas["owner"], "gone", lifecycle=Endpoint.Lifecycle.DESTROYED)
    route(gone, node, Route.Status.HEALTHY, 21003)

    response = Client().get("/metrics/sd")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    groups = [g for g in json.loads(response.content) if g["labels"]["service"] in (chat.slug, gone.slug)]
    assert groups == [
        {
            "targets": ["127.0.0.1:21001"],
            "labels": {
                "service": chat.slug,
                "service_name": "chat",
                "service_id": str(chat.pk),
                "route": str(healthy.pk),
                "node": "sd-a",
                "revision": "3",
                "runtime": "custom",
            },
        }
    ]


@pytest.mark.parametrize("path", ["/metrics", "/metrics/sd"])
def test_access_loopback_or_token(personas: dict[str, Any], settings: Any, path: str) -> None:
    far = {"REMOTE_ADDR": "203.0.113.7"}
    settings.METRICS_TOKEN = ""
    refused = Client().get(path, **far)
    assert refused.status_code == 403
    assert "METRICS_TOKEN" in refused.json()["error"]["message"]
    operator = Client()
    operator.force_login(personas["admin"])
    assert operator.get(path, **far).status_code == 403, "a session is not a way in: Prometheus has none"
    assert Client().get(path, **far, HTTP_AUTHORIZATION="Bearer anything").status_code == 403, "no token set"

    settings.METRICS_TOKEN = "s3cret-metrics-token"
    assert Client().get(path, **far, HTTP_AUTHORIZATION="Bearer s3cret-metrics-token").status_code == 200
    wrong = Client().get(path, **far, HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Wrong METRICS_TOKEN."
    assert Client().get(path, **far).status_code == 403
    assert Client().get(path, REMOTE_ADDR="::1").status_code == 200  # loopback, also with a token set


# --- the dashboard ---------------------------------------------------------------------------------

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (inside braces or by/without lists) or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exported_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_metric_names_of_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, view) (rate(a_bucket{view=~"x"}[$__rate_interval]))) / clamp_min(b, 1e-9)'
    ) == {"a_bucket", "b"}


def test_the_dashboard_queries_only_what_the_platform_exports(tmp_path: Path) -> None:
    from tests.live import LiveSystem

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "service" in variables
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # label_values(<metric selector>, <label>): only its first argument is PromQL.
    exprs += [
        re.fullmatch(r"label_values\((.*),\s*\w+\)", v["definition"]).group(1)  # type: ignore[union-attr]
        for v in dashboard["templating"]["list"]
        if v.get("definition")
    ]
    wanted = set().union(*(metric_names(e) for e in exprs))
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for subject in ("traffic", "errors", "latency", "replicas", "scaling"):
        assert subject in titles, f"the dashboard has no {subject} panel"

    exported = exported_names(Client().get("/metrics").content.decode())
    system = LiveSystem(tmp_path)  # the real data plane, scraped on its admin port
    try:
        system.start_proxy()
        with urllib.request.urlopen(f"{system.proxy_admin_url}/metrics", timeout=5) as answer:
            exported |= exported_names(answer.read().decode())
    finally:
        system.stop_all()
    # A proxy without traffic writes the HELP and TYPE of its per-endpoint families but no sample.
    assert "modelserve_proxy_requests_total" in exported and "modelserve_replicas" in exported
    missing = sorted(wanted - exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
