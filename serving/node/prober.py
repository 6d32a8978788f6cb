"""The node's health prober and what a probe or an exit writes (S5), around the pure state machine
of ``serving.core.health``.

``Prober`` is an asyncio loop in a thread of the node worker that probes every route of its node
concurrently (a slow probe never delays another) and writes a route row only when its status changes
(or its failure count grows), so a healthy fleet costs no database writes. ``record_exit`` marks a
replica whose process ended on its own at once, not after the retries.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import aiohttp
from django.db import close_old_connections, transaction
from django.utils import timezone

from serving.bus import dispatch, events
from serving.core import logs
from serving.core.health import DEGRADED, HEALTHY, UNHEALTHY, HealthConfig, ProbeState, apply_probe, next_probe_at
from serving.models import STARTING_MARK, Endpoint, Route, RouteMember
from serving.node.engine import get_engine, log_tail, stop_quietly
from serving.node.engines.base import ReplicaNotFound, ReplicaState
from serving.node.members import stop_all_members

log = logging.getLogger(__name__)


# --- applying results to rows --------------------------------------------------------------------


def _after_change(endpoint_id: str) -> None:
    transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))


def record_status(route_id: str, old_status: str, new: ProbeState, now: datetime, reason: str = "") -> bool:
    """Write a probe outcome with compare-and-set on the old status; returns True if it applied."""
    with transaction.atomic():
        if new.status != old_status:
            # A change of status writes the endpoint too: lock it before the route, the reconcile's
            # order (it holds a batch of endpoints while it writes their routes).
            owner = Route.objects.filter(pk=route_id).values_list("endpoint_id", flat=True).first()
            if owner is None or Endpoint.objects.select_for_update(no_key=True).filter(pk=owner).first() is None:
                return False
        fields: dict[str, Any] = {
            "consecutive_failures": new.failures,
            "last_probe_at": now,
        }
        if new.status != old_status:
            fields["status"] = new.status
            fields["updated_at"] = now
            if new.status == HEALTHY:
                fields["error"] = {}
            elif new.status == UNHEALTHY:
                fields["error"] = {"kind": "health", "message": reason or "Health check failed."}
        claim = Route.objects.filter(pk=route_id, status=old_status)
        if new.status == HEALTHY and new.status != old_status:
            # Cluster mode: main passing its check is not enough; every sub member must run too
            # (serving.core.cluster). Until then it stays as it is, and the next passing check tries again.
            claim = claim.exclude(
                members__status__in=[s for s in RouteMember.Status if s != RouteMember.Status.RUNNING]
            )
        updated = claim.update(**fields)
        if not updated or new.status == old_status:
            return bool(updated)
        route = Route.objects.select_related("endpoint").get(pk=route_id)
        endpoint = route.endpoint
        if new.status == HEALTHY:
            if route.healthy_since is None:
                Route.objects.filter(pk=route_id).update(healthy_since=now)
            # A replica that became healthy proves the configuration works: retries start over.
            Endpoint.objects.filter(pk=endpoint.pk).update(retries=0)
            events.record_event(endpoint, "route_healthy", f"Replica {route_id[:8]} is healthy.", route_id=route_id)
        elif new.status == UNHEALTHY:
            if route.healthy_since is None:
                endpoint.count_failed_start()
            events.record_event(
                endpoint,
                "route_unhealthy",
                f"Replica {route_id[:8]} is unhealthy: {reason}",
                level="error",
                route_id=route_id,
            )
            endpoint_id = str(endpoint.pk)
            transaction.on_commit(lambda: dispatch.enqueue_reconcile(endpoint_id))
        _after_change(str(endpoint.pk))
    return True


def record_exit(route: Route, info: Any, log_tail: str, now: datetime) -> None:
    """A replica's process ended on its own: mark it at once (not after the retries)."""

    exit_code = getattr(info, "exit_code", None)
    engine_error = getattr(info, "error", "") or ""
    if info is None:
        message = "The replica's container disappeared."
    else:
        message = engine_error or f"The replica exited with code {exit_code}."
    error = {"kind": "exited", "message": message, "exit_code": exit_code, "log_tail": log_tail}
    never_healthy = route.healthy_since is None
    new_status = Route.Status.FAILED_TO_START if never_healthy else Route.Status.TERMINATING
    with transaction.atomic():
        # The endpoint first, then its route: the reconcile's lock order (it holds a batch of
        # endpoints while it writes their routes; the other order deadlocks against it).
        endpoint = Endpoint.objects.select_for_update(no_key=True).get(pk=route.endpoint_id)
        if not Route.objects.filter(pk=route.pk, status=route.status, container_id=route.container_id).update(
            status=new_status, error=error, updated_at=now
        ):
            return
        if never_healthy:
            endpoint.count_failed_start()
        events.record_event(
            endpoint,
            "route_exited",
            f"Replica {str(route.pk)[:8]}: {message}",
            level="error",
            route_id=route.pk,
            data={"exit_code": exit_code},
        )
        endpoint_id = str(endpoint.pk)
        container_id = route.container_id
        if never_healthy:
            # Its container is finished; remove it now, keep the row for the error it shows. Its
            # cluster members (if any) go with it: the whole replica failed.
            transaction.on_commit(lambda: _remove_container(container_id))
            stop_all_members(route)
        else:
            transaction.on_commit(lambda: dispatch.send_stop(Route.objects.select_related("node").get(pk=route.pk)))
        transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))
        transaction.on_commit(lambda: dispatch.enqueue_reconcile(endpoint_id))


def check_exited(route_id: str, now: datetime | None = None) -> bool:
    """If the replica of a started route has exited (or vanished), record it now; True if so."""
    route = Route.objects.select_related("endpoint").filter(pk=route_id).first()
    if route is None or route.status not in (Route.Status.DEGRADED, Route.Status.HEALTHY, Route.Status.UNHEALTHY):
        return False
    if route.container_id in ("", STARTING_MARK):
        return False
    engine = get_engine()
    try:
        info = engine.inspect(route.container_id)
    except ReplicaNotFound:
        info = None
    if info is not None and info.state not in (ReplicaState.EXITED, ReplicaState.GONE):
        return False
    tail = log_tail(engine, route.container_id) if info is not None else ""
    record_exit(route, info, tail, now or timezone.now())
    return True


def _remove_container(container_id: str) -> None:
    stop_quietly(get_engine(), container_id)


# --- the prober ----------------------------------------------------------------------------------


@dataclass
class _Tracked:
    route_id: str
    endpoint_id: str
    host: str
    port: int
    config: HealthConfig
    state: ProbeState
    in_flight: bool = False
    urgent: bool = False  # a check asked for by a proxy's failure report is running
    db_status: str = DEGRADED
    extra: dict[str, Any] = field(default_factory=dict)


_probers: weakref.WeakSet[Prober] = weakref.WeakSet()


def refresh_soon() -> None:
    """A route was just started in this process: every prober here re-reads its routes now."""
    for prober in list(_probers):
        prober.refresh_requested = True


class Prober:
    """Probes every started route of one node; runs its own asyncio loop in a daemon thread."""

    REFRESH_EVERY = 1.0  # seconds between re-reads of the node's routes

    def __init__(self, node: str, clock: Any = time.time) -> None:
        self.node = node
        self.clock = clock
        self.tracked: dict[str, _Tracked] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: Any = None
        self._urgent_tasks: set[asyncio.Task[None]] = set()
        # Checks whether a route's replica exited and, if so, records it; injectable for tests.
        self.exit_check: Any = check_exited
        self.refresh_requested = False
        _probers.add(self)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"prober-{self.node}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self._session = session
            self._loop = asyncio.get_running_loop()
            last_refresh = 0.0
            while not self._stop.is_set():
                now = self.clock()
                if now - last_refresh >= self.REFRESH_EVERY or self.refresh_requested:
                    self.refresh_requested = False
                    try:
                        await asyncio.to_thread(self._refresh)
                    except Exception:
                        log.exception("prober refresh failed")
                    last_refresh = now
                for tracked in list(self.tracked.values()):
                    if not tracked.in_flight and now >= next_probe_at(tracked.config, tracked.state):
                        tracked.in_flight = True
                        asyncio.create_task(self._probe(session, tracked))
                await asyncio.sleep(0.05)
            self._loop = None

    # --- out-of-schedule checks (a proxy reported the route failing) -----------------------------

    def tracks(self, route_id: str) -> bool:
        """Whether ``route_id`` is a started route of this node (safe from any thread)."""
        return route_id in self.tracked

    def check_now(self, route_id: str, reason: str = "", request_id: str = "") -> bool:
        """Check a route at once instead of at its next interval (from any thread).

        First whether its process exited (then it is marked at once, like the node's sync does),
        else one HTTP probe that counts as S5.1 says; a replica whose exit is being recorded while
        the proxy already saw the refusal is looked at again for a moment. Returns False when the
        route is not tracked here or a check of it is already running. ``request_id``: the request
        that found the route down; the events the check writes carry it (ServiceEvent.request_id).
        """
        loop = self._loop
        tracked = self.tracked.get(route_id)
        if loop is None or tracked is None or tracked.urgent:
            return False
        try:
            loop.call_soon_threadsafe(self._start_urgent, route_id, reason, request_id)
        except RuntimeError:  # the loop just closed
            return False
        return True

    def _start_urgent(self, route_id: str, reason: str, request_id: str = "") -> None:
        tracked = self.tracked.get(route_id)
        if tracked is None or tracked.urgent:
            return
        tracked.urgent = True
        task = asyncio.get_running_loop().create_task(self._urgent_check(tracked, reason, request_id))
        self._urgent_tasks.add(task)
        task.add_done_callback(self._urgent_tasks.discard)

    async def _urgent_check(self, tracked: _Tracked, reason: str, request_id: str = "") -> None:
        # The task's own context (create_task copied the loop's): what the check writes and logs,
        # here and in the threads asyncio.to_thread runs it in, carries the request's id.
        logs.bind(request_id=request_id, route=tracked.route_id)
        try:
            if await asyncio.to_thread(self._exit_check, tracked.route_id):
                return
            probed_ok = True
            if not tracked.in_flight and self._session is not None:
                tracked.in_flight = True
                await self._probe(self._session, tracked)
                probed_ok = tracked.state.failures == 0
            if not probed_ok:
                # The sandbox's exit record can trail the refused connection by a few milliseconds.
                for delay in (0.05, 0.1, 0.2, 0.4):
                    await asyncio.sleep(delay)
                    if await asyncio.to_thread(self._exit_check, tracked.route_id):
                        return
        except Exception:
            log.exception("checking route %s after a proxy's report failed", tracked.route_id)
        finally:
            tracked.urgent = False

    def _exit_check(self, route_id: str) -> bool:
        close_old_connections()
        return bool(self.exit_check(route_id))

    def _refresh(self) -> None:
        close_old_connections()
        rows = (
            Route.objects.filter(
                node__name=self.node,
                status__in=[Route.Status.DEGRADED, Route.Status.HEALTHY, Route.Status.UNHEALTHY],
            )
            .exclude(host="")
            .values_list(
                "id", "endpoint_id", "host", "port", "health_check", "status", "started_at", "consecutive_failures"
            )
        )
        seen = set()
        for route_id, endpoint_id, host, port, health_check, status, started_at, failures in rows:
            key = str(route_id)
            seen.add(key)
            tracked = self.tracked.get(key)
            if tracked is None:
                started = started_at.timestamp() if started_at else self.clock()
                self.tracked[key] = _Tracked(
                    route_id=key,
                    endpoint_id=str(endpoint_id),
                    host=host,
                    port=port or 0,
                    config=HealthConfig.from_json(health_check or {}),
                    state=ProbeState(status=status, failures=failures, started_at=started),
                    db_status=status,
                )
            elif not tracked.in_flight and tracked.db_status != status:
                # Someone else changed it (e.g. clear errors): follow the database.
                tracked.state = replace(tracked.state, status=status)
                tracked.db_status = status
        for key in set(self.tracked) - seen:
            del self.tracked[key]

    async def _probe(self, session: Any, tracked: _Tracked) -> None:
        config = tracked.config
        ok = False
        reason = ""
        # S5.1: a check every ``interval``, counted from when each check *started*. Counted from its
        # end, a replica that hangs (every check waits max_wait_time) would stay in traffic for
        # (interval + max_wait_time) x (max_retries + 1) instead of S5.2's interval x (max_retries + 1).
        started = self.clock()
        try:
            if config.path is None:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(tracked.host, tracked.port), timeout=config.max_wait_time
                )
                writer.close()
                ok = True
            else:
                url = f"http://{tracked.host}:{tracked.port}{config.path}"
                async with session.get(
                    url,
                    headers=dict(config.headers),
                    timeout=aiohttp.ClientTimeout(total=config.max_wait_time),
                    allow_redirects=False,
                ) as response:
                    ok = response.status == config.expected_status_code
                    if not ok:
                        reason = (
                            f"GET {config.path} answered {response.status}, expected {config.expected_status_code}."
                        )
        except TimeoutError:
            reason = f"GET {config.path or 'port'} took longer than max_wait_time ({config.max_wait_time:g} s)."
        except (OSError, aiohttp.ClientError) as exc:
            reason = f"GET {config.path or 'port'} failed: {exc.__class__.__name__}: {exc}"
        old = tracked.state
        new = apply_probe(config, old, ok, started)
        tracked.state = new
        try:
            if new.status != tracked.db_status or (new.failures != old.failures and new.failures > 0):
                applied = await asyncio.to_thread(_write_probe, tracked.route_id, tracked.db_status, new, reason)
                if applied:
                    tracked.db_status = new.status
        except Exception:
            log.exception("recording a probe of route %s failed", tracked.route_id)
        finally:
            tracked.in_flight = False


def _write_probe(route_id: str, old_status: str, new: ProbeState, reason: str) -> bool:
    close_old_connections()
    return record_status(route_id, old_status, new, timezone.now(), reason)
