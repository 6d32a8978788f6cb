"""Scale to zero and the proxies' traffic reports: idle services sleep, a request wakes them.

* **Sleep** (``tick``, on the beat): a service with an ``idle_timeout`` that saw no request for that
  long (``serving.core.sleep``, from the proxies' stats) goes to 0 replicas by compare-and-set; its
  status reads SLEEPING. An autoscaling rule with ``min_replicas`` 0 puts it to sleep the same way
  (serving/control/autoscaling.py).
* **Wake** (``WakeListener``, a thread of the control worker): a proxy that holds a request for a
  sleeping service pushes a wake request on ``<prefix>:wake`` (deduplicated over every proxy by
  ``SET NX``, proxy/report.py); the thread blocks on that list and restores the replicas at once,
  not at the next tick. The tick wakes too a sleeping service whose proxies hold requests, should a
  wake request be lost.
* **Cold start**: once the first replica after a wake is healthy, the wake's line in the scaling
  log gets its cold-start time (wake request to healthy, from the route's ``healthy_since``).
* **Re-sent requests**: the proxies count requests they sent again to another replica (the
  service's retry policy), and gateway requests a service failed unanswered that went on to another
  backend of their model name; the tick writes one event per service with each count
  (``requests_resent``, ``gateway_failover``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import Q
from django.utils import timezone

from serving.bus import dispatch, routing, telemetry
from serving.bus import events as audit
from serving.core import logs
from serving.core import sleep as rules
from serving.models import Endpoint, Route, ScalingEvent

log = logging.getLogger(__name__)

WAKE_METRIC = "wake"  # the scaling log's line of a wake (its ``observed``: the cold start, seconds)
IDLE_METRIC = "idle"  # the scaling log's line of a sleep (its ``observed``: the idle seconds)


def last_request_key() -> str:
    """The latest request time the tick saw per service (slug -> epoch): outlives a proxy's sample."""
    return f"{settings.REDIS_PREFIX}:sleep:last-request"


def _after_commit(endpoint_id: str) -> None:
    transaction.on_commit(lambda: routing.publish_endpoint_safely(endpoint_id))
    transaction.on_commit(lambda: dispatch.enqueue_reconcile(endpoint_id))


# --- wake ----------------------------------------------------------------------------------------


def wake(slug: str, *, why: str = "a request", now: datetime | None = None) -> bool:
    """Restore a sleeping service's replicas; False when it is not asleep (awake, waking, gone)."""
    now = now or timezone.now()
    with transaction.atomic():
        endpoint = (
            Endpoint.objects.select_for_update(no_key=True)
            .filter(slug=slug, lifecycle=Endpoint.Lifecycle.CREATED, slept_at__isnull=False)
            .first()
        )
        if endpoint is None or endpoint.slept_at is None:
            return False
        asleep = (now - endpoint.slept_at).total_seconds()
        replicas = max(1, endpoint.wake_replicas)
        old = endpoint.desired_replicas
        Endpoint.objects.filter(pk=endpoint.pk).update(
            desired_replicas=replicas, slept_at=None, woke_at=now, last_scaled_at=now, updated_at=now
        )
        reason = f"woken by {why} after {asleep:.0f} s asleep"
        telemetry.count_decision(endpoint.slug, old, replicas, True)
        ScalingEvent.objects.create(
            endpoint=endpoint,
            metric=WAKE_METRIC,
            old_replicas=old,
            new_replicas=replicas,
            acted=True,
            reason=reason[:255],
            created_at=now,
        )
        audit.record_event(
            endpoint,
            "woken",
            f"Woken by {why} after {asleep:.0f} s asleep: starting {replicas} replica(s); requests wait meanwhile.",
            data={"replicas": replicas, "asleep_seconds": round(asleep, 1)},
        )
        _after_commit(str(endpoint.pk))
    log.info("woke %s (%s)", slug, why)
    return True


class WakeListener(threading.Thread):
    """Blocks on the proxies' wake requests and acts on each at once (in the control worker)."""

    def __init__(self) -> None:
        super().__init__(name="wake-listener", daemon=True)
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        delay = 0.2
        down = False
        while not self.stopping.is_set():
            try:
                client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
                client.ping()
                if down:
                    log.warning("wake listener: Redis is back")
                    down = False
                self.ready.set()
                delay = 0.2
                while not self.stopping.is_set():
                    item = client.blpop([routing.wake_list_key()], timeout=1)
                    if item is not None:
                        close_old_connections()  # this thread's connection may have gone stale while it waited
                        try:
                            self.handle(item[1])
                        finally:
                            close_old_connections()
            except redis.RedisError as exc:
                if not down:
                    log.warning("wake listener: Redis unreachable (%s); the beat's tick wakes services meanwhile", exc)
                    down = True
                self.stopping.wait(delay)
                delay = min(delay * 2, 2.0)

    def handle(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            slug = str(message["endpoint"])
        except (ValueError, KeyError, TypeError):
            log.warning("wake listener: ignored a malformed wake request %r", raw[:200])
            return
        # The held request's id (ServiceEvent.request_id): its client finds the wake in the event log.
        rid = message.get("request_id") if isinstance(message, dict) else None
        try:
            with logs.bound(request_id=rid if isinstance(rid, str) else None, service=slug):
                wake(slug, why="a request")
        except Exception:
            log.exception("wake of %s failed; the beat's tick tries again while requests wait", slug)


# --- the tick ------------------------------------------------------------------------------------


def tick(now: float | None = None) -> None:
    """The beat's scale-to-zero tick: re-sent and failed-over counts, idle services to sleep, missed
    wakes, cold starts."""
    now = time.time() if now is None else now
    record_resent()
    record_failovers()
    sleep_idle(now)
    record_cold_starts()


def record_resent() -> int:
    """One event per service whose requests the proxies re-sent since the last tick; returns the total."""
    return _record_counts(
        routing.take_resent(),
        "requests_resent",
        lambda endpoint, count: (
            f"{count} request(s) re-sent to another replica after the one they reached closed without "
            f"answering (retry policy {endpoint.retry_policy}).",
            {"count": count, "retry_policy": endpoint.retry_policy},
        ),
    )


def record_failovers() -> int:
    """One event per service whose gateway requests the proxies sent to another backend of their
    model name since the last tick (every replica of it refused them, or failed them unanswered);
    returns the total."""
    return _record_counts(
        routing.take_failovers(),
        "gateway_failover",
        lambda endpoint, count: (
            f"{count} gateway request(s) went to another service of the same model name after every "
            "replica of this one refused them or failed them before answering.",
            {"count": count},
        ),
    )


def _record_counts(
    counts: dict[str, int], kind: str, say: Callable[[Endpoint, int], tuple[str, dict[str, Any]]]
) -> int:
    """One ``kind`` event per service of ``counts`` (slug -> what the proxies counted this tick),
    its message and data from ``say``; returns the total."""
    if not counts:
        return 0
    total = 0
    for endpoint in Endpoint.objects.filter(slug__in=list(counts)):
        count = counts[endpoint.slug]
        if count <= 0:
            continue
        total += count
        message, data = say(endpoint, count)
        audit.record_event(endpoint, kind, message, data=data)
    return total


def sleep_idle(now: float) -> list[str]:
    """Put to sleep the services idle past their timeout, wake the sleeping ones with requests held
    (a lost wake request); returns the slugs put to sleep."""
    rows = list(
        Endpoint.objects.filter(lifecycle=Endpoint.Lifecycle.CREATED).filter(
            Q(idle_timeout__isnull=False) | Q(slept_at__isnull=False)
        )
    )
    if not rows:
        return []
    client = routing.get_redis()
    pipe = client.pipeline(transaction=False)
    for endpoint in rows:
        pipe.hgetall(f"{settings.REDIS_PREFIX}:proxy:stats:{endpoint.slug}")
    pipe.hgetall(last_request_key())
    *hashes, remembered = pipe.execute()
    remembered = {k.decode(): float(v) for k, v in remembered.items()}
    latest: dict[str, float] = {}
    slept: list[str] = []
    for endpoint, fields in zip(rows, hashes, strict=True):
        seen = rules.activity(fields or {}, now)
        last = max(seen.last, remembered.get(endpoint.slug, 0.0))
        if seen.last > remembered.get(endpoint.slug, 0.0):
            latest[endpoint.slug] = seen.last
        if endpoint.slept_at is not None:
            if seen.in_flight > 0 and endpoint.slept_at.timestamp() < now - 1:
                wake(endpoint.slug, why="requests held by the proxies")
            continue
        if endpoint.desired_replicas == 0 or endpoint.woke_at is not None:
            continue  # scaled to 0 by hand (not asleep), or still waking
        since = max(
            endpoint.created_at.timestamp(),
            endpoint.last_scaled_at.timestamp() if endpoint.last_scaled_at else 0.0,
        )
        idle = rules.idle_for(now, rules.Activity(last, seen.in_flight), since)
        if rules.should_sleep(endpoint.idle_timeout, idle) and _put_to_sleep(endpoint, idle, now):
            slept.append(endpoint.slug)
    if latest:
        client.hset(last_request_key(), mapping={k: f"{v:.3f}" for k, v in latest.items()})
    if slept:
        # A new sleep gets a new wake: the last wake's dedupe key (proxy/report.py) must not hide it.
        client.delete(*(routing.wake_dedupe_key(slug) for slug in slept))
    return slept


def _put_to_sleep(endpoint: Endpoint, idle: float, now: float) -> bool:
    moment = datetime.fromtimestamp(now, tz=timezone.get_current_timezone())
    with transaction.atomic():
        current = endpoint.desired_replicas
        updated = Endpoint.objects.filter(
            pk=endpoint.pk,
            lifecycle=Endpoint.Lifecycle.CREATED,
            desired_replicas=current,
            slept_at__isnull=True,
            woke_at__isnull=True,
        ).update(desired_replicas=0, slept_at=moment, wake_replicas=current, last_scaled_at=moment, updated_at=moment)
        if not updated:
            return False  # changed meanwhile (scaled, modified, woken): the next tick looks again
        reason = f"no request for {idle:.0f} s (idle timeout {endpoint.idle_timeout} s): sleeping"
        telemetry.count_decision(endpoint.slug, current, 0, True)
        ScalingEvent.objects.create(
            endpoint=endpoint,
            metric=IDLE_METRIC,
            observed=round(idle, 1),
            old_replicas=current,
            new_replicas=0,
            acted=True,
            reason=reason,
            created_at=moment,
        )
        audit.record_event(
            endpoint,
            "slept",
            f"No request for {idle:.0f} s (idle timeout {endpoint.idle_timeout} s): sleeping at 0 replicas. "
            f"The next request wakes it ({current} replica(s)).",
            data={"idle_seconds": round(idle, 1), "replicas": current},
        )
        _after_commit(str(endpoint.pk))
    return True


def record_cold_starts() -> int:
    """Give each finished wake its cold-start time (wake to first healthy replica); returns how many."""
    done = 0
    for endpoint in Endpoint.objects.filter(woke_at__isnull=False, lifecycle=Endpoint.Lifecycle.CREATED):
        first = (
            Route.objects.filter(endpoint=endpoint, healthy_since__isnull=False, healthy_since__gte=endpoint.woke_at)
            .order_by("healthy_since")
            .values_list("healthy_since", flat=True)
            .first()
        )
        if first is None:
            continue
        assert endpoint.woke_at is not None
        cold = max(0.0, (first - endpoint.woke_at).total_seconds())
        with transaction.atomic():
            if not Endpoint.objects.filter(pk=endpoint.pk, woke_at=endpoint.woke_at).update(woke_at=None):
                continue
            line = (
                ScalingEvent.objects.filter(endpoint=endpoint, metric=WAKE_METRIC, created_at=endpoint.woke_at)
                .order_by("-id")
                .first()
            )
            if line is not None:
                line.observed = round(cold, 3)
                line.reason = f"{line.reason}; cold start {cold:.2f} s"[:255]
                line.save(update_fields=["observed", "reason"])
            audit.record_event(
                endpoint,
                "awake",
                f"Awake: the first replica was healthy {cold:.2f} s after the wake (cold start).",
                data={"cold_start_seconds": round(cold, 3)},
            )
            transaction.on_commit(partial(routing.publish_endpoint_safely, str(endpoint.pk)))
        done += 1
    return done


def start_listener() -> Any:
    listener = WakeListener()
    listener.start()
    return listener
