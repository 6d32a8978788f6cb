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


@dataclass
class Plan:
    create: int = 0
    drain: list[str] = field(default_factory=list)  # -> terminating, then the node stops it
    forget: list[str] = field(default_factory=list)  # delete the row now (node lost, stop gave up)
    resend_stop: list[str] = field(default_factory=list)
    resend_start: list[str] = field(default_factory=list)  # provisioning, never claimed by its node
    fail: list[str] = field(default_factory=list)  # provisioning that never started
    destroyed: bool = False

    def is_empty(self) -> bool:
        return not (
            self.create
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
