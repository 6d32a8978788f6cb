"""Read the processes' heartbeats from Redis (written by serving/worker.py and proxy/report.py; the
key and value shapes are in serving/core/processes.py), for the admin's Processes page."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings

from serving.bus.nodebus import redis_client
from serving.core import processes


def running(now: float | None = None) -> list[dict[str, Any]]:
    """Every process whose heartbeat has not expired, by node, kind and host; ``age`` in seconds."""
    now = time.time() if now is None else now
    client = redis_client(read_timeout=2)
    try:
        keys = list(client.scan_iter(match=processes.pattern(settings.REDIS_PREFIX), count=500))
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    found = []
    for raw in values:
        beat = processes.parse(raw)
        if beat is not None:
            beat["age"] = max(0.0, now - float(beat.get("t") or 0))
            found.append(beat)
    return sorted(found, key=lambda b: (b.get("node") or "", b["kind"], str(b.get("host")), int(b.get("pid") or 0)))
