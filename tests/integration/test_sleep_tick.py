"""Scale to zero's control half against the real Redis and DB with an injected clock (no workers,
no replicas: those are in test_scale_to_zero): the sleep tick, wake, the cold start, the re-sent
counts and an autoscaling rule with min_replicas 0."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from serving.actions import services
from serving.bus import metrics, routing
from serving.bus.routing import get_redis
from serving.control import autoscaling, sleep
from serving.models import AutoScalingRule, Endpoint, Route, ScalingEvent, ServiceEvent

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_reconcile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    kicked: list[str] = []
    monkeypatch.setattr("serving.bus.dispatch.enqueue_reconcile", kicked.append)
    return kicked


@pytest.fixture
def endpoint(personas: dict[str, Any]) -> Endpoint:
    created = timezone.now() - timedelta(seconds=100)
    return Endpoint.objects.create(
        name="sleepy", owner=personas["owner"], desired_replicas=2, idle_timeout=30, created_at=created
    )


def push_sample(slug: str, t: float, last: float, in_flight: int = 0, proxy: str = "p1:8080:1") -> None:
    """What a proxy's reporter writes (proxy/report.py)."""
    sample = {"t": t, "window": 2, "rps": 0, "requests": 0, "in_flight": in_flight, "p95_ms": 0, "last": last}
    get_redis().hset(f"{settings.REDIS_PREFIX}:proxy:stats:{slug}", proxy, json.dumps(sample))


def test_a_service_idle_past_its_timeout_sleeps_and_one_in_use_does_not(endpoint: Endpoint, personas: Any) -> None:
    now = timezone.now().timestamp()
    busy = Endpoint.objects.create(name="busy", owner=personas["owner"], idle_timeout=30)
    never = Endpoint.objects.create(name="never", owner=personas["owner"], created_at=endpoint.created_at)
    push_sample(endpoint.slug, t=now, last=now - 31)
    push_sample(busy.slug, t=now, last=now - 100, in_flight=1)  # a long stream is not idle
    assert sleep.sleep_idle(now) == [endpoint.slug]
    endpoint.refresh_from_db()
    assert (endpoint.desired_replicas, endpoint.wake_replicas) == (0, 2) and endpoint.slept_at is not None
    assert endpoint.compute_status([]) == "SLEEPING"
    line = ScalingEvent.objects.get(endpoint=endpoint, metric="idle")
    assert (line.old_replicas, line.new_replicas, line.acted, line.observed) == (2, 0, True, 31.0)
    assert "idle timeout 30 s" in ServiceEvent.objects.get(endpoint=endpoint, kind="slept").message
    assert Endpoint.objects.get(pk=busy.pk).slept_at is None
    assert Endpoint.objects.get(pk=never.pk).slept_at is None  # no idle timeout: never sleeps
    # The latest request time outlives the proxies' samples (they expire when a proxy stops).
    assert float(get_redis().hget(sleep.last_request_key(), busy.slug)) == pytest.approx(now - 100, abs=0.01)
    assert sleep.sleep_idle(now + 1) == []  # asleep already: nothing more


def test_a_recent_request_or_a_recent_start_keeps_it_awake(endpoint: Endpoint) -> None:
    now = timezone.now().timestamp()
    push_sample(endpoint.slug, t=now, last=now - 10)
    assert sleep.sleep_idle(now) == []
    get_redis().delete(f"{settings.REDIS_PREFIX}:proxy:stats:{endpoint.slug}")  # the proxy went away
    assert sleep.sleep_idle(now + 15) == []  # its last request is remembered: 25 s idle
    assert sleep.sleep_idle(now + 21) == [endpoint.slug]


def test_wake_restores_the_replicas_once_and_the_cold_start_is_logged(endpoint: Endpoint, _no_reconcile: Any) -> None:
    now = timezone.now().timestamp()
    push_sample(endpoint.slug, t=now, last=now - 40)
    get_redis().set(routing.wake_dedupe_key(endpoint.slug), "an earlier wake")
    assert sleep.sleep_idle(now) == [endpoint.slug]
    assert not get_redis().exists(routing.wake_dedupe_key(endpoint.slug))  # a new sleep gets a new wake
    woke = timezone.now()
    assert sleep.wake(endpoint.slug, now=woke) is True
    assert sleep.wake(endpoint.slug) is False  # awake already: a second proxy's request changes nothing
    endpoint.refresh_from_db()
    assert (endpoint.desired_replicas, endpoint.slept_at, endpoint.woke_at) == (2, None, woke)
    assert ScalingEvent.objects.filter(endpoint=endpoint, metric="wake").count() == 1
    assert ServiceEvent.objects.filter(endpoint=endpoint, kind="woken").count() == 1
    assert routing.build_entry(endpoint, [], [])["scale_to_zero"] is True
    assert sleep.record_cold_starts() == 0  # no healthy replica yet
    Route.objects.create(endpoint=endpoint, status="healthy", healthy_since=woke + timedelta(seconds=1.25))
    assert sleep.record_cold_starts() == 1
    line = ScalingEvent.objects.get(endpoint=endpoint, metric="wake")
    assert line.observed == 1.25 and "cold start 1.25 s" in line.reason
    assert Endpoint.objects.get(pk=endpoint.pk).woke_at is None
    assert "1.25 s" in ServiceEvent.objects.get(endpoint=endpoint, kind="awake").message


def test_the_tick_wakes_a_sleeping_service_whose_proxies_hold_requests(endpoint: Endpoint) -> None:
    slept = timezone.now() - timedelta(seconds=10)
    Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=0, slept_at=slept, wake_replicas=2)
    now = timezone.now().timestamp()
    push_sample(endpoint.slug, t=now, last=now, in_flight=3)  # a lost wake request: they wait
    sleep.sleep_idle(now)
    assert Endpoint.objects.get(pk=endpoint.pk).desired_replicas == 2
    assert "requests held by the proxies" in ServiceEvent.objects.get(endpoint=endpoint, kind="woken").message


def test_the_proxies_re_sent_counts_become_one_event_per_service(endpoint: Endpoint) -> None:
    get_redis().hincrby(routing.resent_key(), endpoint.slug, 3)
    get_redis().hincrby(routing.resent_key(), endpoint.slug, 2)  # a second proxy
    get_redis().hincrby(routing.resent_key(), "gone-service", 1)
    assert sleep.record_resent() == 5
    event = ServiceEvent.objects.get(endpoint=endpoint, kind="requests_resent")
    assert event.data == {"count": 5, "retry_policy": "inference"} and event.message.startswith("5 request(s)")
    assert sleep.record_resent() == 0  # taken: counted once


def test_the_proxies_gateway_failover_counts_become_one_event_per_service(endpoint: Endpoint) -> None:
    get_redis().hincrby(routing.failovers_key(), endpoint.slug, 2)
    get_redis().hincrby(routing.failovers_key(), endpoint.slug, 1)  # a second proxy
    get_redis().hincrby(routing.failovers_key(), "gone-service", 4)
    sleep.tick()  # the beat's tick takes them
    event = ServiceEvent.objects.get(endpoint=endpoint, kind="gateway_failover")
    assert event.data == {"count": 3} and event.message.startswith("3 gateway request(s)")
    assert sleep.record_failovers() == 0  # taken: counted once
    assert get_redis().hget(routing.failovers_key(), "gone-service") is None


def test_the_wake_listener_acts_on_a_proxys_request(endpoint: Endpoint) -> None:
    Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=0, slept_at=timezone.now(), wake_replicas=1)
    listener = sleep.WakeListener()
    listener.handle(json.dumps({"endpoint": endpoint.slug, "proxy": "p1"}).encode())
    listener.handle(b"not json")  # logged and skipped
    assert Endpoint.objects.get(pk=endpoint.pk).desired_replicas == 1


def test_an_autoscaling_rule_with_min_replicas_0_puts_it_to_sleep(personas: Any) -> None:
    scaled = Endpoint.objects.create(name="ruled", owner=personas["owner"], desired_replicas=1)
    AutoScalingRule.objects.create(
        endpoint=scaled,
        direction="in",
        source="proxy",
        metric="rps",
        comparator="LESS_THAN",
        threshold=1,
        step=-1,
        min_replicas=0,
        max_replicas=3,
        cooldown=0,
        window=20,
    )
    now = datetime.now(tz=UTC)
    metrics.record([metrics.Point("proxy", str(scaled.pk), "rps", now.timestamp() - 1, 0.0)], now.timestamp())
    autoscaling.tick(now)
    scaled.refresh_from_db()
    assert (scaled.desired_replicas, scaled.wake_replicas) == (0, 1) and scaled.slept_at is not None
    assert scaled.compute_status([]) == "SLEEPING"
    assert routing.build_entry(scaled, [], [])["scale_to_zero"] is True
    assert sleep.wake(scaled.slug) is True
    assert Endpoint.objects.get(pk=scaled.pk).desired_replicas == 1


def test_a_count_set_by_hand_ends_a_sleep(endpoint: Endpoint, personas: Any) -> None:
    for change in ("scale", "modify"):
        Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=0, slept_at=timezone.now(), wake_replicas=2)
        endpoint.refresh_from_db()
        if change == "scale":
            services.do_scale(endpoint, 1, acting_user=personas["owner"])
        else:
            services.do_modify_service(endpoint, acting_user=personas["owner"], changes={"desired_replicas": 3})
        endpoint.refresh_from_db()
        assert endpoint.slept_at is None and endpoint.desired_replicas in (1, 3)
        assert endpoint.compute_status([]) != "SLEEPING"
