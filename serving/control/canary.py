"""A canary that answers with more 5xx than its stable revision is rolled back by itself (issue 16).

Every proxy adds, per minute, the answers and 5xx of each revision of an endpoint that runs several
(``proxy/report.py``: ``<prefix>:proxy:revisions:<slug>:<minute>``, fields ``<n>:answers`` and
``<n>:errors``). After each collection of the proxies' figures the control plane sums the last
``CANARY_WINDOW`` seconds of them (never from before the canary began) for every canary in
progress, asks the pure verdict (``serving.core.revisions.error_rate_verdict``: at least
``CANARY_MIN_REQUESTS`` answers, and a 5xx rate more than ``CANARY_MAX_5XX_MARGIN`` above the
stable revision's), and on a bad one moves the service back to its stable revision with an event
that gives the numbers. A canary whose replicas do not start is rolled back by the reconcile.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from serving.bus import dispatch, events, routing
from serving.control import revisions
from serving.core import revisions as pure
from serving.models import Endpoint

log = logging.getLogger(__name__)


def counts_key(prefix: str, slug: str, minute: int) -> str:
    return f"{prefix}:proxy:revisions:{slug}:{minute}"


def window_counts(client: Any, slug: str, since: float, now: float) -> dict[int, tuple[int, int]]:
    """(answers, 5xx) per revision over the minutes from ``since`` (or the window's start) to now."""
    first = int(max(since, now - settings.CANARY_WINDOW) // 60)
    minutes = range(first, int(now // 60) + 1)
    pipe = client.pipeline(transaction=False)
    for minute in minutes:
        pipe.hgetall(counts_key(settings.REDIS_PREFIX, slug, minute))
    totals: dict[int, list[int]] = {}
    for fields in pipe.execute():
        for raw_field, raw_value in fields.items():
            name = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            number, _, what = name.partition(":")
            if not number.isdigit() or what not in ("answers", "errors"):
                continue
            pair = totals.setdefault(int(number), [0, 0])
            pair[0 if what == "answers" else 1] += int(raw_value)
    return {number: (answers, errors) for number, (answers, errors) in totals.items()}


def _since(rollout: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(rollout.get("since"))).timestamp()
    except ValueError:
        return -math.inf


def check(now: float | None = None, client: Any = None) -> int:
    """Roll back every canary in progress whose 5xx rate is too high; returns how many."""
    now = time.time() if now is None else now
    canaries = [
        e
        for e in Endpoint.objects.filter(lifecycle=Endpoint.Lifecycle.CREATED).exclude(rollout={})
        if (e.rollout or {}).get("strategy") == pure.CANARY
    ]
    if not canaries:
        return 0
    client = client or routing.get_redis()
    rolled = 0
    for endpoint in canaries:
        rollout = dict(endpoint.rollout)
        counts = window_counts(client, endpoint.slug, _since(rollout), now)
        canary, stable = int(rollout.get("revision") or endpoint.spec_version), int(rollout.get("stable") or 0)
        verdict = pure.error_rate_verdict(
            counts.get(canary, (0, 0)),
            counts.get(stable, (0, 0)),
            settings.CANARY_MAX_5XX_MARGIN,
            settings.CANARY_MIN_REQUESTS,
        )
        if verdict and _roll_back(endpoint.pk, rollout, verdict):
            rolled += 1
    return rolled


def _roll_back(endpoint_id: Any, rollout: dict[str, Any], verdict: str) -> bool:
    with transaction.atomic():
        endpoint = Endpoint.objects.select_for_update(no_key=True).filter(pk=endpoint_id).first()
        if endpoint is None or endpoint.rollout != rollout:
            return False  # promoted, rolled back or changed meanwhile: that decision stands
        done = revisions.roll_back(endpoint, verdict)
        if done is None:
            return False
        events.record_event(endpoint, "rolled_back", done["message"], level="error", data=done["data"])
        key = str(endpoint.pk)
        transaction.on_commit(lambda: events.after_routes_changed(key))
        transaction.on_commit(lambda: dispatch.enqueue_reconcile(key))
    log.warning("service %s: %s", endpoint_id, done["message"])
    return True
