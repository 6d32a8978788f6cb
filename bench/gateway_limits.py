"""The gateway's rate limiter's accuracy (issue 17): a key's requests_per_minute over 2 proxies.

    .venv/bin/python bench/gateway_limits.py [--limit 600] [--rate 40]

Two real proxy processes share one Redis prefix (so one routing table and one key's counters) in
front of one backend (bench/proxy.py's). One gateway key has ``requests_per_minute = limit``. Load
well over the limit (``--rate`` requests/s, half to each proxy, plus a burst of 20 at each at the
minute's start, when both proxies admit on credit before their first lease) runs through one whole
clock minute, the limiter's window (proxy/limits.py counts per epoch minute; it has no shorter
window, so this takes up to two minutes: the wait for a minute's start, then the minute). Requests
are not sent in the 50 ms around the minute's edges, so each answer belongs to one minute. Printed:
the requests admitted (200) in the minute vs the limit, as a ratio (target <= 1.01: at most 1% over),
and per proxy. The last line reads exactly ``admitted A of limit L over 2 proxies: ratio R``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy import CHAT_BODY, KEY, MODEL, PY, free_port, http_ok, wait_until  # noqa: E402
from serving.core import tokens  # noqa: E402 - pure module, no Django

EDGE = 0.05  # seconds around the minute's edges when nothing is sent


async def load(ports: list[int], key: str, rate: float, minute: int) -> dict[str, list[tuple[float, int, int]]]:
    """Send requests from before ``minute``'s start to after its end; (sent at, proxy, status) each."""
    import aiohttp

    start, end = minute * 60, (minute + 1) * 60
    results: list[tuple[float, int, int]] = []
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            sent = time.time()
            async with session.post(
                f"http://127.0.0.1:{ports[i]}/v1/chat/completions", data=CHAT_BODY, headers=headers
            ) as response:
                await response.read()
                results.append((sent, i, response.status))

        tasks: set[asyncio.Task[None]] = set()

        def fire(i: int) -> None:
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        interval = 1 / rate
        n = 0
        next_at = start - 1.0
        burst_done = False
        while True:
            now = time.time()
            if now >= end + 1.0:
                break
            if not burst_done and now >= start + EDGE:
                burst_done = True
                for _ in range(20):
                    fire(0)
                    fire(1)
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.01))
                continue
            next_at += interval
            if abs(now - start) < EDGE or abs(now - end) < EDGE:
                continue
            fire(n % 2)
            n += 1
        await asyncio.gather(*tasks)
    inside = [r for r in results if start + EDGE <= r[0] <= end - EDGE]
    return {"inside": inside, "all": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=600, help="the key's requests_per_minute (default 600)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s sent, both proxies (default 40)")
    args = parser.parse_args()
    import redis

    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"bench-rl-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backend_port = free_port()
        procs.append(subprocess.Popen([PY, str(ROOT / "bench" / "proxy.py"), "--backend", str(backend_port)], cwd=ROOT))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{backend_port}/hello"), what="the backend")
        entry = {
            "id": "bench",
            "slug": "bench",
            "name": "bench",
            "public": False,
            "status": "HEALTHY",
            "routes": [{"id": "r1", "host": "127.0.0.1", "port": backend_port, "weight": 1}],
            "tokens": {},
            "models": [MODEL],
            "project": "p-bench",
            "owner": "1",
        }
        r.hset(f"{prefix}:routing", "bench", json.dumps(entry))
        key = tokens.mint(tokens.GATEWAY_KEY_KIND, KEY)
        key_entry = {
            "digest": key.digest,
            "expires": time.time() + 3600,
            "services": [],
            "projects": ["p-bench"],
            "owner": "",
            "requests_per_minute": args.limit,
        }
        r.hset(f"{prefix}:gateway:keys", key.lookup, json.dumps(key_entry))
        ports = [free_port(), free_port()]
        for port in ports:
            env = {
                **os.environ,
                "PROXY_PORT": str(port),
                "PROXY_ADMIN_PORT": str(free_port()),
                "REDIS_PREFIX": prefix,
                "TOKEN_HMAC_KEY": KEY,
            }
            procs.append(subprocess.Popen([PY, "-m", "proxy"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
        auth = {"Authorization": f"Bearer {key.token}"}
        for port in ports:
            wait_until(lambda port=port: http_ok(f"http://127.0.0.1:{port}/v1/models", auth), what="the proxies")
        minute = int(time.time() // 60) + 1
        if minute * 60 - time.time() < 2:
            minute += 1
        print(f"waiting {minute * 60 - time.time():.0f} s for a minute's start, then one minute of load", flush=True)
        results = asyncio.run(load(ports, key.token, args.rate, minute))
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for k in r.scan_iter(f"{prefix}:*"):
            r.delete(k)
    inside = results["inside"]
    admitted = [x for x in inside if x[2] == 200]
    refused = [x for x in inside if x[2] == 429]
    other = [x for x in inside if x[2] not in (200, 429)]
    per_proxy = [sum(1 for x in admitted if x[1] == i) for i in (0, 1)]
    ratio = len(admitted) / args.limit
    print(f"sent in the minute: {len(inside)}; admitted (200): {len(admitted)} (proxy 1: {per_proxy[0]}, "
          f"proxy 2: {per_proxy[1]}); refused (429): {len(refused)}; other: {len(other)}")  # fmt: skip
    if admitted:
        last = max(x[0] for x in admitted) - minute * 60
        print(f"the last admitted request was sent {last:.1f} s into the minute")
    print(f"target: at most 1% over the limit: {ratio <= 1.01}")
    print(f"admitted {len(admitted)} of limit {args.limit} over 2 proxies: ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
