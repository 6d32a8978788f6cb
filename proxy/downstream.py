"""The client's side of the relay: one ``Downstream`` per client connection.

It parses the client's requests with ``httptools`` (llhttp) as they arrive: each header is sorted
once into what is forwarded as received and what the proxy sets or consumes itself, the request's
size is bounded, and each request becomes an ``Exchange`` (proxy/exchange.py) handed to
``RelayState.dispatch`` (``Proxy.dispatch``, proxy/app.py). Pipelined requests queue behind the one
being answered. Once a replica switches protocols (proxy/upstream.py), the connection is a plain
byte tunnel to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from proxy.exchange import (
    CONNECTION_OPTIONS,
    NEVER_NOMINATED,
    PAUSE_CONNECTING,
    PAUSE_PIPELINE,
    PAUSE_UPSTREAM_FULL,
    REASONS,
    Exchange,
    Refused,
    RelayState,
    connection_options,
    error_body,
    set_nodelay,
)

if TYPE_CHECKING:
    from proxy.upstream import Upstream

log = logging.getLogger("proxy")

_monotonic = time.monotonic

MAX_EARLY_TUNNEL_BYTES = 1 << 20
# A request's target and its whole head (request line and headers; trailers count too) are bounded,
# like nginx's large_client_header_buffers and envoy's max_request_headers_kb: without a bound one
# client could grow the parser's buffers without end (and httptools joins a header's pieces by
# copying, so a long one also costs quadratic CPU on the one thread every request shares).
MAX_REQUEST_TARGET = 16 * 1024
MAX_REQUEST_HEAD = 64 * 1024
# A request body may go this many bytes without a single body byte (chunk extensions, trailers).
MAX_BODY_OVERHEAD = 64 * 1024

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

# X-Modelserve-Revision pins a revision (issue 16); consumed here, never sent to a replica.
H_REVISION = 13
REQUEST_HEADERS[b"x-modelserve-revision"] = H_REVISION

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

    def __init__(self, proxy: RelayState) -> None:
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
        set_nodelay(transport)
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
            body = error_body(code, message)
            self.transport.write(
                b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (status, REASONS.get(status, b"Error"), len(body), body)
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
        elif kind == H_REVISION:
            ex.revision = value
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
