"""A canary whose 5xx rate exceeds its stable revision's is rolled back by itself (issue 16), from the
per-revision answers every proxy adds up in Redis (proxy/report.py) — real Redis and database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from django.conf import settings

from proxy.report import Reporter
from proxy.table import Table
from serving.bus import routing
from serving.control import canary
from serving.models import Endpoint, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(owner=personas["owner"], name="canary", files={"model-definition.yaml": SIMPLE_DEFINITION})


@pytest.fixture
def service(api: Any, folder: Folder) -> Endpoint:
    created = api("owner").post("/api/v1/services/", {"name": "canaried", "folder": str(folder.pk)}, format="json")
    assert created.status_code == 201, created.json()
    body = {"environ": {"MODE": "two"}, "rollout": {"strategy": "canary", "percent": 10}}
    assert api("owner").patch(f"/api/v1/services/{created.json()['id']}/", body, format="json").status_code == 200
    return Endpoint.objects.get(pk=created.json()["id"])


def add(slug: str, revision: int, answers: int, errors: int, at: float) -> None:
    key = canary.counts_key(settings.REDIS_PREFIX, slug, int(at // 60))
    routing.get_redis().hincrby(key, f"{revision}:answers", answers)
    routing.get_redis().hincrby(key, f"{revision}:errors", errors)


def test_a_canary_with_too_many_5xx_is_rolled_back_with_the_numbers(service: Endpoint) -> None:
    now = time.time()
    add(service.slug, 1, 900, 9, now)  # the stable revision: 1 %
    add(service.slug, 2, 10, 3, now)  # the canary: too few answers yet to judge
    assert canary.check(now) == 0
    add(service.slug, 2, 90, 17, now)  # 20 of 100: 19 points above the stable revision
    assert canary.check(now) == 1
    service.refresh_from_db()
    assert (service.spec_version, service.traffic, service.rollout) == (1, {"1": 100}, {})
    event = ServiceEvent.objects.get(endpoint=service, kind="rolled_back")
    assert event.message == (
        "Revision 2 rolled back automatically to revision 1: its 5xx rate was 20.0% (20 of 100 requests) against "
        "1.0% (9 of 900) for the stable revision, more than the 5.0% margin."
    )
    assert event.level == ServiceEvent.Level.ERROR and event.data["automatic"] is True
    assert canary.check(now) == 0  # once


def test_a_healthy_canary_stays_and_old_answers_do_not_count(service: Endpoint) -> None:
    now = time.time()
    add(service.slug, 1, 500, 5, now)
    add(service.slug, 2, 100, 3, now)  # 3 %: within the 5-point margin
    add(service.slug, 2, 100, 90, now - 3600)  # before the canary began and outside the window
    assert canary.check(now) == 0
    service.refresh_from_db()
    assert service.rollout["strategy"] == "canary" and service.traffic == {"1": 90, "2": 10}


def test_the_proxy_adds_each_revisions_answers_and_5xx_once() -> None:
    """The proxy's push: per revision, the answers and 5xx of its routes since the previous push."""
    table = Table("redis://unused", settings.REDIS_PREFIX, 10)
    routes = [
        {"id": "a1", "host": "10.0.0.1", "port": 8000, "weight": 1, "revision": 1},
        {"id": "b1", "host": "10.0.0.2", "port": 8000, "weight": 1, "revision": 2},
    ]
    entry = {"id": "e", "slug": "split", "name": "split", "public": True, "status": "HEALTHY", "routes": routes}
    table.apply("split", {**entry, "shares": {"1": 90, "2": 10}, "tokens": {}})
    endpoint = table.endpoints["split"]
    stable, fresh = endpoint.by_revision[1].routes[0], endpoint.by_revision[2].routes[0]
    stable.codes[2] += 50
    stable.codes[5] += 1
    fresh.codes[2] += 4
    fresh.codes[5] += 6
    endpoint.stats.observe(200, 0.01)  # the endpoint's own counters move with its routes'
    reporter = Reporter(settings.REDIS_URL, settings.REDIS_PREFIX, "test", table, 10)

    async def push_twice() -> None:
        await reporter.flush()
        fresh.codes[5] += 2
        await reporter.flush()
        await reporter.client.aclose()

    asyncio.run(push_twice())
    now = time.time()
    assert canary.window_counts(routing.get_redis(), "split", now - 60, now) == {1: (51, 1), 2: (12, 8)}
