"""Fold the proxies' gateway usage counters (serving.bus.usage) into ``GatewayUsage`` rows: one per
key, service and UTC day, added to (never replaced). Run by the beat (serving.tasks.fold_gateway_usage)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from datetime import date, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from serving.bus import usage as bus_usage
from serving.core import usage as figures
from serving.models import Endpoint, GatewayKey, GatewayUsage

log = logging.getLogger(__name__)


def fold() -> int:
    """Fold every pending hash; returns how many rows were added to."""
    rows = 0
    for member in bus_usage.members():
        lookup, _, day_text = member.rpartition(":")
        try:
            day = date.fromisoformat(day_text)
        except ValueError:
            log.warning("gateway usage: %r is not <lookup>:<day>; left alone", member)
            continue
        raw = bus_usage.take(member)
        rows += _add(lookup, day, figures.parse_fields(raw))
        bus_usage.done(member)
    return rows


@transaction.atomic
def _add(lookup: str, day: date, counts: dict[str, figures.Counts]) -> int:
    key = GatewayKey.objects.filter(lookup=lookup).first()
    if key is None:  # a key deleted since: its usage goes with it
        return 0
    ids: dict[uuid.UUID, figures.Counts] = {}
    for endpoint_id, c in counts.items():
        with contextlib.suppress(ValueError):
            ids[uuid.UUID(endpoint_id)] = c
    live = set(Endpoint.objects.filter(pk__in=list(ids)).values_list("pk", flat=True))
    added = 0
    for pk, c in ids.items():
        if pk not in live:  # a service deleted since
            continue
        row, _ = GatewayUsage.objects.select_for_update().get_or_create(key=key, endpoint_id=pk, day=day)
        row.requests += c.requests
        row.prompt_tokens += c.prompt
        row.completion_tokens += c.completion
        row.errors += c.errors
        row.latency = figures.merge_latency(row.latency or {}, c.latency)
        row.save()
        added += 1
    return added


def usage_row(row: GatewayUsage) -> dict[str, Any]:
    """One usage row as the API, its CSV and the key's page show it (latencies in milliseconds)."""
    return {
        "day": row.day,
        "service": str(row.endpoint_id),
        "service_name": row.endpoint.name,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "errors": row.errors,
        "p50_ms": _ms(figures.quantile(row.latency, 0.5)),
        "p95_ms": _ms(figures.quantile(row.latency, 0.95)),
    }


def rows_of(key: GatewayKey) -> list[dict[str, Any]]:
    """A key's usage per UTC day and service, newest day first."""
    return [usage_row(row) for row in key.usage.select_related("endpoint").order_by("-day", "endpoint__name")]


# --- a service's gateway usage (its page's Usage panel and GET /api/v1/services/{id}/usage/) --------

DEFAULT_DAYS = 14
MAX_DAYS = 366


def _window(days: int, today: date) -> tuple[date, list[date]]:
    """The first day of a window of ``days`` UTC days ending with ``today``, and its days newest first."""
    every = [today - timedelta(days=n) for n in range(days)]
    return every[-1], every


def service_days(endpoint: Endpoint, *, days: int = DEFAULT_DAYS, today: date | None = None) -> list[dict[str, Any]]:
    """The service's gateway usage per UTC day, summed over every key, newest first: one row for each
    day of the window, a day without requests included (as zeros), so that a gap reads as a gap. p50
    and p95 come from the day's merged latency histograms (so they weigh each request alike)."""
    first, every = _window(days, today or timezone.now().date())
    totals: dict[date, dict[str, Any]] = {
        day: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "latency": {}} for day in every
    }
    for row in GatewayUsage.objects.filter(endpoint=endpoint, day__gte=first, day__lte=every[0]):
        total = totals[row.day]
        for name in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            total[name] += getattr(row, name)
        total["latency"] = figures.merge_latency(total["latency"], row.latency or {})
    out = []
    for day in every:
        total = totals[day]
        latency = total.pop("latency")
        out.append(
            {
                "day": day,
                **total,
                "p50_ms": _ms(figures.quantile(latency, 0.5)),
                "p95_ms": _ms(figures.quantile(latency, 0.95)),
            }
        )
    return out


def service_keys(endpoint: Endpoint, *, days: int = DEFAULT_DAYS, today: date | None = None) -> list[dict[str, Any]]:
    """The keys that called the service in the window, the busiest first (by requests, then tokens):
    each key's name, prefix, owner and project, never its secret (only its digest is kept anyway)."""
    first, every = _window(days, today or timezone.now().date())
    sums = (
        GatewayUsage.objects.filter(endpoint=endpoint, day__gte=first, day__lte=every[0])
        .values("key")
        .annotate(
            requests_sum=Sum("requests"),
            prompt_sum=Sum("prompt_tokens"),
            completion_sum=Sum("completion_tokens"),
            errors_sum=Sum("errors"),
        )
    )
    keys = GatewayKey.objects.select_related("owner", "project").in_bulk([s["key"] for s in sums])
    out = []
    for s in sums:
        key = keys.get(s["key"])
        if key is None:  # deleted between the two queries (its rows go with it)
            continue
        out.append(
            {
                "key": str(key.pk),
                "key_name": key.name,
                "key_prefix": key.prefix,
                "owner": key.owner.username,
                "project": key.project.name if key.project else None,
                "requests": s["requests_sum"],
                "prompt_tokens": s["prompt_sum"],
                "completion_tokens": s["completion_sum"],
                "errors": s["errors_sum"],
            }
        )
    out.sort(key=lambda r: (-r["requests"], -(r["prompt_tokens"] + r["completion_tokens"]), r["key_name"]))
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
