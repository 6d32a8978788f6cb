"""What the CLI prints: results on stdout (text, or one JSON document with ``--json``), progress and
status changes on stderr, a progress bar only on a terminal and never for scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


class Output:
    def __init__(self, as_json: bool, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> None:
        self.as_json = as_json
        self.stdout = stdout
        self.stderr = stderr

    def result(self, data: Any, text: str | None = None) -> None:
        """The command's answer: ``data`` as JSON for scripts, ``text`` (or the JSON) for people."""
        if self.as_json:
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        elif text is not None:
            self.stdout.write(text.rstrip("\n") + "\n" if text else "")
        else:
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        self.stdout.flush()

    def error(self, message: str, status: int = 0) -> None:
        if self.as_json:
            body: dict[str, Any] = {"error": message}
            if status:
                body["status"] = status
            self.stdout.write(json.dumps(body) + "\n")
            self.stdout.flush()
        else:
            self.stderr.write(f"modelserve: {message}\n")

    def note(self, message: str) -> None:
        """A line for the person watching (status changes, what a push will do); silent for scripts."""
        if not self.as_json:
            self.stderr.write(message + "\n")
            self.stderr.flush()

    def progress_bar(self, total: int) -> ProgressBar:
        return ProgressBar(total, self.stderr, enabled=not self.as_json and self.stderr.isatty())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressBar:
    """``[#####-----]  40%  12.0 MiB / 30.0 MiB  name``, redrawn at most 10 times a second."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.enabled = enabled
        self.drawn_at = 0.0

    def advance(self, n: int, label: str) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.drawn_at >= 0.1 or self.done >= self.total):
            self.drawn_at = now
            filled = int(self.WIDTH * self.done / self.total)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            line = (
                f"[{bar}] {100 * self.done / self.total:3.0f}%  "
                f"{human_bytes(self.done)} / {human_bytes(self.total)}  {label[-40:]}"
            )
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(row.get(c, "") if row.get(c) is not None else "-") for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)
