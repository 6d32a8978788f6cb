"""The data plane: forwards client requests to healthy replicas (S4.3, S5, S7, DESIGN.md §1).

No Django, no database: it serves from the routing table it keeps in memory (proxy/table.py), so it
keeps serving when Redis, the database or every Celery process is down. Hot path notes: aiohttp's
low-level server (no router), one pooled keep-alive client session, no access log, counters are plain
ints rendered only when /metrics is scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.table import Endpoint, Route, Table
from serving import tokens

log = logging.getLogger("proxy")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
RESPONSE_SKIP = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length", "trailer", "upgrade"))
ROUTE_DOWN_SECONDS = 2.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


def _json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class Stats:
    """Per-endpoint counters; cheap to update, rendered on scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (slug, "2xx") -> n
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.window: dict[str, list[float]] = defaultdict(list)  # recent latencies, for the pusher

    def observe(self, slug: str, status: int, seconds: float) -> None:
        self.requests[(slug, f"{status // 100}xx")] += 1
        buckets = self.latency[slug]
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        self.latency_sum[slug] += seconds
        self.window[slug].append(seconds)

    def render(self, table: Table) -> str:
        lines = [
            "# HELP modelserve_proxy_requests_total Requests by endpoint and status class.",
            "# TYPE modelserve_proxy_requests_total counter",
        ]
        for (slug, klass), count in sorted(self.requests.items()):
            lines.append(f'modelserve_proxy_requests_total{{endpoint="{slug}",status="{klass}"}} {count}')
        lines += [
            "# HELP modelserve_proxy_in_flight Requests being forwarded right now.",
            "# TYPE modelserve_proxy_in_flight gauge",
        ]
        for slug, endpoint in sorted(table.endpoints.items()):
            lines.append(f'modelserve_proxy_in_flight{{endpoint="{slug}"}} {endpoint.in_flight}')
            for route in endpoint.routes:
                lines.append(
                    f'modelserve_proxy_route_in_flight{{endpoint="{slug}",route="{route.id}"}} {route.in_flight}'
                )
        lines += [
            "# HELP modelserve_proxy_latency_seconds Time to the end of the response.",
            "# TYPE modelserve_proxy_latency_seconds histogram",
        ]
        for slug, buckets in sorted(self.latency.items()):
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, buckets, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'modelserve_proxy_latency_seconds_bucket{{endpoint="{slug}",le="{le}"}} {cumulative}')
            lines.append(f'modelserve_proxy_latency_seconds_sum{{endpoint="{slug}"}} {self.latency_sum[slug]}')
            lines.append(f'modelserve_proxy_latency_seconds_count{{endpoint="{slug}"}} {cumulative}')
        return "\n".join(lines) + "\n"


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.table = Table(config.redis_url, config.prefix, config.resync_interval)
        self.stats = Stats()
        self.session: aiohttp.ClientSession | None = None
        self.last_used: dict[str, float] = {}
        self.failures: list[dict[str, str]] = []
        self._background: list[asyncio.Task[None]] = []
        self._key = config.token_key.encode()

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=None, use_dns_cache=False)
        timeout = aiohttp.ClientTimeout(
            total=self.config.total_timeout, sock_connect=5.0, sock_read=self.config.idle_timeout
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        self.table.start()
        try:
            await asyncio.wait_for(self.table.loaded.wait(), timeout=5)
        except TimeoutError:
            log.warning("routing table not loaded yet; serving what arrives")
        self._background.append(asyncio.create_task(self._push_loop()))

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await self.table.stop()
        if self.session is not None:
            await self.session.close()

    async def _push_loop(self) -> None:
        """Every 2 s: token last-used times, route failures and short stats, to Redis (batched)."""
        prefix = self.config.prefix
        while True:
            await asyncio.sleep(2.0)
            client = self.table.redis
            if client is None:
                continue
            try:
                pipe = client.pipeline(transaction=False)
                if self.last_used:
                    pipe.hset(f"{prefix}:tokens:last_used", mapping={k: str(v) for k, v in self.last_used.items()})
                    self.last_used = {}
                now = time.time()
                for slug, endpoint in self.table.endpoints.items():
                    window = self.stats.window.pop(slug, [])
                    window.sort()
                    p95 = window[int(0.95 * (len(window) - 1))] if window else 0.0
                    sample = {"t": now, "rps": len(window) / 2.0, "in_flight": endpoint.in_flight, "p95": p95}
                    key = f"{prefix}:metrics:proxy:{endpoint.id}"
                    pipe.zadd(key, {json.dumps(sample): now})
                    pipe.zremrangebyscore(key, 0, now - 600)
                    pipe.expire(key, 900)
                await pipe.execute()
            except Exception as exc:  # Redis away: keep serving; figures of this period are dropped
                log.debug("stats push failed: %s", exc)

    def _report_failure(self, endpoint: Endpoint, route: Route, error: str) -> None:
        client = self.table.redis
        if client is None:
            return
        message = json.dumps({"route": route.id, "endpoint": endpoint.id, "slug": endpoint.slug, "error": error})

        async def send() -> None:
            try:
                await client.publish(f"{self.config.prefix}:proxy:route-failures", message)
            except Exception as exc:
                log.debug("route failure report lost: %s", exc)

        task = asyncio.create_task(send())
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    # --- request handling ------------------------------------------------------------------------

    def _resolve(self, request: web.BaseRequest) -> tuple[str, str] | None:
        path = request.raw_path
        if self.config.domain:
            host = (request.host or "").split(":", 1)[0]
            suffix = "." + self.config.domain
            if host.endswith(suffix):
                return host[: -len(suffix)], path
        if path.startswith("/e/"):
            slug, _, rest = path[3:].partition("/")
            if "?" in slug:
                slug, _, query = slug.partition("?")
                rest = "?" + query
            return slug, "/" + rest
        return None

    def _authorize(self, request: web.BaseRequest, endpoint: Endpoint) -> web.Response | None:
        if endpoint.public:
            return None
        challenge = {"WWW-Authenticate": 'Bearer realm="modelserve", charset="UTF-8"'}
        header = request.headers.get("Authorization")
        if not header:
            return _json_error(
                401, "missing_token", "This service needs a token: send 'Authorization: BackendAI <token>'.", challenge
            )
        credential = tokens.from_authorization(header, schemes=("backendai", "bearer"))
        parsed = tokens.parse(credential or "")
        if parsed is None or parsed.kind != tokens.ENDPOINT_TOKEN_KIND:
            return _json_error(401, "malformed_token", "The token is malformed.", challenge)
        known = endpoint.tokens.get(parsed.lookup)
        if known is None or not tokens.verify(parsed.token, known[0], self._key):
            return _json_error(
                401, "invalid_token", "The token is unknown, revoked, or for another service.", challenge
            )
        now = time.time()
        if known[1] <= now:
            return _json_error(401, "expired_token", "The token has expired; generate a new one.", challenge)
        self.last_used[parsed.lookup] = now
        return None

    def _no_route(self, endpoint: Endpoint) -> web.Response:
        reasons = {
            "PROVISIONING": "The service is starting; no replica is ready yet.",
            "READY": "The service's replicas are starting; none has passed its health check yet.",
            "UNHEALTHY": "Every replica of this service is unhealthy.",
            "TERMINATING": "The service is being terminated.",
        }
        message = reasons.get(endpoint.status, "No healthy replica is available right now.")
        return _json_error(503, "no_healthy_replica", message, {"Retry-After": "5"})

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        resolved = self._resolve(request)
        if resolved is None:
            return _json_error(404, "not_found", "Call a service at /e/<slug>/...; see its URL on the service page.")
        slug, path = resolved
        endpoint = self.table.endpoints.get(slug)
        if endpoint is None:
            return _json_error(404, "unknown_service", f"No service {slug!r} here (terminated, or a typo).")
        denied = self._authorize(request, endpoint)
        if denied is not None:
            return denied
        if endpoint.in_flight >= self.config.queue_limit:
            self.stats.observe(slug, 429, 0.0)
            return _json_error(429, "overloaded", "Too many requests in flight for this service.", {"Retry-After": "1"})
        started = time.monotonic()
        endpoint.in_flight += 1
        try:
            response = await self._forward(request, endpoint, path)
        finally:
            endpoint.in_flight -= 1
        self.stats.observe(slug, response.status, time.monotonic() - started)
        return response

    def _upstream_headers(self, request: web.BaseRequest) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if not self.config.keep_token:
            headers.pop("Authorization", None)
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host or ""
        headers.setdefault("X-Request-ID", request.headers.get("X-Request-ID") or uuid.uuid4().hex)
        return headers

    async def _wait_for_route(self, endpoint: Endpoint) -> None:
        if self.config.hold_seconds <= 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        endpoint.waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout=self.config.hold_seconds)

    async def _forward(self, request: web.BaseRequest, endpoint: Endpoint, path: str) -> web.StreamResponse:
        assert self.session is not None
        headers = self._upstream_headers(request)
        # A body we can replay lets us retry on another replica even after reading it (small JSON
        # requests, the common case); big or streamed bodies are forwarded as a stream, once.
        length = request.content_length
        replayable = request.method in ("GET", "HEAD", "OPTIONS", "DELETE") or (
            length is not None and length <= 1 << 20
        )
        body: Any = await request.read() if replayable and request.can_read_body else None
        if body is None and request.can_read_body:
            body = request.content
        tried: set[str] = set()
        while True:
            now = time.monotonic()
            route = endpoint.pick(now, tried)
            if route is None and not tried:
                await self._wait_for_route(endpoint)
                endpoint = self.table.endpoints.get(endpoint.slug, endpoint)
                route = endpoint.pick(time.monotonic(), tried)
            if route is None:
                return self._no_route(endpoint)
            tried.add(route.id)
            route.in_flight += 1
            try:
                upstream = await self.session.request(
                    request.method,
                    route.base + path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                )
            except aiohttp.ClientConnectionError as exc:
                route.in_flight -= 1
                # The connection failed before any answer came back: connect refused, a pooled
                # connection closed under us, or the replica died mid-request. Inference calls have
                # no side effects, so a request whose body can be sent again goes to another replica:
                # killing a replica loses no request.
                route.down_until = time.monotonic() + ROUTE_DOWN_SECONDS
                self._report_failure(endpoint, route, f"{exc.__class__.__name__}: {exc}")
                if replayable:
                    continue
                return _json_error(502, "replica_unreachable", "The replica could not be reached.")
            except TimeoutError:
                route.in_flight -= 1
                return _json_error(504, "replica_timeout", "The replica did not answer in time.")
            except aiohttp.ClientError as exc:
                route.in_flight -= 1
                return _json_error(502, "replica_error", f"The replica's answer was broken: {exc.__class__.__name__}.")
            try:
                return await self._relay(request, upstream)
            finally:
                upstream.release()
                route.in_flight -= 1

    async def _relay(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in RESPONSE_SKIP}
        length = upstream.content_length
        if (
            length is not None
            and length <= 65536
            and "text/event-stream" not in upstream.headers.get("Content-Type", "")
        ):
            data = await upstream.read()
            return web.Response(status=upstream.status, body=data, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # each chunk as it arrives: no buffering of SSE
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionResetError) as exc:
            log.debug("stream cut: %s", exc)
        await response.write_eof()
        return response


async def admin_handler(proxy: Proxy, request: web.BaseRequest) -> web.Response:
    if request.path == "/metrics":
        return web.Response(text=proxy.stats.render(proxy.table), content_type="text/plain")
    if request.path == "/healthz":
        return web.json_response({"status": "ok", "endpoints": len(proxy.table.endpoints)})
    return _json_error(404, "not_found", "The admin port serves /metrics and /healthz.")


async def serve(config: Config) -> None:
    proxy = Proxy(config)
    await proxy.start()
    server = web.Server(proxy.handle, access_log=None)
    admin = web.Server(lambda request: admin_handler(proxy, request), access_log=None)
    loop = asyncio.get_running_loop()
    main_server = await loop.create_server(server, config.host, config.port, reuse_address=True, backlog=2048)
    admin_server = await loop.create_server(admin, config.host, config.admin_port, reuse_address=True)
    log.warning("proxy listening on http://%s:%d (admin :%d)", config.host, config.port, config.admin_port)
    try:
        await asyncio.Event().wait()
    finally:
        main_server.close()
        admin_server.close()
        await proxy.close()
