"""The exchange between the two sides of a proxied request, and what both sides share.

The relay is split by side, each a plain ``asyncio.Protocol`` fed by ``httptools`` (llhttp; see
proxy/app.py for why): the client's connection (proxy/downstream.py) and a replica's connection
(proxy/upstream.py). Between them goes one ``Exchange`` per request; this module holds it and the
little both sides need of each other, so neither side imports the other at run time:

* ``Exchange``: one request, its rewritten head, its body (kept for a retry while it is small), its
  accounting, and every way it can end (answered, failed, timed out, abandoned);
* ``RelayState``: what the relay needs from the process (``Proxy``, proxy/app.py), listed so that
  the relay depends on that and not on the whole ``Proxy``;
* the rules the two directions share: when a request may be sent again, which cookies cross
  (``Cookie`` on the way in, ``Set-Cookie`` on the way out: one policy, kept in one place), which
  headers a ``Connection`` header makes hop-by-hop, and the proxy's own error answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.downstream import Downstream
    from proxy.limits import KeyState
    from proxy.table import Endpoint, Route
    from proxy.upstream import Upstream
    from proxy.usage import Usage

access_log = logging.getLogger("proxy.access")

_monotonic = time.monotonic

# Methods a request may be sent again with after it reached a replica (RFC 9110 9.2.2); any other
# (POST, PATCH) only with an Idempotency-Key header, as Go's http.Transport does.
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
# Paths of inference APIs (OpenAI's, and the common servers' own: TGI, TEI, vLLM, SGLang, KServe,
# SageMaker): a POST there computes an answer and changes nothing, so a service's ``inference`` retry
# policy (the default, serving/models.py RetryPolicy) sends it again to another replica when the one
# it reached closed without answering a byte. Compared without the query and a trailing slash.
INFERENCE_PATHS = frozenset(
    (
        b"/v1/chat/completions",
        b"/v1/completions",
        b"/v1/embeddings",
        b"/v1/responses",
        b"/v1/rerank",
        b"/v1/score",
        b"/v1/moderations",
        b"/v1/audio/transcriptions",
        b"/v1/audio/translations",
        b"/v1/images/generations",
        b"/v2/rerank",
        b"/rerank",
        b"/score",
        b"/generate",
        b"/generate_stream",
        b"/embed",
        b"/embed_sparse",
        b"/classify",
        b"/predict",
        b"/invocations",
        b"/tokenize",
        b"/detokenize",
    )
)
# KServe's open inference protocol: /v2/models/<name>[/versions/<v>]/infer, /v1/models/<name>:predict.
INFERENCE_PATTERN = re.compile(rb"^/v[12]/models/[^?]+(?:/infer|:predict)$")
RETRY_SAFE, RETRY_INFERENCE, RETRY_ALL = "safe", "inference", "all"


def inference_path(line: bytes) -> bool:
    """Whether a forwarded request line (``POST /v1/chat/completions HTTP/1.1``) calls an inference API."""
    path = line.split(b" ", 2)[1] if line.count(b" ") >= 2 else b""
    path = path.partition(b"?")[0]
    if len(path) > 1 and path[-1:] == b"/":
        path = path[:-1]
    return path in INFERENCE_PATHS or INFERENCE_PATTERN.match(path) is not None


# A pooled connection idle longer than this is not used for a request that cannot be retried: the
# replica's keep-alive timer may be closing it right now, and then the request could not be sent
# again (below every common server's keep-alive timeout: uvicorn 5 s, gunicorn 2 s).
UNSAFE_REUSE_SECONDS = 1.0
# Connection options that name no header (RFC 9110 7.6.1: any other option names a hop-by-hop header).
CONNECTION_OPTIONS = frozenset((b"", b"close", b"keep-alive", b"upgrade"))
# Headers never removed because a Connection header names them: the framing and the target.
NEVER_NOMINATED = frozenset((b"content-length", b"transfer-encoding", b"host"))
# A Set-Cookie attribute named Domain (rare: only then is a forwarded Set-Cookie rewritten).
DOMAIN_SEARCH = re.compile(rb"domain", re.IGNORECASE)
# Why reading from a client is paused (a bit each; reading resumes when none is left).
PAUSE_PIPELINE, PAUSE_UPSTREAM_FULL, PAUSE_CONNECTING = 1, 2, 4

REASONS = {
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


class RelayState(Protocol):
    """What the relay uses of the process that runs it (``Proxy``, proxy/app.py), and nothing more.

    As uvicorn hands its protocols a ``ServerState`` rather than the server: the sides and the
    exchange reach the process only through these names, so what the relay may touch of it is
    written down here (mypy checks ``Proxy`` against it where app.py builds a side), and the relay's
    modules need not import proxy/app.py, which imports them.
    """

    config: Config  # trusts() (a client's X-Forwarded-* headers) and retry_unsafe
    downstreams: set[Downstream]  # every client connection: swept for timeouts, drained on stop
    replay_limit: int  # bytes of a request body kept while it may be sent again
    access_log: bool
    usage: Usage  # gateway keys' usage, pushed by proxy/report.py

    def request_id(self) -> bytes:
        """A new X-Request-ID, for a request that came without one."""
        ...

    def dispatch(self, ex: Exchange) -> None:
        """Route a request whose head is complete: answer it, or send it to a replica."""
        ...

    def forward(self, ex: Exchange) -> None:
        """Send a routed request to a replica (again, after one failed before answering)."""
        ...

    def failover(self, ex: Exchange) -> bool:
        """Send a gateway request its service failed before answering to another backend of its
        model name; False when there is none (or it may not go), and the caller answers."""
        ...

    def sniff(self, ex: Exchange) -> None:
        """More of a gateway request's body came (or all of it): route it once its model is known."""
        ...

    def route_unreachable(self, route: Route, ex: Exchange, error: str, what: str, now: float) -> None:
        """A route could not be reached (refused, or closed a new connection unanswered): mark it
        down and report it to its node."""
        ...


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def error_body(code: str, message: str, kind: str = "proxy_error") -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "type": kind}}).encode()


class Refused(Exception):
    """Raised from a parser callback: the request is refused (too big, or framing we do not relay)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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
    revision: bytes | None = None  # X-Modelserve-Revision: the revision the client pinned (issue 16)
    # The gateway (proxy/gateway.py): the body's start while its model is looked for, and the answer
    # names the service (X-Modelserve-Service) once one is chosen.
    sniffed: bytearray | None = None
    sniff_scanned = 0
    gateway = ""  # the model name a gateway request was routed by ("": not a gateway request)
    gateway_key: object = None
    # The services that failed this gateway request before a byte of an answer, in order (set only
    # on a failover, proxy/app.py Proxy.failover: the usual request allocates nothing for it).
    failed_over: list[Endpoint] | None = None
    limit: KeyState | None = None  # the gateway key's limits (proxy/limits.py), counted for this request
    tail: bytearray | None = None  # a gateway answer's last bytes, for its usage (proxy/usage.py)
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
    resent = False  # sent again after it reached a replica (counted once per request)
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
        if self.sniffed is not None:
            self.sniffed += chunk
            self.down.proxy.sniff(self)

    def on_request_done(self) -> None:
        self.request_done = True
        if self.sniffed is not None and not (self.response_done or self.ended):
            self.down.proxy.sniff(self)
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
            if self.body_size > self.down.proxy.replay_limit and self.sniffed is None:
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
                    extra={
                        "request_id": (self.rid or b"").decode("latin-1"),
                        "service": endpoint.slug,
                        "route": route.id if route is not None else "",
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 1),
                    },
                )
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
        if self.gateway:
            used = 0
            if endpoint is not None:  # forwarded (not refused by the key's limits): counted
                key = self.gateway_key
                prompt, completion = self.down.proxy.usage.record(
                    key.lookup,  # type: ignore[attr-defined]
                    endpoint.id,
                    status,
                    elapsed,
                    self.tail,
                )
                used = prompt + completion
            self.tail = None
            if self.limit is not None:
                limit, self.limit = self.limit, None
                limit.finish(used)

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
        if not conn.idle_since and route is not None and not self.got_bytes:
            # A connection opened for this request (never pooled) that closed before a byte of answer
            # is a replica as unreachable as one that refused it: a process being killed still
            # completes handshakes from its listen backlog until it is gone, then resets them, and
            # whether the reset comes before the connect returned (proxy/app.py _connect) or after
            # the request was written is a race. Marked down and reported to its node the same way,
            # with this request's id. (A pooled one may have met the replica's keep-alive timer.)
            self.down.proxy.route_unreachable(route, self, error, "closed a new connection unanswered", _monotonic())
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
            if not self.resent:  # reached a replica and is sent again: the event log says how many
                self.resent = True
                endpoint.stats.resent += 1
            self.down.proxy.forward(self)
            return
        if self.gateway and not self.got_bytes and self.replayable and endpoint is not None and self.retryable():
            # Its service's retry budget is spent, nothing of an answer came, and repeating it is
            # as safe as the service's retry policy says: another backend of the model name.
            self.out = []
            if self.down.proxy.failover(self):
                return
        if not self.response_started:
            if self.got_bytes or self.retryable():
                message = f"The replica closed the connection without answering ({error})."
            else:
                message = (
                    f"The replica closed the connection without answering ({error}). It may have processed "
                    f"the request, so this {self.method.decode('latin-1')} was not sent again: send an "
                    "Idempotency-Key header to allow that, or set the service's retry policy to all."
                )
            self.respond(502, "replica_unreachable", message)
            return
        # The answer had started: the client can only learn it is cut short by the connection closing.
        self.close_after = True
        self.down.transport.close()
        self.end(self.status)

    def retryable(self) -> bool:
        """May this request be sent again after it reached a replica? (Before, it always may.)

        Only while no byte of the response came back (the callers check ``got_bytes``). Idempotent
        methods and requests with an Idempotency-Key always; others as the service's retry policy
        says (``all``; ``inference``: a POST to an inference path), or PROXY_RETRY_UNSAFE."""
        if self.method in IDEMPOTENT_METHODS or self.idempotency_key or self.down.proxy.config.retry_unsafe:
            return True
        endpoint = self.endpoint
        policy = endpoint.retry_policy if endpoint is not None else RETRY_SAFE
        if policy == RETRY_INFERENCE:
            return self.method == b"POST" and inference_path(self.line)
        return policy == RETRY_ALL

    def respond(self, status: int, code: str, message: str, extra: bytes = b"", kind: str = "proxy_error") -> None:
        """Answer the client from the proxy itself (errors: JSON ``{"error": {...}}``)."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.ex = None
            conn.close()
        down = self.down
        body = error_body(code, message, kind)
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
                REASONS.get(status, b"Error"),
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
            if self.limit is not None:  # refused after its key's limits counted it
                limit, self.limit = self.limit, None
                limit.finish(0)
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
