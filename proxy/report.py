"""What the proxy tells the control plane through Redis; never on a request's path.

* ``<prefix>:tokens:last_used`` (hash): token lookup -> epoch seconds of its last accepted use,
  flushed every ``stats_interval`` in one HSET (never a write per request).
* ``<prefix>:gateway:usage:<lookup>:<day>`` (hash) and ``<prefix>:gateway:usage:pending`` (set): the
  gateway keys' usage per service and day (proxy/usage.py), HINCRBY per push, and at a graceful stop.
* ``<prefix>:proxy:stats:<slug>`` (hash, expires after 30 s without a push): one field per proxy
  process (``host:port:pid``) whose value is JSON ``{"t": epoch, "window": seconds, "rps",
  "errors_per_s", "requests", "in_flight", "p95_ms", "routes"}`` for the last window. Several
  proxies behind a load balancer each write their own field; a reader sums ``rps``/``in_flight``
  over fields whose ``t`` is recent and takes the max of ``p95_ms``. No field: no traffic.
  The sample also holds ``last``: the epoch of the last push that saw a request (arrived, or still in
  flight or held) — what the control plane's idle detection reads (serving/control/sleep.py).
* ``<prefix>:proxy:resent`` (hash): slug -> requests sent again to another replica after the one
  they reached closed without answering (the service's retry policy), HINCRBY per push; the control
  plane takes it and writes one event per service (never one per request).
* ``<prefix>:proxy:failovers`` (hash): slug -> gateway requests that service failed before a byte of
  an answer and that went on to another backend of their model name (proxy/app.py failover); taken
  the same way, one ``gateway_failover`` event per service and tick.
* ``<prefix>:wake`` (list) and ``<prefix>:wake:<slug>`` (key): a request to a sleeping service asks
  the control plane to wake it at once: ``SET <prefix>:wake:<slug> NX EX`` first, and only the proxy
  that set it pushes ``{"endpoint": slug, "endpoint_id": id, "proxy": instance, "request_id": the
  held request's X-Request-ID, "t": epoch}`` on the list, which a control-plane thread blocks on
  (serving/control/sleep.py): many proxies, one wake.
* ``<prefix>:process:proxy:<host>:<pid>``: this process's heartbeat (serving/core/processes.py),
  set on every push with a short expiry, deleted at a clean stop; the admin lists it.
* ``<prefix>:proxy:route-failures`` (channel): JSON ``{"route": id, "endpoint": slug,
  "endpoint_id": id, "error": text, "request_id": the X-Request-ID of the request that found it
  down, "proxy": instance, "t": epoch}`` the moment a replica refuses a connection, or closes one
  opened for a request before a byte of answer (fire and forget, at most once per local down
  period of that route).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from proxy import usage as gateway_usage
from serving.core import processes

if TYPE_CHECKING:
    from proxy.metrics import EndpointStats
    from proxy.table import RevisionRoutes, Table

log = logging.getLogger("proxy.report")

STATS_TTL = 30
REVISION_COUNTS_TTL = 3600  # the per-minute answers and 5xx by revision outlive any canary window
MAX_PENDING_REPORTS = 64  # failure reports in the air at once; beyond that they are dropped
MAX_LAST_USED = 100_000  # bound on remembered tokens while Redis is away
WAKE_DEDUPE_SECONDS = 30  # one wake per service per this long, over every proxy (the Redis key's expiry)


class Reporter:
    def __init__(self, redis_url: str, prefix: str, instance: str, table: Table, interval: float) -> None:
        self.prefix = prefix
        self.instance = instance
        self.table = table
        self.interval = interval
        self.client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        self.last_used: dict[str, float] = {}
        self.usage = gateway_usage.Usage()
        self.failures_channel = f"{prefix}:proxy:route-failures"
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._down = False
        self._last_flush = time.monotonic()
        self._seen: dict[str, tuple[int, float]] = {}  # slug -> (request count at the last push, epoch it grew)
        self._route_codes: dict[str, tuple[int, int]] = {}  # route id -> (answers, 5xx) at the last push
        self._heartbeat = processes.key(prefix, "proxy", socket.gethostname(), os.getpid())
        self._started = time.time()

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        with contextlib.suppress(Exception):  # best effort at shutdown
            await asyncio.wait_for(self.flush(final=True), 2.0)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.aclose(), 1.0)

    def route_failed(
        self, route_id: str, endpoint_slug: str, endpoint_id: str, error: str, request_id: str = ""
    ) -> None:
        """Publish a route failure without waiting for it (never blocks the request)."""
        if self._pending >= MAX_PENDING_REPORTS or not self.table.connected:
            return  # Redis away or slow: the control plane's own health checks will see it too
        message = json.dumps(
            {
                "route": route_id,
                "endpoint": endpoint_slug,
                "endpoint_id": endpoint_id,
                "error": error,
                "request_id": request_id,
                "proxy": self.instance,
                "t": time.time(),
            }
        )
        self._pending += 1
        task = asyncio.get_running_loop().create_task(self._publish(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake(self, slug: str, endpoint_id: str, request_id: str = "") -> None:
        """Ask the control plane to wake a sleeping service, without waiting (the request is held).
        ``request_id``: the held request's, for the service's "woken" event."""
        if self._pending >= MAX_PENDING_REPORTS:
            return  # the next held request (or the next second's) asks again
        message = json.dumps(
            {
                "endpoint": slug,
                "endpoint_id": endpoint_id,
                "proxy": self.instance,
                "request_id": request_id,
                "t": time.time(),
            }
        )
        self._pending += 1
        task = asyncio.get_running_loop().create_task(self._wake(slug, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake(self, slug: str, message: str) -> None:
        try:
            # Several proxies hold requests for the same service: the first one's key wins, one wake.
            if await self.client.set(f"{self.prefix}:wake:{slug}", self.instance, nx=True, ex=WAKE_DEDUPE_SECONDS):
                await self.client.lpush(f"{self.prefix}:wake", message)
        except Exception as exc:
            log.warning("cannot ask to wake %s (%s: %s); asking again shortly", slug, exc.__class__.__name__, exc)
        finally:
            self._pending -= 1

    async def _publish(self, message: str) -> None:
        try:
            await self.client.publish(self.failures_channel, message)
        except Exception as exc:
            log.debug("route failure report lost: %s", exc)
        finally:
            self._pending -= 1

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self, final: bool = False) -> None:
        now = time.time()
        elapsed = max(time.monotonic() - self._last_flush, 0.001)  # the real window, not the nominal one
        self._last_flush = time.monotonic()
        used, self.last_used = self.last_used, {}
        cells = self.usage.take()
        # MULTI/EXEC: the push applies whole or not at all, so usage given back after a failure is
        # not counted twice (only a connection lost after EXEC was sent leaves it unknown).
        pipe = self.client.pipeline(transaction=True)
        if final:  # stopping: leave the admin's Processes page at once
            pipe.delete(self._heartbeat)
        else:
            host, pid = socket.gethostname(), os.getpid()
            pipe.set(self._heartbeat, processes.beat("proxy", host, pid, self._started, now=now), ex=processes.TTL)
        if used:
            pipe.hset(f"{self.prefix}:tokens:last_used", mapping={k: f"{v:.3f}" for k, v in used.items()})
        if cells:
            self._push_usage(pipe, cells)
        resent: list[tuple[EndpointStats, int]] = []  # counted in Redis once the push succeeded
        failed_over: list[tuple[EndpointStats, int]] = []  # the same for gateway failovers
        seen_routes: dict[str, tuple[int, int]] = {}
        for slug, endpoint in self.table.endpoints.items():
            stats = endpoint.stats
            figures = stats.window(elapsed)
            if (
                not final
                and not figures["requests"]
                and not endpoint.in_flight
                and stats.count == 0
                and stats.resent == stats.reported_resent
                and stats.failovers == stats.reported_failovers
            ):
                continue  # never used through this proxy (not even failed over from): nothing to say
            sample = {
                "t": round(now, 3),
                "window": round(elapsed, 3),
                **figures,
                "in_flight": endpoint.in_flight,
                "routes": len(endpoint.routes),
                "last": self._last_request(slug, stats.count, endpoint.in_flight, now),
            }
            if stats.resent > stats.reported_resent:
                pipe.hincrby(f"{self.prefix}:proxy:resent", slug, stats.resent - stats.reported_resent)
                resent.append((stats, stats.resent))
            if stats.failovers > stats.reported_failovers:
                pipe.hincrby(f"{self.prefix}:proxy:failovers", slug, stats.failovers - stats.reported_failovers)
                failed_over.append((stats, stats.failovers))
            key = f"{self.prefix}:proxy:stats:{slug}"
            pipe.hset(key, self.instance, json.dumps(sample, separators=(",", ":")))
            pipe.expire(key, STATS_TTL)
            if len(endpoint.by_revision) > 1:
                self._count_revisions(pipe, slug, endpoint.by_revision, now, seen_routes)
        if not len(pipe):
            return
        try:
            await pipe.execute()
        except Exception as exc:
            # Keep the last-used times for the next try (newest wins); this window's stats are lost.
            for lookup, when in used.items():
                if len(self.last_used) < MAX_LAST_USED and self.last_used.get(lookup, 0.0) < when:
                    self.last_used[lookup] = when
            self.usage.give_back(cells)
            if not self._down:
                log.warning("cannot push stats to Redis (%s); will retry", exc.__class__.__name__)
                self._down = True
            return
        for stats, count in resent:
            stats.reported_resent = count
        for stats, count in failed_over:
            stats.reported_failovers = count
        self._route_codes = seen_routes
        if self._down:
            log.warning("stats push to Redis works again")
            self._down = False

    def _push_usage(self, pipe: Any, cells: dict[tuple[str, str, str], gateway_usage.Cell]) -> None:
        """HINCRBY each cell's counts into its key's hash of the day, then name the hash as pending
        (after the counts: the control plane's fold, serving.control.usage, may run in between)."""
        by_hash: dict[tuple[str, str], dict[str, int]] = {}
        for (lookup, endpoint_id, day), cell in cells.items():
            by_hash.setdefault((lookup, day), {}).update(cell.fields(endpoint_id))
        pending = gateway_usage.pending_key(self.prefix)
        for (lookup, day), fields in by_hash.items():
            key = gateway_usage.hash_key(self.prefix, lookup, day)
            for field, value in fields.items():
                pipe.hincrby(key, field, value)
            pipe.sadd(pending, f"{lookup}:{day}")

    def _count_revisions(
        self, pipe: Any, slug: str, groups: dict[int, RevisionRoutes], now: float, seen: dict[str, tuple[int, int]]
    ) -> None:
        """While an endpoint runs several revisions (a canary), its answers and 5xx per revision since
        the last push, added to a per-minute hash that every proxy adds to: the control plane rolls
        a canary back on their sums (serving.control.canary). Read from the routes' own status
        counters at push time, so the request path pays nothing for it."""
        key = f"{self.prefix}:proxy:revisions:{slug}:{int(now // 60)}"
        for number, group in groups.items():
            answers = errors = 0
            for route in group.routes:
                codes = route.codes
                total, failed = sum(codes), codes[5]
                before = self._route_codes.get(route.id, (0, 0))
                if total < before[0]:  # a new Route object for the same id: its counters began again
                    before = (0, 0)
                answers += total - before[0]
                errors += failed - before[1]
                seen[route.id] = (total, failed)
            if answers:
                pipe.hincrby(key, f"{number}:answers", answers)
                if errors:
                    pipe.hincrby(key, f"{number}:errors", errors)
        pipe.expire(key, REVISION_COUNTS_TTL)

    def _last_request(self, slug: str, count: int, in_flight: int, now: float) -> float:
        """The epoch of the last push that saw a request of this endpoint (none: 0): no per-request
        clock read on the hot path; a request in flight (a long stream, a held one) counts as one."""
        seen = self._seen.get(slug)
        if seen is None or seen[0] != count or in_flight:
            seen = self._seen[slug] = (count, round(now, 3) if (count or in_flight) else 0.0)
        return seen[1]
