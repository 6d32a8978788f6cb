"""The platform's Prometheus endpoints: ``GET /metrics`` and ``GET /metrics/sd`` (HTTP service discovery).

Where each figure comes from, so that every series is right however many processes run:

* **Requests and latencies per view** (``modelserve_http_requests_total``,
  ``modelserve_http_request_duration_seconds``): counted by ``RequestMetricsMiddleware`` in this web
  process, labelled by the resolved URL name (``serving:service-detail``), never the raw path, so the
  number of series is bounded by the URL conf. Several web processes are several scrape targets.
  A streamed answer counts until its headers; websockets are not counted.
* **What the database knows** (replicas by service, status and node; node slots capacity, used and
  free; nodes up; services' desired replicas): read from the database when Prometheus scrapes,
  a handful of grouped queries, so they are exact whatever worker wrote them and need no cleanup.
* **What only the workers know** (reconcile duration and backlog, scheduling failures by reason,
  autoscaling decisions, image pull bytes): counted in Redis by ``serving.bus.telemetry`` from
  whichever Celery process saw it, and read here at scrape time (see its docstring for why not
  prometheus_client's multiprocess mode).

The data plane (``python -m proxy``) exposes its own ``/metrics`` on its admin port
(``modelserve_proxy_*``); ``docs/grafana/modelserve.json`` uses both.

Both URLs answer only to a loopback address, or to ``Authorization: Bearer <METRICS_TOKEN>`` when
that setting is set: they list every service and replica of the installation.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from serving.bus import telemetry
from serving.control.scheduler import held_slots
from serving.models import Endpoint, Node, Route

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "modelserve_http_requests",
    "Requests answered by the web app, by view (URL name), method and status code.",
    ("view", "method", "code"),
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "modelserve_http_request_duration_seconds",
    "Time the web app took to answer (until the headers of a streamed answer), by view and method.",
    ("view", "method"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _view_name(request: HttpRequest) -> str:
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unresolved"  # a 404 before any view: one series for every unknown path
    return match.view_name or "unnamed"


class RequestMetricsMiddleware:
    """Counts every answer by view, method and code; times it (sync and async views alike)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        start = time.perf_counter()
        response = self.get_response(request)
        self._observe(request, response, start)
        return response

    async def __acall__(self, request: HttpRequest) -> Any:
        start = time.perf_counter()
        response = await self.get_response(request)
        self._observe(request, response, start)
        return response

    @staticmethod
    def _observe(request: HttpRequest, response: HttpResponse, start: float) -> None:
        view = _view_name(request)
        method = request.method if request.method in METHODS else "other"
        HTTP_REQUESTS.labels(view, method, str(response.status_code)).inc()
        HTTP_DURATION.labels(view, method).observe(time.perf_counter() - start)


class PlatformCollector(Collector):
    """The figures read at scrape time: the database's and the workers' (Redis)."""

    def describe(self) -> list[Metric]:
        return []  # registering must not query the database (collect would, at import time)

    def collect(self) -> Iterator[Metric]:
        yield from self._database()
        yield from self._workers()

    def _database(self) -> Iterator[Metric]:
        now = timezone.now()
        live = Endpoint.objects.live()
        desired = GaugeMetricFamily(
            "modelserve_service_desired_replicas", "Replicas each service should have.", labels=["service"]
        )
        for slug, count in live.values_list("slug", "desired_replicas").order_by("slug"):
            desired.add_metric([slug], count)
        yield desired
        replicas = GaugeMetricFamily(
            "modelserve_replicas",
            "Replicas (routes) by service, status and node (node is empty while none is chosen).",
            labels=["service", "status", "node"],
        )
        rows = (
            Route.objects.filter(endpoint__in=live)
            .values_list("endpoint__slug", "status", "node__name")
            .annotate(n=Count("id"))
            .order_by("endpoint__slug", "status", "node__name")
        )
        for slug, status, node, count in rows:
            replicas.add_metric([slug, status, node or ""], count)
        yield replicas
        nodes = list(Node.objects.order_by("name"))
        up = GaugeMetricFamily(
            "modelserve_node_up", "1 when the node's heartbeat is recent and it is not lost.", labels=["node"]
        )
        schedulable = GaugeMetricFamily(
            "modelserve_node_schedulable",
            "1 when new replicas may be placed on the node: the operator has not cordoned it and its engine "
            "does not say it is unavailable.",
            labels=["node"],
        )
        # Apart from the operator's cordon: a drained Swarm node clears by itself; a cordon does not.
        unavailable = GaugeMetricFamily(
            "modelserve_node_unavailable",
            "1 while the node's engine says it can take no new replica (e.g. its Swarm node is drained or "
            "down); the reason is on the admin's Nodes list and in /api/v1/nodes/.",
            labels=["node"],
        )
        capacity = GaugeMetricFamily(
            "modelserve_node_slots_capacity", "Slots a node advertises, by slot.", labels=["node", "slot"]
        )
        used = GaugeMetricFamily(
            "modelserve_node_slots_used", "Slots held by the replicas on a node, by slot.", labels=["node", "slot"]
        )
        free = GaugeMetricFamily(
            "modelserve_node_slots_free",
            "Slots of a node not held by replicas (capacity minus used), by slot.",
            labels=["node", "slot"],
        )
        held = held_slots(nodes)
        for node in nodes:
            up.add_metric([node.name], 1 if node.is_alive(now) else 0)
            schedulable.add_metric([node.name], 1 if node.schedulable and not node.unavailable else 0)
            unavailable.add_metric([node.name], 1 if node.unavailable else 0)
            have = {k: float(v) for k, v in (node.capacity or {}).items() if isinstance(v, int | float)}
            holding = held.get(node.pk, {})
            for slot in sorted(set(have) | set(holding)):
                capacity.add_metric([node.name, slot], have.get(slot, 0.0))
                used.add_metric([node.name, slot], holding.get(slot, 0.0))
                free.add_metric([node.name, slot], have.get(slot, 0.0) - holding.get(slot, 0.0))
        yield from (up, schedulable, unavailable, capacity, used, free)

    def _workers(self) -> Iterator[Metric]:
        try:
            samples = telemetry.read()
        except Exception as exc:  # Redis down: the database's figures are still worth a scrape
            log.warning("metrics: the workers' counters could not be read from Redis: %s", exc)
            samples = {}
        by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = defaultdict(list)
        for (name, labels), value in samples.items():
            by_name[name].append((labels, value))
        for metric in telemetry.METRICS.values():
            if metric.kind == "gauge":
                gauge = GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))
                for labels, value in sorted(by_name[metric.name]):
                    gauge.add_metric([dict(labels)[k] for k in metric.labels], value)
                yield gauge
            elif metric.kind == "counter":
                # prometheus_client adds "_total" to a counter family's samples.
                counter = CounterMetricFamily(
                    metric.name.removesuffix("_total"), metric.help, labels=list(metric.labels)
                )
                for labels, value in sorted(by_name[metric.name]):
                    counter.add_metric([dict(labels)[k] for k in metric.labels], value)
                yield counter
            else:
                yield _histogram(metric, by_name)


def _histogram(
    metric: telemetry.Metric, by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(metric.name, metric.help, labels=list(metric.labels))
    sums = {labels: value for labels, value in by_name[f"{metric.name}_sum"]}
    per_bucket: dict[tuple[tuple[str, str], ...], dict[str, float]] = defaultdict(dict)
    for labels, value in by_name[f"{metric.name}_bucket"]:
        as_dict = dict(labels)
        le = as_dict.pop("le", "+Inf")
        per_bucket[tuple(sorted(as_dict.items()))][le] = value
    for labels in sorted(set(sums) | set(per_bucket)):
        counts = per_bucket.get(labels, {})
        cumulative = 0.0
        buckets = []
        for bound in [*metric.buckets, float("inf")]:
            cumulative += counts.get("+Inf" if bound == float("inf") else f"{bound:g}", 0.0)
            buckets.append((floatToGoString(bound), cumulative))  # le="5.0", as prometheus_client writes
        as_dict = dict(labels)
        family.add_metric([as_dict[k] for k in metric.labels], buckets, sums.get(labels, 0.0))
    return family


REGISTRY.register(PlatformCollector())


# --- access -------------------------------------------------------------------------------------

REFUSED = (
    "The metrics endpoints answer only to a loopback address, or with the header "
    "'Authorization: Bearer <METRICS_TOKEN>': set METRICS_TOKEN on the web app and give the same "
    "token to Prometheus (authorization: credentials: in its scrape config)."
)


def refusal(request: HttpRequest) -> JsonResponse | None:
    """None when ``request`` may read the metrics; else the answer that says how to be let in."""
    token = str(getattr(settings, "METRICS_TOKEN", "") or "")
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and token:
        if hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), token.encode()):
            return None
        return JsonResponse({"error": {"code": "not_authenticated", "message": "Wrong METRICS_TOKEN."}}, status=401)
    try:
        loopback = ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return JsonResponse({"error": {"code": "permission_denied", "message": REFUSED}}, status=403)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    refused = refusal(request)
    if refused is not None:
        return refused
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


@require_GET
def service_discovery(request: HttpRequest) -> HttpResponse:
    """Prometheus' HTTP service discovery (``http_sd_configs``): every healthy replica of every live
    service, one target group each, with the labels that say which replica it is."""
    refused = refusal(request)
    if refused is not None:
        return refused
    routes = (
        Route.objects.filter(endpoint__in=Endpoint.objects.live(), status=Route.Status.HEALTHY, port__isnull=False)
        .exclude(host="")
        .select_related("endpoint", "node")
        .order_by("endpoint__slug", "created_at")
    )
    groups = [
        {
            "targets": [f"[{route.host}]:{route.port}" if ":" in route.host else f"{route.host}:{route.port}"],
            "labels": {
                "service": route.endpoint.slug,
                "service_name": route.endpoint.name,
                "service_id": str(route.endpoint_id),
                "route": str(route.pk),
                "node": route.node.name if route.node else "",
                "revision": str(route.spec_version),
                "runtime": route.endpoint.runtime,
            },
        }
        for route in routes
    ]
    return JsonResponse(groups, safe=False)
