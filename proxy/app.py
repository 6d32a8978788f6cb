"""The data plane: forwards client requests to healthy replicas (S4.3, S5, S7, docs/architecture.md).

No Django, no database: it serves from the routing table it keeps in memory (proxy/table.py), so it
keeps serving when Redis, the database or every Celery process is down.

Past the ~800 lines the other modules keep to, on purpose: this is the one path every request takes
through the process (dispatch, the gateway's admission, the choice of a revision and a replica,
holding for a wake, connecting, retrying), read top to bottom in one place. What can stand alone
does: the two sides of the relay and their exchange, the table, the gateway's parsing, the limits,
the usage counters, the reports.

Why it is built this way: the proxy is the product's hot path, and a general-purpose framework
(aiohttp's client and server) spends ~150 us and most of a core per request on things a reverse
proxy does not need (request objects, header multidicts, futures, tasks). Here each side is a plain
``asyncio.Protocol`` fed by ``httptools`` (llhttp):

* a request's head is parsed once and rewritten into bytes once, then written to a pooled
  keep-alive connection of the chosen replica;
* a response's head is checked with one regular expression and passed through nearly verbatim,
  and its body bytes are relayed exactly as they arrive (chunked framing included) in one
  ``write`` per received packet: streams (SSE) flow chunk by chunk with no buffering, and the
  parser only tells where the response ends;
* no task, future or timer is created per request on the keep-alive path: timeouts are enforced by
  one sweep a second; counters are plain ints rendered on scrape (proxy/metrics.py); Redis writes
  are batched off the request path (proxy/report.py).

Retries: a request is sent to another replica when nothing of it reached the first (connection
refused, reset or closed on connect), so a dead replica costs no request; a replica that refused a
connection is skipped locally for a while and reported at once to the control plane. A request
that was written to a replica which then closed without answering a byte is sent again only when
repeating it is safe (RFC 9110 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE, or any request with
an ``Idempotency-Key`` header) and its body is still held (up to PROXY_REPLAY_LIMIT): a POST that
may have been processed is answered 502, never run twice. So that the replica's keep-alive timer
does not cost such a POST, it is not written to a pooled connection idle for more than a second.
A gateway request (routed by its body's model) that its service failed so, before a byte of an
answer, goes on to another backend of the same model name (``failover``), by the same rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import random
import signal
import socket
import threading
import time

from proxy import gateway
from proxy.admin import Admin
from proxy.config import Config
from proxy.downstream import Downstream
from proxy.exchange import UNSAFE_REUSE_SECONDS, Exchange, keep_app_cookies
from proxy.limits import WAIT, WINDOW, KeyState, Limiter, reset_text
from proxy.report import Reporter
from proxy.table import Endpoint, Route, Table
from proxy.upstream import Upstream
from serving.core import tokens

log = logging.getLogger("proxy")

_monotonic = time.monotonic
_time = time.time
_random = random.random  # a traffic split, not a secret

# Says what is wrong and the way out: a caller who pasted a revoked or another service's token.
INVALID_TOKEN = (
    "The token is unknown, revoked, or for another service: generate one for this service on its page "
    "(Tokens) or with `modelserve token create SERVICE`."
)
SCHEMES = ("backendai", "bearer")
PLATFORM_KINDS = (tokens.ENDPOINT_TOKEN_KIND, tokens.API_KEY_KIND, tokens.GATEWAY_KEY_KIND)
INVALID_REQUEST = "invalid_request_error"  # OpenAI's error type for a request it refuses
CHALLENGE = b'WWW-Authenticate: Bearer realm="modelserve", BackendAI realm="modelserve"\r\n'
TOKEN_CACHE_SIZE = 10_000
DRAIN_SECONDS = 5.0  # on SIGTERM, requests in flight get this long to finish
# What the proxy adds to a request (the usual case, in one formatting operation).
FORWARDED = (
    b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\nX-Forwarded-Host: %b\r\nX-Forwarded-Prefix: %b\r\n"
    b"X-Request-ID: %b\r\n\r\n"
)
NO_ROUTE = {
    "PROVISIONING": ("The service is starting; no replica is ready yet. Try again shortly.", 5),
    "READY": ("The service's replicas are starting; none has passed its health check yet.", 5),
    "DEGRADED": ("No replica of this service is healthy right now; they are being restarted.", 5),
    "UNHEALTHY": ("Every replica of this service is unhealthy; see the service page for their errors.", 10),
    "TERMINATING": ("The service is being terminated.", 30),
}
NO_ROUTE_DEFAULT = ("No healthy replica of this service is available right now.", 2)
WAKE_ASK_AGAIN = 5.0  # seconds between this proxy's wake requests for a service it holds requests for


class Proxy:
    """Shared state of the process: the table, the pools (on the routes), counters, reporting."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.table = Table(config.redis_url, config.prefix, config.resync_interval)
        self.table.on_routes = self._wake
        self.key = config.token_key.encode()
        self.instance = f"{socket.gethostname()}:{config.port}:{os.getpid()}"
        self.reporter = Reporter(config.redis_url, config.prefix, self.instance, self.table, config.stats_interval)
        self.limiter = Limiter(config.redis_url, config.prefix)
        self.usage = self.reporter.usage
        self.limiter.resume = self._admit_gateway
        self.downstreams: set[Downstream] = set()
        self.token_cache: dict[bytes, tuple[str, str, str]] = {}  # header -> (lookup, token, digest)
        self.gateway_cache: dict[bytes, tuple[str, str, str]] = {}  # the same for gateway keys
        self.replay_limit = config.replay_limit
        self.queue_limit = config.queue_limit
        self.keep_token = config.keep_token
        self.access_log = config.access_log
        self.domain_suffix = ("." + config.domain).encode() if config.domain else b""
        self._rid_prefix = os.urandom(4).hex().encode()
        self._rid_counter = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.counters = {"route_connect_failures_total": 0, "retries_total": 0}
        self.failovers: dict[str, int] = {}  # model name -> gateway requests failed over (/metrics)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.table.start()
        self.reporter.start()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.table.stop()
        await self.reporter.stop()
        await self.limiter.stop()
        for endpoint in self.table.endpoints.values():
            for route in endpoint.routes:
                route.retire()

    def request_id(self) -> bytes:
        self._rid_counter += 1
        return b"%b%08x" % (self._rid_prefix, self._rid_counter)

    # --- the request path ------------------------------------------------------------------------

    def dispatch(self, ex: Exchange) -> None:
        target = ex.target
        if target[:1] != b"/":
            target = self._origin_form(ex)
        slug: str | None = None
        path = target
        prefix = b""
        if self.domain_suffix and ex.host:
            host = ex.host.partition(b":")[0].lower()
            if host.endswith(self.domain_suffix) and len(host) > len(self.domain_suffix):
                slug = host[: -len(self.domain_suffix)].decode("latin-1")
        if slug is None:
            if target[:3] != b"/e/":
                if target[:4] == b"/v1/":
                    self._gateway(ex, target)
                    return
                ex.respond(
                    404,
                    "not_found",
                    "Call a service at /e/<service slug>/<path>; its address is on the service page.",
                )
                return
            cut = target.find(b"/", 3)
            query = target.find(b"?", 3)
            if cut < 0 or 0 <= query < cut:
                cut = query if query >= 0 else len(target)
            slug = target[3:cut].decode("latin-1")
            path = target[cut:]
            if path[:1] != b"/":
                path = b"/" + path
            prefix = target[:cut]
        endpoint = self.table.endpoints.get(slug)
        if endpoint is None:
            if not self.table.loaded:
                ex.respond(
                    503,
                    "routing_table_not_loaded",
                    "The proxy has not loaded its routing table yet (is Redis reachable?).",
                    b"Retry-After: 1\r\n",
                )
            else:
                ex.respond(404, "unknown_service", f"No service {slug!r} here: it was terminated, or this is a typo.")
            return
        auth = ex.auth
        forward_auth = auth is not None
        if not endpoint.public:
            problem = self._authorize(auth, endpoint)
            if problem is not None:
                endpoint.stats.codes[4] += 1
                ex.respond(401, problem[0], problem[1], CHALLENGE)
                return
            forward_auth = self.keep_token
        elif auth is not None and not self.keep_token and self._is_platform_token(auth):
            forward_auth = False
        self._admit(ex, endpoint, path, prefix, forward_auth)

    def _admit(self, ex: Exchange, endpoint: Endpoint, path: bytes, prefix: bytes, forward_auth: bool) -> None:
        """Send a request whose endpoint is known and allowed: the endpoint's limit, the forwarded
        head, then a route."""
        slug = endpoint.slug
        auth = ex.auth
        if endpoint.in_flight >= self.queue_limit * endpoint.capacity:
            endpoint.stats.codes[4] += 1
            endpoint.stats.throttled += 1
            ex.respond(
                429,
                "overloaded",
                f"Service {slug!r} has {endpoint.in_flight} requests in flight, its limit; retry shortly.",
                b"Retry-After: 1\r\n",
            )
            return
        endpoint.in_flight += 1
        ex.endpoint = endpoint
        rid = ex.rid
        if rid is None or len(rid) > 128:
            self._rid_counter += 1
            ex.rid = rid = b"%b%08x" % (self._rid_prefix, self._rid_counter)
        # An HTTP/1.0 client's request goes as HTTP/1.0: the replica then never answers chunked.
        ex.line = b"%b %b %b\r\n" % (ex.method, path, b"HTTP/1.1" if ex.version11 else b"HTTP/1.0")
        parts = ex.hparts
        # Cookies pass only on the service's own host name (<slug>.<SERVING_DOMAIN>): at /e/<slug>/
        # and at the gateway's /v1/ every service shares the proxy's origin, and so would each
        # other's cookies.
        if endpoint.forward_cookies and not prefix and not ex.gateway:
            ex.forward_cookies = True
            cookie = ex.cookie
            if cookie is not None:
                cookie = keep_app_cookies(cookie, endpoint.platform_cookies)
                if cookie:
                    parts.append(b"Cookie: %b\r\n" % cookie)
        if forward_auth and auth is not None:
            parts.append(b"Authorization: %b\r\n" % auth)
        peer = ex.down.peer
        if not ex.down.trusted:  # a client's own X-Forwarded-* claims are not passed on as facts
            ex.xff = ex.xfp = ex.xfh = None
        forwarded_for = ex.xff + b", " + peer if ex.xff else peer
        forwarded_host = ex.xfh or ex.host
        if forwarded_host and prefix and not ex.chunked and ex.upgrade is None:
            # The usual request in one formatting operation.
            parts.append(FORWARDED % (forwarded_for, ex.xfp or b"http", forwarded_host, prefix, rid))
        else:
            parts.append(
                b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\nX-Request-ID: %b\r\n"
                % (forwarded_for, ex.xfp or b"http", rid)
            )
            if forwarded_host:
                parts.append(b"X-Forwarded-Host: %b\r\n" % forwarded_host)
            if prefix:
                parts.append(b"X-Forwarded-Prefix: %b\r\n" % prefix)
            if ex.chunked:
                parts.append(b"Transfer-Encoding: %b\r\n" % (ex.te or b"chunked"))
            if ex.upgrade is not None:
                parts.append(b"Connection: Upgrade\r\nUpgrade: %b\r\n" % ex.upgrade)
            parts.append(b"\r\n")
        ex.head = b"".join(parts)
        if ex.expect and not ex.request_done and ex.version11:
            # The replica gets no Expect. (Never to an HTTP/1.0 client: RFC 9110 10.1.1.)
            ex.down.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.forward(ex)

    # --- the gateway: routing by model (proxy/gateway.py) -------------------------------------------

    def _gateway(self, ex: Exchange, target: bytes) -> None:
        """A request at the root's /v1/: answered here (/v1/models) or routed by its body's model."""
        path = target.partition(b"?")[0]
        if len(path) > 1 and path[-1:] == b"/":
            path = path[:-1]
        is_models = path == gateway.MODELS_PATH or path[:11] == b"/v1/models/"
        if path not in gateway.MODEL_PATHS and not is_models:
            ex.respond(
                404,
                "unknown_url",
                f"Unknown URL {path.decode('latin-1')!r}: the gateway serves /v1/chat/completions, /v1/completions, "
                "/v1/embeddings, /v1/responses and /v1/models; call a service's other paths at /e/<service slug>/.",
                kind=INVALID_REQUEST,
            )
            return
        if not self.table.loaded:
            ex.respond(
                503,
                "routing_table_not_loaded",
                "The proxy has not loaded its routing table yet (is Redis reachable?).",
                b"Retry-After: 1\r\n",
            )
            return
        key = self._gateway_key(ex.auth)
        if isinstance(key, tuple):
            ex.respond(401, key[0], key[1], CHALLENGE, kind=INVALID_REQUEST)
            return
        if is_models:
            if ex.method not in (b"GET", b"HEAD"):
                ex.respond(405, "method_not_allowed", "Use GET for /v1/models.", kind=INVALID_REQUEST)
                return
            names = self._models_for(key)
            if path == gateway.MODELS_PATH:
                self._answer_json(ex, gateway.models_body(names))
                return
            wanted = path[11:].decode("latin-1")
            for name, owner in names:
                if name == wanted:
                    self._answer_json(
                        ex,
                        json.dumps({"id": name, "object": "model", "created": 0, "owned_by": owner}).encode(),
                    )
                    return
            self._unknown_model(ex, wanted)
            return
        if ex.method != b"POST":
            ex.respond(405, "method_not_allowed", f"Use POST for {path.decode('latin-1')}.", kind=INVALID_REQUEST)
            return
        if ex.upgrade is not None:
            ex.respond(400, "bad_request", "The gateway does not switch protocols.", kind=INVALID_REQUEST)
            return
        ex.gateway_key = key
        ex.sniffed = bytearray()
        if ex.request_done or ex.body_size:
            # A pipelined request whose body came before its turn: what was kept of it.
            if ex.chunked or ex.body is None:
                ex.respond(
                    400,
                    "pipelined",
                    "Send this request after the answer to the one before it (no pipelining with a chunked body).",
                    kind=INVALID_REQUEST,
                )
                return
            ex.sniffed += b"".join(ex.body)
            self.sniff(ex)
            return
        if ex.expect and ex.version11:
            # The body is needed to choose a service: ask for it now; the replica gets no Expect.
            ex.down.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            ex.expect = False

    def sniff(self, ex: Exchange) -> None:
        """Called with each piece of a gateway request's body and at its end, until the model is known."""
        buf = ex.sniffed
        assert buf is not None
        done = ex.request_done
        size = len(buf)
        if not done and size < gateway.SNIFF_LIMIT and size < 2 * ex.sniff_scanned:
            return  # scanned again once what arrived doubles: O(n) scanning in all
        ex.sniff_scanned = size
        found = gateway.model_of_body(bytes(buf[: gateway.SNIFF_LIMIT]), done and size <= gateway.SNIFF_LIMIT)
        if isinstance(found, tuple):
            verdict = found[0]
            if verdict == gateway.MORE and not done and size < gateway.SNIFF_LIMIT:
                return
            ex.sniffed = None
            if verdict == gateway.INVALID:
                message = "The request body must be a JSON object with a string 'model'."
            else:
                message = "The request body names no model: send 'model' (one of GET /v1/models)" + (
                    f" within its first {gateway.SNIFF_LIMIT // 1024} KiB." if size >= gateway.SNIFF_LIMIT else "."
                )
            ex.respond(400, "invalid_model", message, kind=INVALID_REQUEST)
            return
        ex.sniffed = None
        key = ex.gateway_key
        assert isinstance(key, gateway.GatewayKey)
        endpoint = None
        candidates = self.table.by_model(found)
        if len(candidates) == 1:
            if key.may_call(candidates[0]):
                endpoint = candidates[0]
        else:
            now = ex.last_active
            for candidate in candidates:
                if key.may_call(candidate):
                    if any(r.down_until <= now for r in candidate.routes):
                        endpoint = candidate  # one with a replica not refusing connections here first
                        break
                    if endpoint is None or (candidate.routes and not endpoint.routes):
                        endpoint = candidate  # else one with replicas (the marks are a guess)
        if endpoint is None:
            for alias in self.table.aliases_named(found):
                endpoint = self._pick_backend(alias, key)
                if endpoint is not None:
                    break
        if endpoint is None:
            self._unknown_model(ex, found)
            return
        ex.gateway = found  # (the name, kept for a failover: proxy.failover)
        self.reporter.last_used[key.lookup] = _time()
        self._admit_gateway(ex, endpoint)

    def _admit_gateway(self, ex: Exchange, endpoint: Endpoint) -> None:
        """A gateway request whose service is chosen: its key's limits (proxy/limits.py), then on."""
        key = ex.gateway_key
        assert isinstance(key, gateway.GatewayKey)
        state = self.limiter.state(key)
        if state is not None:
            now = _time()
            refused = self.limiter.admit(state, now)
            if refused is not None:
                if refused[0] == WAIT:  # the lease is empty and its refill on the way: wait for it
                    state.waiters.append((ex, endpoint))
                    return
                self._over_limit(ex, state, refused[0], now)
                return
            ex.limit = state
        ex.tail = bytearray()  # every gateway answer's last 4 KiB, for its usage (proxy/usage.py)
        self._admit(ex, endpoint, ex.target, b"", self.keep_token)

    def _over_limit(self, ex: Exchange, state: KeyState, kind: str, now: float) -> None:
        """429 in OpenAI's shape (type "requests"/"tokens", code rate_limit_exceeded) with its headers."""
        if kind == "concurrency":
            ex.respond(
                429,
                "rate_limit_exceeded",
                f"This key has {state.in_flight} requests in flight, its limit (max_concurrency "
                f"{state.concurrency}); send the next when one has finished.",
                b"Retry-After: 1\r\n" + state.headers(now),
                kind="requests",
            )
            return
        budget = state.requests if kind == "requests" else state.tokens
        assert budget is not None
        wait = WINDOW - now % WINDOW
        label = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        ex.respond(
            429,
            "rate_limit_exceeded",
            f"Rate limit reached for this key on {label}: Limit {budget.limit}, "
            f"Used {budget.limit - budget.remaining()}. Please try again in {reset_text(wait)}.",
            b"Retry-After: %d\r\n%b" % (max(1, int(wait + 0.999)), state.headers(now)),
            kind=kind,
        )

    def _gateway_key(self, header: bytes | None) -> gateway.GatewayKey | tuple[str, str]:
        """The live gateway key an Authorization header holds, else (error code, message)."""
        if header is None:
            return (
                "missing_api_key",
                "The gateway needs a key: send 'Authorization: Bearer <gateway key>' (an OpenAI client's api_key).",
            )
        cached = self.gateway_cache.get(header)
        if cached is not None:
            lookup, token, digest = cached
        else:
            credential = tokens.from_authorization(header.decode("latin-1"), schemes=SCHEMES)
            parsed = tokens.parse(credential) if credential else None
            if parsed is None or parsed.kind != tokens.GATEWAY_KEY_KIND:
                return (
                    "invalid_api_key",
                    "The Authorization header does not hold a gateway key: send 'Authorization: Bearer msg_...' "
                    "with a key from the gateway keys page.",
                )
            lookup, token, digest = parsed.lookup, parsed.token, ""
        key = self.table.keys.get(lookup)
        if key is None:
            return "invalid_api_key", "The gateway key is unknown or revoked."
        if not hmac.compare_digest(key.digest, digest):
            if not tokens.verify(token, key.digest, self.key):
                return "invalid_api_key", "The gateway key is unknown or revoked."
            if len(self.gateway_cache) >= TOKEN_CACHE_SIZE:
                self.gateway_cache.clear()
            self.gateway_cache[header] = (lookup, token, key.digest)
        if key.expires <= _time():
            return "expired_api_key", "The gateway key has expired; create a new one."
        return key

    def _pick_backend(
        self, alias: gateway.Alias, key: gateway.GatewayKey, failed: list[Endpoint] | None = None
    ) -> Endpoint | None:
        """An alias's backend for one request: by weight among those ``key`` may call that have a
        healthy replica (one not refusing connections here); when none has, the first one ``key`` may
        call (it then holds, wakes or answers 503 as a service called by its own name would). None:
        ``key`` may call no backend (the alias is unknown to it). For a failover, ``failed`` are the
        services that failed the request: they are left out, and so is a backend over its queue
        limit; with none up, None (there is nothing better than the answer the caller has)."""
        table = self.table
        first: Endpoint | None = None
        up: list[tuple[Endpoint, int]] = []
        total = 0
        now = _monotonic()
        for endpoint_id, weight in alias.backends:
            endpoint = table.by_id(endpoint_id)
            if endpoint is None or not key.may_call(endpoint):
                continue
            if failed is not None and (endpoint in failed or not self._may_take(endpoint)):
                continue
            if first is None:
                first = endpoint
            if weight > 0 and any(r.down_until <= now for r in endpoint.routes):
                up.append((endpoint, weight))
                total += weight
        if len(up) == 1:
            return up[0][0]
        if up:
            point = _random() * total
            for endpoint, weight in up:
                point -= weight
                if point < 0:
                    return endpoint
            return up[-1][0]
        return first if failed is None else None

    def _may_take(self, endpoint: Endpoint) -> bool:
        """Whether a failover may send a request to ``endpoint``: below its queue limit (the limit
        ``_admit`` answers 429 at) with a replica not refusing connections here."""
        if endpoint.in_flight >= self.queue_limit * endpoint.capacity:
            return False
        now = _monotonic()
        return any(r.down_until <= now for r in endpoint.routes)

    # --- failover: the next backend of a model name, within one request ----------------------------

    def failover(self, ex: Exchange) -> bool:
        """Send a gateway request whose service failed it before a byte of an answer to the next
        backend of its model name (another service declaring it, or another backend of its alias)
        that its key may call; False when it may not go on, and the caller answers as before.

        The callers decide that repeating it is allowed: every replica refused the connection or
        failed while the service's retry policy allowed a re-send (``_no_route`` after ``tried``),
        or the service's retry budget is spent on a request its policy lets be re-sent
        (``Exchange.upstream_failed``). Here: at most PROXY_GATEWAY_BACKENDS services per request,
        never a service tried already, and never a body partly streamed to a replica. The request
        leaves its first service uncounted there (no answer came from it) and is counted, its usage
        too, for the one that answers; ``X-Modelserve-Service`` names that one. A revision pin
        (``X-Modelserve-Revision``) names a revision of the first service only: it is dropped."""
        model = ex.gateway
        endpoint = ex.endpoint
        if not model or endpoint is None or ex.got_bytes or ex.ended or ex.response_started:
            return False
        if not ex.replayable and ex.pending is None and ex.body_size:
            return False  # some of a body too big to keep went to a replica: it cannot be sent whole
        failed = ex.failed_over
        if failed is None:
            failed = ex.failed_over = [endpoint]
        else:
            failed.append(endpoint)
        if len(failed) >= self.config.gateway_backends:
            return False
        key = ex.gateway_key
        assert isinstance(key, gateway.GatewayKey)
        nxt: Endpoint | None = None
        for candidate in self.table.by_model(model):
            if candidate not in failed and key.may_call(candidate) and self._may_take(candidate):
                nxt = candidate
                break
        if nxt is None:
            for alias in self.table.aliases_named(model):
                nxt = self._pick_backend(alias, key, failed)
                if nxt is not None:
                    break
        if nxt is None:
            return False
        # Counted once, for the service that failed it and for the model name (proxy/report.py).
        endpoint.stats.failovers += 1
        self.failovers[model] = self.failovers.get(model, 0) + 1
        log.info(
            "gateway request for model %r failed over from %s to %s",
            model,
            endpoint.slug,
            nxt.slug,
            extra={"request_id": (ex.rid or b"").decode("latin-1"), "service": endpoint.slug},
        )
        endpoint.in_flight -= 1
        nxt.in_flight += 1
        ex.endpoint = nxt
        ex.revision = None
        ex.tried = None
        ex.attempts = 0
        ex.last_active = _monotonic()
        self.forward(ex)
        return True

    def _models_for(self, key: gateway.GatewayKey) -> list[tuple[str, str]]:
        """The model names ``key`` may call, sorted, each with its service's project (or owner); an
        alias when ``key`` may call at least one of its backends."""
        seen: dict[str, str] = {}
        for endpoint in self.table.endpoints.values():
            if endpoint.models and key.may_call(endpoint):
                for name in endpoint.models:
                    seen.setdefault(name, endpoint.project or endpoint.owner or "modelserve")
        table = self.table
        for alias in table.aliases.values():
            if alias.name not in seen:
                for endpoint_id, _ in alias.backends:
                    backend = table.by_id(endpoint_id)
                    if backend is not None and key.may_call(backend):
                        seen[alias.name] = alias.project or alias.owner or "modelserve"
                        break
        return sorted(seen.items())

    def _unknown_model(self, ex: Exchange, name: str) -> None:
        # A model the key may not call gets exactly this too: no way to learn what others serve.
        ex.respond(
            404,
            "model_not_found",
            f"The model {name!r} does not exist or you do not have access to it; GET /v1/models lists yours.",
            kind=INVALID_REQUEST,
        )

    def _answer_json(self, ex: Exchange, body: bytes) -> None:
        """A 200 JSON answer from the proxy itself (ex.respond's framing, with a success status)."""
        down = ex.down
        closing = not ex.keep_alive
        down.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Request-ID: %b\r\n%b\r\n%b"
            % (
                len(body),
                ex.rid or self.request_id(),
                b"Connection: close\r\n" if closing else b"",
                b"" if ex.head_request else body,
            )
        )
        ex.response_started = ex.response_done = ex.ended = True
        if ex.request_done or closing:
            down.finish(ex)

    @staticmethod
    def _origin_form(ex: Exchange) -> bytes:
        """A target in absolute form (``http://host/path``, RFC 9112 3.2.2): its host replaces
        the Host header and its path is the target. Other forms (``*``) are left as they are."""
        target = ex.target
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return target
        cut = len(rest)
        for mark in (b"/", b"?"):
            at = rest.find(mark)
            if 0 <= at < cut:
                cut = at
        ex.host = rest[:cut].rpartition(b"@")[2]
        path = rest[cut:]
        ex.target = path if path[:1] == b"/" else b"/" + path
        return ex.target

    def _authorize(self, header: bytes | None, endpoint: Endpoint) -> tuple[str, str] | None:
        """None when ``header`` holds a live token of ``endpoint``; else (error code, message)."""
        if header is None:
            return (
                "missing_token",
                "This service needs a token: send 'Authorization: BackendAI <token>' (or 'Bearer <token>').",
            )
        cached = self.token_cache.get(header)
        if cached is not None:
            lookup, token, digest = cached
            known = endpoint.tokens.get(lookup)
            if known is None:
                return "invalid_token", INVALID_TOKEN
            if not hmac.compare_digest(known[0], digest):
                if not tokens.verify(token, known[0], self.key):
                    return "invalid_token", INVALID_TOKEN
                self.token_cache[header] = (lookup, token, known[0])
        else:
            credential = tokens.from_authorization(header.decode("latin-1"), schemes=SCHEMES)
            parsed = tokens.parse(credential) if credential else None
            if parsed is None or parsed.kind != tokens.ENDPOINT_TOKEN_KIND:
                return (
                    "malformed_token",
                    "The Authorization header does not hold a service token: "
                    "send 'Authorization: BackendAI <token>' or 'Bearer <token>' (an OpenAI client's api_key) "
                    "with a token from the service page.",
                )
            lookup = parsed.lookup
            known = endpoint.tokens.get(lookup)
            if known is None or not tokens.verify(parsed.token, known[0], self.key):
                return "invalid_token", INVALID_TOKEN
            if len(self.token_cache) >= TOKEN_CACHE_SIZE:
                self.token_cache.clear()
            # Only tokens that verified are remembered (what HMAC gave for them), so garbage
            # cannot fill this, and a token is still checked against the table on every request.
            self.token_cache[header] = (lookup, parsed.token, known[0])
        now = _time()
        if known[1] <= now:
            return "expired_token", "The token has expired; generate a new one on the service page."
        self.reporter.last_used[lookup] = now
        return None

    def _is_platform_token(self, header: bytes) -> bool:
        if header in self.token_cache:
            return True
        credential = tokens.from_authorization(header.decode("latin-1"), schemes=(*SCHEMES, "token"))
        parsed = tokens.parse(credential) if credential else None
        return parsed is not None and parsed.kind in PLATFORM_KINDS

    def forward(self, ex: Exchange) -> None:
        """Send ``ex`` to a route: a pooled connection at once, else a new one."""
        endpoint = ex.endpoint
        assert endpoint is not None
        routes = endpoint.routes
        if (endpoint.split is not None or ex.revision is not None) and routes:
            route: Route | None = self._by_revision(ex, endpoint)
            if route is None and ex.ended:
                return
        elif len(routes) == 1 and ex.tried is None and routes[0].down_until <= ex.last_active:
            route = routes[0]  # one replica: nothing to choose
        else:
            route = endpoint.pick(ex.last_active, ex.tried)
        if route is None:
            self._no_route(ex, endpoint)
            return
        ex.route = route
        route.in_flight += 1
        ex.attempts += 1
        if ex.attempts > 1:
            self.counters["retries_total"] += 1
        if ex.upgrade is None:
            idle = route.idle
            while idle:
                conn = idle.pop()
                # (A connection the replica just closed may not have been told lost yet: skip it.)
                if conn.closed or conn.transport.is_closing():
                    continue
                if conn.idle_since < ex.last_active - UNSAFE_REUSE_SECONDS and not ex.retryable():
                    # A request that cannot be sent twice does not risk the replica's keep-alive
                    # timer: a new connection (this one and the older ones below it are closed).
                    conn.close()
                    continue
                ex.attach(conn)
                return
        assert self.loop is not None
        self.loop.create_task(self._connect(route, ex))

    def _by_revision(self, ex: Exchange, endpoint: Endpoint) -> Route | None:
        """A route chosen by revision share, or of the revision the client pinned (issue 16); None
        with the answer sent when the pin is unusable."""
        raw = ex.revision
        if raw is None:
            return endpoint.choose(ex.last_active, ex.tried)
        try:
            pinned = int(raw)
        except ValueError:
            ex.respond(
                400,
                "bad_revision",
                "X-Modelserve-Revision must be a revision number, as the service's revisions list shows.",
            )
            return None
        route = endpoint.choose(ex.last_active, ex.tried, pinned)
        if route is None and not ex.tried:
            ex.respond(
                503,
                "revision_unavailable",
                f"Revision {pinned} of this service has no healthy replica here; "
                "check the revision number, or wait until its replicas are healthy.",
                b"Retry-After: 1\r\n",
            )
        return route

    def _no_route(self, ex: Exchange, endpoint: Endpoint) -> None:
        if ex.tried:
            # Every replica was tried: each refused the connection (nothing was sent) or failed
            # unanswered while the retry policy allowed a re-send. A gateway request goes on to
            # another backend of its model name, if it has one.
            if ex.gateway and self.failover(ex):
                return
            ex.respond(
                502,
                "replica_unreachable",
                "No replica of this service could be reached; the platform is replacing it. Retry shortly.",
                b"Retry-After: 1\r\n",
            )
            return
        if endpoint.sleeps and not endpoint.routes and endpoint.status != "TERMINATING":
            self._hold_for_wake(ex, endpoint)
            return
        hold = self.config.hold_seconds
        if hold > 0 and not ex.held and not endpoint.routes and endpoint.status != "TERMINATING":
            assert self.loop is not None
            ex.held = True
            endpoint.waiters.append(ex)
            ex.hold_timer = self.loop.call_later(hold, self._hold_expired, ex)
            return
        message, retry_after = NO_ROUTE.get(endpoint.status, NO_ROUTE_DEFAULT)
        if endpoint.routes:
            message, retry_after = "Every replica of this service failed just now; retry shortly.", 1
        ex.respond(503, "no_healthy_replica", message, b"Retry-After: %d\r\n" % retry_after)

    def _hold_for_wake(self, ex: Exchange, endpoint: Endpoint) -> None:
        """Scale to zero: hold a request to a sleeping (or waking) service until its first replica is
        in the routing table (``_wake``), and ask the control plane to wake it now (proxy/report.py)."""
        config = self.config
        if ex.held:  # held once already, for the whole wake timeout
            ex.respond(
                503,
                "wake_timeout",
                f"The service is waking up and had no ready replica within {config.wake_timeout:g} s; "
                "see the service page for why, and retry.",
                b"Retry-After: 5\r\n",
            )
            return
        if len(endpoint.waiters) >= config.wake_queue:
            endpoint.stats.throttled += 1
            ex.respond(
                503,
                "waking",
                f"The service is waking up and {len(endpoint.waiters)} requests already wait for it, the most "
                "held at once; retry in a few seconds.",
                b"Retry-After: 5\r\n",
            )
            return
        assert self.loop is not None
        ex.held = True
        endpoint.waiters.append(ex)
        ex.hold_timer = self.loop.call_later(config.wake_timeout, self._hold_expired, ex)
        self._ask_wake(endpoint, _monotonic(), ex.rid)

    def _ask_wake(self, endpoint: Endpoint, now: float, rid: bytes | None) -> None:
        if now - endpoint.wake_sent >= WAKE_ASK_AGAIN or not endpoint.wake_sent:
            endpoint.wake_sent = now
            # The held request's id goes with it: the service's "woken" event carries it.
            self.reporter.wake(endpoint.slug, endpoint.id, (rid or b"").decode("latin-1"))

    def _hold_expired(self, ex: Exchange) -> None:
        ex.hold_timer = None
        endpoint = ex.endpoint
        if endpoint is not None:
            with contextlib.suppress(ValueError):
                endpoint.waiters.remove(ex)
        if not ex.ended:
            ex.last_active = _monotonic()
            self.forward(ex)

    def _wake(self, endpoint: Endpoint) -> None:
        waiters, endpoint.waiters = endpoint.waiters, []
        now = _monotonic()
        for ex in waiters:
            if ex.hold_timer is not None:
                ex.hold_timer.cancel()
                ex.hold_timer = None
            if not ex.ended:
                ex.held = False  # forwarded now: the idle and total timeouts apply again
                ex.last_active = now
                self.forward(ex)

    async def _connect(self, route: Route, ex: Exchange) -> None:
        assert self.loop is not None
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Upstream(self, route), route.host, route.port),
                self.config.connect_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, unreachable, timeout: nothing was sent, try elsewhere
            self._connect_failed(route, ex, exc)
            return
        if conn.closed or conn.transport.is_closing():
            # Accepted and closed at once: a replica dying behind Docker's userland proxy (docker-proxy
            # accepts, finds no container and closes). Nothing was sent: try elsewhere. (Writing to
            # it would raise, and the request would be neither answered nor retried.)
            self._connect_failed(route, ex, ConnectionResetError("the connection closed as soon as it opened"))
            return
        route.failures = 0
        if ex.ended or ex.route is not route or ex.conn is not None:
            # The client left (or the request was answered) while connecting: keep the connection.
            if ex.upgrade is None and not route.gone:
                conn.idle_since = _monotonic()
                route.idle.append(conn)
            else:
                conn.close()
            return
        ex.attach(conn)

    def _connect_failed(self, route: Route, ex: Exchange, exc: Exception) -> None:
        error = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        now = _monotonic()
        self.route_unreachable(route, ex, error, "refused a connection", now)
        if ex.route is route:
            route.in_flight -= 1
            ex.route = None
        if ex.ended:
            return
        ex.tried = [*(ex.tried or ()), route]
        ex.last_active = now
        self.forward(ex)

    def route_unreachable(self, route: Route, ex: Exchange, error: str, what: str, now: float) -> None:
        """``route`` refused ``ex``'s connection, or closed a new one before a byte of answer: skip it
        for a while, and when newly marked, report it to its node with the request's id (its prober
        checks it at once; the exit event carries the id). Only on a failure: the normal path pays
        nothing."""
        self.counters["route_connect_failures_total"] += 1
        if route.mark_down(now, self.config.route_down_seconds):
            endpoint = ex.endpoint
            rid = (ex.rid or b"").decode("latin-1")  # the request that found it down, for its events
            log.info(
                "route %s (%s:%d) of %s %s: %s",
                route.id,
                route.host,
                route.port,
                route.endpoint_slug,
                what,
                error,
                extra={"request_id": rid, "service": route.endpoint_slug, "route": route.id},
            )
            self.reporter.route_failed(route.id, route.endpoint_slug, endpoint.id if endpoint else "", error, rid)

    # --- housekeeping ----------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Once a second: idle and total timeouts, idle client connections, stale pooled ones."""
        assert self.loop is not None
        self._sweeper = self.loop.call_later(1.0, self._sweep)
        config = self.config
        now = _monotonic()
        idle_cut = now - config.idle_timeout
        total_cut = now - config.total_timeout if config.total_timeout else None
        keepalive_cut = now - config.keepalive_timeout
        try:
            for down in list(self.downstreams):
                ex = down.current
                if ex is None:
                    if down.tunnel is not None:
                        # A websocket silent both ways that long: a peer vanished without a FIN (a
                        # laptop closed, a NAT forgot it). Closing one side closes the other.
                        if down.last_active < idle_cut:
                            down.transport.abort()  # a dead peer reads nothing: do not wait to flush
                    elif down.last_active < keepalive_cut:
                        down.transport.close()
                elif ex.held:
                    continue
                elif ex.last_active < idle_cut:
                    ex.timed_out(f"The replica sent nothing for {config.idle_timeout:g} s.")
                elif total_cut is not None and ex.started < total_cut:
                    ex.timed_out(f"The request took longer than {config.total_timeout:g} s.")
            pool_cut = now - config.upstream_idle
            for endpoint in self.table.endpoints.values():
                if endpoint.waiters and endpoint.sleeps and not endpoint.routes:
                    # Still asleep: a lost wake request is asked again (for the longest-held request).
                    self._ask_wake(endpoint, now, endpoint.waiters[0].rid)
                for route in endpoint.routes:
                    idle = route.idle
                    while idle and idle[0].idle_since < pool_cut:
                        idle.pop(0).close()
        except Exception:
            log.exception("sweep failed")

    def gauges(self) -> dict[str, float]:
        routes = sum(len(e.routes) for e in self.table.endpoints.values())
        return {
            "endpoints": len(self.table.endpoints),
            "routes": routes,
            "client_connections": len(self.downstreams),
            "redis_connected": 1 if self.table.connected else 0,
            "routing_table_age_seconds": (_time() - self.table.loaded_at) if self.table.loaded else -1,
            **self.counters,
            **self.limiter.counters,
        }


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT, then drain requests in flight (up to DRAIN_SECONDS)."""
    loop = asyncio.get_running_loop()
    proxy = Proxy(config)
    proxy.start()
    server = await loop.create_server(
        lambda: Downstream(proxy), config.host, config.port, reuse_address=True, backlog=4096
    )
    admin = await loop.create_server(lambda: Admin(proxy), config.host, config.admin_port, reuse_address=True)
    # Everything allocated so far lives for the whole run: keep the collector from rescanning it,
    # and collect young objects less often (requests allocate many short-lived, acyclic ones).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)
    log.warning("proxy listening on http://%s:%d (admin :%d)", config.host, config.port, config.admin_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        # Whatever happens below, the process ends soon: a supervisor waits for it.
        watchdog = threading.Timer(DRAIN_SECONDS + 3.0, os._exit, (0,))
        watchdog.daemon = True
        watchdog.start()
        server.close()
        admin.close()

        def busy(down: Downstream) -> bool:
            ex = down.current
            return ex is not None and ex.endpoint is not None and not ex.ended

        for down in list(proxy.downstreams):
            if not busy(down) and down.tunnel is None:
                down.transport.close()
        deadline = loop.time() + DRAIN_SECONDS
        while loop.time() < deadline and any(busy(d) for d in proxy.downstreams):
            await asyncio.sleep(0.05)
        for down in list(proxy.downstreams):
            down.transport.close()
        await proxy.stop()
