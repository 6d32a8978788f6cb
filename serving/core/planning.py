r"""The reconciliation planner (S4.3-S4.6), pure: plain views of an endpoint and its routes -> a plan.

``plan()`` looks at an ``EndpointView`` and its ``RouteView``\ s and says which routes to create,
drain or forget, and whether the endpoint is now destroyed. It reads no database, no clock (``now``
is given) and no Django: the shell that locks the rows, builds the views, writes the plan and sends
the engine work is ``serving.control.lifecycle``. The statuses it compares are plain strings
(``RouteStatus``, ``EndpointLifecycle``); ``serving.models`` takes its choices' values from them, so
the two can not drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from serving.core.revisions import replicas_for_share


class RouteStatus:
    """A route's statuses, as stored (``serving.models.Route.Status`` takes its values from here)."""

    PROVISIONING = "provisioning"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DEGRADED = "degraded"  # started, inside initial_delay or not yet checked
    TERMINATING = "terminating"
    FAILED_TO_START = "failed_to_start"


class EndpointLifecycle:
    """An endpoint's lifecycle, as stored (``serving.models.Endpoint.Lifecycle`` takes its values from here)."""

    CREATED = "created"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


# A route the node never picked up (worker gone between commit and enqueue, queue lost) fails.
PROVISION_TIMEOUT = timedelta(seconds=180)
# A provisioning route no node has claimed gets its start re-sent (a worker that died between the
# commit and the enqueue sent none); starting is idempotent: the node claims a route once.
START_RESEND_AFTER = timedelta(seconds=10)
# A terminating route whose stop was not confirmed gets its stop re-sent; after the give-up time
# the row is forgotten (the node's orphan sweep stops a container that may remain).
STOP_RESEND_AFTER = timedelta(seconds=30)
STOP_GIVE_UP_AFTER = timedelta(seconds=180)
# A healthy replica on a lost node keeps serving this long at most while its replacements start: a
# node is "lost" when its *worker* is silent, and replicas outlive their worker (a worker crash, a
# control-plane outage). The proxies retry elsewhere if it is really gone.
STRANDED_GRACE = timedelta(seconds=120)
# A canary (or a blue-green revision waiting for traffic) with this many replicas that failed to
# start or went unhealthy is rolled back by itself (issue 16, automatic rollback).
CANARY_FAILURES = 2

LIVE = frozenset({RouteStatus.PROVISIONING, RouteStatus.DEGRADED, RouteStatus.HEALTHY, RouteStatus.UNHEALTHY})
NOT_READY = frozenset({RouteStatus.PROVISIONING, RouteStatus.DEGRADED})


@dataclass(frozen=True)
class RouteView:
    id: str
    status: str
    spec_version: int
    node_alive: bool
    created_at: datetime
    updated_at: datetime
    started: bool = False  # the node has started (or is starting) its container
    lost_since: datetime | None = None  # when its node was lost (None: the node is alive)
    # Cluster mode: since when its main runs while a sub member does not (None: all run, or none yet).
    members_waiting_since: datetime | None = None


@dataclass(frozen=True)
class EndpointView:
    lifecycle: str
    desired: int
    spec_version: int
    gave_up: bool
    # Revision shares (issue 16): ((revision, percent), ...); empty: rolling, every healthy replica
    # of any revision serves and the older ones are replaced one at a time (S4.5).
    traffic: tuple[tuple[int, int], ...] = ()
    # Blue-green: the revision that gets all of ``desired`` before any traffic moves to it (0: none).
    staged: int = 0


@dataclass
class Plan:
    create: int = 0
    drain: list[str] = field(default_factory=list)  # -> terminating, then the node stops it
    forget: list[str] = field(default_factory=list)  # delete the row now (node lost, stop gave up)
    resend_stop: list[str] = field(default_factory=list)
    resend_start: list[str] = field(default_factory=list)  # provisioning, never claimed by its node
    fail: list[str] = field(default_factory=list)  # provisioning that never started
    destroyed: bool = False
    # Split mode (EndpointView.traffic): replicas of revisions other than spec_version to create.
    create_for: dict[int, int] = field(default_factory=dict)
    switch_to: int = 0  # blue-green: the staged revision is all healthy, move all traffic to it
    abort: str = ""  # the canary is broken: roll it back, saying why

    def is_empty(self) -> bool:
        return not (
            self.create
            or self.create_for
            or self.switch_to
            or self.abort
            or self.drain
            or self.forget
            or self.resend_stop
            or self.resend_start
            or self.fail
            or self.destroyed
        )


def _drain_order(route: RouteView) -> tuple[int, float]:
    """Which extra replica goes first: unhealthy, then not yet ready, then the newest healthy."""
    ranks: dict[str, int] = {RouteStatus.UNHEALTHY: 0, RouteStatus.PROVISIONING: 1, RouteStatus.DEGRADED: 2}
    rank = ranks.get(route.status, 3)
    return rank, -route.created_at.timestamp()


def plan(endpoint: EndpointView, routes: list[RouteView], now: datetime) -> Plan:
    """What to do so that the routes match the endpoint. Pure; see the module docstring."""
    result = Plan()
    # Routes on a lost node: new ones are placed elsewhere. A healthy one of the current version is
    # "stranded": it stays in traffic until enough replacements are healthy (see below) or the grace
    # runs out; anything else on a lost node is forgotten at once.
    stranded: list[RouteView] = []
    for route in routes:
        if route.node_alive or route.status == RouteStatus.FAILED_TO_START:
            continue
        if (
            endpoint.lifecycle == EndpointLifecycle.CREATED
            and route.status == RouteStatus.HEALTHY
            and route.spec_version == endpoint.spec_version
            and route.lost_since is not None
            and now - route.lost_since < STRANDED_GRACE
        ):
            stranded.append(route)
        else:
            result.forget.append(route.id)
    present = [r for r in routes if r.id not in result.forget and r not in stranded]

    for route in present:
        if route.status == RouteStatus.TERMINATING:
            if now - route.updated_at > STOP_GIVE_UP_AFTER:
                result.forget.append(route.id)
            elif now - route.updated_at > STOP_RESEND_AFTER:
                result.resend_stop.append(route.id)
        elif route.status == RouteStatus.PROVISIONING and now - route.created_at > PROVISION_TIMEOUT:
            result.fail.append(route.id)
        elif (
            route.status == RouteStatus.PROVISIONING
            and not route.started
            and now - route.updated_at > START_RESEND_AFTER
        ):
            result.resend_start.append(route.id)
    present = [r for r in present if r.id not in result.forget and r.id not in result.fail]

    if endpoint.lifecycle != EndpointLifecycle.CREATED:
        result.drain = [r.id for r in present if r.status in LIVE]
        remaining = [r for r in present if r.status not in (RouteStatus.FAILED_TO_START,) and r.id not in result.drain]
        # Destroyed once nothing runs: failed rows have no container; draining ones are being stopped.
        result.destroyed = not remaining and not result.drain
        if result.destroyed:
            result.forget.extend(r.id for r in present if r.status == RouteStatus.FAILED_TO_START)
        return result

    if endpoint.traffic or endpoint.staged:
        _plan_split(endpoint, present, result)
        return result

    live = [r for r in present if r.status in LIVE]
    current = [r for r in live if r.spec_version == endpoint.spec_version]
    outdated = [r for r in live if r.spec_version != endpoint.spec_version]

    # A replica that went unhealthy is replaced (unless we gave up: then it stays, with its error).
    # So is a cluster replica whose sub members never all came up (a start message was lost): its
    # main alone is not the replica that was asked for (serving.cluster).
    if not endpoint.gave_up:
        broken = [
            r
            for r in current
            if r.status == RouteStatus.UNHEALTHY
            or (r.members_waiting_since is not None and now - r.members_waiting_since > PROVISION_TIMEOUT)
        ]
        result.drain.extend(r.id for r in broken)
        current = [r for r in current if r not in broken]

    desired = endpoint.desired
    # Stranded replicas do not count (replacements are created), but serve until enough are healthy.
    healthy_elsewhere = sum(1 for r in current if r.status == RouteStatus.HEALTHY)
    keep = max(0, desired - healthy_elsewhere)
    oldest_first = sorted(stranded, key=lambda r: r.created_at.timestamp())
    result.forget.extend(r.id for r in oldest_first[keep:])
    if not outdated:
        if len(current) > desired:
            extra = sorted(current, key=_drain_order)[: len(current) - desired]
            result.drain.extend(r.id for r in extra)
        elif len(current) < desired and not endpoint.gave_up:
            result.create = desired - len(current)
        return result

    # Rolling replacement (S4.5): one new replica at a time, healthy before an old one is drained,
    # never fewer healthy replicas than asked for while the old ones still serve.
    if desired == 0:
        result.drain.extend(r.id for r in outdated + current)
        return result
    starting = [r for r in current if r.status in NOT_READY]
    if len(current) < desired and not starting and not endpoint.gave_up:
        result.create = 1
    healthy_new = sum(1 for r in current if r.status == RouteStatus.HEALTHY)
    healthy_old = sorted(
        (r for r in outdated if r.status == RouteStatus.HEALTHY), key=lambda r: r.created_at.timestamp()
    )
    not_serving_old = [r for r in outdated if r.status != RouteStatus.HEALTHY]
    result.drain.extend(r.id for r in not_serving_old)
    surplus = healthy_new + len(healthy_old) - desired
    if healthy_new >= desired:
        surplus = len(healthy_old)
    result.drain.extend(r.id for r in healthy_old[: max(0, surplus)])
    if len(current) > desired:
        extra = sorted(current, key=_drain_order)[: len(current) - desired]
        result.drain.extend(r.id for r in extra if r.id not in result.drain)
    return result


def wanted_replicas(endpoint: EndpointView) -> dict[int, int]:
    """Replicas per revision in split mode: each revision's share of ``desired`` (at least one while
    it has a share), and all of ``desired`` for a staged blue-green revision."""
    wanted = {rev: replicas_for_share(endpoint.desired, share) for rev, share in endpoint.traffic if share > 0}
    if endpoint.staged:
        wanted[endpoint.staged] = endpoint.desired
    return wanted


def _plan_split(endpoint: EndpointView, present: list[RouteView], result: Plan) -> None:
    """Split mode (issue 16): every revision with a share (or staged) gets its replicas; revisions
    without one are drained once the others have theirs healthy (no request waits for a replica)."""
    wanted = wanted_replicas(endpoint)
    live = [r for r in present if r.status in LIVE]
    ready = True
    for rev, want in wanted.items():
        mine = [r for r in live if r.spec_version == rev]
        if not endpoint.gave_up:
            broken = [r for r in mine if r.status == RouteStatus.UNHEALTHY]
            result.drain.extend(r.id for r in broken)
            mine = [r for r in mine if r not in broken]
        if len(mine) > want:
            extra = sorted(mine, key=_drain_order)[: len(mine) - want]
            result.drain.extend(r.id for r in extra)
        elif len(mine) < want and not endpoint.gave_up:
            if rev == endpoint.spec_version:
                result.create += want - len(mine)
            else:
                result.create_for[rev] = want - len(mine)
        healthy = sum(1 for r in mine if r.status == RouteStatus.HEALTHY)
        if rev != endpoint.staged and healthy < want:
            ready = False
    for route in present:
        if route.spec_version in wanted:
            continue
        if route.status in LIVE and (ready or route.status != RouteStatus.HEALTHY):
            result.drain.append(route.id)
        elif route.status == RouteStatus.FAILED_TO_START:
            result.forget.append(route.id)  # a revision that left: its failures go with it
    new = endpoint.spec_version
    if endpoint.staged or (new in wanted and len(wanted) > 1):
        failed = [r for r in present if r.spec_version == new and r.status == RouteStatus.FAILED_TO_START]
        sick = [r for r in present if r.spec_version == new and r.status == RouteStatus.UNHEALTHY]
        if len(failed) + len(sick) >= CANARY_FAILURES or (endpoint.gave_up and (failed or sick)):
            parts = [f"{len(failed)} failed to start"] if failed else []
            parts += [f"{len(sick)} went unhealthy"] if sick else []
            result.abort = f"{len(failed) + len(sick)} of its replicas did not become healthy ({', '.join(parts)})"
            return
    if endpoint.staged:
        staged = [r for r in live if r.spec_version == endpoint.staged and r.status == RouteStatus.HEALTHY]
        if len(staged) >= endpoint.desired:
            result.switch_to = endpoint.staged
