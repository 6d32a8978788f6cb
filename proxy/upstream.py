"""The replica's side of the relay: one ``Upstream`` per connection to a replica.

Connections are pooled per route between requests (HTTP/1.1 keep-alive; the pool is on the
``Route``, proxy/table.py). An ``Upstream`` relays the answer to its ``Exchange`` (proxy/exchange.py):
the head is checked as bytes and, when nothing needs changing, head and body go to the client
exactly as they arrived, one write per received packet; the parser only says where the answer
ends; an error answer (4xx, 5xx) without ``X-Request-ID`` gets the request's. Otherwise the head
is rewritten (hop-by-hop headers, cookies, framing for the client's HTTP version). A 101 Switching
Protocols turns both connections into one byte tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from proxy.exchange import (
    NEVER_NOMINATED,
    PAUSE_UPSTREAM_FULL,
    Exchange,
    RelayState,
    connection_options,
    forwarded_set_cookie,
    set_nodelay,
)
from proxy.usage import TAIL

if TYPE_CHECKING:
    from proxy.downstream import Downstream
    from proxy.table import Route

log = logging.getLogger("proxy")

_monotonic = time.monotonic
_time = time.time

MAX_RESPONSE_HEAD = 64 * 1024
# Response headers that make the verbatim relay wrong, searched in the raw head: hop-by-hop ones, and
# Set-Cookie (a replica must not set cookies on the caller's browser, at least not the platform's).
RESPONSE_HOP_SEARCH = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-|te|trailer|upgrade|set-cookie)[ \t]*:", re.IGNORECASE
)
# A replica's error answer gets the request's id, unless it sent one itself (many servers echo it):
# the client can then find the request in the access log, the replica's log and the event log.
REQUEST_ID_SEARCH = re.compile(rb"\r\nx-request-id[ \t]*:", re.IGNORECASE)
RESPONSE_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"transfer-encoding"))

# How a response body goes to the client.
MODE_HEAD = 0  # the response head has not arrived yet
MODE_PASS = 1  # bytes relayed as they are (Content-Length, or chunked to an HTTP/1.1 client)
MODE_NONE = 2  # no body (HEAD, 204, 304, 101)
MODE_CHUNK = 3  # the replica ends the body by closing: re-framed as chunks for an HTTP/1.1 client
MODE_UNTIL_CLOSE = 4  # ... or relayed and ended by closing, for an HTTP/1.0 client


def _request_id_header(ex: Exchange, buf: bytes, end: int) -> bytes:
    """``X-Request-ID`` for a replica's error answer (status >= 400) that does not carry one."""
    rid = ex.rid
    if rid is None or REQUEST_ID_SEARCH.search(buf, 0, end + 2) is not None:
        return b""
    return b"X-Request-ID: %b\r\n" % rid


def _service_header(ex: Exchange) -> bytes:
    """Which service answered a request to the gateway (proxy/gateway.py), and the key's budgets."""
    endpoint = ex.endpoint
    header = b"X-Modelserve-Service: %b\r\n" % (endpoint.slug.encode("latin-1") if endpoint is not None else b"-")
    limit = ex.limit
    if limit is not None and (limit.requests is not None or limit.tokens is not None):
        header += limit.headers(_time())
    return header


class Upstream(asyncio.Protocol):
    """One connection to a replica; pooled per route between requests (HTTP/1.1 keep-alive).

    The parser only delimits messages and says whether the connection persists (no per-header
    callbacks): the head is inspected as bytes, and when it needs no change (a persistent HTTP/1.1
    answer without hop-by-hop headers, the common case) the received bytes go to the client as they
    are, head and body in one write.
    """

    __slots__ = (
        "closed",
        "done",
        "ex",
        "garbage",
        "head_seen",
        "headbuf",
        "idle_since",
        "interim",
        "keep",
        "mode",
        "parser",
        "proxy",
        "route",
        "served",
        "skipped_interim",
        "status",
        "transport",
        "tunnel",
    )

    def __init__(self, proxy: RelayState, route: Route) -> None:
        self.proxy = proxy
        self.route = route
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.ex: Exchange | None = None
        self.tunnel: Downstream | None = None
        self.served = 0
        self.idle_since = 0.0
        self.closed = False
        self.done = False
        self.garbage = False
        self.mode = MODE_HEAD
        self.headbuf = b""
        self.keep = False
        self.status = 0
        self.interim = 0  # interim (1xx) answers whose end the parser has yet to report
        self.skipped_interim = 0  # ... and whose heads are still to be cut off the bytes
        self.head_seen = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            if self.tunnel is not None:
                self.tunnel.last_active = _monotonic()
                self.tunnel.transport.write(data)
            else:
                self.close()  # a pooled connection talking out of turn: not to be trusted
            return
        ex.got_bytes = True
        ex.last_active = _monotonic()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            offset = exc.args[0]
            head = self._head(ex, self.headbuf + data[:offset] if self.headbuf else data[:offset])
            self._switch_protocols(ex, head + data[offset:])
            return
        except HttpParserError as exc:
            if isinstance(exc, HttpParserCallbackError):
                log.exception("bug while relaying a response")
            self._broken(ex, f"invalid HTTP from the replica: {exc}")
            return
        if self.garbage:
            self._broken(ex, "the replica sent more than one response")
            return
        tail = ex.tail
        if tail is not None:  # a gateway request: its usage is near the answer's end (proxy/usage.py)
            if len(data) >= TAIL:
                tail[:] = data[-TAIL:]  # one 4 KiB copy, whatever the piece's size
            else:
                tail += data
                if len(tail) > TAIL:
                    del tail[: len(tail) - TAIL]  # O(1)-ish: a bytearray drops its head in place
        mode = self.mode
        if mode == MODE_PASS:
            ex.down.transport.write(data)
        elif mode == MODE_HEAD:
            out = self._head(ex, self.headbuf + data if self.headbuf else data)
            if out:
                ex.down.transport.write(out)
        elif mode == MODE_CHUNK:
            ex.down.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        elif mode == MODE_UNTIL_CLOSE:
            ex.down.transport.write(data)
        if self.done or (ex.head_request and ex.response_started):
            # (after a HEAD the head is all: llhttp would wait for a body, so no reuse)
            self._finish(ex)

    def _head(self, ex: Exchange, buf: bytes) -> bytes:
        """The bytes for the client once the whole head is in ``buf`` (else b"", kept for later)."""
        if not self.head_seen:
            if len(buf) > MAX_RESPONSE_HEAD:
                raise HttpParserError("response head too large")  # handled like a parse error
            self.headbuf = buf
            return b""
        self.headbuf = b""
        end = buf.find(b"\r\n\r\n")
        while self.skipped_interim:
            # 100 Continue / 103 Early Hints before the answer: not forwarded.
            self.skipped_interim -= 1
            buf = buf[end + 4 :]
            end = buf.find(b"\r\n\r\n")
        status = self.status
        ex.status = status
        ex.response_started = True
        if (
            self.keep
            and ex.keep_alive
            and ex.version11
            and status != 101
            and not ex.head_request
            and ex.upgrade is None
            and buf[:9] == b"HTTP/1.1 "
            and RESPONSE_HOP_SEARCH.search(buf, 0, end + 2) is None
        ):
            # The common case: nothing to change, the head goes as it came; so does the body.
            self.mode = MODE_PASS
            if ex.gateway or status >= 400:
                line = buf.find(b"\r\n") + 2
                extra = _service_header(ex) if ex.gateway else b""
                if status >= 400:
                    extra += _request_id_header(ex, buf, end)
                return buf[:line] + extra + buf[line:]
            return buf
        return self._rebuilt_head(ex, buf, end, status)

    def _rebuilt_head(self, ex: Exchange, buf: bytes, end: int, status: int) -> bytes:
        """The head without hop-by-hop headers and with our framing (the slow path)."""
        head, body = buf[:end], buf[end + 4 :]
        lines = head.split(b"\r\n")
        kept = [b"HTTP/1.1 " + lines[0][9:]]
        if ex.gateway:
            kept.append(_service_header(ex)[:-2])
        if status >= 400 and (rid_header := _request_id_header(ex, buf, end)):
            kept.append(rid_header[:-2])
        has_length = chunked = False
        nominated: set[bytes] = set()  # headers a Connection header names are hop-by-hop too
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"connection":
                nominated.update(connection_options(value))
        nominated -= NEVER_NOMINATED
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name in nominated:
                continue
            if name == b"content-length":
                has_length = True
            elif name == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
                continue
            elif name == b"set-cookie":
                forwarded = forwarded_set_cookie(ex, value)
                if forwarded is None:
                    continue
                if forwarded is not value:
                    line = b"Set-Cookie: " + forwarded
            elif name in RESPONSE_HOP_BY_HOP or name.startswith(b"proxy-"):
                if status == 101 and name in (b"connection", b"upgrade"):
                    kept.append(line)
                continue
            kept.append(line)
        if status == 101 or ex.head_request or status in (204, 304):
            mode = MODE_NONE
            if ex.head_request and chunked:
                kept.append(b"Transfer-Encoding: chunked")
        elif chunked:
            if not ex.version11:
                raise HttpParserError("chunked answer to an HTTP/1.0 request")
            mode = MODE_PASS
            kept.append(b"Transfer-Encoding: chunked")
        elif has_length:
            mode = MODE_PASS
        else:
            mode = MODE_CHUNK if ex.version11 else MODE_UNTIL_CLOSE
            if ex.version11:
                kept.append(b"Transfer-Encoding: chunked")
            else:
                ex.close_after = True  # an HTTP/1.0 client learns the end of the body by the close
        if ex.upgrade is not None and status != 101:
            ex.close_after = True  # the client's connection is half switched already: end it
        if status != 101:
            if ex.close_after or not ex.keep_alive:
                kept.append(b"Connection: close")
            elif not ex.version11:
                kept.append(b"Connection: keep-alive")
        self.mode = mode
        kept.append(b"")
        kept.append(b"")
        if body:
            if mode == MODE_CHUNK:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            elif mode == MODE_NONE:
                body = b""
        return b"\r\n".join(kept) + body

    def _broken(self, ex: Exchange, error: str) -> None:
        self.ex = None
        self.close()
        ex.upstream_failed(self, error)

    def _finish(self, ex: Exchange) -> None:
        self.ex = None
        self.done = self.head_seen = False
        self.mode = MODE_HEAD
        self.served += 1
        route = self.route
        if self.keep and ex.request_done and not ex.head_request and not route.gone and not self.closed:
            self.idle_since = ex.last_active
            route.idle.append(self)
        else:
            self.close()
        ex.response_done = True
        ex.conn = None
        ex.end(ex.status)
        if ex.request_done:
            ex.down.finish(ex)

    def _switch_protocols(self, ex: Exchange, first: bytes) -> None:
        """101 from the replica: from now on both connections are a plain byte tunnel."""
        down = ex.down
        if ex.status != 101 or ex.upgrade is None:
            self._broken(ex, "switching protocols unasked, or an upgrade without 101 Switching Protocols")
            return
        down.transport.write(first)
        self.ex = None
        ex.conn = None
        self.tunnel = down
        down.tunnel = self
        down.current = None
        down.last_active = _monotonic()
        if ex.early:
            self.transport.write(b"".join(ex.early))
            ex.early = None
        ex.response_done = True
        ex.end(101)  # a websocket is one request in the counters; it no longer holds a queue slot

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            down, self.tunnel = self.tunnel, None
            down.tunnel = None
            down.transport.close()
            return
        ex = self.ex
        if ex is None:
            with contextlib.suppress(ValueError):
                self.route.idle.remove(self)
            return
        self.ex = None
        if exc is None and ex.response_started and self.mode in (MODE_CHUNK, MODE_UNTIL_CLOSE):
            # The replica framed its body by closing the connection: this is the normal end.
            if self.mode == MODE_CHUNK:
                ex.down.transport.write(b"0\r\n\r\n")
            ex.response_finished()
            return
        ex.upstream_failed(self, exc.__class__.__name__ if exc is not None else "connection closed")

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.pause_reading()
        elif self.ex is not None:
            self.ex.down.pause(PAUSE_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            if not self.tunnel.transport.is_closing():
                self.tunnel.transport.resume_reading()
        elif self.ex is not None:
            self.ex.down.resume(PAUSE_UPSTREAM_FULL)

    # --- httptools callbacks (framing only) ------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self.garbage = True  # a second response in one exchange: the replica is not sane

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status >= 200 or status == 101:
            self.status = status
            self.head_seen = True
            self.keep = parser.should_keep_alive()  # false for Connection: close and close-framed bodies
        else:
            self.interim += 1
            self.skipped_interim += 1

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim -= 1
        elif self.status != 101:
            self.done = True
