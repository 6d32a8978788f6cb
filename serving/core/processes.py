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


def host_pattern(prefix: str, kind: str, host: str) -> str:
    """The keys of every ``kind`` process on ``host`` (a host name holds no glob characters)."""
    return f"{prefix}:process:{kind}:{host}:*"


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


# --- a process's own health (``manage.py worker_health``, an orchestrator's health check) ------------

ROLES = ("control", "node", "beat")  # the processes whose only sign of life is their heartbeat
FRESH = 3 * INTERVAL  # a beat older than this is stale: at least two were missed (the key lives TTL)
ROLE_NAMES = {"control": "control worker", "node": "node worker", "beat": "beat"}


def health(
    beats: list[dict[str, Any]], role: str, host: str, now: float, node: str = "", max_age: float = FRESH
) -> tuple[bool, str]:
    """Whether the ``role`` process on ``host`` (for a node worker: of node ``node``) beats: True and
    when it last did, or False and a sentence saying what is wrong and where to look.

    ``beats`` are parsed heartbeat values; those of other kinds, hosts or nodes are not looked at.
    Several of one role on a host (a restart within the key's TTL): the freshest counts."""
    what = ROLE_NAMES.get(role, role)
    if role == "node":
        what = f"node worker of node {node!r}"
    mine = [
        b
        for b in beats
        if b.get("kind") == role and str(b.get("host")) == host and (role != "node" or b.get("node") == node)
    ]
    if not mine:
        return False, (
            f"No heartbeat of a {what} on host {host!r}: it is not running, has not finished starting, or "
            "writes to another Redis (check REDIS_URL and REDIS_PREFIX, and the process's log)."
        )
    freshest = max(mine, key=lambda b: float(b.get("t") or 0))
    age = max(0.0, now - float(freshest.get("t") or 0))
    pid = freshest.get("pid")
    if age > max_age:
        return False, (
            f"The {what} on host {host!r} (pid {pid}) last beat {age:.0f} s ago, more than {max_age:g} s: it is "
            "stuck or can not write to Redis; see its log."
        )
    return True, f"The {what} on host {host!r} (pid {pid}) beat {age:.1f} s ago."
