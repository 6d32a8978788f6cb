"""A route's replica on this node: start it, stop it, fail its start, recover a start a dead worker left.

The control plane sends ``start_route`` and ``stop_route`` to the node's queue (``serving.bus.dispatch``);
every step is a compare-and-set on the route's row, so a duplicate delivery does nothing and a worker
killed at any line leaves work the next tick finishes.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from serving import failpoints
from serving.bus import dispatch, events, telemetry
from serving.models import STARTING_MARK, Endpoint, Route, RouteMember
from serving.node import prober, replicas
from serving.node.engine import (
    get_engine,
    node_name,
    record_start_warnings,
    report_unavailable,
    share_node_addresses,
    stop_quietly,
)
from serving.node.engines.base import LABEL_ROUTE, Engine, EngineError, ReplicaNotFound

log = logging.getLogger(__name__)

# How often a pull's progress is written on its route (a row write and a page notification each).
PULL_PROGRESS_EVERY = 0.5


class _PullProgress:
    """Writes a pull's bytes on its route while the start's claim holds, at most every
    ``PULL_PROGRESS_EVERY`` s. Each write bumps ``updated_at``: a start moving is not a stuck one
    (serving.core.planning)."""

    def __init__(self, route: Route) -> None:
        self.route_id = route.pk
        self.endpoint_id = str(route.endpoint_id)
        self.last = 0.0
        self.done = 0  # the pull's bytes so far (for modelserve_image_pull_bytes_total)

    def __call__(self, done: int, total: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last < PULL_PROGRESS_EVERY:
            return
        self.last = now
        if Route.objects.filter(pk=self.route_id, status=Route.Status.PROVISIONING, container_id=STARTING_MARK).update(
            pull_progress={"done": done, "total": total}, updated_at=timezone.now()
        ):
            events.notify_endpoint_changed(self.endpoint_id)


def _fail_start(route: Route, kind: str, message: str, counted: bool = True, **extra: Any) -> None:
    """Mark a provisioning route failed with ``message``; ``counted``: one more failed start of its
    service towards MAX_START_FAILURES (not when the node, not the service, is the reason)."""
    with transaction.atomic():
        # The endpoint first, then its route: the order of the reconcile, which holds a batch of
        # endpoints while it writes their routes (the other order deadlocks against it).
        endpoint = Endpoint.objects.select_for_update(no_key=True).get(pk=route.endpoint_id)
        updated = Route.objects.filter(pk=route.pk, status=Route.Status.PROVISIONING).update(
            status=Route.Status.FAILED_TO_START,
            error={"kind": kind, "message": message, **extra},
            pull_progress={},
            container_id="",
            updated_at=timezone.now(),
        )
        if updated:
            if counted:
                endpoint.count_failed_start()
            events.record_event(
                endpoint,
                "route_failed",
                f"Replica {str(route.pk)[:8]} failed to start: {message}",
                level="error",
                route_id=route.pk,
                data={"kind": kind},
            )
            endpoint_id = str(endpoint.pk)
            transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))
            transaction.on_commit(lambda: dispatch.enqueue_reconcile(endpoint_id))


def start_route(route_id: str) -> None:
    """Start the container of a provisioning route placed on this node. Idempotent."""
    route = Route.objects.select_related("endpoint", "endpoint__model_folder", "node").filter(pk=route_id).first()
    if route is None or route.status != Route.Status.PROVISIONING:
        return
    # Claim: exactly one delivery of this task starts a container. (The claim's time tells a start
    # under way from one a previous worker died in: recover_interrupted_starts.)
    if not Route.objects.filter(pk=route.pk, container_id="", status=Route.Status.PROVISIONING).update(
        container_id=STARTING_MARK, updated_at=timezone.now()
    ):
        return
    try:
        spec, health_config = replicas.build_spec(route)
    except replicas.SpecError as exc:
        _fail_start(route, exc.kind, str(exc), **exc.extra)
        return
    engine = get_engine()
    share_node_addresses(engine)  # this may be a forked worker, whose engine knows no other node yet
    unavailable = report_unavailable(engine)
    if unavailable:
        # Placed before a heartbeat told the scheduler (a Swarm node drained meanwhile): the row now
        # says so, and the reconcile this sends places the replacement on another node. Not the
        # service's fault, so not counted towards giving up.
        message = f"node {node_name()} can take no new replicas now: {unavailable}."
        _fail_start(route, "node_unavailable", message, counted=False)
        return
    try:
        _pull_image(engine, route, spec.image)
        info = engine.start(spec)
    except EngineError as exc:
        kind = "image" if exc.__class__.__name__ == "ImageNotFound" else "engine"
        _fail_start(route, kind, str(exc))
        return
    failpoints.crash_point("node.started")
    now = timezone.now()
    with transaction.atomic():
        updated = Route.objects.filter(pk=route.pk, status=Route.Status.PROVISIONING).update(
            container_id=info.replica_id,
            host=info.host,
            port=info.port,
            status=Route.Status.DEGRADED,
            started_at=now,
            updated_at=now,
            error={},
            pull_progress={},
            consecutive_failures=0,
            health_check=health_config.to_json(),
        )
        if not updated:
            # Drained while we were starting it: do not leave it running.
            transaction.on_commit(lambda: stop_quietly(engine, info.replica_id))
            return
        events.record_event(
            route.endpoint,
            "route_started",
            f"Replica {str(route.pk)[:8]} started on node {node_name()} at {info.host}:{info.port}.",
            route_id=route.pk,
        )
        record_start_warnings(
            route, info, f"Replica {str(route.pk)[:8]}", spec.definition_warnings, spec.environ_warnings
        )
        endpoint_id = str(route.endpoint_id)
        transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))
        transaction.on_commit(prober.refresh_soon)  # probe it from now on, not at the next re-read
        # Cluster mode: the subs start now that main has an address they can be given.
        for member in RouteMember.objects.filter(route=route, status=RouteMember.Status.PENDING).select_related("node"):
            transaction.on_commit(lambda member=member: dispatch.send_member_start(member))  # type: ignore[misc]


def _pull_image(engine: Engine, route: Route, image: str) -> None:
    """An engine that pulls images (Docker's ``ensure_image``) has it before the start, the bytes
    on the route meanwhile and the time it took in the event log."""
    ensure_image = getattr(engine, "ensure_image", None)
    if ensure_image is None:
        return
    progress = _PullProgress(route)
    seconds = ensure_image(image, progress)
    if seconds is None:
        return
    telemetry.count_pull(node_name(), progress.done, seconds)
    events.record_event(
        route.endpoint,
        "image_pulled",
        f"Replica {str(route.pk)[:8]}: node {node_name()} pulled the image {image} in {seconds:.1f} s.",
        route_id=route.pk,
        data={"image": image, "seconds": round(seconds, 3)},
    )


def recover_interrupted_starts(before: datetime) -> int:
    """Starts a previous worker of this node claimed and never finished (killed half-way): stop what
    they may have left running and start them again. Called once as the node worker starts, for
    claims made before this worker process began (one node worker per node, docs/architecture.md), so a start
    under way is never taken. Returns how many were restarted."""

    engine = get_engine()
    restarted = 0
    stale = Route.objects.filter(
        node__name=node_name(), status=Route.Status.PROVISIONING, container_id=STARTING_MARK, updated_at__lt=before
    ).select_related("node")
    for route in stale:
        for info in engine.list({LABEL_ROUTE: str(route.pk)}):
            stop_quietly(engine, info.replica_id)
        if Route.objects.filter(pk=route.pk, container_id=STARTING_MARK, updated_at=route.updated_at).update(
            container_id="", updated_at=timezone.now()
        ):
            log.warning("route %s: its start was interrupted (its worker stopped); starting it again", route.pk)
            dispatch.send_start(route)
            restarted += 1
    return restarted


def stop_route(route_id: str) -> None:
    """Stop a terminating route's container and delete the row. Idempotent; never stuck."""

    route = Route.objects.select_related("endpoint").filter(pk=route_id).first()
    if route is None or route.status != Route.Status.TERMINATING:
        return
    engine = get_engine()
    error = ""
    if route.container_id and route.container_id != STARTING_MARK:
        try:
            engine.stop(route.container_id, grace=settings.REPLICA_STOP_GRACE)
        except ReplicaNotFound:
            pass
        except EngineError as exc:
            error = str(exc)
            log.warning("stop of route %s: %s", route_id, exc)
    failpoints.crash_point("node.stopped")
    endpoint = route.endpoint
    # Cluster mode: every sub member is stopped by its own node. Should a message be lost, the member
    # is an orphan of that node's sweep once this row (and its members with it) is gone.
    for member in RouteMember.objects.filter(route=route).exclude(container_id="").select_related("node"):
        dispatch.send_member_stop(member)
    Route.objects.filter(pk=route.pk, status=Route.Status.TERMINATING).delete()
    events.record_event(
        endpoint,
        "route_stopped",
        f"Replica {route_id[:8]} stopped" + (f" (engine said: {error})" if error else "") + ".",
        level="warning" if error else "info",
        route_id=route_id,
    )
    endpoint_id = str(endpoint.pk)
    events.after_routes_changed(endpoint_id)
    dispatch.enqueue_reconcile(endpoint_id)  # e.g. a terminating service becomes destroyed
