"""The canary split's figure (issue 16), measured through the real proxy in one run.

    .venv/bin/python bench/canary.py [--requests N]

Two backends (this file run with --backend PORT NAME: a tiny HTTP/1.1 keep-alive server answering
its name) are the routes of revision 1 and of revision 2 of one public endpoint written into a
private Redis prefix with shares 90/10; the real proxy (``python -m proxy``) reads it. N requests
(default 10,000) go through one keep-alive connection and the answers are counted. Also measured:
the cost of the proxy's choice, ``Endpoint.choose`` with the split vs ``Endpoint.pick`` without, in
microseconds per call (in process). The last line reads exactly
``canary share: P% (target 10% +- 1.5); choose us: C; pick us: K``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable


def run_backend(port: int, name: str) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = name.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            # One write: headers and body apart would meet the client's delayed ACK (40 ms each).
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))

        def log_message(self, *args: object) -> None:
            return

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, str]:
    conn.request("GET", path)
    answer = conn.getresponse()
    return answer.status, answer.read().decode()


def choice_cost() -> tuple[float, float]:
    from proxy.metrics import EndpointStats
    from proxy.table import Endpoint

    routes = [
        {"id": f"r{i}", "host": "10.0.0.1", "port": 8000 + i, "weight": 1, "revision": 1 if i < 2 else 2}
        for i in range(3)
    ]
    split = Endpoint("a", EndpointStats())
    split.update({"routes": routes, "shares": {"1": 90, "2": 10}})
    plain = Endpoint("b", EndpointStats())
    plain.update({"routes": routes})
    n = 200_000
    choose = min(timeit.repeat(lambda: split.choose(0.0), number=n, repeat=3)) / n * 1e6
    pick = min(timeit.repeat(lambda: plain.pick(0.0), number=n, repeat=3)) / n * 1e6
    return choose, pick


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--backend", nargs=2)
    args = parser.parse_args()
    if args.backend:
        run_backend(int(args.backend[0]), args.backend[1])
        return
    import redis

    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-canary-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_port(), free_port()]
        for port, name in zip(ports, ("v1", "v2"), strict=True):
            procs.append(subprocess.Popen([PY, __file__, "--backend", str(port), name], cwd=ROOT))
        entry = {
            "id": "canary",
            "slug": "canary",
            "name": "canary",
            "public": True,
            "status": "HEALTHY",
            "routes": [
                {"id": "v1", "host": "127.0.0.1", "port": ports[0], "weight": 1, "revision": 1},
                {"id": "v2", "host": "127.0.0.1", "port": ports[1], "weight": 1, "revision": 2},
            ],
            "shares": {"1": 90, "2": 10},
            "tokens": {},
        }
        r.hset(f"{prefix}:routing", "canary", json.dumps(entry))
        r.set(f"{prefix}:routing:complete", "1")
        proxy_port, admin_port = free_port(), free_port()
        env = {**os.environ, "PROXY_PORT": str(proxy_port), "PROXY_ADMIN_PORT": str(admin_port), "REDIS_PREFIX": prefix}
        with (tmp / "proxy.log").open("wb") as log:
            procs.append(subprocess.Popen([PY, "-m", "proxy"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_until(
            lambda: get(http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=2), "/e/canary/")[0] == 200,
            "the proxy",
        )
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
        seen: Counter[str] = Counter()
        started = time.perf_counter()
        for _ in range(args.requests):
            status, body = get(conn, "/e/canary/")
            seen[body if status == 200 else f"HTTP {status}"] += 1
        elapsed = time.perf_counter() - started
        total = sum(seen.values())
        share = 100 * seen["v2"] / total
        print(f"{total} requests in {elapsed:.1f} s: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
        print(f"observed split: revision 1 {100 * seen['v1'] / total:.2f}%, revision 2 {share:.2f}% (asked 90/10)")
        choose, pick = choice_cost()
        ok = abs(share - 10) <= 1.5 and seen["v1"] + seen["v2"] == total
        print(
            f"canary share: {share:.2f}% (target 10% +- 1.5){'' if ok else ' MISSED'}; "
            f"choose us: {choose:.2f}; pick us: {pick:.2f}"
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(5)
        r.delete(f"{prefix}:routing", f"{prefix}:routing:complete")


if __name__ == "__main__":
    main()
