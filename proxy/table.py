"""The routing table in memory: a full load from Redis at start, pub/sub updates, periodic resync.

Written by ``serving/routing.py``: hash ``<prefix>:routing`` (slug -> JSON entry) and channel
``<prefix>:routing:updates`` (``{"slug", "entry"}`` or ``{"resync": true}``). When Redis is away the
last table stays in use and the follower keeps retrying in the background; one log line per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger("proxy.table")


@dataclass
class Route:
    id: str
    host: str
    port: int
    weight: float
    in_flight: int = 0
    down_until: float = 0.0  # marked down locally after a connect failure

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Endpoint:
    id: str
    slug: str
    public: bool
    status: str
    routes: list[Route]
    tokens: dict[str, tuple[str, float]]  # lookup -> (digest, expires epoch)
    in_flight: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @classmethod
    def from_entry(cls, entry: dict[str, Any], previous: Endpoint | None) -> Endpoint:
        old = {r.id: r for r in previous.routes} if previous else {}
        routes = []
        for raw in entry.get("routes", []):
            route = old.get(raw["id"])
            if route is None or (route.host, route.port) != (raw["host"], raw["port"]):
                route = Route(id=raw["id"], host=raw["host"], port=int(raw["port"]), weight=float(raw.get("weight", 1)))
            else:
                route.weight = float(raw.get("weight", 1))
            routes.append(route)
        tokens = {k: (v["digest"], float(v["expires"])) for k, v in (entry.get("tokens") or {}).items()}
        if previous is not None:
            # Update in place: requests in flight hold this object and decrement its counters.
            previous.id = entry["id"]
            previous.public = bool(entry.get("public"))
            previous.status = str(entry.get("status", ""))
            previous.routes = routes
            previous.tokens = tokens
            return previous
        return cls(
            id=entry["id"],
            slug=entry["slug"],
            public=bool(entry.get("public")),
            status=str(entry.get("status", "")),
            routes=routes,
            tokens=tokens,
        )

    def pick(self, now: float, exclude: set[str]) -> Route | None:
        """Power of two choices over healthy routes, weighted; skips routes marked down."""
        candidates = [r for r in self.routes if r.id not in exclude and r.down_until <= now and r.weight > 0]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        weights = [r.weight for r in candidates]
        a, b = random.choices(candidates, weights=weights, k=2)
        # Fewer requests in flight per unit of weight wins.
        return a if a.in_flight / a.weight <= b.in_flight / b.weight else b


class Table:
    def __init__(self, redis_url: str, prefix: str, resync_interval: float) -> None:
        self.redis_url = redis_url
        self.key = f"{prefix}:routing"
        self.channel = f"{prefix}:routing:updates"
        self.resync_interval = resync_interval
        self.endpoints: dict[str, Endpoint] = {}
        self.loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.redis: aioredis.Redis | None = None

    def apply(self, slug: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            gone = self.endpoints.pop(slug, None)
            if gone is not None:
                self._wake(gone)
            return
        endpoint = Endpoint.from_entry(entry, self.endpoints.get(slug))
        self.endpoints[slug] = endpoint
        if endpoint.routes:
            self._wake(endpoint)

    @staticmethod
    def _wake(endpoint: Endpoint) -> None:
        for waiter in endpoint.waiters:
            if not waiter.done():
                waiter.set_result(None)
        endpoint.waiters.clear()

    async def full_load(self, client: aioredis.Redis) -> None:
        raw = await client.hgetall(self.key)
        seen = set()
        for slug_b, value in raw.items():
            slug = slug_b.decode()
            seen.add(slug)
            try:
                self.apply(slug, json.loads(value))
            except (ValueError, KeyError) as exc:
                log.warning("bad routing entry for %s ignored: %s", slug, exc)
        for slug in set(self.endpoints) - seen:
            self.apply(slug, None)
        self.loaded.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        outage = False
        while True:
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_keepalive=True)
            self.redis = client
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(self.channel)
                await self.full_load(client)  # after subscribing: no update falls in between
                if outage:
                    log.warning("Redis is back; routing table reloaded (%d endpoints)", len(self.endpoints))
                    outage = False
                loop = asyncio.get_running_loop()
                next_resync = loop.time() + self.resync_interval
                while True:
                    timeout = max(0.05, next_resync - loop.time())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                    if message is not None and message.get("type") == "message":
                        self._handle(message["data"])
                        if b'"resync"' in message["data"]:
                            await self.full_load(client)
                    if loop.time() >= next_resync:
                        await self.full_load(client)
                        next_resync = loop.time() + self.resync_interval
            except asyncio.CancelledError:
                await client.aclose()
                raise
            except (OSError, aioredis.RedisError) as exc:
                if not outage:
                    log.warning("Redis unreachable (%s); serving from the last routing table", exc)
                    outage = True
                self.loaded.set()  # nothing to wait for: serve what we have
                await client.aclose()
                await asyncio.sleep(1.0)

    def _handle(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if "slug" in message:
            self.apply(message["slug"], message.get("entry"))
