"""The data plane's figures, measured side by side in one run: direct vs our proxy vs nginx.

    .venv/bin/python bench/proxy.py [--rounds N] [--streams N]

One backend (a single-process aiohttp server) on 127.0.0.1 serves all three paths; nginx (Debian's,
one worker, keep-alive upstream, no buffering) is configured in a temp dir as the reference reverse
proxy; the load comes from wrk (bounded: a few seconds per measurement). Each figure is the median
of several interleaved rounds, so a noisy neighbour hurts all three paths alike. Measured:

* requests/s at 32 connections (direct, nginx, proxy) -> proxy/nginx ratio (target >= 0.5)
* p50 latency at 1 connection -> the proxy's added p50 over direct (target <= 100 us)
* time to the first byte of an SSE stream, direct vs proxy (target: within 2 ms)
* RSS of the proxy holding 5,000 concurrent SSE streams (target < 300 MiB)
* RSS of a proxy that loaded 1,000 endpoints with 3,000 routes (target < 100 MiB)
* the gateway (issue 17): POST /v1/chat/completions at the proxy's root, routed by the body's
  ``model`` with a gateway key, vs the same request at the per-service URL
  /e/<slug>/v1/chat/completions with an endpoint token, alternating in the same rounds:
  requests/s at 32 connections -> gateway/per-service ratio (target >= 0.9) and p50 at 1 connection
  -> the gateway's added p50 over the per-service URL (target <= 30 us); the same with a key that has
  a requests_per_minute limit (counted in memory from Redis leases, proxy/limits.py)

The proxy endpoint is private: every request carries a token the proxy verifies (nginx checks
nothing), so the comparison is a fair picture of the product. The last line reads exactly
``proxy/nginx rps ratio: R; added p50 us: U; stream ttfb delta ms: T``, after the gateway's
``gateway/per-service rps ratio: G; gateway added p50 us: A``. ``--gateway-only`` measures only the
gateway rows (quicker, for profiling). The rate limiter's accuracy over 2 proxies is
bench/gateway_limits.py (it takes a clock minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.core import tokens  # noqa: E402 - pure module, no Django

KEY = "bench-key"
PY = sys.executable
MODEL = "bench-model"
# A chat request as the openai client sends it (messages first, then model).
CHAT_BODY = json.dumps(
    {
        "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly."}],
        "model": MODEL,
        "max_tokens": 16,
    }
)
CHAT_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
).encode()


# --- the backend (this file run with --backend PORT) ---------------------------------------------


def run_backend(port: int) -> None:
    from aiohttp import web

    _raise_nofile()
    hello = b"hello, world: a small JSON-sized answer of about a hundred bytes..........................."

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=hello, content_type="text/plain")

    async def stream(request: web.Request) -> web.StreamResponse:
        # SSE like an LLM: n events, `delay` seconds apart; hold=1 keeps the stream open (a comment
        # line every 5 s) until the client leaves.
        n = int(request.query.get("n", "3"))
        delay = float(request.query.get("delay", "0.02"))
        hold = request.query.get("hold") == "1"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i in range(n):
            await response.write(b'data: {"token": %d}\n\n' % i)
            if i + 1 < n:
                await asyncio.sleep(delay)
        while hold:
            await asyncio.sleep(5)
            await response.write(b": keep-alive\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=CHAT_ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_get("/hello", small)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stream", stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


# --- helpers ---------------------------------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: object, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ensure_tools() -> None:
    missing = [tool for tool, path in (("wrk", "wrk"), ("nginx", "nginx")) if shutil.which(path) is None]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get (Debian packages)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, stdout=subprocess.DEVNULL)
        packages = ["wrk" if m == "wrk" else "nginx-light" for m in missing]
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env, check=False, stdout=subprocess.DEVNULL)
    still = [tool for tool in missing if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if still:
        raise SystemExit(f"bench/proxy.py needs {' '.join(still)}: apt-get install {' '.join(still)}")


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location /e/bench/ {{
      proxy_pass http://backend/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}
last_requests = 0  # requests completed by the last wrk run


def wrk(
    url: str, connections: int, seconds: float, headers: dict[str, str], script: Path | None = None
) -> tuple[float, float]:
    """(requests/s, p50 latency in us) of one bounded wrk run (``script``: a wrk Lua script, e.g. a POST)."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if script is not None:
        args += ["-s", str(script)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    global last_requests
    last_requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"\s50%\s+([\d.]+)(us|ms|s)\b", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} failed responses from {url}:\n{out}")
    return rps, float(p50.group(1)) * _UNITS[p50.group(2)] if p50 else float("nan")  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post_script(directory: Path, body: str) -> Path:
    """A wrk Lua script that POSTs ``body`` as JSON."""
    path = directory / "post.lua"
    quoted = body.replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(f"wrk.method = 'POST'\nwrk.body = '{quoted}'\nwrk.headers['Content-Type'] = 'application/json'\n")
    return path


def first_byte_ms(port: int, path: str, headers: dict[str, str]) -> tuple[float, float]:
    """Time to the first body byte of a fresh streamed request, and to its end (ms)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        s.sendall(request)
        data = b""
        first = None
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if first is None and b"data: " in data:
                first = time.perf_counter()
        ended = time.perf_counter()
    if first is None:
        raise SystemExit(f"no SSE event on :{port}{path}: {data[:300]!r}")
    return (first - started) * 1000, (ended - started) * 1000


async def hold_streams(port: int, path: str, count: int, headers: dict[str, str]) -> list[asyncio.StreamWriter]:
    """Open ``count`` SSE streams and wait until each has its first event."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(256)  # open them briskly but without a SYN flood

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            data = b""
            while b"data: " not in data:
                chunk = await asyncio.wait_for(reader.read(4096), 30)
                if not chunk:
                    raise SystemExit(f"stream closed early: {data[:200]!r}")
                data += chunk
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the run -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per wrk run (default 3)")
    parser.add_argument("--streams", type=int, default=5000, help="concurrent SSE streams (default 5000)")
    parser.add_argument("--gateway-rounds", type=int, default=10, help="rounds for the gateway rows (default 10)")
    parser.add_argument("--gateway-only", action="store_true", help="measure only the gateway rows")
    args = parser.parse_args()
    if args.backend:
        run_backend(args.backend)
        return
    ensure_tools()
    _raise_nofile()
    import redis

    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    prefix_big = f"{prefix}-big"

    def spawn(cmd: list[str], env: dict[str, str] | None = None, log: str = "") -> subprocess.Popen[bytes]:
        out = (tmp / f"{log}.log").open("wb") if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        backend_port, nginx_port, proxy_port, admin_port = free_port(), free_port(), free_port(), free_port()
        spawn([PY, __file__, "--backend", str(backend_port)], log="backend")
        wait_until(lambda: http_ok(f"http://127.0.0.1:{backend_port}/hello"), what="the backend")

        token = tokens.mint("mst", KEY)
        entry = {
            "id": "bench",
            "slug": "bench",
            "name": "bench",
            "public": False,
            "status": "HEALTHY",
            "routes": [{"id": "r1", "host": "127.0.0.1", "port": backend_port, "weight": 1}],
            "tokens": {token.lookup: {"digest": token.digest, "expires": time.time() + 3600}},
            "models": [MODEL],
            "project": "p-bench",
            "owner": "1",
        }
        r.hset(f"{prefix}:routing", "bench", json.dumps(entry))
        # Two gateway keys of the project, as serving/bus/routing.py writes them: one without limits,
        # one with a requests_per_minute limit far above what the bench sends (the limiter's cost).
        gw_key, gw_limited = tokens.mint(tokens.GATEWAY_KEY_KIND, KEY), tokens.mint(tokens.GATEWAY_KEY_KIND, KEY)
        for minted, rpm in ((gw_key, 0), (gw_limited, 1_000_000_000)):
            key_entry = {
                "digest": minted.digest,
                "expires": time.time() + 3600,
                "services": [],
                "projects": ["p-bench"],
                "owner": "",
                "requests_per_minute": rpm,
            }
            r.hset(f"{prefix}:gateway:keys", minted.lookup, json.dumps(key_entry))
        proxy_env = {
            "PROXY_PORT": str(proxy_port),
            "PROXY_ADMIN_PORT": str(admin_port),
            "REDIS_PREFIX": prefix,
            "TOKEN_HMAC_KEY": KEY,
            "PROXY_QUEUE_LIMIT": "100000",
        }
        proxy = spawn([PY, "-m", "proxy"], proxy_env, log="proxy")
        auth = {"Authorization": f"Bearer {token.token}"}
        wait_until(lambda: http_ok(f"http://127.0.0.1:{proxy_port}/e/bench/hello", auth), what="the proxy")

        # The gateway vs the per-service URL: the same chat POST, side by side, alternating.
        script = post_script(tmp, CHAT_BODY)
        routes = {
            "service": (f"http://127.0.0.1:{proxy_port}/e/bench/v1/chat/completions", auth),
            "gateway": (
                f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
                {"Authorization": f"Bearer {gw_key.token}"},
            ),
            "limited": (
                f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
                {"Authorization": f"Bearer {gw_limited.token}"},
            ),
        }
        for url, headers in routes.values():
            wrk(url, 32, 1, headers, script)
        g_rps: dict[str, list[float]] = {name: [] for name in routes}
        g_p50: dict[str, list[float]] = {name: [] for name in routes}
        g_cpu: dict[str, list[float]] = {name: [] for name in routes}  # the proxy's CPU us per request
        rounds = args.gateway_rounds
        seconds = max(1, min(int(args.seconds), 2))  # (wrk takes whole seconds)
        print(f"measuring the gateway: {rounds} rounds of {seconds:g} s per path and load", flush=True)
        for i in range(rounds):
            order = list(routes.items()) if i % 2 == 0 else list(reversed(routes.items()))
            for name, (url, headers) in order:
                before = cpu_seconds(proxy.pid)
                g_rps[name].append(wrk(url, 32, seconds, headers, script)[0])
                g_cpu[name].append((cpu_seconds(proxy.pid) - before) * 1e6 / max(1, last_requests))
            for name, (url, headers) in order:
                g_p50[name].append(wrk(url, 1, seconds, headers, script)[1])
        if not args.gateway_only:
            nginx_dir = tmp / "nginx"
            nginx_dir.mkdir()
            (nginx_dir / "nginx.conf").write_text(
                NGINX_CONF.format(dir=nginx_dir, backend=backend_port, port=nginx_port)
            )
            spawn([nginx_binary(), "-c", str(nginx_dir / "nginx.conf"), "-p", str(nginx_dir)], log="nginx")
            wait_until(lambda: http_ok(f"http://127.0.0.1:{nginx_port}/e/bench/hello"), what="nginx")

            targets = {
                "direct": (f"http://127.0.0.1:{backend_port}/hello", {}),
                "nginx": (f"http://127.0.0.1:{nginx_port}/e/bench/hello", {}),
                "proxy": (f"http://127.0.0.1:{proxy_port}/e/bench/hello", auth),
            }
            for url, headers in targets.values():  # warm every path (pools, caches) before measuring
                wrk(url, 32, 1, headers)

            rps: dict[str, list[float]] = {name: [] for name in targets}
            p50: dict[str, list[float]] = {name: [] for name in targets}
            print(f"measuring: {args.rounds} rounds of {args.seconds:g} s per path and load", flush=True)
            for _ in range(args.rounds):
                for name, (url, headers) in targets.items():
                    rps[name].append(wrk(url, 32, args.seconds, headers)[0])
                for name, (url, headers) in targets.items():
                    p50[name].append(wrk(url, 1, args.seconds, headers)[1])

            # Streaming: time to the first SSE event of a fresh request, interleaved direct/proxy.
            stream_path = "/stream?n=5&delay=0.02"
            ttfb: dict[str, list[float]] = {"direct": [], "proxy": []}
            spread: list[float] = []
            for _ in range(40):
                ttfb["direct"].append(first_byte_ms(backend_port, stream_path, {})[0])
                first, total = first_byte_ms(proxy_port, "/e/bench" + stream_path, auth)
                ttfb["proxy"].append(first)
                spread.append(total - first)
            ttfb_delta = median(ttfb["proxy"]) - median(ttfb["direct"])

            # Many concurrent streams held open through the proxy.
            rss_idle = rss_mib(proxy.pid)
            loop = asyncio.new_event_loop()
            started = time.monotonic()
            writers = loop.run_until_complete(
                hold_streams(proxy_port, "/e/bench/stream?n=1&hold=1", args.streams, auth)
            )
            opened_in = time.monotonic() - started
            rss_streams = rss_mib(proxy.pid)
            for writer in writers:
                writer.close()
            loop.run_until_complete(asyncio.sleep(0.5))
            loop.close()

            # A big routing table: 1,000 endpoints x 3 routes (and a token each) in a fresh proxy.
            pipe = r.pipeline()
            for i in range(1000):
                t = tokens.mint("mst", KEY)
                big = {
                    "id": str(uuid.uuid4()),
                    "slug": f"svc-{i}",
                    "name": f"service {i}",
                    "public": i % 2 == 0,
                    "status": "HEALTHY",
                    "routes": [
                        {"id": str(uuid.uuid4()), "host": f"10.0.{i // 250}.{i % 250}", "port": 8000 + j, "weight": 1}
                        for j in range(3)
                    ],
                    "tokens": {t.lookup: {"digest": t.digest, "expires": time.time() + 3600}},
                }
                pipe.hset(f"{prefix_big}:routing", big["slug"], json.dumps(big))
            pipe.execute()
            big_admin = free_port()
            big_proxy = spawn(
                [PY, "-m", "proxy"],
                {
                    **proxy_env,
                    "PROXY_PORT": str(free_port()),
                    "PROXY_ADMIN_PORT": str(big_admin),
                    "REDIS_PREFIX": prefix_big,
                },
                log="proxy-big",
            )

            def big_loaded() -> bool:
                with urllib.request.urlopen(f"http://127.0.0.1:{big_admin}/healthz", timeout=2) as resp:
                    return json.load(resp)["endpoints"] == 1000

            wait_until(big_loaded, what="1,000 endpoints loaded")
            time.sleep(0.5)
            rss_table = rss_mib(big_proxy.pid)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for key in [*r.scan_iter(f"{prefix}:*"), *r.scan_iter(f"{prefix_big}:*")]:
            r.delete(key)
        shutil.rmtree(tmp, ignore_errors=True)

    # Each round's gateway figure against the per-service one measured beside it, then the median:
    # a noisy neighbour slows a whole round, not one path.
    g_m_rps = {name: median(values) for name, values in g_rps.items()}
    g_m_p50 = {name: median(values) for name, values in g_p50.items()}
    g_m_cpu = {name: median(values) for name, values in g_cpu.items()}
    g_ratio = median([g / s for g, s in zip(g_rps["gateway"], g_rps["service"], strict=True)])
    g_added = median([g - s for g, s in zip(g_p50["gateway"], g_p50["service"], strict=True)])
    l_ratio = median([g / s for g, s in zip(g_rps["limited"], g_rps["service"], strict=True)])
    l_added = median([g - s for g, s in zip(g_p50["limited"], g_p50["service"], strict=True)])
    if not args.gateway_only:
        m_rps = {name: median(values) for name, values in rps.items()}
        m_p50 = {name: median(values) for name, values in p50.items()}
        ratio = m_rps["proxy"] / m_rps["nginx"]
        added = m_p50["proxy"] - m_p50["direct"]
        rows = [
            ("requests/s, 32 connections", f"{m_rps['direct']:.0f}", f"{m_rps['nginx']:.0f}", f"{m_rps['proxy']:.0f}"),
            (
                "p50 latency us, 1 connection",
                f"{m_p50['direct']:.0f}",
                f"{m_p50['nginx']:.0f}",
                f"{m_p50['proxy']:.0f}",
            ),
            ("added p50 us over direct", "-", f"{m_p50['nginx'] - m_p50['direct']:.0f}", f"{added:.0f}"),
            ("SSE time to first event ms", f"{median(ttfb['direct']):.2f}", "-", f"{median(ttfb['proxy']):.2f}"),
        ]
        print()
        print(f"{'figure':34} {'direct':>10} {'nginx':>10} {'proxy':>10}")
        for row in rows:
            print(f"{row[0]:34} {row[1]:>10} {row[2]:>10} {row[3]:>10}")
        print()
        print(f"rounds (rps direct/nginx/proxy): {rps['direct']} / {rps['nginx']} / {rps['proxy']}")
        print(f"rounds (p50 us direct/nginx/proxy): {p50['direct']} / {p50['nginx']} / {p50['proxy']}")
        print(
            f"SSE events after the first arrived over {median(spread):.1f} ms (4 x 20 ms apart: streamed, not buffered)"
        )
        print(f"proxy RSS idle: {rss_idle:.1f} MiB; holding {args.streams} SSE streams: {rss_streams:.1f} MiB "
              f"(opened in {opened_in:.1f} s) (target < 300)")  # fmt: skip
        print(f"proxy RSS with 1,000 endpoints and 3,000 routes loaded: {rss_table:.1f} MiB (target < 100)")
        print(f"targets: ratio >= 0.5: {ratio >= 0.5}; added p50 <= 100 us: {added <= 100}; "
              f"ttfb delta <= 2 ms: {ttfb_delta <= 2}; streams RSS < 300 MiB: {rss_streams < 300}; "
              f"table RSS < 100 MiB: {rss_table < 100}")  # fmt: skip
        print(f"proxy/nginx rps ratio: {ratio:.2f}; added p50 us: {added:.0f}; stream ttfb delta ms: {ttfb_delta:.2f}")

    print()
    print(f"{'gateway: POST chat/completions':34} {'/e/<slug>':>10} {'gateway':>10} {'+ rpm lim':>10}")
    print(f"{'requests/s, 32 connections':34} {g_m_rps['service']:>10.0f} {g_m_rps['gateway']:>10.0f} "
          f"{g_m_rps['limited']:>10.0f}")  # fmt: skip
    print(f"{'p50 latency us, 1 connection':34} {g_m_p50['service']:>10.0f} {g_m_p50['gateway']:>10.0f} "
          f"{g_m_p50['limited']:>10.0f}")  # fmt: skip
    print(f"{'proxy CPU us per request':34} {g_m_cpu['service']:>10.1f} {g_m_cpu['gateway']:>10.1f} "
          f"{g_m_cpu['limited']:>10.1f}")  # fmt: skip
    print(f"{'rps ratio to /e/<slug>':34} {'-':>10} {g_ratio:>10.2f} {l_ratio:>10.2f}")
    print(f"{'added CPU us per request':34} {'-':>10} {g_m_cpu['gateway'] - g_m_cpu['service']:>10.1f} "
          f"{g_m_cpu['limited'] - g_m_cpu['service']:>10.1f}")  # fmt: skip
    print(f"{'added p50 us over /e/<slug>':34} {'-':>10} {g_added:>10.0f} {l_added:>10.0f}")
    print(f"rounds (rps /e/<slug> / gateway / limited): {g_rps['service']} / {g_rps['gateway']} / {g_rps['limited']}")
    print(
        f"rounds (p50 us /e/<slug> / gateway / limited): {g_p50['service']} / {g_p50['gateway']} / {g_p50['limited']}"
    )
    print("(ratio and added p50: the median of each round's pair; CPU: the proxy process's user + system time)")
    print(f"gateway targets: rps ratio >= 0.9: {g_ratio >= 0.9}; added p50 <= 30 us: {g_added <= 30}")
    print(f"gateway/per-service rps ratio: {g_ratio:.2f}; gateway added p50 us: {g_added:.0f}")


if __name__ == "__main__":
    main()
