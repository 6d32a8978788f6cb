"""The real proxy process against real llm-echo replicas and the real Redis (DESIGN.md §7, S7)."""

from __future__ import annotations

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from serving import tokens
from tests.live import ROOT, wait_for

KEY = "proxy-test-key"
ECHO = ROOT / "examples" / "llm-echo" / "server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class Backend:
    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.proc = start(
            [sys.executable, str(ECHO), "--host", "127.0.0.1", "--port", str(self.port)],
            {"ECHO_TOKEN_DELAY": "0.05", **env},
        )
        wait_for(lambda: answers(f"http://127.0.0.1:{self.port}/health"), what="llm-echo to answer")

    def route(self, weight: float = 1.0) -> dict[str, Any]:
        return {"id": f"r{self.port}", "host": "127.0.0.1", "port": self.port, "weight": weight}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class World:
    """A proxy process reading a private routing table in the real Redis."""

    def __init__(self, tmp: Path) -> None:
        self.prefix = f"proxytest-{uuid.uuid4().hex[:8]}"
        self.redis = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        self.port = free_port()
        self.admin = free_port()
        self.backends: list[Backend] = []
        self.proc = start(
            [sys.executable, "-m", "proxy"],
            {
                "PROXY_PORT": str(self.port),
                "PROXY_ADMIN_PORT": str(self.admin),
                "REDIS_PREFIX": self.prefix,
                "TOKEN_HMAC_KEY": KEY,
                "PROXY_RESYNC_INTERVAL": "1",
                "PROXY_QUEUE_LIMIT": "4",
            },
        )
        wait_for(lambda: answers(f"http://127.0.0.1:{self.admin}/healthz"), what="the proxy to answer")

    def backend(self, **env: str) -> Backend:
        backend = Backend(**env)
        self.backends.append(backend)
        return backend

    def publish(
        self,
        slug: str,
        routes: list[dict[str, Any]],
        *,
        public: bool = False,
        token_list: list[tokens.MintedToken] = (),
        expires: float | None = None,
        status: str = "HEALTHY",
    ) -> None:
        entry = {
            "id": str(uuid.uuid4()),
            "slug": slug,
            "name": slug,
            "public": public,
            "status": status,
            "routes": routes,
            "tokens": {t.lookup: {"digest": t.digest, "expires": expires or time.time() + 3600} for t in token_list},
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
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"{scheme} {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(slug, path), data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        for backend in self.backends:
            backend.proc.kill()
            backend.proc.wait()
        for key in self.redis.scan_iter(f"{self.prefix}:*"):
            self.redis.delete(key)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def test_every_auth_case(world: World) -> None:
    backend = world.backend()
    good = tokens.mint("mst", KEY)
    other = tokens.mint("mst", KEY)
    expired = tokens.mint("mst", KEY)
    world.publish("private", [backend.route()], token_list=[good])
    world.publish("other", [backend.route()], token_list=[other])
    world.publish("old", [backend.route()], token_list=[expired], expires=time.time() - 1)
    world.publish("open", [backend.route()], public=True)
    wait_for(lambda: world.call("open")[0] == 200, what="the table to arrive")

    for scheme in ("BackendAI", "Bearer"):
        assert world.call("private", token=good.token, scheme=scheme)[0] == 200
    cases = {
        "missing": world.call("private"),
        "malformed": world.call("private", token="nope"),
        "unknown": world.call("private", token=tokens.mint("mst", KEY).token),
        "other service": world.call("private", token=other.token),
        "wrong key": world.call("private", token=tokens.mint("mst", "other-key").token),
        "expired": world.call("old", token=expired.token),
        "wrong scheme": world.call("private", token=good.token, scheme="Basic"),
        "api key kind": world.call("private", token=tokens.mint("msk", KEY).token),
    }
    for name, (status, headers, body) in cases.items():
        assert status == 401, name
        assert "Bearer" in headers.get("WWW-Authenticate", ""), name
        assert json.loads(body)["error"]["message"], name

    # Revocation (the entry republished without the token) takes effect within 1 s.
    world.publish("private", [backend.route()], token_list=[])
    started = time.monotonic()
    wait_for(
        lambda: world.call("private", token=good.token)[0] == 401,
        timeout=1.0,
        interval=0.02,
        what="revocation within 1 s",
    )
    assert time.monotonic() - started < 1.0


def test_token_is_not_forwarded_and_forwarding_headers_are_added(world: World) -> None:
    seen: dict[str, str] = {}
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.update(self.headers)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    good = tokens.mint("mst", KEY)
    world.publish("hdr", [{"id": "x", "host": "127.0.0.1", "port": server.server_port, "weight": 1}], token_list=[good])
    wait_for(lambda: world.call("hdr", "a?b=1", token=good.token)[0] == 200, what="a forwarded call")
    server.shutdown()
    assert "Authorization" not in seen
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Request-ID"]


def test_weighted_balancing(world: World) -> None:
    light, heavy = world.backend(ECHO_TOKEN_DELAY="0"), world.backend(ECHO_TOKEN_DELAY="0")
    world.publish("w", [light.route(1), heavy.route(3)], public=True)
    wait_for(lambda: world.call("w")[0] == 200, what="the table")
    for _ in range(200):
        assert world.call("w", "v1/completions", body={"prompt": "x"})[0] == 200
    metrics = {}
    for backend in (light, heavy):
        text = urllib.request.urlopen(f"http://127.0.0.1:{backend.port}/metrics").read().decode()
        metrics[backend.port] = int(
            next(line.split()[1] for line in text.splitlines() if line.startswith("llm_echo_requests_total"))
        )
    share = metrics[heavy.port] / (metrics[light.port] + metrics[heavy.port])
    assert 0.6 < share < 0.9, metrics


def test_no_route_503_unknown_404_and_overload_429(world: World) -> None:
    world.publish("empty", [], public=True, status="PROVISIONING")
    wait_for(lambda: world.call("empty")[0] == 503, what="503")
    _, headers, body = world.call("empty")
    assert headers["Retry-After"]
    assert "starting" in json.loads(body)["error"]["message"]
    assert world.call("nope")[0] == 404
    slow = world.backend(ECHO_TOKEN_DELAY="0.3")
    world.publish("busy", [slow.route()], public=True)
    wait_for(lambda: world.call("busy")[0] == 200, what="the table")
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(world.call("busy", "v1/completions", body={"prompt": "a b c"})[0])
        )
        for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(429) >= 1 and results.count(200) >= 4, results


def test_killed_replica_loses_no_request(world: World) -> None:
    a, b = world.backend(ECHO_TOKEN_DELAY="0"), world.backend(ECHO_TOKEN_DELAY="0")
    world.publish("ha", [a.route(), b.route()], public=True)
    wait_for(lambda: world.call("ha")[0] == 200, what="the table")
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(
                world.call("ha", "v1/chat/completions", body={"messages": [{"role": "user", "content": "hi"}]})[0]
            )

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    a.kill()
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join()
    failures = [s for s in statuses if s != 200]
    print(f"requests: {len(statuses)}, failed: {len(failures)}")
    assert len(statuses) > 50
    assert failures == []


def test_sse_streams_chunk_by_chunk_and_openai_client_works(world: World) -> None:
    backend = world.backend(ECHO_TOKEN_DELAY="0.1")
    good = tokens.mint("mst", KEY)
    world.publish("chat", [backend.route()], token_list=[good])
    wait_for(lambda: world.call("chat", token=good.token)[0] == 200, what="the table")
    from openai import OpenAI

    client = OpenAI(base_url=world.url("chat", "v1"), api_key=good.token)
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
    assert arrivals[0] < arrivals[-1] - 0.3, arrivals  # the first word came well before the last


def test_serves_from_memory_when_redis_is_gone(world: World, tmp_path: Path) -> None:
    port = free_port()
    own_redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: _ping(client), what="a private redis")
        backend = world.backend()
        proxy_port, admin = free_port(), free_port()
        prefix = "gone"
        entry = {"id": "1", "slug": "s", "public": True, "status": "HEALTHY", "routes": [backend.route()], "tokens": {}}
        client.hset(f"{prefix}:routing", "s", json.dumps(entry))
        proc = start(
            [sys.executable, "-m", "proxy"],
            {
                "PROXY_PORT": str(proxy_port),
                "PROXY_ADMIN_PORT": str(admin),
                "REDIS_URL": f"redis://127.0.0.1:{port}/0",
                "REDIS_PREFIX": prefix,
                "TOKEN_HMAC_KEY": KEY,
            },
        )
        url = f"http://127.0.0.1:{proxy_port}/e/s/v1/models"
        wait_for(lambda: answers(url) and urllib.request.urlopen(url).status == 200, what="served")
        own_redis.kill()
        own_redis.wait()
        for _ in range(20):
            assert urllib.request.urlopen(url, timeout=5).status == 200
        proc.terminate()
        proc.wait(timeout=10)
    finally:
        own_redis.kill()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
