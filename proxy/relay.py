"""The two sides of a proxied request: the client's connection and a replica's connection.

Each side is a plain ``asyncio.Protocol`` fed by ``httptools`` (llhttp); see proxy/app.py for why.

* ``Downstream`` (one per client connection) parses requests; pipelined ones queue behind the
  current one. Each request becomes an ``Exchange`` handed to ``Proxy.dispatch`` (proxy/app.py).
* ``Exchange`` carries one request: its rewritten head, its body (kept for a retry while it is
  small), its accounting, and every way it can end (answered, failed, timed out, abandoned).
* ``Upstream`` (one per replica connection, pooled per route) relays the answer: the head is
  checked as bytes and, when nothing needs changing, head and body go to the client exactly as
  they arrived, one write per received packet; the parser only says where the answer ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

if TYPE_CHECKING:
    from proxy.app import Proxy
    from proxy.table import Endpoint, Route

log = logging.getLogger("proxy")
access_log = logging.getLogger("proxy.access")

_monotonic = time.monotonic

MAX_EARLY_TUNNEL_BYTES = 1 << 20
MAX_RESPONSE_HEAD = 64 * 1024
# A request's target and its whole head (request line and headers; trailers count too) are bounded,
# like nginx's large_client_header_buffers and envoy's max_request_headers_kb: without a bound one
# client could grow the parser's buffers without end (and httptools joins a header's pieces by
# copying, so a long one also costs quadratic CPU on the one thread every request shares).
MAX_REQUEST_TARGET = 16 * 1024
MAX_REQUEST_HEAD = 64 * 1024
# A request body may go this many bytes without a single body byte (chunk extensions, trailers).
MAX_BODY_OVERHEAD = 64 * 1024
# Methods a request may be sent again with after it reached a replica (RFC 9110 9.2.2); any other
# (POST, PATCH) only with an Idempotency-Key header, as Go's http.Transport does.
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
# A pooled connection idle longer than this is not used for a request that cannot be retried: the
# replica's keep-alive timer may be closing it right now, and then the request could not be sent
# again (below every common server's keep-alive timeout: uvicorn 5 s, gunicorn 2 s).
UNSAFE_REUSE_SECONDS = 1.0

# Request headers the proxy sets or consumes itself; every other header is forwarded as received.
(H_DROP, H_AUTH, H_HOST, H_XFF, H_XFP, H_XFH, H_RID, H_CONN, H_TE, H_UPGRADE, H_EXPECT, H_IDEMPOTENCY, H_COOKIE) = (
    range(13)
)
REQUEST_HEADERS = {
    b"authorization": H_AUTH,
    b"host": H_HOST,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XFP,
    b"x-forwarded-host": H_XFH,
    b"x-forwarded-prefix": H_DROP,
    b"x-request-id": H_RID,
    b"connection": H_CONN,
    b"transfer-encoding": H_TE,
    b"upgrade": H_UPGRADE,
    b"expect": H_EXPECT,
    b"idempotency-key": H_IDEMPOTENCY,
    b"x-idempotency-key": H_IDEMPOTENCY,
    # Held back until the endpoint is known: by default no cookie reaches a replica, since with the
    # web app on the same host name the browser would send the platform's session to whoever owns
    # the service (Endpoint.forward_cookies; see keep_app_cookies).
    b"cookie": H_COOKIE,
    b"keep-alive": H_DROP,
    b"te": H_DROP,
    b"trailer": H_DROP,
    b"proxy-authorization": H_DROP,
    b"proxy-authenticate": H_DROP,
    b"proxy-connection": H_DROP,
}
# Connection options that name no header (RFC 9110 7.6.1: any other option names a hop-by-hop header).
CONNECTION_OPTIONS = frozenset((b"", b"close", b"keep-alive", b"upgrade"))
# Headers never removed because a Connection header names them: the framing and the target.
NEVER_NOMINATED = frozenset((b"content-length", b"transfer-encoding", b"host"))
# Response headers that make the verbatim relay wrong, searched in the raw head: hop-by-hop ones, and
# Set-Cookie (a replica must not set cookies on the caller's browser, at least not the platform's).
RESPONSE_HOP_SEARCH = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-|te|trailer|upgrade|set-cookie)[ \t]*:", re.IGNORECASE
)
# A Set-Cookie attribute named Domain (rare: only then is a forwarded Set-Cookie rewritten).
DOMAIN_SEARCH = re.compile(rb"domain", re.IGNORECASE)
RESPONSE_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"transfer-encoding"))

# How a response body goes to the client.
MODE_HEAD = 0  # the response head has not arrived yet
MODE_PASS = 1  # bytes relayed as they are (Content-Length, or chunked to an HTTP/1.1 client)
MODE_NONE = 2  # no body (HEAD, 204, 304, 101)
MODE_CHUNK = 3  # the replica ends the body by closing: re-framed as chunks for an HTTP/1.1 client
MODE_UNTIL_CLOSE = 4  # ... or relayed and ended by closing, for an HTTP/1.0 client
# Why reading from a client is paused (a bit each; reading resumes when none is left).
PAUSE_PIPELINE, PAUSE_UPSTREAM_FULL, PAUSE_CONNECTING = 1, 2, 4

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    505: b"HTTP Version Not Supported",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "type": "proxy_error"}}).encode()


class Refused(Exception):
    """Raised from a parser callback: the request is refused (too big, or framing we do not relay)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_HEAD_TOO_LARGE = f"The request's header fields are longer than {MAX_REQUEST_HEAD} bytes in all."


def _version11(version: str) -> bool:
    """True for HTTP/1.1, False for HTTP/1.0; anything else (llhttp parses "HTTP/2.0") is refused."""
    if version == "1.1":
        return True
    if version == "1.0":
        return False
    raise Refused(505, "http_version_not_supported", f"HTTP/{version} is not served here: use HTTP/1.1.")


def _drop_nominated(ex: Exchange) -> None:
    """Remove the headers a Connection header named (RFC 9110 7.6.1: they are for this hop only)."""
    names = {n for n in ex.nominated or () if n not in NEVER_NOMINATED}
    ex.hparts = [part for part in ex.hparts if part[: part.find(b":")].lower() not in names]
    if b"x-forwarded-for" in names:
        ex.xff = None
    if b"x-forwarded-proto" in names:
        ex.xfp = None
    if b"x-forwarded-host" in names:
        ex.xfh = None
    if b"x-request-id" in names:
        ex.rid = None
    if b"idempotency-key" in names or b"x-idempotency-key" in names:
        ex.idempotency_key = False
    if b"cookie" in names:
        ex.cookie = None


def cookie_name(pair: bytes) -> bytes:
    """The name of one ``name=value`` (a Cookie pair, or a Set-Cookie value), lower case."""
    return pair.partition(b"=")[0].strip().lower()


def keep_app_cookies(header: bytes, platform: frozenset[bytes]) -> bytes:
    """A Cookie header's pairs without the platform's cookies (names compared in lower case, so
    ``SessionId`` goes too: a replica's framework might match names loosely)."""
    return b"; ".join(pair.strip() for pair in header.split(b";") if pair.strip() and cookie_name(pair) not in platform)


def forwarded_set_cookie(ex: Exchange, value: bytes) -> bytes | None:
    """A replica's Set-Cookie value as the caller gets it, or None when it is not passed on.

    Passed only when the service forwards cookies and was called on its own host name (see
    ``Proxy.dispatch``), and never:

    * for a platform cookie's name (it could log the caller out, or fix their CSRF token);
    * without a name (no ``=`` before the first ``;``, or nothing before the ``=``): a browser
      (RFC 6265bis) stores a nameless cookie and sends back its value alone, so
      ``=sessionid=<attacker's>`` would come back as the platform's session (a login CSRF). For the
      same reason a value that starts with ``<platform cookie>=`` is refused too.

    A ``Domain`` attribute is removed: under SERVING_DOMAIN it would let one service set cookies
    for its sibling services' host names. The value is rebuilt only when it names one.
    """
    endpoint = ex.endpoint
    if endpoint is None or not ex.forward_cookies:
        return None
    platform = endpoint.platform_cookies
    pair, semicolon, attributes = value.partition(b";")
    name, equals, cookie_value = pair.partition(b"=")
    name = name.strip().lower()
    if not equals or not name or name in platform:
        return None
    if b"=" in cookie_value and cookie_value.partition(b"=")[0].strip().lower() in platform:
        return None
    if semicolon and DOMAIN_SEARCH.search(attributes) is not None:
        kept = [a for a in attributes.split(b";") if a.partition(b"=")[0].strip().lower() != b"domain"]
        return b";".join([pair.strip(), *kept])
    return value


def connection_options(value: bytes) -> list[bytes]:
    """The header names a Connection header nominates as hop-by-hop (lower case)."""
    names = []
    for option in value.lower().split(b","):
        option = option.strip()
        if option not in CONNECTION_OPTIONS:
            names.append(option)
    return names


class Exchange:
    """One request and its response, from the client's head to the last byte back.

    No ``__slots__`` on purpose: the defaults live on the class, so a new exchange sets only the
    few fields that differ (a request allocates one small dict instead of initialising 40 slots).
    """

    method = b"GET"
    target = b""
    version11 = True
    keep_alive = True
    head_request = False
    auth: bytes | None = None
    cookie: bytes | None = None  # the Cookie header(s), joined; forwarded only as the endpoint allows
    forward_cookies = False  # cookies pass both ways (the endpoint's choice, on its own host name)
    host: bytes | None = None
    xff: bytes | None = None
    xfp: bytes | None = None
    xfh: bytes | None = None
    rid: bytes | None = None
    chunked = False
    te: bytes | None = None  # the Transfer-Encoding value (codings before chunked are kept)
    upgrade: bytes | None = None
    expect = False
    connection_header = False
    nominated: list[bytes] | None = None  # headers named in Connection: removed before forwarding
    idempotency_key = False
    endpoint: Endpoint | None = None
    route: Route | None = None
    conn: Upstream | None = None
    line = b""
    head = b""
    body: list[bytes] | None = None  # body pieces as sent upstream, kept while replayable
    body_size = 0
    replayable = True
    pending: list[bytes] | None = None  # pieces not yet sent, once the body is too big to keep
    request_done = False
    response_started = False
    response_done = False
    got_bytes = False
    ended = False
    close_after = False
    held = False
    hold_timer: asyncio.TimerHandle | None = None
    early: list[bytes] | None = None
    status = 0
    attempts = 0
    tried: list[Route] | None = None
    started = 0.0
    last_active = 0.0

    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.hparts: list[bytes] = []
        self.out: list[bytes] = []  # bytes for the replica, written once per received packet

    # --- request body, client -> replica ---------------------------------------------------------

    def on_body(self, chunk: bytes) -> None:
        if self.response_done or self.ended:
            return  # answered already (an early or local response): the rest is discarded
        self.last_active = _monotonic()
        self._body_piece(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)

    def on_request_done(self) -> None:
        self.request_done = True
        if self.chunked and not (self.response_done or self.ended):
            self._body_piece(b"0\r\n\r\n")
        if self.response_done:
            self.down.finish(self)

    def _body_piece(self, piece: bytes) -> None:
        if self.replayable:
            body = self.body
            if body is None:
                body = self.body = []
            body.append(piece)
            self.body_size += len(piece)
            if self.body_size > self.down.proxy.replay_limit:
                # Too big to keep for a retry: from now on it streams through, once.
                self.replayable = False
                self.body = None
                if self.conn is None:
                    self.pending = body
                    self.down.pause(PAUSE_CONNECTING)
                    return
            elif self.conn is None:
                return  # kept in the body: sent when a connection is attached
        elif self.conn is None:
            if self.pending is None:
                self.pending = []
            self.pending.append(piece)
            # (Reading may have resumed while no connection is attached, e.g. a pipelined request
            # dispatched after the one before it: hold the client again, or this grows unbounded.)
            self.down.pause(PAUSE_CONNECTING)
            return
        self.out.append(piece)
        if not self.down.in_feed:
            self.flush()

    def attach(self, conn: Upstream) -> None:
        """Send the request on ``conn`` (pooled or new): head, then the body received so far."""
        self.conn = conn
        conn.ex = self
        out = self.out
        out.append(self.line)
        out.append(conn.route.host_line)
        out.append(self.head)
        if self.body is not None:
            out.extend(self.body)
        elif self.pending:
            out.extend(self.pending)
            self.pending = None
            self.down.resume(PAUSE_CONNECTING)
        if self.down.write_paused:
            conn.transport.pause_reading()
        if not self.down.in_feed:
            self.flush()

    def flush(self) -> None:
        out = self.out
        if out and self.conn is not None:
            self.conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
            self.out = []

    # --- outcomes --------------------------------------------------------------------------------

    def end(self, status: int) -> None:
        """Account for the request once, whatever way it ended."""
        if self.ended:
            return
        self.ended = True
        self.status = status
        endpoint = self.endpoint
        if endpoint is not None:
            endpoint.in_flight -= 1
            elapsed = (self.last_active or _monotonic()) - self.started
            endpoint.stats.observe(status, elapsed)
            route = self.route
            if route is not None:
                route.in_flight -= 1
                route.codes[status // 100 if status < 600 else 5] += 1
                self.route = None
            if self.down.proxy.access_log:
                access_log.info(
                    "%s %s %s %d %.1fms route=%s rid=%s",
                    self.down.peer.decode(),
                    self.method.decode(),
                    self.target.decode("latin-1"),
                    status,
                    elapsed * 1000,
                    route.id if route is not None else "-",
                    (self.rid or b"-").decode("latin-1"),
                )
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None

    def response_finished(self) -> None:
        self.response_done = True
        self.conn = None
        self.end(self.status)
        if self.request_done:
            self.down.finish(self)

    def upstream_failed(self, conn: Upstream, error: str) -> None:
        """The replica's connection closed or broke before the response was complete."""
        self.conn = None
        route = self.route
        if route is not None:
            route.in_flight -= 1
            self.route = None
        if self.ended:
            return
        endpoint = self.endpoint
        if (
            not self.got_bytes
            and self.replayable
            and endpoint is not None
            and self.attempts < len(endpoint.routes) + 2
            and self.retryable()
        ):
            if conn.served == 0 and route is not None:
                # A fresh connection that died unanswered: try elsewhere. (A reused one may just
                # have been closed by the replica's keep-alive timer: the route stays eligible.)
                self.tried = [*(self.tried or ()), route]
            self.out = []
            self.down.proxy.forward(self)
            return
        if not self.response_started:
            if self.got_bytes or self.retryable():
                message = f"The replica closed the connection without answering ({error})."
            else:
                message = (
                    f"The replica closed the connection without answering ({error}). It may have processed "
                    f"the request, so this {self.method.decode('latin-1')} was not sent again: send an "
                    "Idempotency-Key header to allow that."
                )
            self.respond(502, "replica_unreachable", message)
            return
        # The answer had started: the client can only learn it is cut short by the connection closing.
        self.close_after = True
        self.down.transport.close()
        self.end(self.status)

    def retryable(self) -> bool:
        """May this request be sent again after it reached a replica? (Before, it always may.)"""
        return self.method in IDEMPOTENT_METHODS or self.idempotency_key or self.down.proxy.config.retry_unsafe

    def respond(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        """Answer the client from the proxy itself (errors: JSON ``{"error": {...}}``)."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.ex = None
            conn.close()
        down = self.down
        body = _error_body(code, message)
        # The body still coming is discarded while it is small; a big or endless one (or a
        # connection switching protocols) is not worth reading: close after this answer.
        if (not self.request_done or self.upgrade is not None) and (
            self.upgrade is not None or self.chunked or self.body_size or self.expect
        ):
            self.close_after = True
        closing = self.close_after or not self.keep_alive
        down.transport.write(
            b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%bX-Request-ID: %b\r\n%b\r\n%b"
            % (
                status,
                _REASONS.get(status, b"Error"),
                len(body),
                extra,
                self.rid or down.proxy.request_id(),
                b"Connection: close\r\n" if closing else b"",
                body,
            )
        )
        self.response_started = True
        self.response_done = True
        if self.endpoint is not None:
            self.last_active = _monotonic()
            self.end(status)
        else:
            self.ended = True
        if self.request_done or closing:
            down.finish(self)

    def timed_out(self, what: str) -> None:
        if self.response_started:
            if self.conn is not None:
                conn, self.conn = self.conn, None
                conn.ex = None
                conn.close()
            self.close_after = True
            self.down.transport.close()
            self.end(self.status or 504)
        else:
            self.respond(504, "replica_timeout", what)

    def client_gone(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.ex = None
            conn.abort()  # the replica stops working for nobody (an LLM stops generating)
        if self.held and self.endpoint is not None:
            with contextlib.suppress(ValueError):
                self.endpoint.waiters.remove(self)
        self.last_active = _monotonic()
        self.end(499)  # nginx's code for "client closed request"


class Downstream(asyncio.Protocol):
    """One client connection: parses requests (pipelined ones queue), writes responses back."""

    __slots__ = (
        "blocked",
        "body_progress",
        "body_stall",
        "current",
        "head_bytes",
        "head_size",
        "in_feed",
        "last_active",
        "parser",
        "peer",
        "proxy",
        "queue",
        "receiving",
        "rejected",
        "transport",
        "trusted",
        "tunnel",
        "upgraded",
        "write_paused",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.peer = b""
        self.trusted = False  # the peer's X-Forwarded-* headers are believed (PROXY_TRUSTED_PROXIES)
        self.current: Exchange | None = None
        self.receiving: Exchange | None = None
        self.queue: deque[Exchange] | None = None
        self.blocked = 0
        self.write_paused = False
        self.in_feed = False
        self.upgraded = False  # (also set once a request is refused: nothing more is parsed)
        self.rejected = False
        self.tunnel: Upstream | None = None
        self.last_active = _monotonic()
        self.head_size = 0  # bytes of the header fields (and trailers) of the request being received
        self.head_bytes = 0  # bytes of packets that ended inside that request's head
        self.body_progress = False  # a body byte came in the last packet
        self.body_stall = 0  # bytes received since the last body byte

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b""
        self.trusted = self.proxy.config.trusts(str(peer[0])) if peer else False
        self.proxy.downstreams.add(self)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            if not self.rejected:
                self._tunnel_data(data)
            return
        self.in_feed = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.upgraded = True
            rest = data[exc.args[0] :]
            if rest:
                self._tunnel_data(rest)
        except HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, Refused):
                self._reject(refused.status, refused.code, refused.message)
            else:
                log.exception("bug while handling a request")
                self._reject(500, "internal_error", "The proxy failed on this request.")
        except HttpParserError as exc:
            self._reject(400, "bad_request", f"The request is not valid HTTP/1.1: {exc}.")
        finally:
            self.in_feed = False
        receiving = self.receiving
        if receiving is not None:
            # Bound what a request makes the parser hold between packets (see MAX_REQUEST_HEAD).
            if not receiving.started:  # this packet ended inside the head
                if self.head_bytes < 0:
                    self.head_bytes = 0  # the head began in this packet: its share is bounded by one read
                else:
                    self.head_bytes += len(data)
                    if self.head_bytes > MAX_REQUEST_HEAD:
                        self._reject(431, "headers_too_large", _HEAD_TOO_LARGE)
            elif self.body_progress:
                self.body_progress = False
                self.body_stall = 0
            else:  # ... or inside the body, with no body byte in it: chunk extensions or trailers
                self.body_stall += len(data)
                if self.body_stall > MAX_BODY_OVERHEAD:
                    self._reject(400, "bad_request", "The request body's chunk framing or trailers are too long.")
        ex = self.current
        if ex is not None and ex.out:
            ex.flush()

    def _tunnel_data(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.last_active = _monotonic()  # a silent tunnel is cut after PROXY_IDLE_TIMEOUT
            self.tunnel.transport.write(data)
            return
        ex = self.current
        if ex is None or ex.response_done:
            return
        if ex.early is None:
            ex.early = []
        ex.early.append(data)
        if sum(map(len, ex.early)) > MAX_EARLY_TUNNEL_BYTES:
            self.transport.close()

    def _reject(self, status: int, code: str, message: str) -> None:
        """The request being received is refused (invalid, or too big): nothing more is read.

        When it is the request being answered, it gets the error (or, when its answer has started,
        the connection closes). When it is a later, pipelined one, the requests before it are
        answered first and the connection closes after the last of them.
        """
        self.upgraded = self.rejected = True
        bad, self.receiving = self.receiving, None
        current = self.current
        if current is not None and current.request_done and not current.ended:
            queue = self.queue
            if queue and queue[-1] is bad:  # its head was fine, its body is not: it is not sent
                queue.pop()
                bad.ended = True  # type: ignore[union-attr]
            last = queue[-1] if queue else current
            last.keep_alive = False  # its answer says "Connection: close"; then the connection closes
            return
        if current is not None and not current.response_started:
            current.close_after = True
            current.respond(status, code, message)
            return
        if current is None:
            body = _error_body(code, message)
            self.transport.write(
                b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (status, _REASONS.get(status, b"Error"), len(body), body)
            )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.downstreams.discard(self)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.tunnel = None
            tunnel.close()
        if self.current is not None:
            self.current.client_gone()
            self.current = None
        if self.queue:
            for ex in self.queue:
                ex.ended = True
            self.queue.clear()

    def pause_writing(self) -> None:
        # The client reads slower than the replica writes: stop reading the replica (backpressure).
        self.write_paused = True
        conn = self.tunnel or (self.current.conn if self.current is not None else None)
        if conn is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        conn = self.tunnel or (self.current.conn if self.current is not None else None)
        if conn is not None and not conn.transport.is_closing():
            conn.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.blocked and not self.transport.is_closing():
            self.transport.pause_reading()
        self.blocked |= reason

    def resume(self, reason: int) -> None:
        if self.blocked & reason:
            self.blocked &= ~reason  # (several bits at once are fine)
            if not self.blocked and not self.transport.is_closing():
                self.transport.resume_reading()

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.receiving = Exchange(self)
        self.head_size = 0
        self.head_bytes = -1

    def on_url(self, url: bytes) -> None:
        ex = self.receiving
        if ex is not None:
            target = ex.target + url if ex.target else url
            if len(target) > MAX_REQUEST_TARGET:
                raise Refused(414, "uri_too_long", f"The request target is longer than {MAX_REQUEST_TARGET} bytes.")
            ex.target = target

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.receiving
        self.head_size += len(name) + len(value) + 4
        if ex is None or ex.started or self.head_size > MAX_REQUEST_HEAD:
            # (One test for the three unusual cases.) A trailer field of a chunked body is dropped:
            # the body is re-framed on its way to the replica (RFC 9112 7.1.2 lets a recipient that
            # removes the chunked coding discard them), and a trailer must not set what the head
            # decided (the token, the framing).
            if self.head_size > MAX_REQUEST_HEAD:
                raise Refused(431, "headers_too_large", _HEAD_TOO_LARGE)
            return
        kind = REQUEST_HEADERS.get(name.lower())
        if kind is None:
            ex.hparts.append(b"%b: %b\r\n" % (name, value))
        elif kind == H_HOST:
            ex.host = value
        elif kind == H_AUTH:
            ex.auth = value
        elif kind == H_COOKIE:
            # (RFC 9113 8.2.3's way of joining several Cookie fields; HTTP/1.1 clients send one.)
            ex.cookie = value if ex.cookie is None else ex.cookie + b"; " + value
        elif kind == H_XFF:
            ex.xff = value if ex.xff is None else ex.xff + b", " + value
        elif kind == H_RID:
            ex.rid = value
        elif kind == H_TE:
            # llhttp refuses a request whose last coding is not chunked: a parsed one is chunked.
            ex.chunked = True
            ex.te = value if ex.te is None else ex.te + b", " + value
        elif kind == H_UPGRADE:
            ex.upgrade = value
        elif kind == H_EXPECT:
            ex.expect = value.lower() == b"100-continue"
        elif kind == H_XFP:
            ex.xfp = value
        elif kind == H_XFH:
            ex.xfh = value
        elif kind == H_CONN:
            ex.connection_header = True  # keep-alive and upgrade are read from the parser
            if value.lower() not in CONNECTION_OPTIONS:  # (the usual values cost one lookup)
                names = connection_options(value)
                if names:
                    ex.nominated = names if ex.nominated is None else ex.nominated + names
        elif kind == H_IDEMPOTENCY:
            ex.idempotency_key = True
            ex.hparts.append(b"%b: %b\r\n" % (name, value))
        # H_DROP: hop-by-hop, dropped.

    def on_headers_complete(self) -> None:
        ex = self.receiving
        if ex is None:
            return
        parser = self.parser
        ex.method = method = parser.get_method()
        if method == b"HEAD":
            ex.head_request = True
        elif method == b"CONNECT":
            raise Refused(405, "method_not_allowed", "CONNECT is not served: this is a reverse proxy.")
        if not parser.should_keep_alive():
            ex.keep_alive = False
            ex.version11 = _version11(parser.get_http_version())
        elif ex.connection_header:
            # A persistent request is HTTP/1.1 unless it said "Connection: keep-alive" the HTTP/1.0
            # way; only then is the version asked for (the parser formats it as a string: it costs).
            ex.version11 = _version11(parser.get_http_version())
        if ex.chunked and not ex.version11:
            # RFC 9112 6.1: the framing of an HTTP/1.0 message with Transfer-Encoding is faulty
            # (a classic way to smuggle a request past a proxy): refused, not forwarded.
            raise Refused(400, "bad_request", "Transfer-Encoding is not allowed in an HTTP/1.0 request.")
        if ex.nominated is not None:
            _drop_nominated(ex)
        self.body_progress = True  # (this packet's bytes were the head's)
        if parser.should_upgrade():
            ex.upgrade = ex.upgrade or b"websocket"
        else:
            ex.upgrade = None
        ex.started = ex.last_active = _monotonic()
        if self.current is None:
            self.current = ex
            self.proxy.dispatch(ex)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.receiving
        if ex is not None:
            self.body_progress = True
            ex.on_body(body)

    def on_message_complete(self) -> None:
        ex = self.receiving
        self.receiving = None
        if ex is not None:
            ex.on_request_done()

    # --- sequencing ------------------------------------------------------------------------------

    def finish(self, ex: Exchange) -> None:
        """Both halves of ``ex`` are done: close, or go on with the next request."""
        if self.current is not ex:
            return
        self.current = None
        if self.blocked & (PAUSE_UPSTREAM_FULL | PAUSE_CONNECTING):
            self.resume(PAUSE_UPSTREAM_FULL | PAUSE_CONNECTING)  # that replica connection is gone
        if ex.close_after or not ex.keep_alive:
            self.transport.close()
            return
        self.last_active = ex.last_active
        queue = self.queue
        if queue:
            nxt = queue.popleft()
            self.current = nxt
            if not queue:
                self.resume(PAUSE_PIPELINE)
            nxt.started = nxt.last_active = _monotonic()
            self.proxy.dispatch(nxt)


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

    def __init__(self, proxy: Proxy, route: Route) -> None:
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
        _set_nodelay(transport)

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
            return buf
        return self._rebuilt_head(ex, buf, end, status)

    def _rebuilt_head(self, ex: Exchange, buf: bytes, end: int, status: int) -> bytes:
        """The head without hop-by-hop headers and with our framing (the slow path)."""
        head, body = buf[:end], buf[end + 4 :]
        lines = head.split(b"\r\n")
        kept = [b"HTTP/1.1 " + lines[0][9:]]
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
