"""The node side: what a node worker does for the routes placed on its node.

Commands (start, stop) arrive as Celery tasks on the queue ``node.<name>``. Besides them, the node
agent (a thread in the node worker, see ``serving.worker``) heartbeats, notices replicas that exited
on their own, stops orphan containers (ours by label, with no route), and probes health.
All state lives in the DB and in the engine's labels, never only in memory (docs/architecture.md).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import Q
from django.utils import timezone

from serving import failpoints
from serving.bus import dispatch, events
from serving.models import Endpoint, Node, Route, RouteMember, ServiceEvent
from serving.node import replicas
from serving.node.engines.base import (
    LABEL_ENDPOINT,
    LABEL_NODE,
    LABEL_ROUTE,
    LABEL_VALIDATION,
    Engine,
    EngineError,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaState,
)

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_lock = threading.Lock()
# Marks a route whose start is in progress on this node (compare-and-set claim on container_id).
STARTING_MARK = "starting"


def node_name() -> str:
    return str(settings.NODE_NAME)


def get_engine() -> Engine:
    """The engine of this node: Docker when a daemon answers (SERVING_ENGINE=auto), else local."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _make_engine(settings.SERVING_ENGINE)
        return _engine


def set_engine(engine: Engine | None) -> None:
    """For tests and tools that bring their own engine instance."""
    global _engine
    with _engine_lock:
        _engine = engine


def _make_engine(choice: str) -> Engine:
    from serving.node.engines.local import LocalEngine

    state_dir = settings.ENGINE_STATE_DIR
    if choice in ("docker", "auto"):
        try:
            from serving.node.engines.docker import DockerEngine
        except ImportError:
            DockerEngine = None  # type: ignore[assignment,misc]
        docker_engine = (
            DockerEngine(
                state_dir=state_dir / "docker",
                installation=settings.REDIS_PREFIX,
                publish_host=settings.NODE_ADDRESS,
                egress=settings.SERVING_REPLICA_EGRESS,
                uid=settings.DOCKER_REPLICA_UID,
                gid=settings.DOCKER_REPLICA_GID,
            )
            if DockerEngine is not None
            else None
        )
        if docker_engine is not None and docker_engine.available():
            return docker_engine
        if choice == "docker":
            raise EngineError("SERVING_ENGINE=docker but no Docker daemon answers; start dockerd or use local.")
    if not ipaddress.ip_address(settings.NODE_ADDRESS).is_loopback:
        log.warning(
            "NODE_ADDRESS=%s: the local engine's replicas are reachable from this machine only (each in a "
            "network namespace of its own); a proxy on another host can not reach them. Use Docker for nodes "
            "on several hosts, or run the proxy on this host.",
            settings.NODE_ADDRESS,
        )
    return LocalEngine(
        state_dir=state_dir / f"local-{node_name()}",
        uid=settings.LOCAL_ENGINE_UID,
        gid=settings.LOCAL_ENGINE_GID,
        egress=settings.SERVING_REPLICA_EGRESS,
    )


# --- registration and heartbeat ------------------------------------------------------------------


def node_capacity() -> dict[str, float]:
    from serving.core import slots

    cpu = settings.NODE_CPU or float(os.cpu_count() or 1)
    if settings.NODE_MEM:
        mem = float(slots.normalize({"mem": settings.NODE_MEM})["mem"])
    else:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    capacity: dict[str, float] = {"cpu": cpu, "mem": mem}
    for item in filter(None, (p.strip() for p in settings.NODE_ACCELERATORS.split(","))):
        key, _, value = item.partition("=")
        capacity.update(slots.normalize({key.strip(): value.strip()}))
    return capacity


def heartbeat(now: datetime | None = None) -> Node:
    """Register this node (first call) or refresh its heartbeat; a lost node comes back."""
    now = now or timezone.now()
    engine = get_engine()
    node, created = Node.objects.get_or_create(
        name=node_name(),
        defaults={
            "address": settings.NODE_ADDRESS,
            "engine": engine.name,
            "resource_group": settings.NODE_RESOURCE_GROUP,
            "capacity": node_capacity(),
            "heartbeat_at": now,
        },
    )
    if not created:
        Node.objects.filter(pk=node.pk).update(
            heartbeat_at=now,
            lost_at=None,
            address=settings.NODE_ADDRESS,
            engine=engine.name,
            capacity=node_capacity(),
            resource_group=settings.NODE_RESOURCE_GROUP,
        )
        node.refresh_from_db()
    share_node_addresses(engine)
    return node


def share_node_addresses(engine: Engine) -> None:
    """Hand the engine every node's address (the Docker engine keeps replicas off all of them, so
    a replica here can not call a replica published on another node past the proxy's tokens).

    Called at every heartbeat (in the node agent's thread of the parent worker) and before every
    start (in whichever forked worker runs it: each process has its own engine, which knows only
    what it was told): the engine re-asserts every rule each time, and drops those of addresses
    no longer in the table."""
    set_addresses = getattr(engine, "set_node_addresses", None)
    if set_addresses is None:
        return
    addresses = Node.objects.exclude(address="").values_list("address", flat=True)
    try:
        set_addresses(list(addresses))
    except EngineError:
        log.exception("could not update the firewall rules for the nodes' addresses; retrying at the next heartbeat")


# --- start and stop ------------------------------------------------------------------------------


def _fail_start(route: Route, kind: str, message: str, **extra: Any) -> None:
    with transaction.atomic():
        # The endpoint first, then its route: the order of the reconcile, which holds a batch of
        # endpoints while it writes their routes (the other order deadlocks against it).
        endpoint = Endpoint.objects.select_for_update(no_key=True).get(pk=route.endpoint_id)
        updated = Route.objects.filter(pk=route.pk, status=Route.Status.PROVISIONING).update(
            status=Route.Status.FAILED_TO_START,
            error={"kind": kind, "message": message, **extra},
            container_id="",
            updated_at=timezone.now(),
        )
        if updated:
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
    from serving.node import prober as health

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
    try:
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
            consecutive_failures=0,
            health_check=health_config.to_json(),
        )
        if not updated:
            # Drained while we were starting it: do not leave it running.
            transaction.on_commit(lambda: _stop_quietly(engine, info.replica_id))
            return
        events.record_event(
            route.endpoint,
            "route_started",
            f"Replica {str(route.pk)[:8]} started on node {node_name()} at {info.host}:{info.port}.",
            route_id=route.pk,
        )
        _record_start_warnings(route, info, f"Replica {str(route.pk)[:8]}")
        endpoint_id = str(route.endpoint_id)
        transaction.on_commit(lambda: events.after_routes_changed(endpoint_id))
        transaction.on_commit(health.refresh_soon)  # probe it from now on, not at the next re-read
        # Cluster mode: the subs start now that main has an address they can be given.
        for member in RouteMember.objects.filter(route=route, status=RouteMember.Status.PENDING).select_related("node"):
            transaction.on_commit(lambda member=member: dispatch.send_member_start(member))  # type: ignore[misc]


def _record_start_warnings(route: Route, info: ReplicaInfo, who: str) -> None:
    """What the engine noticed at start but did not stop for (a read-write mount the replica's
    user can not write): a warning on the service's log, as well as a line in the replica's.
    Once per service and spec version: every replica of a version meets the same folder, and a
    service restarting its replicas would otherwise repeat it at each start."""
    for warning in info.warnings:
        seen = ServiceEvent.objects.filter(
            endpoint_id=route.endpoint_id,
            kind="replica_warning",
            data__spec_version=route.spec_version,
            data__warning=warning,
        )
        if seen.exists():
            continue
        events.record_event(
            route.endpoint,
            "replica_warning",
            f"{who}: {warning}",
            level=ServiceEvent.Level.WARNING,
            route_id=route.pk,
            data={"spec_version": route.spec_version, "warning": warning},
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
            _stop_quietly(engine, info.replica_id)
        if Route.objects.filter(pk=route.pk, container_id=STARTING_MARK, updated_at=route.updated_at).update(
            container_id="", updated_at=timezone.now()
        ):
            log.warning("route %s: its start was interrupted (its worker stopped); starting it again", route.pk)
            dispatch.send_start(route)
            restarted += 1
    return restarted


def _stop_quietly(engine: Engine, replica_id: str) -> None:
    try:
        engine.stop(replica_id, grace=settings.REPLICA_STOP_GRACE)
    except EngineError as exc:
        log.warning("stopping replica %s failed: %s", replica_id, exc)


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


# --- cluster members (serving.cluster) ----------------------------------------------------------


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
            transaction.on_commit(lambda: _stop_quietly(engine, info.replica_id))
            return
        events.record_event(
            route.endpoint,
            "member_started",
            f"Cluster member {host_name} of replica {str(route.pk)[:8]} started on node {node_name()} "
            f"at {info.host}:{info.port}.",
            route_id=route.pk,
        )
        _record_start_warnings(route, info, f"Cluster member {host_name} of replica {str(route.pk)[:8]}")
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
    _stop_quietly(engine, container_id)
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


def _sync_members(engine: Engine, now: datetime) -> int:
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
        tail = _log_tail(engine, member.container_id) if info is not None else ""
        container_id = member.container_id
        fail_cluster_route(
            member.route,
            member,
            "exited",
            f"Cluster member {member.host_name} on node {node_name()} {what}.",
            exit_code=info.exit_code if info is not None else None,
            log_tail=tail,
        )
        _stop_quietly(engine, container_id)  # removes what is left of it
        exited += 1
    return exited


# --- sync: exits and orphans ---------------------------------------------------------------------


def _our_replicas(engine: Engine) -> Iterator[ReplicaInfo]:
    for info in engine.list({LABEL_NODE: node_name()}):
        # A validation's replica is no route's (the Docker engine still gives it a route label, its
        # container name): the validation sweep below ends it once its run is over, never earlier.
        if LABEL_ROUTE in info.labels and LABEL_VALIDATION not in info.labels:
            yield info


def sync(now: datetime | None = None) -> dict[str, int]:
    """Reconcile the engine's view with the DB for this node; returns counts for logs and tests."""
    from serving.node import prober as health

    now = now or timezone.now()
    engine = get_engine()
    counts = {"exited": 0, "orphans": 0, "vanished": 0}
    by_container: dict[str, ReplicaInfo] = {info.replica_id: info for info in _our_replicas(engine)}
    routes = list(
        Route.objects.filter(node__name=node_name())
        .exclude(status__in=[Route.Status.FAILED_TO_START, Route.Status.TERMINATING])
        .exclude(container_id__in=["", STARTING_MARK])
        .select_related("endpoint")
    )
    known = set()
    for route in routes:
        known.add(route.container_id)
        info = by_container.get(route.container_id)
        if info is None:
            try:
                info = engine.inspect(route.container_id)
            except ReplicaNotFound:
                info = None
        if info is None or info.state in (ReplicaState.EXITED, ReplicaState.GONE):
            tail = _log_tail(engine, route.container_id) if info is not None else ""
            health.record_exit(route, info, tail, now)
            counts["exited" if info is not None else "vanished"] += 1
    counts["exited"] += _sync_members(engine, now)
    # Orphans: our label, this node, but no route (or not the route's current container), nor a
    # cluster member of one.
    live_ids = set(
        Route.objects.filter(node__name=node_name()).exclude(container_id="").values_list("container_id", flat=True)
    ) | set(
        RouteMember.objects.filter(node__name=node_name())
        .exclude(container_id="")
        .values_list("container_id", flat=True)
    )
    from serving.node import dryrun as validation

    for info in engine.list({LABEL_NODE: node_name()}):
        run_id = info.labels.get(LABEL_VALIDATION)
        if run_id and validation.finish_if_abandoned(run_id):
            log.warning("stopping the replica of finished validation %s", run_id)
            _stop_quietly(engine, info.replica_id)
            counts["orphans"] += 1
    for replica_id, info in by_container.items():
        if replica_id not in live_ids:
            # Started moments ago by a start task that has not written its row yet? The claim mark
            # tells: leave replicas of routes still marked as starting alone, and look at the row
            # again now: the start may have recorded this very replica since live_ids was read (it
            # replaces the mark with the replica's id in one update, so one of the two holds).
            # Once the route failed or went, the replica of a start that crashed half-way is an
            # orphan like any other.
            route_id = info.labels.get(LABEL_ROUTE, "")
            if _is_uuid(route_id) and (
                Route.objects.filter(pk=route_id)
                .filter(Q(container_id=replica_id) | Q(container_id=STARTING_MARK, status=Route.Status.PROVISIONING))
                .exists()
                or RouteMember.objects.filter(route_id=route_id)
                .filter(Q(container_id=replica_id) | Q(status=RouteMember.Status.STARTING))
                .exists()
            ):
                continue
            log.warning(
                "stopping orphan replica %s (route %s, endpoint %s)",
                replica_id,
                route_id,
                info.labels.get(LABEL_ENDPOINT),
            )
            _stop_quietly(engine, replica_id)
            counts["orphans"] += 1
    return counts


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _log_tail(engine: Engine, replica_id: str, lines: int = 20) -> str:
    try:
        return "\n".join(list(engine.logs(replica_id, tail=lines))[-lines:])
    except EngineError:
        return ""


# --- the agent thread ----------------------------------------------------------------------------


class NodeAgent(threading.Thread):
    """Heartbeat + sync every NODE_HEARTBEAT_INTERVAL, and the health prober, until stopped."""

    def __init__(self, worker_started: datetime | None = None) -> None:
        super().__init__(name=f"node-agent-{node_name()}", daemon=True)
        # Starts claimed before this are a dead worker's (see recover_interrupted_starts).
        self.worker_started = worker_started
        self.stopping = threading.Event()
        self.prober: Any = None
        self.listener: Any = None

    def run(self) -> None:
        from serving.node import prober as health

        self.prober = health.Prober(node_name())
        self.prober.start()
        # Log requests from the web and the proxies' failure reports (serving.nodebus).
        from serving.node.nodebus import NodeListener

        self.listener = NodeListener(node_name(), self.prober)
        self.listener.start()
        # Kernel and inference metrics of this node's replicas, every METRICS_INTERVAL (serving.metrics).
        from serving.bus.metrics import NodeSampler

        sampler = NodeSampler(node_name())
        sampler.start()
        if self.worker_started is not None:
            try:
                recover_interrupted_starts(self.worker_started)
            except Exception:
                log.exception("recovering interrupted starts failed; the start timeout will fail them")
        while not self.stopping.is_set():
            try:
                close_old_connections()
                heartbeat()
                sync()
            except Exception:
                log.exception("node agent tick failed; retrying")
            self.stopping.wait(settings.NODE_HEARTBEAT_INTERVAL)
        sampler.stop()
        self.listener.stop()
        self.prober.stop()

    def stop(self) -> None:
        self.stopping.set()
