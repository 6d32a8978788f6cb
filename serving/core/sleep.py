"""Scale to zero, the pure half: when a service with an idle timeout has been idle long enough.

The proxies' stats samples (proxy/report.py, one JSON field per proxy process) each say ``last``:
the epoch of the last push that saw a request of the service (arrived, in flight or held), and
``in_flight``. The shell (serving/control/sleep.py) reads them, remembers the latest ``last`` across
ticks (a stopped proxy's sample expires), and asks here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STALE_AFTER = 10.0  # a sample older than this is a proxy that stopped: its in_flight no longer counts


@dataclass(frozen=True)
class Activity:
    last: float  # epoch of the latest request any proxy saw (0: none)
    in_flight: int  # requests in flight or held now, over the proxies that report


def activity(fields: Mapping[Any, Any], now: float, stale_after: float = STALE_AFTER) -> Activity:
    """The proxies' view of one service from its stats hash; unreadable fields are skipped."""
    last = 0.0
    in_flight = 0
    for value in fields.values():
        try:
            sample = json.loads(value)
            t = float(sample.get("t", 0))
            seen = float(sample.get("last", 0) or 0)
            busy = int(sample.get("in_flight", 0) or 0)
        except (TypeError, ValueError, AttributeError):
            continue
        last = max(last, seen)
        if now - t <= stale_after:
            in_flight += max(busy, 0)
    return Activity(last, in_flight)


def idle_for(now: float, activity: Activity, since: float) -> float:
    """Seconds the service has been idle: since its last request, or since ``since`` (created,
    last scaled or woken) when that is later or no request was seen; 0 while a request is in flight."""
    if activity.in_flight > 0:
        return 0.0
    return max(0.0, now - max(activity.last, since))


def should_sleep(idle_timeout: int | None, idle: float) -> bool:
    return idle_timeout is not None and idle >= idle_timeout
