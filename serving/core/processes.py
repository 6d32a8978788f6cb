"""Process heartbeats: every long-running process says it is alive in Redis (pure: names and shapes).

Key ``<prefix>:process:<kind>:<host>:<pid>``, a JSON value ``{"kind", "host", "pid", "node",
"version", "started", "t"}``, with a TTL of a few beats: a process that stops beating disappears
from the admin's Processes page by itself. Written by the Celery workers and beat
(serving/worker.py), the node agents and the proxy (proxy/report.py); read by the admin.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from typing import Any

INTERVAL = 5.0  # seconds between beats
TTL = 20  # a key outlives three missed beats
KINDS = ("web", "control", "beat", "node", "proxy")


def _version() -> str:
    try:
        return metadata.version("modelserve")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "0.1.0"


VERSION = _version()


def key(prefix: str, kind: str, host: str, pid: int) -> str:
    return f"{prefix}:process:{kind}:{host}:{pid}"


def pattern(prefix: str) -> str:
    return f"{prefix}:process:*"


def beat(kind: str, host: str, pid: int, started: float, node: str = "", now: float | None = None) -> str:
    return json.dumps(
        {
            "kind": kind,
            "host": host,
            "pid": pid,
            "node": node,
            "version": VERSION,
            "started": round(started, 3),
            "t": round(time.time() if now is None else now, 3),
        },
        separators=(",", ":"),
    )


def parse(raw: bytes | str | None) -> dict[str, Any] | None:
    """One heartbeat value, or None if it is not one (a reader never fails on a bad key)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        return None
    return value
