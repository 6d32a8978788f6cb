"""The platform's own counters, kept in Redis so that every worker process adds to the same ones.

The Celery workers run several processes each (prefork), and one beat: a prometheus_client
``Counter`` in each would be per process and die with it. prometheus_client's multiprocess mode
needs a shared directory per host and its cleanup on every worker restart, and still leaves one
series per host. So what only the workers know (how long a reconcile took, why a replica could not
be placed, what autoscaling decided, the bytes of image pulls) is added here, one ``HINCRBYFLOAT``
in one Redis hash (``<prefix>:telemetry``) per observation, and the web app's ``/metrics``
(``serving.web.metrics``) reads the hash when Prometheus scrapes it: one series per label set for
the whole installation, surviving worker restarts (until Redis is emptied). What the database
already knows (replicas by status and node, node slots) is not counted here at all: the web app
reads it from the database at scrape time.

A write is best effort and never raises: metrics must not fail a reconcile, and Redis being down
already shows elsewhere. A write made inside a transaction that rolls back stays counted.
Every metric is declared below (name, help, kind and its label names): a call with another name or
other labels is a programming error (``ValueError``), so the cardinality stays what is declared.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings

from serving.bus import routing

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter", "histogram" or "gauge"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "modelserve_reconcile_duration_seconds",
            "histogram",
            "Time of one reconcile: a whole tick (kind=tick) or one service's (kind=service).",
            ("kind",),
            DURATION_BUCKETS,
        ),
        Metric(
            "modelserve_reconcile_backlog",
            "gauge",
            "Services whose replicas did not match their desired state at the last reconcile tick.",
        ),
        Metric(
            "modelserve_reconcile_last_tick_timestamp_seconds",
            "gauge",
            "When the last reconcile tick ended (Unix time).",
        ),
        Metric(
            "modelserve_scheduling_failures_total",
            "counter",
            "Replicas that could not be placed, by reason: no_node (no node alive in the group, it waits), "
            "architecture (none of the service's architecture, it waits), resources (no node has the slots).",
            ("reason", "resource_group"),
        ),
        Metric(
            "modelserve_autoscaling_decisions_total",
            "counter",
            "Autoscaling decisions recorded in the scaling log, by service, direction (out, in, none) and "
            "whether they changed the replica count.",
            ("service", "direction", "acted"),
        ),
        Metric(
            "modelserve_snapshot_bytes_total",
            "counter",
            "Bytes of model folders copied to the nodes as snapshots (files already there are linked).",
            ("node",),
        ),
        Metric(
            "modelserve_snapshot_duration_seconds",
            "histogram",
            "Time of one model folder's snapshot fetch by a node.",
            ("node",),
            (0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
        ),
        Metric(
            "modelserve_image_pull_bytes_total",
            "counter",
            "Bytes of images pulled by the nodes.",
            ("node",),
        ),
        Metric(
            "modelserve_image_pull_duration_seconds",
            "histogram",
            "Time of one image pull by a node.",
            ("node",),
            (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
        ),
    )
}


def key() -> str:
    return f"{settings.REDIS_PREFIX}:telemetry"


def _field(name: str, labels: Mapping[str, str]) -> str:
    return json.dumps([name, sorted(labels.items())], separators=(",", ":"))


def _check(name: str, kind: str, labels: Mapping[str, str]) -> Metric:
    metric = METRICS.get(name)
    if metric is None or metric.kind != kind:
        raise ValueError(f"{name} is not a declared {kind} of serving.bus.telemetry")
    if tuple(sorted(labels)) != tuple(sorted(metric.labels)):
        raise ValueError(f"{name} takes the labels {metric.labels}, not {tuple(labels)}")
    return metric


def count(name: str, amount: float = 1.0, **labels: str) -> None:
    """Add ``amount`` to the counter ``name`` of these labels."""
    _check(name, "counter", labels)
    _write([(_field(name, labels), amount)], {})


def observe(name: str, value: float, **labels: str) -> None:
    """One observation of the histogram ``name``: its bucket (not cumulative here), sum and count."""
    metric = _check(name, "histogram", labels)
    index = bisect_left(metric.buckets, value)
    le = "+Inf" if index >= len(metric.buckets) else f"{metric.buckets[index]:g}"
    _write(
        [
            (_field(f"{name}_bucket", {**labels, "le": le}), 1),
            (_field(f"{name}_sum", labels), value),
            (_field(f"{name}_count", labels), 1),
        ],
        {},
    )


def set_gauge(name: str, value: float, **labels: str) -> None:
    _check(name, "gauge", labels)
    _write([], {_field(name, labels): value})


def count_decision(service: str, old: int, new: int, acted: bool) -> None:
    """One autoscaling decision of the scaling log."""
    direction = "out" if new > old else "in" if new < old else "none"
    count(
        "modelserve_autoscaling_decisions_total",
        service=service,
        direction=direction,
        acted="true" if acted else "false",
    )


def count_snapshot(node: str, size: int, seconds: float) -> None:
    """One snapshot fetch by ``node``: the bytes it moved and its time."""
    count("modelserve_snapshot_bytes_total", size, node=node)
    observe("modelserve_snapshot_duration_seconds", seconds, node=node)


def count_pull(node: str, size: int, seconds: float) -> None:
    """One image pull by ``node``: its bytes and its time."""
    count("modelserve_image_pull_bytes_total", size, node=node)
    observe("modelserve_image_pull_duration_seconds", seconds, node=node)


@contextmanager
def timed(name: str, **labels: str) -> Iterator[None]:
    """Observe the time the block takes into the histogram ``name`` (also when it raises)."""
    start = time.monotonic()
    try:
        yield
    finally:
        observe(name, time.monotonic() - start, **labels)


def _write(increments: list[tuple[str, float]], gauges: dict[str, float]) -> None:
    try:
        pipe = routing.get_redis().pipeline(transaction=False)
        for field, amount in increments:
            pipe.hincrbyfloat(key(), field, amount)
        if gauges:
            pipe.hset(f"{key()}:gauges", mapping=gauges)
        pipe.execute()
    except Exception as exc:  # best effort: see the module docstring
        log.debug("telemetry not written: %s", exc)


def read() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample written so far: (sample name, sorted labels) -> value. Histogram buckets are as
    written (per bucket); ``serving.web.metrics`` makes them cumulative."""
    client = routing.get_redis()
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(key())
    pipe.hgetall(f"{key()}:gauges")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for raw in pipe.execute():
        for field, value in raw.items():
            try:
                name, labels = json.loads(field)
                samples[(name, tuple((str(k), str(v)) for k, v in labels))] = float(value)
            except (ValueError, TypeError):
                log.warning("telemetry: an unreadable field %r in %s", field, key())
    return samples
