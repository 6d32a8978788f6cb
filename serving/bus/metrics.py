"""Metrics for autoscaling and the service page's charts (S6): short time series in Redis.

Three sources, each kept as one sorted set per endpoint and metric for the last ``METRICS_RETENTION``
seconds (10 minutes): ``<prefix>:metrics:<source>:<endpoint_id>:<metric>``, score = epoch seconds,
member ``"<value>|<t>|<replica>"`` (the replica part keeps two replicas' equal samples apart). A set
``<prefix>:metrics:names:<endpoint_id>`` lists the ``<source>:<metric>`` names an endpoint has, so
nobody scans the keyspace. Old points are trimmed on every write and idle keys expire.

* **kernel**: per replica ``cpu_percent`` (100 = one full core), ``mem_bytes`` and ``mem_percent``
  (of the replica's memory limit), from the engine's ``stats()``; sampled every ``METRICS_INTERVAL``
  by each node worker for the replicas running on its own node (``serving.node.sampler``).
* **inference**: each healthy replica's ``/metrics`` (Prometheus text, parsed by prometheus_client),
  scraped by the same node sampler; every sample name the runtime reports is kept, its label sets
  summed (``vllm:num_requests_waiting`` over all models), except histogram buckets, summary quantiles
  and ``*_created`` timestamps, which mean nothing once summed.
* **proxy**: ``rps``, ``in_flight``, ``p95_ms``, ``errors_per_s``, ``throttled_per_s`` per endpoint,
  from the data plane's stats hashes (``proxy/report.py``), summed over proxy processes (the maximum
  for ``p95_ms``); collected by the control plane's beat (``collect_proxy``).

Per-replica sources store one point per replica and round (all at the round's time), so a rule's
aggregation over its window (average, max, min) is over replicas and time at once, and the charts
average the replicas of each round. The node sampler is bounded: at most ``METRICS_CONCURRENCY``
scrapes and engine calls at once, each with ``METRICS_TIMEOUT``, a replica whose previous engine call
still hangs is skipped, and a response body is read up to 1 MiB, so a hung replica costs one slot,
never the round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from serving.bus import routing
from serving.models import Endpoint

log = logging.getLogger(__name__)

SOURCES = ("kernel", "inference", "proxy")
MAX_BODY = 1 << 20  # bytes of a /metrics answer; vLLM's is ~50 KiB
MAX_NAMES = 500  # metric names kept per replica scrape
MAX_SERIES = 200  # series in one chart answer

KERNEL_METRICS = ("cpu_percent", "mem_bytes", "mem_percent")
PROXY_FIELDS = ("rps", "in_flight", "p95_ms", "errors_per_s", "throttled_per_s")
# Other names a rule may use for the same series.
ALIASES: dict[str, dict[str, str]] = {
    "proxy": {
        "requests_in_flight": "in_flight",
        "inflight": "in_flight",
        "requests_per_second": "rps",
        "p95": "p95_ms",
        "p95_latency": "p95_ms",
        "latency_p95": "p95_ms",
        "latency_p95_ms": "p95_ms",
        "errors": "errors_per_s",
        "throttled": "throttled_per_s",
    },
    "kernel": {
        "cpu": "cpu_percent",
        "cpu_util": "cpu_percent",
        "cpu_utilization": "cpu_percent",
        "mem": "mem_bytes",
        "memory": "mem_bytes",
        "mem_util": "mem_percent",
        "memory_percent": "mem_percent",
    },
}


def canonical(source: str, metric: str) -> str:
    """The stored name of a metric a rule names (an alias or the name itself)."""
    return ALIASES.get(source, {}).get(metric, metric)


@dataclass(frozen=True)
class Point:
    source: str
    endpoint_id: str
    metric: str
    t: float
    value: float
    replica: str = ""


def series_key(prefix: str, source: str, endpoint_id: str, metric: str) -> str:
    return f"{prefix}:metrics:{source}:{endpoint_id}:{metric}"


def names_key(prefix: str, endpoint_id: str) -> str:
    return f"{prefix}:metrics:names:{endpoint_id}"


# --- pure parts ----------------------------------------------------------------------------------


class ExpositionError(ValueError):
    """A /metrics answer that is not Prometheus text."""


def parse_prometheus(text: str, max_names: int = MAX_NAMES) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over its label sets}.

    Histogram buckets, summary quantiles and ``*_created`` timestamps are left out (their sum is
    meaningless); ``_sum``/``_count`` stay. NaN and infinite values are dropped. A malformed answer
    raises ExpositionError as a whole: a half-parsed one would sum only some label sets.
    """
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name
                if name.endswith("_created") or "quantile" in sample.labels:
                    continue
                if name.endswith("_bucket") and "le" in sample.labels:
                    continue
                value = float(sample.value)
                if not math.isfinite(value):
                    continue
                if name not in totals and len(totals) >= max_names:
                    continue
                totals[name] = totals.get(name, 0.0) + value
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ExpositionError(f"not Prometheus text: {exc}") from None
    return totals


def proxy_figures(fields: Mapping[Any, Any], now: float, stale_after: float = 10.0) -> dict[str, float] | None:
    """One endpoint's figures from its stats hash (one JSON field per proxy process): ``rps``,
    ``in_flight``, ``errors_per_s``, ``throttled_per_s`` summed, ``p95_ms`` the maximum. Fields older
    than ``stale_after`` (or three of their windows) are a proxy that stopped: ignored. None when no
    proxy reported."""
    figures = dict.fromkeys(PROXY_FIELDS, 0.0)
    seen = False
    for raw in fields.values():
        try:
            sample = json.loads(raw)
            at = float(sample["t"])
            window = float(sample.get("window") or 0.0)
        except (ValueError, TypeError, KeyError):
            continue
        if now - at > max(stale_after, 3 * window):
            continue
        seen = True
        for name in ("rps", "in_flight", "errors_per_s", "throttled_per_s"):
            figures[name] += _number(sample.get(name))
        figures["p95_ms"] = max(figures["p95_ms"], _number(sample.get("p95_ms")))
    return figures if seen else None


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def kernel_points(endpoint_id: str, replica: str, stats: Any, t: float) -> list[Point]:
    """A replica's engine stats (serving.node.engines.base.ReplicaStats) as kernel points."""
    points = [
        Point("kernel", endpoint_id, "cpu_percent", t, float(stats.cpu_percent), replica),
        Point("kernel", endpoint_id, "mem_bytes", t, float(stats.mem_bytes), replica),
    ]
    if stats.mem_limit_bytes:
        points.append(
            Point("kernel", endpoint_id, "mem_percent", t, 100.0 * stats.mem_bytes / stats.mem_limit_bytes, replica)
        )
    return points


def decode(member: bytes | str) -> float:
    """The value of a stored member ``"<value>|<t>|<replica>"``."""
    text = member.decode() if isinstance(member, bytes) else member
    return float(text.split("|", 1)[0])


def buckets(samples: Iterable[tuple[float, float]], step: float) -> list[list[float]]:
    """Average the samples that fall in the same ``step``-second slot (the replicas of one round):
    ``[[t, value], ...]`` in time order, t the slot's latest sample time."""
    slots: dict[int, list[float]] = {}
    for at, value in samples:
        slot = slots.setdefault(int(at // step) if step > 0 else int(at * 1000), [0.0, 0.0, 0.0])
        slot[0] = max(slot[0], at)
        slot[1] += value
        slot[2] += 1
    return [[round(s[0], 3), s[1] / s[2]] for _, s in sorted(slots.items())]


# --- Redis ---------------------------------------------------------------------------------------


def _prefix() -> str:
    return str(settings.REDIS_PREFIX)


def _retention() -> float:
    return float(settings.METRICS_RETENTION)


def _client() -> Any:
    return routing.get_redis()


def record(points: Sequence[Point], now: float | None = None, client: Any = None, prefix: str | None = None) -> int:
    """Append points to their series in one round trip, trimming what is older than the retention."""
    if not points:
        return 0
    client = client or _client()
    prefix = prefix or _prefix()
    now = time.time() if now is None else now
    retention = _retention()
    ttl = int(retention) + 60
    pipe = client.pipeline(transaction=False)
    keys: set[str] = set()
    names: dict[str, set[str]] = {}
    for p in points:
        if not math.isfinite(p.value):
            continue
        key = series_key(prefix, p.source, p.endpoint_id, p.metric)
        pipe.zadd(key, {f"{p.value!r}|{p.t:.3f}|{p.replica}": p.t})
        keys.add(key)
        names.setdefault(p.endpoint_id, set()).add(f"{p.source}:{p.metric}")
    for key in keys:
        pipe.zremrangebyscore(key, "-inf", f"({now - retention}")
        pipe.expire(key, ttl)
    for endpoint_id, wanted in names.items():
        pipe.sadd(names_key(prefix, endpoint_id), *wanted)
        pipe.expire(names_key(prefix, endpoint_id), ttl)
    pipe.execute()
    return len(points)


@overload
def read_many(
    wanted: Sequence[tuple[str, str, str, float]],
    until: float,
    client: Any = None,
    prefix: str | None = None,
    *,
    with_times: Literal[True] = True,
) -> list[list[tuple[float, float]]]: ...


@overload
def read_many(
    wanted: Sequence[tuple[str, str, str, float]],
    until: float,
    client: Any = None,
    prefix: str | None = None,
    *,
    with_times: Literal[False],
) -> list[list[float]]: ...


def read_many(
    wanted: Sequence[tuple[str, str, str, float]],
    until: float,
    client: Any = None,
    prefix: str | None = None,
    *,
    with_times: bool = True,
) -> list[list[tuple[float, float]]] | list[list[float]]:
    """``[(endpoint_id, source, metric, since), ...]`` -> their samples ``(t, value)`` in
    ``[since, until]``, in one round trip (the autoscaling tick reads every rule's window this way).

    ``with_times=False``: the values alone, for a reader that needs no more than "in the window"
    (Redis has selected by time already). Redis then sends each window as one string of the
    members' value parts (``_VALUES_LUA``): parsing a reply element costs far more in redis-py than
    the value itself, and the elements were most of the autoscaling tick's CPU.
    """
    if not wanted:
        return []
    client = client or _client()
    prefix = prefix or _prefix()
    pipe = client.pipeline(transaction=False)
    if not with_times:
        script = client.register_script(_VALUES_LUA)
        for endpoint_id, source, metric, since in wanted:
            key = series_key(prefix, source, endpoint_id, canonical(source, metric))
            script(keys=[key], args=[since, until], client=pipe)
        return [_values(joined.split(b"\n") if joined else []) for joined in pipe.execute()]
    for endpoint_id, source, metric, since in wanted:
        pipe.zrangebyscore(
            series_key(prefix, source, endpoint_id, canonical(source, metric)), since, until, withscores=True
        )
    out = []
    for rows in pipe.execute():
        samples = []
        for member, score in rows:
            try:
                samples.append((float(score), decode(member)))
            except ValueError:
                continue
        out.append(samples)
    return out


# One window's members "<value>|<t>|<replica>" in time order -> their value parts joined by newlines
# (a value part is a float's repr: no "|", no newline), so the reply is one string per window.
_VALUES_LUA = """
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[2])) do
  out[#out + 1] = string.match(member, '^[^|]*')
end
return table.concat(out, '\\n')
"""


def _values(members: Iterable[bytes | str]) -> list[float]:
    """``decode`` of each member, the unreadable ones left out (as ``read_many`` does)."""
    values = []
    for member in members:
        head = member.split(b"|", 1)[0] if isinstance(member, bytes) else member.split("|", 1)[0]
        try:
            values.append(float(head))
        except ValueError:
            continue
    return values


def chart(
    endpoint_id: str,
    sources: Iterable[str],
    window: float,
    now: float | None = None,
    client: Any = None,
    prefix: str | None = None,
) -> dict[str, list[list[float]]]:
    """``{"<source>:<metric>": [[t, value], ...]}`` of the last ``window`` seconds for the charts;
    per-replica sources average the replicas of each sampling round."""
    client = client or _client()
    prefix = prefix or _prefix()
    now = time.time() if now is None else now
    wanted_sources = set(sources)
    names = sorted(
        name
        for raw in client.smembers(names_key(prefix, endpoint_id))
        if (name := raw.decode() if isinstance(raw, bytes) else str(raw)).split(":", 1)[0] in wanted_sources
    )[:MAX_SERIES]
    pairs = [name.split(":", 1) for name in names]
    rows = read_many([(endpoint_id, s, m, now - window) for s, m in pairs], now, client, prefix)
    step = float(settings.METRICS_INTERVAL)
    return {name: buckets(samples, step) for name, samples in zip(names, rows, strict=True) if samples}


# --- proxy (control plane, beat) -----------------------------------------------------------------


def collect_proxy(now: float | None = None, client: Any = None, prefix: str | None = None) -> int:
    """Turn the proxies' current stats hashes into points of every live endpoint; returns how many.

    A proxy reports an endpoint once it has served it and from then on every push, traffic or not;
    so when some proxy reports and an endpoint has no hash, no proxy has served it recently: zeros
    (and a scale-in rule on idle traffic can act). When no proxy reports anything there is no data.
    """
    client = client or _client()
    prefix = prefix or _prefix()
    now = time.time() if now is None else now
    rows = list(Endpoint.objects.filter(lifecycle=Endpoint.Lifecycle.CREATED).values_list("pk", "slug"))
    if not rows:
        return 0
    pipe = client.pipeline(transaction=False)
    for _, slug in rows:
        pipe.hgetall(f"{prefix}:proxy:stats:{slug}")
    hashes = pipe.execute()
    found = [proxy_figures(fields, now) if fields else None for fields in hashes]
    if all(figures is None for figures in found):
        return 0
    points = []
    for (pk, _), figures in zip(rows, found, strict=True):
        for name, value in (figures or dict.fromkeys(PROXY_FIELDS, 0.0)).items():
            points.append(Point("proxy", str(pk), name, now, value))
    return record(points, now, client, prefix)
