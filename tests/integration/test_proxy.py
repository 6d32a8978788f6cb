"""The real data plane (``python -m proxy`` as a process) against real replicas and the real Redis.

No Django here: the routing table is written into Redis directly, in the format serving/bus/routing.py
writes (docs/architecture.md; S5, S7, S8). Every proxy gets its own key prefix; backends are
examples/llm-echo (OpenAI-compatible, SSE) and a small aiohttp app for headers, bodies and
websockets. Conditions are awaited with deadlines, never with bare sleeps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from serving.core import tokens
from tests import live

# The data plane's timings are sub-second: poll fast.
wait_for = functools.partial(live.wait_for, interval=0.02)

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "examples" / "llm-echo" / "server.py"
KEY = "proxy-test-key"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DOMAIN = "models.test"

# A replica that reports what it received: headers, bodies, and a websocket echo.
AUX_BACKEND = r"""
import asyncio, hashlib, json, sys
from aiohttp import web, WSMsgType

async def headers(request):
    return web.json_response({"path": request.path_qs, "headers": dict(request.headers),
                              "version": f"{request.version.major}.{request.version.minor}"})

async def body(request):
    data = await request.read()
    return web.json_response({"length": len(data), "md5": hashlib.md5(data).hexdigest(),
                              "chunked": request.headers.get("Transfer-Encoding", "")})

async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str("echo: " + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data[::-1])
    return sock

async def stream(request):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(int(request.query.get("n", "5"))):
        await response.write(b"data: %d\n\n" % i)
        await asyncio.sleep(float(request.query.get("delay", "0.2")))
    return response

async def fail(request):
    # An error answer: ?status=, ?echo=1 sends its own X-Request-ID, ?close=1 a Connection header.
    extra = {"X-Request-ID": "the-replica-s-own"} if request.query.get("echo") else {}
    if request.query.get("close"):
        extra["Connection"] = "close"
    return web.Response(status=int(request.query.get("status", "500")), text="failed", headers=extra)

app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_get("/fail", fail)
app.router.add_get("/headers", headers)
app.router.add_route("*", "/body", body)
app.router.add_get("/ws", ws)
app.router.add_get("/stream", stream)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


# --- helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def spawn(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    err = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=err
        )
    finally:
        if log is not None:
            err.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


class Backend:
    """One replica process on a free port: llm-echo by default, the aux app with aux=True."""

    def __init__(self, aux: bool = False, **env: str) -> None:
        self.port = free_port()
        if aux:
            self.proc = spawn([sys.executable, "-c", AUX_BACKEND, str(self.port)])
            probe = f"http://127.0.0.1:{self.port}/headers"
        else:
            self.proc = spawn(
                [sys.executable, str(ECHO), "--host", "127.0.0.1", "--port", str(self.port)],
                {"ECHO_TOKEN_DELAY": "0", **env},
            )
            probe = f"http://127.0.0.1:{self.port}/health"
        wait_for(lambda: answers(probe), what=f"a backend on :{self.port}")

    def route(self, weight: float = 1.0) -> dict[str, Any]:
        return {"id": f"route-{self.port}", "host": "127.0.0.1", "port": self.port, "weight": weight}

    def served(self) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("llm_echo_requests_total")))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Proxy:
    """A proxy process reading a private routing table (its own key prefix) in a Redis."""

    def __init__(self, redis_url: str = REDIS_URL, **env: str) -> None:
        self.prefix = f"proxytest-{uuid.uuid4().hex[:8]}"
        self.redis = redis.Redis.from_url(redis_url)
        self.port, self.admin = free_port(), free_port()
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{self.prefix}.log"
        self.proc = spawn(
            [sys.executable, "-m", "proxy"],
            {
                "PROXY_PORT": str(self.port),
                "PROXY_ADMIN_PORT": str(self.admin),
                "REDIS_URL": redis_url,
                "REDIS_PREFIX": self.prefix,
                "TOKEN_HMAC_KEY": KEY,
                "PROXY_RESYNC_INTERVAL": "1",
                "PROXY_STATS_INTERVAL": "0.5",
                "PROXY_QUEUE_LIMIT": "4",
                "SERVING_DOMAIN": DOMAIN,
                **env,
            },
            log=self.log,
        )
        wait_for(lambda: self.health().get("routing_table_loaded"), what="the proxy to load its table")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/healthz", timeout=1) as r:
                return dict(json.load(r))
        except OSError:
            return {}

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read().decode()

    def publish(
        self,
        slug: str,
        routes: list[dict[str, Any]],
        *,
        public: bool = False,
        grant: tuple[tokens.MintedToken, ...] = (),
        expires: float | None = None,
        status: str = "HEALTHY",
        **extra: Any,
    ) -> None:
        """What serving/bus/routing.py does: write the entry, then announce it."""
        entry = {
            "id": f"id-{slug}",
            "slug": slug,
            "name": slug,
            "public": public,
            "status": status,
            "routes": routes,
            "tokens": {t.lookup: {"digest": t.digest, "expires": expires or time.time() + 3600} for t in grant},
            **extra,
        }
        self.redis.hset(f"{self.prefix}:routing", slug, json.dumps(entry))
        self.redis.publish(f"{self.prefix}:routing:updates", json.dumps({"slug": slug, "entry": entry}))

    def url(self, slug: str, path: str = "v1/models") -> str:
        return f"http://127.0.0.1:{self.port}/e/{slug}/{path}"

    def call(
        self,
        slug: str,
        path: str = "v1/models",
        token: str | None = None,
        scheme: str = "BackendAI",
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"{scheme} {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(slug, path), data=data, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def raw(self, data: bytes, until: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
        """Send raw bytes on a fresh connection; read until ``until(received)`` or the close."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            received = b""
            while not until(received):
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
            return received

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        finally:
            stop(self.proc)
            self.log.unlink(missing_ok=True)
            for key in self.redis.scan_iter(f"{self.prefix}:*"):
                self.redis.delete(key)


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    started: list[Backend] = []

    def make(aux: bool = False, **env: str) -> Backend:
        backend = Backend(aux, **env)
        started.append(backend)
        return backend

    yield make
    for backend in started:
        stop(backend.proc)


def new_slug() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


# --- S7: tokens ------------------------------------------------------------------------------------


def test_every_auth_case(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    backend = backends()
    good, other, expired = (tokens.mint("mst", KEY) for _ in range(3))
    private, neighbour, old, public = new_slug(), new_slug(), new_slug(), new_slug()
    proxy.publish(private, [backend.route()], grant=(good,))
    proxy.publish(neighbour, [backend.route()], grant=(other,))
    proxy.publish(old, [backend.route()], grant=(expired,), expires=time.time() - 1)
    proxy.publish(public, [backend.route()], public=True)
    wait_for(lambda: proxy.call(public)[0] == 200, what="the entries to arrive")

    for scheme in ("BackendAI", "Bearer", "bearer", "backendai"):
        status, _, body = proxy.call(private, token=good.token, scheme=scheme)
        assert status == 200, (scheme, body)
        assert json.loads(body)["data"][0]["id"] == "llm-echo"
    assert proxy.call(public)[0] == 200  # a public service needs no token

    cases = {
        "missing": proxy.call(private),
        "malformed": proxy.call(private, token="nope"),
        "unknown": proxy.call(private, token=tokens.mint("mst", KEY).token),
        "another service's token": proxy.call(private, token=other.token),
        "signed with another key": proxy.call(private, token=tokens.mint("mst", "other-key").token),
        "expired": proxy.call(old, token=expired.token),
        "wrong scheme": proxy.call(private, token=good.token, scheme="Basic"),
        "an API key, not a service token": proxy.call(private, token=tokens.mint("msk", KEY).token),
        "two credentials": proxy.call(private, token=f"{good.token} {good.token}"),
    }
    for name, (status, headers, body) in cases.items():
        assert status == 401, name
        challenge = headers.get("WWW-Authenticate", "")
        assert "Bearer" in challenge and "BackendAI" in challenge, name
        error = json.loads(body)["error"]
        assert error["message"] and error["code"], name
    assert json.loads(cases["missing"][2])["error"]["code"] == "missing_token"
    assert json.loads(cases["expired"][2])["error"]["code"] == "expired_token"
    assert json.loads(cases["another service's token"][2])["error"]["code"] == "invalid_token"
    # The sentence names the way out, not only the problem.
    said = json.loads(cases["unknown"][2])["error"]["message"]
    assert said.startswith("The token is unknown, revoked, or for another service: generate one") and "Tokens" in said

    # Revocation = the entry republished without the token: refused within 1 s.
    proxy.publish(private, [backend.route()], grant=())
    started = time.monotonic()
    wait_for(lambda: proxy.call(private, token=good.token)[0] == 401, timeout=1.0, what="revocation", promise=True)
    assert time.monotonic() - started < 1.0

    # Last use of each token reaches Redis in a batch (lookup -> epoch), never a write per request.
    last_used = wait_for(
        lambda: proxy.redis.hget(f"{proxy.prefix}:tokens:last_used", good.lookup), what="last-used flush"
    )
    assert time.time() - 30 < float(last_used) <= time.time()


def test_token_is_removed_and_forwarding_headers_added(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    aux = backends(aux=True)
    good = tokens.mint("mst", KEY)
    slug = new_slug()
    proxy.publish(slug, [aux.route()], grant=(good,))
    wait_for(lambda: proxy.call(slug, "headers", token=good.token)[0] == 200, what="the entry")

    status, response_headers, body = proxy.call(
        slug,
        "headers?b=2&a=%2F1",
        token=good.token,
        headers={"X-Request-ID": "client-chosen-id", "X-Custom": "kept", "Keep-Alive": "timeout=5"},
    )
    assert status == 200
    seen = json.loads(body)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/headers?b=2&a=%2F1"  # prefix stripped, query string intact
    assert "authorization" not in headers  # the platform token stays at the proxy
    assert headers["x-custom"] == "kept"
    assert "keep-alive" not in headers  # hop-by-hop
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
    assert headers["x-forwarded-prefix"] == f"/e/{slug}"
    assert headers["x-request-id"] == "client-chosen-id"
    assert headers["host"] == f"127.0.0.1:{aux.port}"
    assert "Server" in response_headers

    # Without a request id from the client the proxy makes one; a foreign Authorization header
    # (not a platform token) on a public service goes through untouched.
    public = new_slug()
    proxy.publish(public, [aux.route()], public=True)
    wait_for(lambda: proxy.call(public, "headers")[0] == 200, what="the public entry")
    headers = {
        k.lower(): v
        for k, v in json.loads(proxy.call(public, "headers", token="sk-backend-own-key", scheme="Bearer")[2])[
            "headers"
        ].items()
    }
    assert headers["x-request-id"]
    assert headers["authorization"] == "Bearer sk-backend-own-key"
    headers = {
        k.lower(): v for k, v in json.loads(proxy.call(public, "headers", token=good.token)[2])["headers"].items()
    }
    assert "authorization" not in headers  # ours is never leaked to a replica

    # Host routing: <slug>.<SERVING_DOMAIN> reaches the same service with the path unchanged.
    answer = proxy.raw(
        f"GET /headers?x=1 HTTP/1.1\r\nHost: {public}.{DOMAIN}\r\nConnection: close\r\n\r\n".encode(),
        until=lambda r: False,
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"/headers?x=1"' in answer


def test_request_bodies_stream_through_in_every_framing(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    aux = backends(aux=True)
    slug = new_slug()
    proxy.publish(slug, [aux.route()], public=True)
    wait_for(lambda: proxy.call(slug, "headers")[0] == 200, what="the entry")
    payload = os.urandom(3 * 1024 * 1024)  # bigger than the replay limit: streamed once

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 256 * 1024):
            yield payload[i : i + 256 * 1024]

    request = urllib.request.Request(proxy.url(slug, "body"), data=chunks(), method="POST")  # chunked
    seen = json.loads(urllib.request.urlopen(request, timeout=20).read())
    assert seen == {"length": len(payload), "md5": hashlib.md5(payload).hexdigest(), "chunked": "chunked"}
    request = urllib.request.Request(proxy.url(slug, "body"), data=payload, method="PUT")  # Content-Length
    seen = json.loads(urllib.request.urlopen(request, timeout=20).read())
    assert seen["length"] == len(payload) and seen["md5"] == hashlib.md5(payload).hexdigest()

    # Two pipelined requests in one packet: two answers, in order, on one connection.
    two = (
        f"GET /e/{slug}/headers?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        f"POST /e/{slug}/body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    ).encode()
    answer = proxy.raw(two, until=lambda r: False)
    assert answer.count(b"HTTP/1.1 200") == 2
    assert answer.index(b'"/headers?n=1"') < answer.index(b'"length": 3')

    # An HTTP/1.0 client: no chunked framing; the end of the body is the end of the connection.
    answer = proxy.raw(
        f"GET /e/{slug}/stream?n=2&delay=0.01 HTTP/1.0\r\nHost: x\r\n\r\n".encode(), until=lambda r: False
    )
    assert answer.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding" not in answer
    assert answer.endswith(b"data: 0\n\ndata: 1\n\n")

    # Garbage gets a 400 and the connection closes.
    assert proxy.raw(b"NOT HTTP AT ALL\r\n\r\n", until=lambda r: False).startswith(b"HTTP/1.1 400")


# --- load balancing, failures, limits ----------------------------------------------------------


def test_weighted_balancing(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    light, heavy = backends(), backends()
    slug = new_slug()
    proxy.publish(slug, [light.route(1), heavy.route(3)], public=True)
    wait_for(lambda: proxy.call(slug)[0] == 200, what="the entry")
    before = light.served(), heavy.served()
    for _ in range(200):
        assert proxy.call(slug, "v1/completions", body={"prompt": "x"})[0] == 200
    light_n, heavy_n = light.served() - before[0], heavy.served() - before[1]
    assert light_n + heavy_n == 200
    assert 0.65 < heavy_n / 200 < 0.85, (light_n, heavy_n)


def test_no_route_503_unknown_404_and_overload_429(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    starting, gone = new_slug(), new_slug()
    proxy.publish(starting, [], public=True, status="PROVISIONING")
    proxy.publish(gone, [], public=True, status="UNHEALTHY")
    wait_for(lambda: proxy.call(starting)[0] == 503, what="503 while starting")
    status, headers, body = proxy.call(starting)
    assert int(headers["Retry-After"]) > 0
    error = json.loads(body)["error"]
    assert error["code"] == "no_healthy_replica" and "starting" in error["message"]
    assert "unhealthy" in json.loads(proxy.call(gone)[2])["error"]["message"]
    status, _, body = proxy.call("no-such-service")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_service"
    assert proxy.raw(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", lambda r: False).startswith(
        b"HTTP/1.1 404"
    )

    # PROXY_QUEUE_LIMIT=4 per route: the 5th concurrent request onward gets 429 + Retry-After.
    slow = backends(ECHO_TOKEN_DELAY="0.3")
    busy = new_slug()
    proxy.publish(busy, [slow.route()], public=True)
    wait_for(lambda: proxy.call(busy)[0] == 200, what="the entry")
    results: list[tuple[int, dict[str, str]]] = []

    def one() -> None:
        status, headers, _ = proxy.call(busy, "v1/completions", body={"prompt": "a b c"})
        results.append((status, headers))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    assert all(h.get("Retry-After") for s, h in results if s == 429)


def test_killed_replica_loses_no_request_and_is_reported(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    a, b = backends(), backends()
    slug = new_slug()
    proxy.publish(slug, [a.route(), b.route()], public=True)
    wait_for(lambda: proxy.call(slug)[0] == 200, what="the entry")
    failures = proxy.redis.pubsub(ignore_subscribe_messages=True)
    failures.subscribe(f"{proxy.prefix}:proxy:route-failures")
    statuses: list[int] = []
    stop_load = threading.Event()

    def load(post: bool) -> None:
        # GETs, and POSTs that carry an Idempotency-Key: requests the proxy may send again even
        # after they reached the replica that died (a plain POST is never sent twice: see
        # test_a_post_that_reached_a_dying_replica_is_never_sent_twice).
        n = 0
        while not stop_load.is_set():
            n += 1
            if post:
                body = {"messages": [{"role": "user", "content": "hi there"}]}
                key = {"Idempotency-Key": f"{threading.get_ident()}-{n}"}
                statuses.append(proxy.call(slug, "v1/chat/completions", body=body, headers=key)[0])
            else:
                statuses.append(proxy.call(slug, "v1/models")[0])

    workers = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(statuses) > 40, what="load through both replicas")
        a.kill()
        mark = len(statuses)
        wait_for(lambda: len(statuses) > mark + 100, what="load after the kill")
    finally:
        stop_load.set()
        for w in workers:
            w.join()
    assert len(statuses) > 140
    assert [s for s in statuses if s != 200] == [], "a request was lost when a replica died"

    def reported() -> dict[str, Any] | None:
        message = failures.get_message(timeout=0.1)
        return json.loads(message["data"]) if message else None

    report = wait_for(reported, timeout=5, what="a route-failure report")
    assert report["route"] == a.route()["id"] and report["endpoint"] == slug and report["error"]
    failures.close()


class BlackHole:
    """A replica that reads each request whole, counts it, and closes without answering (it died)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                if head:
                    self.received.append(head.split(b"\r\n")[0])

    def route(self) -> dict[str, Any]:
        return {"id": f"hole-{self.port}", "host": "127.0.0.1", "port": self.port, "weight": 1}

    def close(self) -> None:
        self.sock.close()


def test_a_post_that_reached_a_dying_replica_is_never_sent_twice(proxy: Proxy) -> None:
    """Retry policy ``safe``: only what is safe to repeat goes to another replica."""
    holes = [BlackHole(), BlackHole()]
    try:
        slug = new_slug()
        proxy.publish(slug, [h.route() for h in holes], public=True, retry_policy="safe")
        wait_for(lambda: proxy.call(slug, "v1/models")[0] == 502, what="the entry")

        def sent() -> int:
            return sum(len(h.received) for h in holes)

        before = sent()
        status, _, body = proxy.call(slug, "v1/chat/completions", body={"messages": []})
        assert status == 502 and b"Idempotency-Key" in body
        wait_for(lambda: sent() >= before + 1, what="the POST at a replica")
        assert sent() == before + 1  # one replica got it; the other never did

        before = sent()  # a GET is sent again elsewhere (it is safe to repeat)
        assert proxy.call(slug, "v1/models")[0] == 502
        wait_for(lambda: sent() == before + 2, what="the GET at both replicas")

        before = sent()  # so is a POST whose client says repeating it is harmless
        status, _, _ = proxy.call(slug, "v1/chat/completions", body={}, headers={"Idempotency-Key": "k-1"})
        assert status == 502
        wait_for(lambda: sent() == before + 2, what="the keyed POST at both replicas")
    finally:
        for hole in holes:
            hole.close()


def test_a_replica_that_closes_a_new_connection_unanswered_is_reported_with_the_request_s_id(
    proxy: Proxy,
) -> None:
    """A replica being killed still completes handshakes from its listen backlog, then resets them:
    the connection opened, the request was written, nothing came back. The proxy could not reach
    it as surely as if it had refused the connection, and reports it to its node the same way, with
    the id of the request that found it (the node's check records the exit with that id)."""
    hole = BlackHole()
    failures = proxy.redis.pubsub(ignore_subscribe_messages=True)
    failures.subscribe(f"{proxy.prefix}:proxy:route-failures")
    try:
        slug = new_slug()
        proxy.publish(slug, [hole.route()], public=True)
        wait_for(lambda: proxy.call(slug, headers={"X-Request-ID": "hole-1"})[0] == 502, what="the entry")
        assert hole.received  # the request reached it: a connection that opened, not a refused one

        def reported() -> dict[str, Any] | None:
            message = failures.get_message(timeout=0.1)
            return json.loads(message["data"]) if message else None

        report = wait_for(reported, timeout=5, what="a route-failure report")
        assert report["route"] == hole.route()["id"] and report["endpoint"] == slug
        assert report["request_id"] == "hole-1" and report["error"]
    finally:
        failures.close()
        hole.close()


@pytest.mark.parametrize(
    ("policy", "path", "resent"),
    [
        ("inference", "v1/chat/completions", True),  # the default: an inference POST goes elsewhere
        ("inference", "v1/embeddings?x=1", True),
        (None, "v1/completions/", True),  # no policy in the entry (an older control plane): inference
        ("inference", "v1/files", False),  # not an inference path: may have side effects
        ("all", "v1/files", True),
        ("safe", "v1/chat/completions", False),
    ],
)
def test_the_retry_policy_says_which_posts_go_to_another_replica(
    proxy: Proxy, policy: str | None, path: str, resent: bool
) -> None:
    holes = [BlackHole(), BlackHole()]
    try:
        slug = new_slug()
        extra = {"retry_policy": policy} if policy else {}
        proxy.publish(slug, [h.route() for h in holes], public=True, **extra)
        wait_for(lambda: proxy.call(slug, "v1/models")[0] == 502, what="the entry")
        wait_for(lambda: proxy.redis.hget(f"{proxy.prefix}:proxy:resent", slug) is not None, what="the GET's count")
        proxy.redis.hdel(f"{proxy.prefix}:proxy:resent", slug)

        def sent() -> int:
            return sum(len(h.received) for h in holes)

        before = sent()
        status, _, body = proxy.call(slug, path, body={"messages": []})
        assert status == 502
        if resent:
            wait_for(lambda: sent() == before + 2, what="the POST at both replicas")
            # The control plane learns how many were re-sent (an event per service, not per request).
            wait_for(lambda: proxy.redis.hget(f"{proxy.prefix}:proxy:resent", slug) == b"1", what="the re-sent count")
        else:
            assert b"Idempotency-Key" in body and b"retry policy" in body
            wait_for(lambda: sent() >= before + 1, what="the POST at a replica")
            assert sent() == before + 1
            assert proxy.redis.hget(f"{proxy.prefix}:proxy:resent", slug) is None
    finally:
        for hole in holes:
            hole.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_clients_leaving_mid_request_or_mid_stream_leak_nothing(backends: Callable[..., Backend]) -> None:
    p = Proxy(PROXY_UPSTREAM_IDLE="0.3")
    try:
        aux = backends(aux=True)
        slug = new_slug()
        p.publish(slug, [aux.route()], public=True)
        wait_for(lambda: p.call(slug, "headers")[0] == 200, what="the entry")
        wait_for(lambda: "modelserve_proxy_client_connections 0" in p.metrics(), what="idle")
        baseline = _fds(p.proc.pid)
        in_flight = f'modelserve_proxy_in_flight{{endpoint="{slug}"}} 0'
        for _ in range(10):
            # Leaves in the middle of a stream ...
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                s.sendall(f"GET /e/{slug}/stream?n=1000&delay=0.05 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                got = b""
                while b"data: 0" not in got:
                    got += s.recv(65536)
            # ... in the middle of its request body (a big one: not kept for a retry) ...
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                s.sendall(f"POST /e/{slug}/body HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n".encode())
                s.sendall(b"x" * 2_000_000)
            # ... and in the middle of its head.
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                s.sendall(f"GET /e/{slug}/headers HTTP/1.1\r\nHost: x\r\nX-Half: ".encode())
        wait_for(lambda: in_flight in p.metrics(), what="every request to be released")
        wait_for(lambda: "modelserve_proxy_client_connections 0" in p.metrics(), what="every client gone")
        # Every socket to the replica closes too (cut off, or pooled and expired): back to the start.
        wait_for(lambda: _fds(p.proc.pid) <= baseline, timeout=5, what=f"the proxy's fds back to {baseline}")
        assert p.call(slug, "headers")[0] == 200
    finally:
        p.close()


def test_oversized_and_smuggling_requests_get_a_clear_4xx(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    aux = backends(aux=True)
    slug = new_slug()
    proxy.publish(slug, [aux.route()], public=True)
    wait_for(lambda: proxy.call(slug, "headers")[0] == 200, what="the entry")
    cases = {
        b"GET /e/%b/%b HTTP/1.1\r\nHost: x\r\n\r\n" % (slug.encode(), b"a" * 20_000): 414,
        b"GET /e/%b/headers HTTP/1.1\r\nHost: x\r\nX-Big: %b\r\n\r\n" % (slug.encode(), b"b" * 70_000): 431,
        b"POST /e/%b/body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /e/%b/headers HTTP/1.1\r\nHost: x\r\n\r\n" % (slug.encode(), slug.encode()): 400,
        b"POST /e/%b/body HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        % slug.encode(): 400,
    }
    for request, status in cases.items():
        answer = proxy.raw(request, until=lambda r: False)
        assert answer.startswith(b"HTTP/1.1 %d " % status), (request[:60], answer[:200])
        assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer


def test_route_changes_apply_within_a_second(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    aux_a, aux_b = backends(aux=True), backends(aux=True)
    slug = new_slug()

    def host_seen() -> str:
        return str(json.loads(proxy.call(slug, "headers")[2])["headers"]["Host"])

    proxy.publish(slug, [aux_a.route()], public=True)
    wait_for(lambda: proxy.call(slug, "headers")[0] == 200, what="the entry")
    assert host_seen() == f"127.0.0.1:{aux_a.port}"
    proxy.publish(slug, [aux_b.route()], public=True)  # a -> b, as when a replica is replaced
    started = time.monotonic()
    wait_for(lambda: host_seen() == f"127.0.0.1:{aux_b.port}", timeout=1.0, what="the new route", promise=True)
    assert time.monotonic() - started < 1.0

    # A change written to the hash without an announcement (a lost message) heals at the resync.
    entry = json.loads(proxy.redis.hget(f"{proxy.prefix}:routing", slug))
    entry["routes"] = [aux_a.route()]
    proxy.redis.hset(f"{proxy.prefix}:routing", slug, json.dumps(entry))
    wait_for(lambda: host_seen() == f"127.0.0.1:{aux_a.port}", timeout=3.0, what="the periodic resync")

    # Removal: the endpoint disappears (entry null), then it is unknown.
    proxy.redis.hdel(f"{proxy.prefix}:routing", slug)
    proxy.redis.publish(f"{proxy.prefix}:routing:updates", json.dumps({"slug": slug, "entry": None}))
    wait_for(lambda: proxy.call(slug, "headers")[0] == 404, timeout=1.0, what="removal", promise=True)


# --- streaming, OpenAI client, websockets --------------------------------------------------------


def test_sse_streams_chunk_by_chunk_and_openai_client_works(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    backend = backends(ECHO_TOKEN_DELAY="0.1")
    good = tokens.mint("mst", KEY)
    slug = new_slug()
    proxy.publish(slug, [backend.route()], grant=(good,))
    wait_for(lambda: proxy.call(slug, token=good.token)[0] == 200, what="the entry")
    from openai import OpenAI

    client = OpenAI(base_url=proxy.url(slug, "v1"), api_key=good.token, max_retries=0)
    assert [m.id for m in client.models.list()] == ["llm-echo"]
    arrivals: list[float] = []
    text = ""
    started = time.monotonic()
    stream = client.chat.completions.create(
        model="llm-echo", messages=[{"role": "user", "content": "one two three four five"}], stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            text += chunk.choices[0].delta.content
    assert text == "one two three four five"
    assert len(arrivals) == 5
    assert arrivals[0] < arrivals[-1] - 0.3, arrivals  # the first word came well before the last
    reply = client.chat.completions.create(model="llm-echo", messages=[{"role": "user", "content": "plain"}])
    assert reply.choices[0].message.content == "plain"

    # Raw: each event is its own chunk on the wire, as the replica flushed it.
    aux = backends(aux=True)
    raw_slug = new_slug()
    proxy.publish(raw_slug, [aux.route()], public=True)
    wait_for(lambda: proxy.call(raw_slug, "headers")[0] == 200, what="the aux entry")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(f"GET /e/{raw_slug}/stream?n=3&delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = b""
        while b"data: 0" not in first:
            first += s.recv(65536)
        got_first = time.monotonic()
        assert b"200 OK" in first and b"data: 1" not in first
        received = first
        while b"\r\n0\r\n\r\n" not in received:
            received += s.recv(65536)
        assert time.monotonic() - got_first > 0.3  # the rest came later: nothing was buffered
    assert b"data: 2" in received


def test_websocket_is_proxied(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    import asyncio

    import aiohttp

    aux = backends(aux=True)
    good = tokens.mint("mst", KEY)
    slug = new_slug()
    proxy.publish(slug, [aux.route()], grant=(good,))
    wait_for(lambda: proxy.call(slug, "headers", token=good.token)[0] == 200, what="the entry")

    async def talk() -> tuple[str, bytes, int]:
        async with aiohttp.ClientSession() as session:
            url = f"ws://127.0.0.1:{proxy.port}/e/{slug}/ws"
            async with session.ws_connect(url, headers={"Authorization": f"Bearer {good.token}"}) as ws:
                await ws.send_str("hello")
                text = (await ws.receive(timeout=5)).data
                await ws.send_bytes(b"abc")
                data = (await ws.receive(timeout=5)).data
            try:
                async with session.ws_connect(url):
                    return text, data, 101
            except aiohttp.WSServerHandshakeError as exc:
                return text, data, exc.status

    text, data, refused = asyncio.run(talk())
    assert text == "echo: hello" and data == b"cba"
    assert refused == 401  # no token, no websocket


def test_a_silent_websocket_is_closed_after_the_idle_timeout_a_busy_one_is_not(
    backends: Callable[..., Backend],
) -> None:
    """A tunnel whose peer vanished without a FIN would otherwise hold two sockets for ever."""
    import asyncio

    import aiohttp

    short = Proxy(PROXY_IDLE_TIMEOUT="2")
    try:
        aux = backends(aux=True)
        slug = new_slug()
        short.publish(slug, [aux.route()], public=True)
        wait_for(lambda: short.call(slug, "headers")[0] == 200, what="the entry")

        async def talk() -> tuple[int, float]:
            url = f"ws://127.0.0.1:{short.port}/e/{slug}/ws"
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                loop = asyncio.get_running_loop()
                busy_until = loop.time() + 5.0  # 2.5 idle timeouts, a message every 0.2 s
                answers, quiet_since = 0, loop.time()
                while loop.time() < busy_until:
                    await ws.send_str("ping")
                    assert (await ws.receive(timeout=5)).data == "echo: ping"
                    answers, quiet_since = answers + 1, loop.time()  # the last byte through
                    await asyncio.sleep(0.2)
                message = await ws.receive(timeout=15)  # silence: the proxy closes the tunnel
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
                return answers, loop.time() - quiet_since

        answers, closed_after = asyncio.run(talk())
        assert answers >= 3  # the busy tunnel outlived its idle timeout
        assert 1.9 <= closed_after <= 6.0  # 2 s of silence, found by the once-a-second sweep
    finally:
        short.close()


def test_request_is_held_until_a_route_appears(backends: Callable[..., Backend]) -> None:
    held = Proxy(PROXY_HOLD_SECONDS="5")
    try:
        backend = backends()
        slug = new_slug()
        held.publish(slug, [], public=True, status="PROVISIONING")
        wait_for(lambda: held.health().get("endpoints") == 1, what="the entry")
        result: list[int] = []
        caller = threading.Thread(target=lambda: result.append(held.call(slug)[0]))
        caller.start()
        in_flight = f'modelserve_proxy_in_flight{{endpoint="{slug}"}} 1'
        wait_for(lambda: in_flight in held.metrics(), what="the request to wait inside the proxy")
        assert result == []
        held.publish(slug, [backend.route()], public=True)
        caller.join(timeout=5)
        assert result == [200]
    finally:
        held.close()


# --- metrics, stats, Redis outage ----------------------------------------------------------------


def test_metrics_and_stats_for_autoscaling(proxy: Proxy, backends: Callable[..., Backend]) -> None:
    backend = backends()
    slug = new_slug()
    proxy.publish(slug, [backend.route()], public=True)
    wait_for(lambda: proxy.call(slug)[0] == 200, what="the entry")
    for _ in range(20):
        assert proxy.call(slug)[0] == 200
    text = proxy.metrics()
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f'modelserve_proxy_requests_total{{endpoint="{slug}",code="2xx"}}')
    )
    assert count >= 21
    assert f'modelserve_proxy_request_duration_seconds_count{{endpoint="{slug}"}}' in text
    assert f'modelserve_proxy_route_in_flight{{endpoint="{slug}",route="{backend.route()["id"]}"}} 0' in text
    assert "modelserve_proxy_redis_connected 1" in text

    def sample() -> dict[str, Any] | None:
        fields = proxy.redis.hgetall(f"{proxy.prefix}:proxy:stats:{slug}")
        for value in fields.values():
            data = json.loads(value)
            if data["requests"] > 0:
                return dict(data)
        return None

    for _ in range(10):
        proxy.call(slug)
    stats = wait_for(sample, timeout=5, what="stats in Redis")
    assert stats["rps"] > 0 and stats["p95_ms"] > 0 and stats["in_flight"] == 0 and stats["routes"] == 1
    assert 0 < proxy.redis.ttl(f"{proxy.prefix}:proxy:stats:{slug}") <= 30


def test_serves_from_memory_while_redis_is_down(backends: Callable[..., Backend]) -> None:
    port = free_port()
    own = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: _ping(client), what="a private redis")
        backend = backends()
        p = Proxy(redis_url=f"redis://127.0.0.1:{port}/0")
        try:
            slug = new_slug()
            p.publish(slug, [backend.route()], public=True)
            wait_for(lambda: p.call(slug)[0] == 200, what="served")
            own.kill()
            own.wait()
            wait_for(lambda: p.health().get("redis_connected") is False, what="the outage to be noticed")
            for _ in range(20):
                assert p.call(slug)[0] == 200
            # Redis back *empty* (a restart without persistence): the proxy keeps its last table
            # instead of dropping every service until the control plane writes the table again ...
            own = subprocess.Popen(
                ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
            )
            wait_for(lambda: _ping(client), what="redis back")
            wait_for(lambda: p.health().get("redis_connected"), timeout=10, what="the proxy to reconnect")
            for _ in range(20):
                assert p.call(slug)[0] == 200
            # ... which every full write does (serving.bus.routing.publish_all): then the table is re-read.
            wait_for(lambda: _ping(p.redis), what="the test's own client back")
            p.redis.set(f"{p.prefix}:routing:complete", "now")
            p.redis.publish(f"{p.prefix}:routing:updates", json.dumps({"resync": True}))
            wait_for(lambda: p.call(slug)[0] == 404, what="the table re-read once Redis holds it whole")
            assert p.log_text().count("unreachable") == 1, p.log_text()  # one line per outage, not per retry
        finally:
            p.close()
    finally:
        own.kill()
        own.wait()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
