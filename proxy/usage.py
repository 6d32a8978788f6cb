"""Gateway usage (issue 17): per key, per service and per UTC day, counted in this process's memory
and added to Redis in batches by proxy/report.py (never a Redis call on a request's path).

A finished gateway request costs a dict lookup, a few int adds, one bisect into the latency buckets
and the parse of the answer's last 4 KiB for its ``usage`` (``usage_of``). Redis holds one hash per
key and day, ``<prefix>:gateway:usage:<lookup>:<day>`` (day ``YYYY-MM-DD``, UTC), with the fields
``<endpoint id>:requests``, ``:prompt``, ``:completion``, ``:errors`` and one per latency bucket
``:le:<bound>`` (seconds, ``inf`` last; the counts per bucket, not cumulative), added with HINCRBY by
every proxy; its name ``<lookup>:<day>`` joins the set ``<prefix>:gateway:usage:pending``. The
control plane folds them into the database (serving.control.usage).
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from typing import Any

from proxy.metrics import BOUNDS

_time = time.time
DAY = 86400
TAIL = 4096  # bytes of an answer's end kept to find its usage (the usage object is near its end)
LABELS = (*(f"{b:g}" for b in BOUNDS), "inf")
MAX_CELLS = 100_000  # bound on the cells kept while Redis is away

# The last "usage" of an answer and what follows it (its numbers may sit in nested objects).
_USAGE_AT = b'"usage"'
_NUMBER = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|total_tokens)"\s*:\s*(\d+)')
_USAGE_SPAN = 1024  # bytes after the last "usage" in which its numbers are looked for


def usage_of(tail: bytes | bytearray) -> tuple[int, int]:
    """(prompt, completion) tokens of the last ``usage`` object in an answer's tail ((0, 0): none).
    Reads OpenAI's chat/completions/embeddings names and the Responses API's input/output ones."""
    at = tail.rfind(_USAGE_AT)
    if at < 0:
        return 0, 0
    at = tail.find(b"{", at, at + 16)
    if at < 0:  # "usage": null (a stream's chunks before its last)
        return 0, 0
    prompt = completion = total = -1
    for name, value in _NUMBER.findall(tail, at, at + _USAGE_SPAN):
        n = int(value)
        if name in (b"prompt_tokens", b"input_tokens"):
            if prompt < 0:
                prompt = n
        elif name in (b"completion_tokens", b"output_tokens"):
            if completion < 0:
                completion = n
        elif total < 0:
            total = n
    if prompt < 0 and completion < 0 and total > 0:
        return total, 0  # only a total: counted as prompt tokens
    return max(prompt, 0), max(completion, 0)


class Cell:
    """One key's use of one service on one day, in this process, since the last push."""

    __slots__ = ("buckets", "completion", "errors", "prompt", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.prompt = 0
        self.completion = 0
        self.errors = 0
        self.buckets = [0] * (len(BOUNDS) + 1)

    def add(self, other: Cell) -> None:
        self.requests += other.requests
        self.prompt += other.prompt
        self.completion += other.completion
        self.errors += other.errors
        for i, count in enumerate(other.buckets):
            self.buckets[i] += count

    def fields(self, endpoint_id: str) -> dict[str, int]:
        out = {
            f"{endpoint_id}:requests": self.requests,
            f"{endpoint_id}:prompt": self.prompt,
            f"{endpoint_id}:completion": self.completion,
            f"{endpoint_id}:errors": self.errors,
        }
        for label, count in zip(LABELS, self.buckets, strict=True):
            if count:
                out[f"{endpoint_id}:le:{label}"] = count
        return {k: v for k, v in out.items() if v}


class Usage:
    """Every (key lookup, endpoint id, day) cell of this process since the last push."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str, str], Cell] = {}
        self._day = -1
        self._day_text = ""

    def day(self, now: float) -> str:
        number = int(now // DAY)
        if number != self._day:
            self._day = number
            self._day_text = time.strftime("%Y-%m-%d", time.gmtime(number * DAY))
        return self._day_text

    def record(self, lookup: str, endpoint_id: str, status: int, seconds: float, tail: Any) -> tuple[int, int]:
        """Count one finished gateway request; returns its (prompt, completion) tokens."""
        where = (lookup, endpoint_id, self.day(_time()))
        cell = self.cells.get(where)
        if cell is None:
            if len(self.cells) >= MAX_CELLS:
                return 0, 0
            cell = self.cells[where] = Cell()
        cell.requests += 1
        cell.buckets[bisect_left(BOUNDS, seconds)] += 1
        if status >= 400 or status == 0:
            cell.errors += 1
            return 0, 0
        if tail:
            prompt, completion = usage_of(tail)
            cell.prompt += prompt
            cell.completion += completion
            return prompt, completion
        return 0, 0

    def take(self) -> dict[tuple[str, str, str], Cell]:
        cells, self.cells = self.cells, {}
        return cells

    def give_back(self, cells: dict[tuple[str, str, str], Cell]) -> None:
        """A push failed: its cells count again with the next one."""
        for where, cell in cells.items():
            mine = self.cells.get(where)
            if mine is None:
                if len(self.cells) < MAX_CELLS:
                    self.cells[where] = cell
            else:
                mine.add(cell)


def hash_key(prefix: str, lookup: str, day: str) -> str:
    return f"{prefix}:gateway:usage:{lookup}:{day}"


def pending_key(prefix: str) -> str:
    return f"{prefix}:gateway:usage:pending"
