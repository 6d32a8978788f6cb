"""Choose a node for a new replica: enough free slots, the right resource group, spread out.

The maths is pure (``rank_nodes``); ``choose_node`` reads the rows and locks the candidate nodes'
rows until the caller's transaction commits, so two planners never both take the last free slots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count

from serving.bus import telemetry
from serving.core import architecture, cluster, devices, slots
from serving.core.devices import Assignment
from serving.models import Endpoint, Node, Route, RouteMember

# Statuses whose containers hold their slots on the node.
HOLDING = (
    Route.Status.PROVISIONING,
    Route.Status.DEGRADED,
    Route.Status.HEALTHY,
    Route.Status.UNHEALTHY,
    Route.Status.TERMINATING,
)


@dataclass(frozen=True)
class NodeView:
    name: str
    capacity: Mapping[str, float]
    used: Mapping[str, float]
    same_endpoint_routes: int
    devices: tuple[str, ...] = ()  # its GPU devices (Node.devices' ids)
    device_used: Mapping[str, float] = field(default_factory=dict)  # shares held per device
    architecture: str = ""  # the node's CPU architecture (serving.core.architecture)

    @property
    def free(self) -> dict[str, float]:
        return slots.subtract(self.capacity, self.used)

    def assign(self, request: Mapping[str, float]) -> Assignment | None:
        """The devices one more replica asking ``request`` would get here; None: they do not fit."""
        return devices.assign(request.get(devices.SHARES, 0.0), self.devices, self.device_used)


@dataclass(frozen=True)
class Choice:
    node: Node | None
    reason: str = ""
    # No node of the group is alive at all (none started yet, or every worker restarting): the
    # replica waits for one instead of failing; a start failure would count towards giving up.
    waiting: bool = False
    devices: Assignment = field(default_factory=dict)  # the GPU devices assigned on node


def replica_request(endpoint: Endpoint) -> dict[str, float]:
    """The slots one replica (one container of it) asks for."""
    return slots.replica_request(endpoint.resources)


def rank_nodes(request: Mapping[str, float], nodes: Iterable[NodeView]) -> list[NodeView]:
    """Nodes that fit, best first: fewest replicas of this service (spread), then most free CPU share."""
    fitting = [n for n in nodes if slots.fits(request, n.free) and n.assign(request) is not None]

    def score(n: NodeView) -> tuple[int, float, str]:
        cpu_capacity = n.capacity.get("cpu", 0.0) or 1.0
        return (n.same_endpoint_routes, -(n.free.get("cpu", 0.0) / cpu_capacity), n.name)

    return sorted(fitting, key=score)


def count_failure(endpoint: Endpoint, failed: bool, waiting: bool, reason: str) -> None:
    """Count a placement that found no node in ``modelserve_scheduling_failures_total``, by a reason
    of a few values (the sentence itself names nodes and sizes: unbounded as a label)."""
    if not failed:
        return
    if not waiting:
        kind = "resources"
    elif reason.startswith(ARCHITECTURE_WAIT):
        kind = "architecture"
    elif reason.startswith(UNAVAILABLE_WAIT):
        kind = "unavailable"
    else:
        kind = "no_node"
    telemetry.count(
        "modelserve_scheduling_failures_total", reason=kind, resource_group=endpoint.resource_group or "default"
    )


ARCHITECTURE_WAIT = "No node runs "  # how of_architecture's reason begins
UNAVAILABLE_WAIT = "No node can take "  # how explain_unavailable's reason begins


def explain_unavailable(
    request: Mapping[str, float], away: list[tuple[str, str]], nodes: list[NodeView], group: str
) -> str:
    """Why a replica waits while nodes of its group are alive but their engines say they can take
    none now (``Node.unavailable``: a drained Swarm node), naming each with its engine's sentence;
    ``nodes``: the others, which have not enough free for ``request``. It waits rather than fails: the mark clears
    by itself (the Swarm node made active again), and a failed start would count towards giving up."""
    said = "; ".join(f"node {name}: {reason.strip().rstrip('.')}" for name, reason in away)
    text = f"{UNAVAILABLE_WAIT}this replica in resource group {group!r} now ({said})"
    if nodes:
        # Their free slots are left out: they change from tick to tick, and the waiting sentence is
        # said again whenever it changes.
        others = ", ".join(n.name for n in nodes)
        text += f", and the others ({others}) have not enough free for {slots.describe(request)}"
    return text + "."


def explain_no_fit(request: Mapping[str, float], nodes: list[NodeView], group: str) -> str:
    if not nodes:
        return (
            f"No node is available in resource group {group!r}: start a node worker "
            "(make run starts one) or choose another resource group."
        )
    free = "; ".join(_free_text(request, n) for n in nodes)
    return (
        f"Not enough resources: one replica asks for {slots.describe(request)}, "
        f"but no node has that much free (free now: {free}). "
        "Lower the replica's resources, reduce replicas, or add a node."
    )


def of_architecture(endpoint: Endpoint, views: list[NodeView]) -> tuple[list[NodeView], str]:
    """The nodes that run the service's image (its ``architecture``, when it names one), and the
    reason to wait when there are nodes but none of them does."""
    fitting = [v for v in views if architecture.fits(endpoint.architecture, v.architecture)]
    if fitting or not views:
        return fitting, ""
    have = ", ".join(f"{v.name} ({v.architecture or 'unknown'})" for v in views)
    return [], (
        f"No node runs {endpoint.architecture} images, which this service's image is built for "
        f"(service-definition.toml); the nodes are: {have}. Add a node of that architecture, or use "
        "an image built for theirs."
    )


def _free_text(request: Mapping[str, float], node: NodeView) -> str:
    text = f"node {node.name}: {slots.describe(node.free)}"
    if request.get(devices.SHARES, 0.0) > 0:
        text += f" ({devices.describe_free(node.devices, node.device_used)})"
    return text


def held_devices(candidates: list[Node]) -> dict[int, dict[str, float]]:
    """The GPU shares the routes (and cluster sub members) on each node hold per device, by node id.
    Only the rows that hold devices are read (few: GPU replicas)."""
    used: dict[int, dict[str, float]] = {n.pk: {} for n in candidates}
    rows = [
        *Route.objects.filter(node__in=candidates, status__in=HOLDING)
        .exclude(devices={})
        .values_list("node_id", "devices"),
        *RouteMember.objects.filter(node__in=candidates, route__status__in=HOLDING)
        .exclude(devices={})
        .values_list("node_id", "devices"),
    ]
    for node_id, assignment in rows:
        used[node_id] = devices.held([used[node_id], assignment or {}])
    return used


def held_slots(candidates: list[Node]) -> dict[int, dict[str, float]]:
    """What the routes (and cluster sub members) on each node hold, by node id."""
    used: dict[int, dict[str, float]] = {n.pk: {} for n in candidates}
    holding = Route.objects.filter(node__in=candidates, status__in=HOLDING)
    # Summed in the database by distinct reservation: a node's routes mostly share a few shapes, so
    # a placement reads a few rows however many replicas run (the tick's cost, bench/runtime.py).
    for node_id, resources, count in holding.values_list("node_id", "resources").annotate(count=Count("id")).order_by():
        used[node_id] = slots.add(used[node_id], {k: float(v) * count for k, v in (resources or {}).items()})
    # Sub members of cluster routes hold the service's slots on their own nodes (serving.core.cluster).
    members = RouteMember.objects.filter(node__in=candidates, route__status__in=HOLDING)
    for node_id, resources, count in members.values_list("node_id", "resources").annotate(count=Count("id")).order_by():
        used[node_id] = slots.add(used[node_id], {k: float(v) * count for k, v in (resources or {}).items()})
    return used


def same_endpoint_routes(endpoint: Endpoint, candidates: list[Node]) -> Counter[int]:
    """How many of the endpoint's running (not terminating) routes each node has, by node id."""
    same: Counter[int] = Counter()
    for node_id, count in (
        Route.objects.filter(node__in=candidates, status__in=HOLDING, endpoint=endpoint)
        .exclude(status=Route.Status.TERMINATING)
        .values_list("node_id")
        .annotate(count=Count("id"))
        .order_by()
    ):
        same[node_id] += count
    return same


def _views(
    candidates: list[Node],
    used: Mapping[int, Mapping[str, float]],
    same: Mapping[int, int],
    device_used: Mapping[int, Mapping[str, float]],
) -> list[NodeView]:
    return [
        NodeView(
            name=n.name,
            capacity={k: float(v) for k, v in n.capacity.items()},
            used=used[n.pk],
            same_endpoint_routes=same.get(n.pk, 0),
            devices=tuple(devices.inventory_ids(n.devices or [])),
            device_used=device_used.get(n.pk, {}),
            architecture=n.architecture,
        )
        for n in candidates
    ]


def node_views(endpoint: Endpoint, candidates: list[Node]) -> list[NodeView]:
    return _views(
        candidates, held_slots(candidates), same_endpoint_routes(endpoint, candidates), held_devices(candidates)
    )


class NodePool:
    """The alive, schedulable and available nodes of one resource group, their rows locked until the caller's
    transaction commits, and what their routes hold; ``hold`` adds a placement made through it.

    So one transaction can place many replicas with one read (the reconcile tick places a batch of
    endpoints' replicas this way): nobody else places on these nodes before the commit, and every
    placement of ours is counted, so the in-memory sums stay what a fresh read would give (or more:
    a route stopped meanwhile by its node frees its slots only for the next transaction).
    """

    def __init__(self, group: str, now: datetime) -> None:
        self.group = group
        # Unavailable nodes (their engine says they can take no replica now) are left out like the
        # unschedulable ones, but kept aside, unlocked, so a replica that waits can say why.
        self.nodes = [
            n
            for n in Node.objects.select_for_update(no_key=True)
            .filter(schedulable=True, resource_group=group, unavailable="")
            .order_by("name")
            if n.is_alive(now)
        ]
        self.unavailable = [
            n
            for n in Node.objects.filter(schedulable=True, resource_group=group)
            .exclude(unavailable="")
            .order_by("name")
            if n.is_alive(now)
        ]
        self.used = held_slots(self.nodes)
        self.device_used = held_devices(self.nodes)

    def views(self, same: Mapping[int, int]) -> list[NodeView]:
        return _views(self.nodes, self.used, same, self.device_used)

    def away(self, endpoint: Endpoint) -> list[tuple[str, str]]:
        """The alive nodes that would run the service's image but take no replica now, and why."""
        return [
            (n.name, n.unavailable)
            for n in self.unavailable
            if architecture.fits(endpoint.architecture, n.architecture)
        ]

    def hold(self, node: Node, request: Mapping[str, float], assignment: Mapping[str, float] | None = None) -> None:
        """Count one more placement on ``node``: its slots, and the devices it was assigned."""
        self.used[node.pk] = slots.add(self.used[node.pk], request)
        if assignment:
            self.device_used[node.pk] = devices.held([self.device_used[node.pk], assignment])


def choose_node(
    endpoint: Endpoint,
    request: Mapping[str, float],
    now: datetime,
    pool: NodePool | None = None,
    same: Mapping[int, int] | None = None,
) -> Choice:
    """The node for one more replica of ``endpoint``. ``pool`` (its resource group's) and ``same``
    (its routes per node) come from a caller that places several replicas in one transaction;
    without them they are read here. The caller ``hold``s the chosen node's slots in its pool."""
    group = endpoint.resource_group or "default"
    pool = pool or NodePool(group, now)
    views = pool.views(same if same is not None else same_endpoint_routes(endpoint, pool.nodes))
    views, wrong = of_architecture(endpoint, views)
    if wrong:
        return Choice(None, wrong, waiting=True)
    ranked = rank_nodes(request, views)
    if not ranked:
        away = pool.away(endpoint)
        if away:
            return Choice(None, explain_unavailable(request, away, views, group), waiting=True)
        return Choice(None, explain_no_fit(request, views, group), waiting=not views)
    by_name = {n.name: n for n in pool.nodes}
    best = ranked[0]
    return Choice(by_name[best.name], devices=best.assign(request) or {})


@dataclass(frozen=True)
class ClusterChoice:
    nodes: tuple[Node, ...]  # one per member, main first; empty when it does not fit
    reason: str = ""
    waiting: bool = False  # as Choice.waiting
    devices: tuple[Assignment, ...] = ()  # one per member, as nodes


def choose_nodes(
    endpoint: Endpoint,
    request: Mapping[str, float],
    now: datetime,
    pool: NodePool | None = None,
    same: Mapping[int, int] | None = None,
) -> ClusterChoice:
    """Nodes for every member of one route (``serving.core.cluster.place`` states the rule); locks the
    candidates' rows like ``choose_node``, and takes ``pool`` and ``same`` as it does."""
    size = max(1, endpoint.cluster_size)
    multi = endpoint.cluster_mode == Endpoint.ClusterMode.MULTI_NODE
    group = endpoint.resource_group or "default"
    pool = pool or NodePool(group, now)
    candidates = pool.nodes
    views = pool.views(same if same is not None else same_endpoint_routes(endpoint, candidates))
    views, wrong = of_architecture(endpoint, views)
    if wrong:
        return ClusterChoice((), wrong, waiting=True)
    away = pool.away(endpoint)
    if not views:
        reason = explain_unavailable(request, away, views, group) if away else explain_no_fit(request, views, group)
        return ClusterChoice((), reason, waiting=True)
    # The scheduler's preference (spread, then most free CPU) over every node, fitting or not, so
    # that the reason can list them all.
    ranked = rank_nodes({}, views)
    placement = cluster.place(
        request, size, multi, [cluster.NodeFree(v.name, v.free, v.devices, v.device_used) for v in ranked]
    )
    if not placement.nodes:
        if away:  # it may fit once they take replicas again: wait, saying why
            return ClusterChoice(
                (), f"{explain_unavailable(request, away, [], group)} {placement.reason}", waiting=True
            )
        return ClusterChoice((), placement.reason)
    by_name = {n.name: n for n in candidates}
    return ClusterChoice(tuple(by_name[name] for name in placement.nodes), devices=placement.devices)
