"""Log lines as JSON (``LOG_FORMAT=json``), shared by every process: web, workers, node agents, proxy.

Pure stdlib, so the proxy (which imports no Django) uses the same formatter. Each line is one JSON
object: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, ``process`` (web, control,
node, proxy, ...), then the context that applies where the line was written — ``request_id``,
``service``, ``route``, ``node``, ``task`` — from context variables set at the edges (a Django
middleware, Celery's task_prerun signal, the node agent, the proxy), and any ``extra={...}`` the
call passed. An exception adds ``exc``, its formatted traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# What a request id may look like: a client's X-Request-ID is kept when it matches (else a new one is
# made), and the events API's ``?request_id=`` filter accepts what matches.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
FIELDS = ("request_id", "service", "route", "node", "task")
_context: dict[str, ContextVar[str]] = {name: ContextVar(f"log_{name}", default="") for name in FIELDS}
_process: dict[str, str] = {}  # fields of the whole process: its kind, and a node agent's node

# The attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind(**values: str | None) -> None:
    """Set context fields for what runs next in this thread or asyncio task (None or "" clears)."""
    for name, value in values.items():
        _context[name].set(str(value) if value else "")


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """``bind`` for a block only: the fields are as they were after it (a listener thread that acts
    on one message after another must not lend one message's request id to the next)."""
    tokens = [(_context[name], _context[name].set(str(value) if value else "")) for name, value in values.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def clear() -> None:
    for var in _context.values():
        var.set("")


def current() -> dict[str, str]:
    return {name: value for name, var in _context.items() if (value := var.get())}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_process)
        line.update(current())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def json_enabled() -> bool:
    """Whether LOG_FORMAT asks for JSON; any value but json/text stops the process with a sentence."""
    raw = os.environ.get("LOG_FORMAT", "").strip().lower()
    if raw in ("", "text", "plain"):
        return False
    if raw == "json":
        return True
    raise SystemExit(f"LOG_FORMAT={raw!r} is not a log format: use json, or text (the default).")


def set_process(kind: str, node: str = "") -> None:
    """Name this process in every JSON line (web, control, beat, node, proxy), and its node if any:
    unlike the context fields, these hold in every thread (a node agent's threads included)."""
    _process.clear()
    _process["process"] = kind
    if node:
        _process["node"] = node


def configure(level: str, kind: str) -> None:
    """Set up the root logger for a process outside Django (the proxy): plain text or JSON lines."""
    set_process(kind)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_enabled() else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
