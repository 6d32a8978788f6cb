"""A bounded load generator on 127.0.0.1 that counts every request and how it ended.

``Load(url, concurrency=4)`` runs ``concurrency`` clients in an asyncio loop of its own thread; each
client keeps one HTTP/1.1 keep-alive connection (reconnecting when it breaks) and sends one request
after another, pausing ``pause`` seconds in between. Every request becomes an ``Outcome``: its start
(monotonic), duration, status (None when no answer came: connection error or client timeout), its
``Retry-After`` header and the error. Bounded on every side: a per-request ``timeout``, at most
``max_seconds`` of running (then the clients stop by themselves) and at most ``max_requests``.

No library between the client and the socket: a proxy's behaviour (a reset, a half answer, a hang)
reaches the counts as it is, not as a client library's retry policy would present it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Outcome:
    started: float
    elapsed: float
    status: int | None
    error: str = ""
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def ended(self) -> float:
        return self.started + self.elapsed


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def between(self, start: float, end: float) -> list[Outcome]:
        """Requests that *started* in [start, end)."""
        return [o for o in self.outcomes if start <= o.started < end]

    def by_status(self) -> Counter[str]:
        return Counter(
            str(o.status) if o.status is not None else f"error:{o.error.split(':')[0]}" for o in self.outcomes
        )

    def summary(self) -> str:
        latencies = sorted(o.elapsed for o in self.outcomes) or [0.0]
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        return (
            f"{len(self.outcomes)} requests, {len(self.failures)} failed, by status {dict(self.by_status())}, "
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1]:.2f} s"
        )


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Load:
    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 4,
        method: str = "GET",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        pause: float = 0.02,
        timeout: float = 10.0,
        max_seconds: float = 240.0,
        max_requests: int | None = None,
        keep_alive: bool = True,
    ) -> None:
        parts = urlsplit(url)
        assert parts.hostname in ("127.0.0.1", "localhost"), "the load stays on the loopback"
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.concurrency = concurrency
        self.method = method
        self.body = body
        self.headers = {"Host": f"{self.host}:{self.port}", **(headers or {})}
        if body or method in ("POST", "PUT"):
            self.headers["Content-Length"] = str(len(body))
        if not keep_alive:
            self.headers["Connection"] = "close"
        self.pause = pause
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.report = Report()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent = 0
        self.started_at = 0.0

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> Load:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Report:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 10)
            assert not self._thread.is_alive(), "the load generator did not stop"
        return self.report

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self) -> int:
        return len(self.report.outcomes)

    def wait_done(self, timeout: float = 60.0) -> Report:
        """Until every client stopped by itself (``max_requests`` sent, or ``max_seconds`` passed)."""
        assert self._thread is not None
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), f"the load did not finish in {timeout:g} s"
        return self.report

    def successes(self) -> int:
        return sum(1 for o in self.report.outcomes if o.ok)

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        """Until at least ``count`` more requests succeeded (the load is flowing)."""
        target = self.successes() + count
        deadline = time.monotonic() + timeout
        while self.successes() < target:
            assert time.monotonic() < deadline, f"the load did not reach {count} requests in {timeout:g} s"
            assert self._thread is not None and self._thread.is_alive(), "the load generator stopped"
            time.sleep(0.02)

    # --- the clients -----------------------------------------------------------------------------

    async def _main(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        clients = [asyncio.create_task(self._client(deadline)) for _ in range(self.concurrency)]
        await asyncio.gather(*clients, return_exceptions=True)

    def _more(self, deadline: float) -> bool:
        if self._stop.is_set() or time.monotonic() >= deadline:
            return False
        return self.max_requests is None or self._sent < self.max_requests

    async def _client(self, deadline: float) -> None:
        head = (
            f"{self.method} {self.path} HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            + "\r\n"
        ).encode("latin-1") + self.body
        conn: _Conn | None = None
        while self._more(deadline):
            self._sent += 1
            started = time.monotonic()
            status: int | None = None
            retry_after: str | None = None
            error = ""
            try:
                if conn is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), timeout=self.timeout
                    )
                    conn = _Conn(reader, writer)
                status, retry_after, keep = await asyncio.wait_for(self._exchange(conn, head), timeout=self.timeout)
                if not keep:
                    conn.close()
                    conn = None
            except TimeoutError:
                error = "timeout: no complete answer within the client's timeout"
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                error = f"{exc.__class__.__name__}: {exc}"
            if status is None and conn is not None:
                conn.close()
                conn = None
            self.report.outcomes.append(
                Outcome(started, time.monotonic() - started, status, error=error, retry_after=retry_after)
            )
            if self.pause:
                await asyncio.sleep(self.pause)
        if conn is not None:
            conn.close()

    @staticmethod
    async def _exchange(conn: _Conn, request: bytes) -> tuple[int, str | None, bool]:
        conn.writer.write(request)
        await conn.writer.drain()
        raw = await conn.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await conn.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await conn.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif "content-length" in headers:
            await conn.reader.readexactly(int(headers["content-length"]))
        else:
            await conn.reader.read()  # framed by the close
            return status, headers.get("retry-after"), False
        keep = headers.get("connection", "").lower() != "close"
        return status, headers.get("retry-after"), keep
