"""Counters of the data plane: plain ints updated per request, rendered only when scraped.

A request costs one list increment for its status class, one bisect into the latency buckets and a
float add; nothing here allocates on the hot path. The p95 pushed to Redis for autoscaling is
estimated from the histogram's growth since the previous push (linear inside a bucket), so no
per-request sample list is kept.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.table import Table

# Seconds; fine at the low end (the proxy's own overhead is microseconds, a short call milliseconds)
# and long at the high end (LLM streams). The implicit last bucket is +Inf.
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class EndpointStats:
    __slots__ = (
        "buckets",
        "codes",
        "count",
        "failovers",
        "last_buckets",
        "last_codes",
        "last_count",
        "last_throttled",
        "reported_failovers",
        "reported_resent",
        "resent",
        "sum",
        "throttled",
    )

    def __init__(self) -> None:
        self.codes = [0, 0, 0, 0, 0, 0]  # index status // 100 (0 unused)
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0
        self.count = 0
        self.last_buckets = [0] * (len(BOUNDS) + 1)
        self.last_codes = [0, 0, 0, 0, 0, 0]
        self.last_count = 0
        self.throttled = 0  # 429s: the signal that the endpoint needs more replicas
        self.last_throttled = 0
        self.resent = 0  # requests sent again after the replica they reached closed unanswered
        self.reported_resent = 0  # of those, how many were counted in Redis (proxy/report.py)
        self.failovers = 0  # gateway requests this service failed unanswered, sent to another backend
        self.reported_failovers = 0  # ... counted in Redis

    def observe(self, status: int, seconds: float) -> None:
        self.codes[status // 100 if status < 600 else 5] += 1
        self.buckets[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def window(self, seconds: float) -> dict[str, float]:
        """Figures since the previous call: requests/s, 5xx/s and p95 latency (ms)."""
        delta = [now - before for now, before in zip(self.buckets, self.last_buckets, strict=True)]
        count = self.count - self.last_count
        errors = self.codes[5] - self.last_codes[5]
        throttled = self.throttled - self.last_throttled
        self.last_throttled = self.throttled
        self.last_buckets = list(self.buckets)
        self.last_codes = list(self.codes)
        self.last_count = self.count
        return {
            "rps": round(count / seconds, 3) if seconds > 0 else 0.0,
            "errors_per_s": round(errors / seconds, 3) if seconds > 0 else 0.0,
            "throttled_per_s": round(throttled / seconds, 3) if seconds > 0 else 0.0,
            "requests": count,
            "p95_ms": round(quantile(delta, 0.95) * 1000.0, 3),
        }


def quantile(counts: list[int], q: float) -> float:
    """The q-quantile of a histogram (counts per bucket of BOUNDS, +Inf last), interpolated."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            low = BOUNDS[i - 1] if i > 0 else 0.0
            if i >= len(BOUNDS):
                return BOUNDS[-1]  # past the last bound: the bound is all we know
            high = BOUNDS[i]
            return low + (high - low) * ((rank - seen) / count)
        seen += count
    return BOUNDS[-1]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(table: Table, gauges: dict[str, float], failovers: dict[str, int] | None = None) -> str:
    """The Prometheus text exposition of every counter (called on scrape only). ``failovers``:
    model name -> gateway requests sent to another backend after the first failed them."""
    out: list[str] = []
    add = out.append
    add("# HELP modelserve_proxy_gateway_failovers_total Gateway requests sent to another service of their model")
    add("# TYPE modelserve_proxy_gateway_failovers_total counter")
    for model, count in sorted((failovers or {}).items()):
        add(f'modelserve_proxy_gateway_failovers_total{{model="{_label(model)}"}} {count}')
    add("# HELP modelserve_proxy_requests_total Requests answered, by endpoint and status class.")
    add("# TYPE modelserve_proxy_requests_total counter")
    for slug, stats in sorted(table.stats.items()):
        s = _label(slug)
        for i, klass in enumerate(CLASSES, start=1):
            if stats.codes[i]:
                add(f'modelserve_proxy_requests_total{{endpoint="{s}",code="{klass}"}} {stats.codes[i]}')
    add("# HELP modelserve_proxy_request_duration_seconds Time from the request to the end of its response.")
    add("# TYPE modelserve_proxy_request_duration_seconds histogram")
    for slug, stats in sorted(table.stats.items()):
        if not stats.count:
            continue
        s = _label(slug)
        cumulative = 0
        for bound, count in zip((*BOUNDS, None), stats.buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound is None else f"{bound:g}"
            add(f'modelserve_proxy_request_duration_seconds_bucket{{endpoint="{s}",le="{le}"}} {cumulative}')
        add(f'modelserve_proxy_request_duration_seconds_sum{{endpoint="{s}"}} {stats.sum:.6f}')
        add(f'modelserve_proxy_request_duration_seconds_count{{endpoint="{s}"}} {stats.count}')
    add("# HELP modelserve_proxy_in_flight Requests being forwarded now, by endpoint.")
    add("# TYPE modelserve_proxy_in_flight gauge")
    for slug, endpoint in sorted(table.endpoints.items()):
        add(f'modelserve_proxy_in_flight{{endpoint="{_label(slug)}"}} {endpoint.in_flight}')
    add("# HELP modelserve_proxy_route_requests_total Responses from each route, by status class.")
    add("# TYPE modelserve_proxy_route_requests_total counter")
    for slug, endpoint in sorted(table.endpoints.items()):
        for route in endpoint.routes:
            labels = f'endpoint="{_label(slug)}",route="{_label(route.id)}"'
            for i, klass in enumerate(CLASSES, start=1):
                if route.codes[i]:
                    add(f'modelserve_proxy_route_requests_total{{{labels},code="{klass}"}} {route.codes[i]}')
    add("# HELP modelserve_proxy_route_in_flight Requests being forwarded now, by route.")
    add("# TYPE modelserve_proxy_route_in_flight gauge")
    for slug, endpoint in sorted(table.endpoints.items()):
        for route in endpoint.routes:
            labels = f'endpoint="{_label(slug)}",route="{_label(route.id)}"'
            add(f"modelserve_proxy_route_in_flight{{{labels}}} {route.in_flight}")
    add("# HELP modelserve_proxy_route_idle_connections Pooled keep-alive connections, by route.")
    add("# TYPE modelserve_proxy_route_idle_connections gauge")
    for slug, endpoint in sorted(table.endpoints.items()):
        for route in endpoint.routes:
            labels = f'endpoint="{_label(slug)}",route="{_label(route.id)}"'
            add(f"modelserve_proxy_route_idle_connections{{{labels}}} {len(route.idle)}")
    for name, value in sorted(gauges.items()):
        kind = "counter" if name.endswith("_total") else "gauge"
        add(f"# TYPE modelserve_proxy_{name} {kind}")
        add(f"modelserve_proxy_{name} {value:g}")
    return "\n".join(out) + "\n"
