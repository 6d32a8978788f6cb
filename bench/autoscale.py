"""The autoscaling tick's figures, measured against a throw-away database and a private Redis prefix.

    .venv/bin/python bench/autoscale.py [--rounds 3] [--endpoints 1000]

1,000 endpoints with 2 rules each (a scale-out rule on the proxy's in-flight and a scale-in rule on
the replicas' inference metric), each rule's series holding a minute of 5 s samples (12 points; the
inference one from 3 replicas, 36 points), as the collectors leave them. ``serving.control.autoscaling.tick``
is timed (process CPU and wall; Redis's own time is in the wall figure only) in three states:

* **steady**: every rule evaluated, nothing to do, nothing to write (the tick every beat pays);
* **first**: every rule's state is new: 500 "no data" decisions (the scale-in rules' metric is
  missing on half the endpoints) written in bulk as ScalingEvents, 1,500 rules marked "not matched";
* **10% scale**: 100 endpoints cross the scale-out threshold: 100 compare-and-sets, events, audit
  lines and immediate reconciles (the Celery enqueue is replaced by a counter: no worker runs here).

Target: under 0.5 s of CPU per tick for 1,000 endpoints x 2 rules (issue 7) on the slowest machine
we support, about 4x slower than the README's (issue 21). Every CPU figure is also printed as a ratio
to ``bench/reference.py``'s fixed pure-Python workload, timed in the same run, which is what to
compare between machines: the reference takes 0.21 s on the README's machine, so about 0.84 s on one
4x slower, where 0.5 s of tick is 0.5/0.84 = 0.6x reference. The last line reads
``autoscale tick cpu s: S (target 0.5, ratio R); ratio to reference: steady S, 10% scale out O
(target 0.6)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import reference  # noqa: E402

TARGET_TICK_CPU = 0.5
# The tick's target in units of the reference workload (see the module docstring).
TARGET_TICK_REF = 0.6


def setup_django(workdir: Path) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
            "STORAGE_ROOT": str(workdir / "storage"),
            "ENGINE_STATE_DIR": str(workdir / "engine"),
            "REDIS_PREFIX": f"msbench-{uuid.uuid4().hex[:8]}",
            "LOG_LEVEL": "WARNING",
        }
    )
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def build(endpoints: int, now: float) -> list[Any]:
    from accounts.models import User
    from serving.bus import metrics
    from serving.models import AutoScalingRule, Endpoint

    owner = User.objects.create_user(username=f"bench-{uuid.uuid4().hex[:6]}", password=uuid.uuid4().hex)
    rows = [Endpoint(name=f"as-{i:05d}", owner=owner, desired_replicas=2) for i in range(endpoints)]
    for row in rows:  # the slug is made in save(); bulk_create skips it
        row.slug = f"a{uuid.uuid4().hex[:12]}"
    Endpoint.objects.bulk_create(rows)
    ids = list(Endpoint.objects.filter(owner=owner).order_by("name").values_list("pk", flat=True))
    common = {"min_replicas": 1, "max_replicas": 5, "cooldown": 60, "window": 60}
    AutoScalingRule.objects.bulk_create(
        rule
        for eid in ids
        for rule in (
            AutoScalingRule(
                endpoint_id=eid,
                direction="out",
                source="proxy",
                metric="in_flight",
                comparator="GREATER_THAN",
                threshold=10,
                step=1,
                **common,
            ),
            AutoScalingRule(
                endpoint_id=eid,
                direction="in",
                source="inference",
                metric="vllm:num_requests_waiting",
                comparator="LESS_THAN",
                threshold=1,
                step=-1,
                **common,
            ),
        )
    )
    points = []
    for n, eid in enumerate(ids):
        for k in range(12):
            t = now - 60 + 5 * k + 2
            points.append(metrics.Point("proxy", str(eid), "in_flight", t, 5.0))
            if n % 2 == 0:  # the other half has no inference data: "no data" on the first tick
                points.extend(
                    metrics.Point("inference", str(eid), "vllm:num_requests_waiting", t, 3.0, f"r{r}") for r in range(3)
                )
    for start in range(0, len(points), 20_000):
        metrics.record(points[start : start + 20_000], now=now)
    return ids


def timed(now: float) -> tuple[float, float, int]:
    from datetime import UTC, datetime

    from serving.control import autoscaling

    cpu, wall = time.process_time(), time.perf_counter()
    changed = autoscaling.tick(datetime.fromtimestamp(now, tz=UTC))
    return time.process_time() - cpu, time.perf_counter() - wall, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoints", type=int, default=1000)
    args = parser.parse_args()

    ref = reference.measure()
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp:
        setup_django(Path(tmp))
        from serving.bus import dispatch, metrics, routing
        from serving.models import Endpoint, ScalingEvent

        kicked = [0]
        dispatch.enqueue_reconcile = lambda endpoint_id: kicked.__setitem__(0, kicked[0] + 1)  # type: ignore[assignment]
        now = time.time()
        ids = build(args.endpoints, now)
        try:
            first = timed(now)
            recorded = ScalingEvent.objects.count()
            steady = [timed(now + 0.1 * (i + 1)) for i in range(args.rounds)]
            scaling = []
            for i in range(args.rounds):
                at = now + 1 + i
                hot = ids[i * args.endpoints // 10 : (i + 1) * args.endpoints // 10]
                metrics.record([metrics.Point("proxy", str(e), "in_flight", at, 500.0) for e in hot], now=at)
                # A millisecond later: the tick's clock is a datetime (microseconds), and a window that
                # ends a rounding error before the hot sample would not see it (no scale-out measured).
                scaling.append(timed(at + 0.001))
            scaled = Endpoint.objects.filter(desired_replicas=3).count()
        finally:
            client = routing.get_redis()
            for key in client.scan_iter(f"{os.environ['REDIS_PREFIX']}:*", count=5000):
                client.delete(key)
    ref = min(ref, reference.measure())  # again after the work: the fastest run is the figure

    rules = 2 * args.endpoints
    print()
    print(
        f"{f'autoscaling tick, {args.endpoints} endpoints x 2 rules':44} {'cpu s':>8} {'wall s':>8} "
        f"{'target s':>9} {'ratio':>7} {'x ref':>7} {'target':>7}"
    )
    rows = [
        (
            "  steady (median; nothing to write)",
            statistics.median(c for c, _, _ in steady),
            statistics.median(w for _, w, _ in steady),
            "",
        ),
        ("  first (every rule's state is new)", first[0], first[1], f"{recorded} 'no data' events written"),
        (
            "  10% scale out (median)",
            statistics.median(c for c, _, _ in scaling),
            statistics.median(w for _, w, _ in scaling),
            f"{scaled // args.rounds} endpoints scaled and reconciles kicked per tick ({kicked[0]} in all)",
        ),
    ]
    for label, cpu, wall, note in rows:
        print(
            f"{label:44} {cpu:8.3f} {wall:8.3f} {TARGET_TICK_CPU:9.1f} {cpu / TARGET_TICK_CPU:7.2f} "
            f"{reference.ratio(cpu, ref):7.2f} {TARGET_TICK_REF:7.1f}   {note}"
        )
    print(reference.describe(ref))
    worst = max(row[1] for row in rows)
    print(
        f"rules evaluated per tick: {rules}; worst tick cpu < {TARGET_TICK_CPU:g} s: {worst < TARGET_TICK_CPU}; "
        f"< {TARGET_TICK_REF:g}x reference: {reference.ratio(worst, ref) < TARGET_TICK_REF}"
    )
    steady_cpu, scale_cpu = rows[0][1], rows[2][1]
    print(
        f"autoscale tick cpu s: {steady_cpu:.3f} (target {TARGET_TICK_CPU:g}, "
        f"ratio {steady_cpu / TARGET_TICK_CPU:.2f}); "
        f"ratio to reference: steady {reference.ratio(steady_cpu, ref):.2f}, "
        f"10% scale out {reference.ratio(scale_cpu, ref):.2f} (target {TARGET_TICK_REF:g})"
    )


if __name__ == "__main__":
    main()
