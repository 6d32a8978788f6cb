"""Reconciliation (S4.3-S4.6): desired replicas vs the routes that exist -> a plan -> execution.

``serving.core.planning.plan()`` is pure: it looks at plain views of an endpoint and its routes and
says which routes to create, drain or forget, and whether the endpoint is now destroyed. This
module is the thin shell around it: ``reconcile()`` locks the endpoint row, feeds ``plan()``, writes
the rows and sends engine work to the nodes' queues after commit. It is idempotent and safe to run
on several workers at once (the row lock serialises planners; route status changes are
compare-and-set) and safe to kill at any line.
The beat's tick (``reconcile_many``) runs the same shell over batches of endpoints, one transaction
per batch, so that its cost is a few queries per batch rather than a dozen per endpoint.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from serving import failpoints
from serving.bus import dispatch, events, telemetry
from serving.control import revisions, scheduler
from serving.core.planning import PROVISION_TIMEOUT, EndpointView, Plan, RouteView, plan
from serving.models import Endpoint, Node, Revision, Route, RouteMember, ServiceEvent

log = logging.getLogger(__name__)

# A replica that served traffic is stopped this long after it left the routing table, so every proxy
# has dropped it and requests already inside it can finish (rolling updates lose no request).
DRAIN_DELAY = 1.0


# --- the shell -----------------------------------------------------------------------------------


def _node_states(now: datetime) -> tuple[set[int], dict[int, datetime]]:
    """The ids of the alive nodes, and for every other node since when it counts as lost."""
    alive: set[int] = set()
    lost: dict[int, datetime] = {}
    for node in Node.objects.all():
        if node.is_alive(now):
            alive.add(node.pk)
        elif node.lost_at is not None:
            lost[node.pk] = node.lost_at
        elif node.heartbeat_at is not None:
            lost[node.pk] = node.heartbeat_at + timedelta(seconds=settings.NODE_LOST_AFTER)
    return alive, lost


def _waiting_for_members(route_ids: list[Any]) -> set[str]:
    """The cluster routes (among ``route_ids``) with a sub member that does not run."""
    return {
        str(pk)
        for pk in RouteMember.objects.filter(route_id__in=route_ids)
        .exclude(status=RouteMember.Status.RUNNING)
        .values_list("route_id", flat=True)
        .distinct()
    }


def _member_nodes(route_ids: list[Any]) -> dict[str, list[int]]:
    """The nodes of the cluster routes' sub members, by route id."""
    out: dict[str, list[int]] = {}
    for route_id, node_id in RouteMember.objects.filter(route_id__in=route_ids, node__isnull=False).values_list(
        "route_id", "node_id"
    ):
        out.setdefault(str(route_id), []).append(node_id)
    return out


def _node_state(node_ids: list[int | None], alive: set[int], lost: dict[int, datetime]) -> tuple[bool, datetime | None]:
    """Whether every node of a route (main's and its members') is alive, and since when one is lost:
    a cluster replica with a member on a lost node is as gone as one whose main's node is lost."""
    placed = [n for n in node_ids if n is not None]
    dead = [n for n in placed if n not in alive]
    since = [lost[n] for n in dead if n in lost]
    return not dead, (min(since) if since else None)


def _members_waiting_since(route_id: str, started_at: datetime | None, waiting: set[str]) -> datetime | None:
    return started_at if started_at is not None and route_id in waiting else None


def _views(
    endpoint: Endpoint,
    routes: list[Route],
    alive_nodes: set[int],
    lost_nodes: dict[int, datetime] | None = None,
    waiting: set[str] | None = None,
    member_nodes: dict[str, list[int]] | None = None,
) -> tuple[EndpointView, list[RouteView]]:
    """The plan's inputs for one endpoint. ``waiting`` and ``member_nodes`` (``_waiting_for_members``
    and ``_member_nodes`` of a set of routes holding these) are read here when not given."""
    ev = EndpointView(
        lifecycle=endpoint.lifecycle,
        desired=endpoint.desired_replicas,
        spec_version=endpoint.spec_version,
        gave_up=endpoint.gave_up,
        traffic=traffic_view(endpoint.traffic),
        staged=staged_view(endpoint.rollout),
    )
    route_ids = [r.pk for r in routes]
    if waiting is None:
        waiting = _waiting_for_members(route_ids) if routes else set()
    mine_waiting = any(str(pk) in waiting for pk in route_ids)
    if not (mine_waiting or endpoint.cluster_size > 1):
        member_nodes = {}
    elif member_nodes is None:
        member_nodes = _member_nodes(route_ids)
    rvs = []
    for r in routes:
        # A route not yet placed (no node) is not "on a lost node".
        node_alive, lost_since = _node_state(
            [r.node_id, *member_nodes.get(str(r.pk), [])], alive_nodes, lost_nodes or {}
        )
        rvs.append(
            RouteView(
                id=str(r.pk),
                status=r.status,
                spec_version=r.spec_version,
                node_alive=node_alive,
                created_at=r.created_at,
                updated_at=r.updated_at,
                started=bool(r.container_id),
                lost_since=lost_since,
                members_waiting_since=_members_waiting_since(str(r.pk), r.started_at, waiting),
            )
        )
    return ev, rvs


def traffic_view(traffic: Any) -> tuple[tuple[int, int], ...]:
    """Endpoint.traffic ({"<n>": percent}) as the planner reads it."""
    return tuple(sorted((int(n), int(share)) for n, share in (traffic or {}).items()))


def staged_view(rollout: Any) -> int:
    """The blue-green revision waiting for its replicas to be healthy, or 0."""
    rollout = rollout or {}
    return int(rollout.get("revision", 0)) if rollout.get("strategy") == "blue_green" else 0


@telemetry.timed("modelserve_reconcile_duration_seconds", kind="service")
def reconcile(endpoint_id: str, now: datetime | None = None) -> Plan | None:
    """Make one endpoint's routes match its desired state. Returns the executed plan."""
    return _reconcile_locked([str(endpoint_id)], now or timezone.now(), robust=False).get(str(endpoint_id))


@dataclass
class _Work:
    """One endpoint's executed plan inside a batch, and what to send once it has committed."""

    endpoint: Endpoint
    plan: Plan
    routes: list[Route]
    to_start: list[Route] = field(default_factory=list)
    to_stop: list[tuple[Route, float]] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)  # its routes no longer running here (forgotten, failed, drained)
    placed: list[Route] = field(default_factory=list)
    kick: bool = False  # reconcile again after the commit (the traffic moved)


class _Placer:
    """The batch's new routes: per resource group one locked read of its nodes and of what they
    hold (``scheduler.NodePool``), every placement added to it; the rows are written together."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.pools: dict[str, scheduler.NodePool] = {}
        self.routes: list[Route] = []
        self.members: list[RouteMember] = []

    @staticmethod
    def group_of(endpoint: Endpoint) -> str:
        return endpoint.resource_group or "default"

    def lock(self, endpoints: list[Endpoint]) -> None:
        """Lock the nodes of every group these endpoints place in, groups in name order: two
        batches that took them in the order of their first placement would deadlock."""
        for group in sorted({self.group_of(e) for e in endpoints}):
            if group not in self.pools:
                self.pools[group] = scheduler.NodePool(group, self.now)

    def pool(self, endpoint: Endpoint) -> scheduler.NodePool:
        group = self.group_of(endpoint)
        if group not in self.pools:
            self.pools[group] = scheduler.NodePool(group, self.now)
        return self.pools[group]

    def save(self) -> None:
        Route.objects.bulk_create(self.routes)
        RouteMember.objects.bulk_create(self.members)


def _reconcile_locked(endpoint_ids: list[str], now: datetime, *, robust: bool) -> dict[str, Plan]:
    """Reconcile a batch of endpoints in one transaction: their rows locked and read together,
    each planned on its own (``plan``), every release (forget, fail, drain) done before any
    placement, and the new routes and the events written in bulk. Engine work and routing updates
    are sent after the commit, endpoint by endpoint; ``robust``: one endpoint's failing send does not
    stop the others' (the batch of the tick), else it propagates (one endpoint, as a task)."""
    results: dict[str, Plan] = {}
    with transaction.atomic():
        endpoints = list(
            Endpoint.objects.select_for_update(no_key=True)
            .filter(pk__in=endpoint_ids)
            .exclude(lifecycle=Endpoint.Lifecycle.DESTROYED)
            .order_by("pk")  # one lock order for every batch
        )
        if not endpoints:
            return results
        routes_of: dict[Any, list[Route]] = {e.pk: [] for e in endpoints}
        for route in Route.objects.filter(endpoint__in=endpoints).select_related("node"):
            routes_of[route.endpoint_id].append(route)
        route_ids = [r.pk for routes in routes_of.values() for r in routes]
        waiting = _waiting_for_members(route_ids) if route_ids else set()
        clustered = waiting or any(e.cluster_size > 1 for e in endpoints)
        member_nodes = _member_nodes(route_ids) if route_ids and clustered else {}
        alive, lost = _node_states(now)
        lines: list[ServiceEvent] = []
        batch: list[_Work] = []
        for endpoint in endpoints:
            routes = routes_of[endpoint.pk]
            ev, rvs = _views(endpoint, routes, alive, lost, waiting, member_nodes)
            work = _Work(endpoint, plan(ev, rvs, now), routes)
            results[str(endpoint.pk)] = work.plan
            if not work.plan.is_empty():
                _release(work, alive, now, lines)
                _move_traffic(work, lines)
                batch.append(work)
        placer = _Placer(now)
        placer.lock([work.endpoint for work in batch if work.plan.create or work.plan.create_for])
        for work in batch:
            wanted = [(work.endpoint.spec_version, work.plan.create), *work.plan.create_for.items()]
            for version, count in wanted:
                for _ in range(count):
                    placed = _place_route(work, placer, now, lines, version)
                    if placed is None:
                        break  # no node is alive: a later tick places them once one reports in
                    if placed.status == Route.Status.PROVISIONING:
                        work.to_start.append(placed)
        placer.save()
        ServiceEvent.objects.bulk_create(lines)
        for work in batch:
            transaction.on_commit(partial(_after_commit, work), robust=robust)
    return results


def _release(work: _Work, alive: set[int], now: datetime, lines: list[ServiceEvent]) -> None:
    """Execute the plan's parts that free or stop routes (and the endpoint's end), not placements."""

    endpoint, result = work.endpoint, work.plan
    by_id = {str(r.pk): r for r in work.routes}
    for route_id in result.forget:
        route = by_id[route_id]
        lost_member = next(
            (m for m in route.members.select_related("node") if m.node is not None and m.node_id not in alive),
            None,
        )
        if route.node is not None and route.node_id not in alive:
            reason = f"its node {route.node.name} was lost (no heartbeat); a new replica is placed on another node"
        elif lost_member is not None and lost_member.node is not None:
            # The other members become orphans of their nodes' sweeps once the row is gone.
            reason = (
                f"the node {lost_member.node.name} of its cluster member {lost_member.host_name} was lost "
                "(no heartbeat); a new replica is placed on nodes that are alive"
            )
        else:
            reason = "its stop was never confirmed"
        lines.append(
            events.new_event(
                endpoint,
                "route_forgotten",
                f"Replica {route_id[:8]} removed: {reason}.",
                level="warning",
                route_id=route.pk,
            )
        )
        Route.objects.filter(pk=route.pk).delete()
        work.gone.add(route_id)
    for route_id in result.fail:
        if Route.objects.filter(pk=route_id, status=Route.Status.PROVISIONING).update(
            status=Route.Status.FAILED_TO_START,
            error={
                "kind": "timeout",
                "message": "The node did not start this replica within "
                f"{int(PROVISION_TIMEOUT.total_seconds())} s; its worker may be down.",
            },
        ):
            endpoint.count_failed_start()
            lines.append(
                events.new_event(
                    endpoint,
                    "route_failed",
                    f"Replica {route_id[:8]} was never started by its node.",
                    level="error",
                    route_id=route_id,
                )
            )
        work.gone.add(route_id)
    for route_id in result.drain:
        route = by_id[route_id]
        if Route.objects.filter(pk=route.pk, status=route.status).update(
            status=Route.Status.TERMINATING, updated_at=now
        ):
            work.to_stop.append((route, DRAIN_DELAY if route.status == Route.Status.HEALTHY else 0.0))
            lines.append(
                events.new_event(
                    endpoint,
                    "route_draining",
                    f"Replica {route_id[:8]} ({route.status}) is being stopped.",
                    route_id=route.pk,
                )
            )
        work.gone.add(route_id)
    work.to_stop.extend((by_id[r], 0.0) for r in result.resend_stop)
    for route_id in result.resend_start:
        # updated_at marks the resend: the next one waits START_RESEND_AFTER again.
        if Route.objects.filter(pk=route_id, status=Route.Status.PROVISIONING, container_id="").update(updated_at=now):
            work.to_start.append(by_id[route_id])
    if result.destroyed:
        Endpoint.objects.filter(pk=endpoint.pk).update(
            lifecycle=Endpoint.Lifecycle.DESTROYED, destroyed_at=now, updated_at=now
        )
        lines.append(
            events.new_event(endpoint, "destroyed", f"Service {endpoint.name!r} terminated; every replica is stopped.")
        )


def _move_traffic(work: _Work, lines: list[ServiceEvent]) -> None:
    """A blue-green revision all healthy gets all the traffic; a broken canary is rolled back
    (issue 16). Either way the plan's placements are dropped: the next reconcile (sent after the
    commit) plans again from the new shares."""
    endpoint, result = work.endpoint, work.plan
    rollout = dict(endpoint.rollout or {})
    if result.abort:
        result.create, result.create_for = 0, {}
        rolled = revisions.roll_back(endpoint, result.abort)
        if rolled is None:
            return
        lines.append(events.new_event(endpoint, "rolled_back", rolled["message"], level="error", data=rolled["data"]))
        work.kick = True
    elif result.switch_to:
        result.create, result.create_for = 0, {}
        endpoint.traffic = {str(result.switch_to): 100}
        endpoint.rollout = {}
        endpoint.save(update_fields=["traffic", "rollout", "updated_at"])
        lines.append(
            events.new_event(
                endpoint,
                "traffic_moved",
                f"Blue-green: the {endpoint.desired_replicas} replica(s) of revision {result.switch_to} are healthy; "
                f"all traffic moves to it (from revision {rollout.get('stable', '?')}).",
                data={"traffic": endpoint.traffic},
            )
        )
        work.kick = True


def _after_commit(work: _Work) -> None:
    if work.to_start or work.to_stop:
        failpoints.crash_point("reconcile.committed")
    # The routing table first: a drained replica leaves the proxies before it is stopped.
    if not work.plan.is_empty():
        events.after_routes_changed(str(work.endpoint.pk))
    for route in work.to_start:
        dispatch.send_start(route)
    for route, delay in work.to_stop:
        dispatch.send_stop(route, countdown=delay)
    if work.kick:
        dispatch.enqueue_reconcile(str(work.endpoint.pk))


WAITING_EVENT_EVERY = timedelta(minutes=5)


def _wait_for_a_node(endpoint: Endpoint, reason: str, now: datetime, lines: list[ServiceEvent]) -> None:
    """No node of the service's group is alive (or every alive one is unavailable, a drained Swarm
    node): place nothing and say why in its event log, each reason at most every
    WAITING_EVENT_EVERY (a new reason, e.g. the node drained after a restart, is said at once).
    Failing the replicas instead would make a restart of the whole product (workers up before the
    node's first heartbeat) look like failed starts, and count towards MAX_START_FAILURES."""

    if reason.startswith(scheduler.UNAVAILABLE_WAIT):
        message = f"{reason} Its replicas are placed as soon as a node can take them."
    else:
        message = f"{reason} Its replicas are placed as soon as a node reports in."
    said = ServiceEvent.objects.filter(
        endpoint=endpoint, kind="waiting_for_node", message=message, created_at__gte=now - WAITING_EVENT_EVERY
    ).exists()
    if not said and not any(
        line.endpoint_id == endpoint.pk and line.kind == "waiting_for_node" and line.message == message
        for line in lines
    ):
        lines.append(events.new_event(endpoint, "waiting_for_node", message, level="warning"))


def _same_endpoint_routes(work: _Work) -> Counter[int]:
    """The endpoint's running routes per node, as ``scheduler.same_endpoint_routes`` would read them
    now: what this reconcile forgot, failed or drained no longer counts, what it placed does."""
    running = set(scheduler.HOLDING) - {Route.Status.TERMINATING}
    same: Counter[int] = Counter()
    for route in [*work.routes, *work.placed]:
        if route.node_id is not None and str(route.pk) not in work.gone and route.status in running:
            same[route.node_id] += 1
    return same


def _as_revision(endpoint: Endpoint, version: int) -> Endpoint:
    """``endpoint`` as revision ``version`` runs it (a copy), for placing one of its replicas."""
    if version == endpoint.spec_version:
        return endpoint
    revision = Revision.objects.filter(endpoint=endpoint, number=version).first()
    if revision is None:
        return endpoint
    copy = Endpoint.objects.get(pk=endpoint.pk)  # a fresh object: the locked one stays as it is
    revision.apply(copy)
    copy.spec_version = version
    return copy


def _place_route(
    work: _Work, placer: _Placer, now: datetime, lines: list[ServiceEvent], version: int | None = None
) -> Route | None:
    """Create one route on a node chosen by the scheduler, or a failed one saying why (S4.4);
    None when no node is alive to place it on (it waits, see _wait_for_a_node). The row is
    written with the batch's (``_Placer.save``). ``version``: the revision it runs (default: the
    one the service stands on)."""

    endpoint = _as_revision(work.endpoint, version or work.endpoint.spec_version)
    request = scheduler.replica_request(endpoint)
    pool = placer.pool(endpoint)
    if endpoint.cluster_size > 1:
        return _place_cluster_route(work, placer, pool, request, now, lines, endpoint)
    choice = scheduler.choose_node(endpoint, request, now, pool=pool, same=_same_endpoint_routes(work))
    scheduler.count_failure(endpoint, choice.node is None, choice.waiting, choice.reason)
    if choice.waiting:
        _wait_for_a_node(endpoint, choice.reason, now, lines)
        return None
    if choice.node is None:
        route = Route(
            endpoint=work.endpoint,
            spec_version=endpoint.spec_version,
            status=Route.Status.FAILED_TO_START,
            resources=request,
            error={"kind": "resources", "message": choice.reason},
        )
        placer.routes.append(route)
        endpoint.count_failed_start()
        lines.append(events.new_event(endpoint, "route_failed", choice.reason, level="error", route_id=route.pk))
        return route
    route = Route(
        endpoint=work.endpoint,
        node=choice.node,
        spec_version=endpoint.spec_version,
        status=Route.Status.PROVISIONING,
        resources=request,
        devices=choice.devices,
    )
    placer.routes.append(route)
    pool.hold(choice.node, request, choice.devices)
    work.placed.append(route)
    lines.append(
        events.new_event(
            endpoint,
            "route_created",
            f"Replica {str(route.pk)[:8]} placed on node {choice.node.name}.",
            route_id=route.pk,
        )
    )
    return route


def _place_cluster_route(
    work: _Work,
    placer: _Placer,
    pool: scheduler.NodePool,
    request: dict[str, float],
    now: datetime,
    lines: list[ServiceEvent],
    endpoint: Endpoint,
) -> Route | None:
    """A cluster route: the main member on the first chosen node, a RouteMember per sub on the
    others (serving.core.cluster); or a failed route saying what was asked and what is free; None when
    no node is alive. ``endpoint``: as the route's revision runs it."""

    choice = scheduler.choose_nodes(endpoint, request, now, pool=pool, same=_same_endpoint_routes(work))
    scheduler.count_failure(endpoint, not choice.nodes, choice.waiting, choice.reason)
    if choice.waiting:
        _wait_for_a_node(endpoint, choice.reason, now, lines)
        return None
    if not choice.nodes:
        route = Route(
            endpoint=work.endpoint,
            spec_version=endpoint.spec_version,
            status=Route.Status.FAILED_TO_START,
            resources=request,
            error={"kind": "resources", "message": choice.reason},
        )
        placer.routes.append(route)
        endpoint.count_failed_start()
        lines.append(events.new_event(endpoint, "route_failed", choice.reason, level="error", route_id=route.pk))
        return route
    main, *subs = choice.nodes
    route = Route(
        endpoint=work.endpoint,
        node=main,
        spec_version=endpoint.spec_version,
        status=Route.Status.PROVISIONING,
        resources=request,
        devices=choice.devices[0],
    )
    placer.routes.append(route)
    placer.members.extend(
        RouteMember(route=route, idx=i, node=node, resources=request, devices=choice.devices[i])
        for i, node in enumerate(subs, start=1)
    )
    for node, assignment in zip(choice.nodes, choice.devices, strict=True):
        pool.hold(node, request, assignment)
    work.placed.append(route)
    where = ", ".join([f"main1 on {main.name}", *(f"sub{i} on {n.name}" for i, n in enumerate(subs, start=1))])
    lines.append(
        events.new_event(
            endpoint,
            "route_created",
            f"Replica {str(route.pk)[:8]} (cluster of {len(choice.nodes)}) placed: {where}.",
            route_id=route.pk,
        )
    )
    return route


# Endpoints reconciled in one transaction by the tick: few queries per batch instead of a dozen per
# endpoint, and locks held for a bounded time (the batch's rows and its resource groups' nodes).
BATCH = 100


@telemetry.timed("modelserve_reconcile_duration_seconds", kind="tick")
def reconcile_many(endpoint_ids: list[Any], now: datetime | None = None) -> int:
    """Reconcile several endpoints; one failing does not stop the others. Returns how many ran.

    The beat's tick over every endpoint: one unlocked read of all of them and their routes plans
    each (``plan`` is pure and cheap), and only the endpoints whose plan is not empty are
    reconciled, in batches (``_reconcile_locked``), which lock them, read them again and plan again
    before acting. So a steady fleet costs a handful of queries per tick instead of several per
    endpoint, a churned one a handful per batch, and correctness still rests on the locked re-plan
    alone. A batch that fails is rolled back and its endpoints are reconciled one by one.
    """
    now = now or timezone.now()
    done = backlog = 0
    ids = [str(i) for i in endpoint_ids]
    for chunk_start in range(0, len(ids), 2000):  # bounded IN (...) lists and memory
        chunk = ids[chunk_start : chunk_start + 2000]
        try:
            needing = _needing_work(chunk, now)
        except Exception:
            log.exception("the tick's bulk read failed; reconciling each endpoint on its own")
            needing = set(chunk)
        done += len(chunk) - len(needing)
        backlog += len(needing)
        todo = [endpoint_id for endpoint_id in chunk if endpoint_id in needing]
        for batch_start in range(0, len(todo), BATCH):
            batch = todo[batch_start : batch_start + BATCH]
            try:
                _reconcile_locked(batch, timezone.now(), robust=True)
                done += len(batch)
                continue
            except Exception:
                log.exception("the batched reconcile of %d endpoints failed; reconciling each on its own", len(batch))
            for endpoint_id in batch:
                try:
                    reconcile(endpoint_id)
                    done += 1
                except Exception:
                    log.exception("reconcile of endpoint %s failed; the next tick retries", endpoint_id)
    telemetry.set_gauge("modelserve_reconcile_backlog", backlog)
    telemetry.set_gauge("modelserve_reconcile_last_tick_timestamp_seconds", time.time())
    return done


def _needing_work(endpoint_ids: list[str], now: datetime) -> set[str]:
    """The endpoints among ``endpoint_ids`` whose plan (from an unlocked read) is not empty."""
    alive, lost = _node_states(now)
    endpoints = {
        str(pk): EndpointView(
            lifecycle=lifecycle,
            desired=desired,
            spec_version=spec_version,
            gave_up=retries >= settings.MAX_START_FAILURES,
            traffic=traffic_view(traffic),
            staged=staged_view(rollout),
        )
        for pk, lifecycle, desired, spec_version, retries, traffic, rollout in Endpoint.objects.filter(
            pk__in=endpoint_ids
        ).values_list("pk", "lifecycle", "desired_replicas", "spec_version", "retries", "traffic", "rollout")
    }
    routes: dict[str, list[RouteView]] = {key: [] for key in endpoints}
    rows = list(
        Route.objects.filter(endpoint_id__in=endpoint_ids).values_list(
            "pk", "endpoint_id", "status", "spec_version", "node_id", "created_at", "updated_at", "container_id"
        )
    )
    # Only the few cluster routes whose members are not all up; one query for the whole chunk.
    waiting = {
        str(pk)
        for pk in RouteMember.objects.filter(route__endpoint_id__in=endpoint_ids)
        .exclude(status=RouteMember.Status.RUNNING)
        .values_list("route_id", flat=True)
        .distinct()
    }
    started = (
        dict(Route.objects.filter(pk__in=[UUID(k) for k in waiting]).values_list("pk", "started_at")) if waiting else {}
    )
    member_nodes: dict[str, list[int]] = {}
    for route_id, member_node in RouteMember.objects.filter(
        route__endpoint_id__in=endpoint_ids, node__isnull=False
    ).values_list("route_id", "node_id"):
        member_nodes.setdefault(str(route_id), []).append(member_node)
    for pk, endpoint_id, status, spec_version, node_id, created_at, updated_at, container_id in rows:
        node_alive, lost_since = _node_state([node_id, *member_nodes.get(str(pk), [])], alive, lost)
        routes.setdefault(str(endpoint_id), []).append(
            RouteView(
                id=str(pk),
                status=status,
                spec_version=spec_version,
                node_alive=node_alive,
                created_at=created_at,
                updated_at=updated_at,
                started=bool(container_id),
                lost_since=lost_since,
                members_waiting_since=_members_waiting_since(str(pk), started.get(pk), waiting),
            )
        )
    needing = {key for key in endpoint_ids if key not in endpoints}  # vanished: reconcile says so
    for key, view in endpoints.items():
        if view.lifecycle == Endpoint.Lifecycle.DESTROYED:
            continue
        if not plan(view, routes.get(key, []), now).is_empty():
            needing.add(key)
    return needing


def active_endpoint_ids() -> list[Any]:
    return list(Endpoint.objects.live().values_list("pk", flat=True))
