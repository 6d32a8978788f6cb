"""Fold the proxies' gateway usage counters (serving.bus.usage) into ``GatewayUsage`` rows: one per
key, service and UTC day, added to (never replaced). Run by the beat (serving.tasks.fold_gateway_usage)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from datetime import date
from typing import Any

from django.db import transaction

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
    p50, p95 = figures.quantile(row.latency, 0.5), figures.quantile(row.latency, 0.95)
    return {
        "day": row.day,
        "service": str(row.endpoint_id),
        "service_name": row.endpoint.name,
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "errors": row.errors,
        "p50_ms": None if p50 is None else round(p50 * 1000, 3),
        "p95_ms": None if p95 is None else round(p95 * 1000, 3),
    }


def rows_of(key: GatewayKey) -> list[dict[str, Any]]:
    """A key's usage per UTC day and service, newest day first."""
    return [usage_row(row) for row in key.usage.select_related("endpoint").order_by("-day", "endpoint__name")]
