"""The node's metrics sampler (S6): every ``METRICS_INTERVAL``, the engine's stats of every replica on
this node (source ``kernel``) and the ``/metrics`` of every healthy one (source ``inference``), written
to the time series of ``serving.bus.metrics``.

Bounded: at most ``METRICS_CONCURRENCY`` scrapes and engine calls at once, each with
``METRICS_TIMEOUT``; a replica whose previous engine call still hangs is skipped, and a response body
is read up to 1 MiB, so a hung replica costs one slot, never the round.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings
from django.db import close_old_connections

from serving.bus.metrics import MAX_BODY, ExpositionError, Point, kernel_points, parse_prometheus, record
from serving.models import STARTING_MARK, Route, RouteMember
from serving.node.engine import get_engine

log = logging.getLogger(__name__)
# Seconds before a replica whose /metrics answered 404 is asked again (rounds are METRICS_INTERVAL).
NO_METRICS_RECHECK = 60.0


@dataclass(frozen=True)
class Target:
    route_id: str
    endpoint_id: str
    container_id: str
    host: str
    port: int | None
    healthy: bool
    member: str = ""  # a cluster's sub member ("sub1"): kernel stats only, main alone serves

    @property
    def replica(self) -> str:
        """The sample's replica key: one per container, so S6.1's kernel average is over every
        container backing the endpoint, a cluster's sub members included."""
        return f"{self.route_id[:8]}.{self.member}" if self.member else self.route_id[:8]


class NodeSampler:
    """Samples the replicas of one node every ``interval`` seconds: engine stats (kernel) of every
    started replica and ``/metrics`` (inference) of every healthy one. Its own thread and asyncio
    loop; started and stopped by the node agent (``serving.node.agent``)."""

    def __init__(
        self,
        node: str,
        engine: Callable[[], Any] | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.engine = engine or get_engine
        self.interval = float(interval if interval is not None else settings.METRICS_INTERVAL)
        self.timeout = float(settings.METRICS_TIMEOUT)
        self.concurrency = int(settings.METRICS_CONCURRENCY)
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"stats-{node}")
        self._busy: set[str] = set()  # replicas whose engine stats call has not returned yet
        self._warned: set[str] = set()
        # Route -> when to ask its /metrics again after a 404: a server without one (most custom
        # ones) would otherwise log a 404 every round, and its owner's replica log fills with ours.
        self._no_metrics: dict[str, float] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name=f"metrics-{self.node}")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _main(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    points = await self.sample(session)
                    await asyncio.to_thread(record, points, self.clock())
                except Exception:
                    log.exception("metrics round on node %s failed; next round in %g s", self.node, self.interval)
                while not self._stop.is_set() and time.monotonic() - started < self.interval:
                    await asyncio.sleep(min(0.1, self.interval))

    async def sample(self, session: Any) -> list[Point]:
        """One round: every target at once (bounded), all points stamped with the round's time."""
        now = self.clock()
        targets = await asyncio.to_thread(self._targets)
        semaphore = asyncio.Semaphore(self.concurrency)
        jobs = [self._kernel(t, now) for t in targets if t.container_id]
        jobs += [
            self._inference(session, semaphore, t, now)
            for t in targets
            if t.healthy and t.host and t.port and not t.member and self._no_metrics.get(t.route_id, now) <= now
        ]
        points: list[Point] = []
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, list):
                points.extend(result)
            elif isinstance(result, BaseException):
                log.debug("metrics sample failed: %s", result)
        return points

    def _targets(self) -> list[Target]:
        close_old_connections()
        live = [Route.Status.HEALTHY, Route.Status.DEGRADED, Route.Status.UNHEALTHY]
        rows = (
            Route.objects.filter(node__name=self.node, status__in=live)
            .exclude(container_id__in=["", STARTING_MARK])
            .values_list("pk", "endpoint_id", "container_id", "host", "port", "status")
        )
        targets = [
            Target(str(pk), str(eid), cid, host, port, status == Route.Status.HEALTHY)
            for pk, eid, cid, host, port, status in rows
        ]
        subs = (
            RouteMember.objects.filter(node__name=self.node, status=RouteMember.Status.RUNNING, route__status__in=live)
            .exclude(container_id__in=["", STARTING_MARK])
            .values_list("route_id", "route__endpoint_id", "container_id", "idx")
        )
        targets += [Target(str(rid), str(eid), cid, "", None, False, f"sub{idx}") for rid, eid, cid, idx in subs]
        return targets

    async def _kernel(self, target: Target, now: float) -> list[Point]:
        if target.container_id in self._busy:
            return []  # its previous stats call still hangs: skip it, never queue behind it
        self._busy.add(target.container_id)
        future = self._pool.submit(lambda: self.engine().stats(target.container_id))
        future.add_done_callback(lambda _: self._busy.discard(target.container_id))
        try:
            stats = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except Exception as exc:
            self._warn_once(target.replica, f"kernel stats of replica {target.replica}: {exc!r}")
            return []
        self._warned.discard(target.replica)
        return kernel_points(target.endpoint_id, target.replica, stats, now)

    async def _inference(self, session: Any, semaphore: asyncio.Semaphore, target: Target, now: float) -> list[Point]:
        url = f"http://{target.host}:{target.port}/metrics"
        async with semaphore:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                    if response.status == 404:
                        # No /metrics on this server: ask again now and then (it may be another
                        # revision's, or gain one), not every round.
                        if len(self._no_metrics) > 10_000:
                            self._no_metrics.clear()
                        self._no_metrics[target.route_id] = now + NO_METRICS_RECHECK
                        return []
                    if response.status != 200:
                        return []  # an error of the moment: nothing to say this round
                    body = await response.content.read(MAX_BODY + 1)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self._warn_once(target.route_id, f"scraping {url}: {exc!r}")
                return []
        if len(body) > MAX_BODY:
            self._warn_once(target.route_id, f"{url} answered more than {MAX_BODY} bytes; not scraped")
            return []
        try:
            values = parse_prometheus(body.decode("utf-8", errors="replace"))
        except ExpositionError as exc:
            self._warn_once(target.route_id, f"{url}: {exc}")
            return []
        self._warned.discard(target.route_id)
        self._no_metrics.pop(target.route_id, None)
        replica = target.route_id[:8]
        return [Point("inference", target.endpoint_id, name, now, value, replica) for name, value in values.items()]

    def _warn_once(self, route_id: str, message: str) -> None:
        if route_id not in self._warned:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned.add(route_id)
            log.info("metrics: %s", message)
