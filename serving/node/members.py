"""Cluster members on this node (S4.1, ``serving.core.cluster``): a sub member starts once its main runs,
and a member that fails or exits fails its whole route, which is then replaced.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from serving.bus import dispatch, events
from serving.models import STARTING_MARK, Endpoint, Node, Route, RouteMember
from serving.node import replicas
from serving.node.engine import (
    get_engine,
    log_tail,
    node_name,
    record_start_warnings,
    share_node_addresses,
    stop_quietly,
)
from serving.node.engines.base import LABEL_ROUTE, Engine, EngineError, ReplicaInfo, ReplicaNotFound, ReplicaState

log = logging.getLogger(__name__)


def start_member(member_id: str) -> None:
    """Start a sub member of a cluster route placed on this node, once its main runs. Idempotent."""

    member = (
        RouteMember.objects.select_related("route", "route__endpoint", "route__endpoint__model_folder", "node")
        .filter(pk=member_id)
        .first()
    )
    if member is None or member.status != RouteMember.Status.PENDING:
        return
    route = member.route
    if route.status not in (Route.Status.DEGRADED, Route.Status.HEALTHY) or not route.address:
        return  # main is not running (any more): nothing to join; the route's own failure handles it
    if not RouteMember.objects.filter(pk=member.pk, status=RouteMember.Status.PENDING).update(
        status=RouteMember.Status.STARTING, container_id=STARTING_MARK, updated_at=timezone.now()
    ):
        return
    host_name = member.host_name
    try:
        spec, _ = replicas.build_spec(route, member, addresses={"main1": route.address})
    except replicas.SpecError as exc:
        fail_cluster_route(route, member, exc.kind, f"Cluster member {host_name} could not be built: {exc}")
        return
    engine = get_engine()
    share_node_addresses(engine)  # this may be a forked worker, whose engine knows no other node yet
    try:
        info = engine.start(spec)
    except EngineError as exc:
        fail_cluster_route(
            route, member, "engine", f"Cluster member {host_name} failed to start on {node_name()}: {exc}"
        )
        return
    now = timezone.now()
    with transaction.atomic():
        updated = RouteMember.objects.filter(pk=member.pk, status=RouteMember.Status.STARTING).update(
            status=RouteMember.Status.RUNNING,
            container_id=info.replica_id,
            host=info.host,
            port=info.port,
            started_at=now,
            updated_at=now,
            error={},
        )
        if not updated:
            # Its route was stopped or failed while we were starting it: do not leave it running.
            transaction.on_commit(lambda: stop_quietly(engine, info.replica_id))
            return
        events.record_event(
            route.endpoint,
            "member_started",
            f"Cluster member {host_name} of replica {str(route.pk)[:8]} started on node {node_name()} "
            f"at {info.host}:{info.port}.",
            route_id=route.pk,
        )
        record_start_warnings(route, info, f"Cluster member {host_name} of replica {str(route.pk)[:8]}")
        endpoint_id = str(route.endpoint_id)
        transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))


def stop_member(route_id: str, container_id: str) -> None:
    """Stop one sub member's container on this node, if it is that route's (labels say). Idempotent."""
    engine = get_engine()
    try:
        info = engine.inspect(container_id)
    except ReplicaNotFound:
        return
    except EngineError as exc:
        log.warning("inspecting cluster member %s failed: %s", container_id, exc)
        return
    if info.labels.get(LABEL_ROUTE) != route_id:
        return
    stop_quietly(engine, container_id)
    RouteMember.objects.filter(route_id=route_id, container_id=container_id).update(
        status=RouteMember.Status.EXITED, container_id="", updated_at=timezone.now()
    )


def fail_cluster_route(route: Route, member: RouteMember, kind: str, message: str, **extra: Any) -> None:
    """A member of a cluster route failed to start or died: the whole route fails and is replaced.

    A route that never was healthy becomes ``failed_to_start`` (it counts as a failed start, S4.4)
    and all its containers are stopped at once; one that served is drained like any exited replica
    (``terminating``: its node stops main and sends every sub its stop).
    """
    now = timezone.now()
    live = [Route.Status.PROVISIONING, Route.Status.DEGRADED, Route.Status.HEALTHY, Route.Status.UNHEALTHY]
    error = {"kind": kind, "message": message, "member": member.host_name, **extra}
    never_healthy = route.healthy_since is None
    with transaction.atomic():
        # The endpoint first, then its rows: the reconcile's lock order (see _fail_start).
        endpoint = Endpoint.objects.select_for_update(no_key=True).get(pk=route.endpoint_id)
        RouteMember.objects.filter(pk=member.pk).update(
            status=RouteMember.Status.FAILED, error=error, container_id="", updated_at=now
        )
        fields: dict[str, Any] = {"status": Route.Status.TERMINATING, "error": error, "updated_at": now}
        if never_healthy:
            fields.update(status=Route.Status.FAILED_TO_START, container_id="")
        if not Route.objects.filter(pk=route.pk, status__in=live).update(**fields):
            return  # already failed, stopping or gone: whoever did that stops the members
        if never_healthy:
            endpoint.count_failed_start()
        events.record_event(
            endpoint,
            "route_failed" if never_healthy else "route_exited",
            f"Replica {str(route.pk)[:8]}: {message} The whole replica is replaced.",
            level="error",
            route_id=route.pk,
            data={"kind": kind, "member": member.host_name},
        )
        endpoint_id = str(endpoint.pk)
        if never_healthy:
            stop_all_members(route, main_container=route.container_id)
        else:
            transaction.on_commit(lambda: dispatch.send_stop(Route.objects.select_related("node").get(pk=route.pk)))
        transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))
        transaction.on_commit(lambda: dispatch.enqueue_reconcile(endpoint_id))


def stop_all_members(route: Route, main_container: str = "") -> None:
    """Inside a transaction: after commit, stop the main container (when given) and every sub member
    of ``route`` on their nodes, and forget their containers (a failed route keeps its row)."""

    members = list(RouteMember.objects.filter(route=route).exclude(container_id="").select_related("node"))
    # Every member leaves pending/starting/running: a start under way then finds its row changed and
    # stops what it started, and a pending one is never started.
    RouteMember.objects.filter(route=route).exclude(status=RouteMember.Status.FAILED).update(
        status=RouteMember.Status.EXITED, container_id="", updated_at=timezone.now()
    )
    route_id = str(route.pk)
    main_node = Node.objects.filter(pk=route.node_id).first() if route.node_id is not None else None
    for member in members:
        if member.container_id != STARTING_MARK:
            transaction.on_commit(lambda member=member: dispatch.send_member_stop(member))  # type: ignore[misc]
    if main_container and main_container != STARTING_MARK and main_node is not None:
        transaction.on_commit(lambda: dispatch.send_container_stop(main_node, route_id, main_container))


def sync_members(engine: Engine, now: datetime) -> int:
    """Sub members on this node whose container ended on its own fail their whole route."""
    exited = 0
    members = RouteMember.objects.filter(
        node__name=node_name(),
        status=RouteMember.Status.RUNNING,
        route__status__in=[Route.Status.DEGRADED, Route.Status.HEALTHY, Route.Status.UNHEALTHY],
    ).select_related("route")
    for member in members:
        try:
            info: ReplicaInfo | None = engine.inspect(member.container_id)
        except ReplicaNotFound:
            info = None
        if info is not None and info.state not in (ReplicaState.EXITED, ReplicaState.GONE):
            continue
        if info is None:
            what = "disappeared"
        else:
            what = info.error or f"exited with code {info.exit_code}"
        tail = log_tail(engine, member.container_id) if info is not None else ""
        container_id = member.container_id
        fail_cluster_route(
            member.route,
            member,
            "exited",
            f"Cluster member {member.host_name} on node {node_name()} {what}.",
            exit_code=info.exit_code if info is not None else None,
            log_tail=tail,
        )
        stop_quietly(engine, container_id)  # removes what is left of it
        exited += 1
    return exited
