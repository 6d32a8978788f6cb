"""Cluster mode (S4.1): one replica (a route) made of several containers, modelled on Backend.AI's
cluster sessions. Pure: names, the environment of each member, placement and readiness.

A route of cluster size N has one ``main`` member (the route's own container: its address is the
one in the routing table, so the proxy sends traffic to main only) and N-1 ``sub`` members
(``RouteMember`` rows). Every member gets Backend.AI's variables:

* ``BACKENDAI_CLUSTER_SIZE``      N
* ``BACKENDAI_CLUSTER_ROLE``      ``main`` or ``sub``
* ``BACKENDAI_CLUSTER_IDX``       1-based index within its role (main: 1; subs: 1..N-1)
* ``BACKENDAI_CLUSTER_HOST``      its own host name: ``main1``, ``sub1``, ``sub2``, ...
* ``BACKENDAI_CLUSTER_HOSTS``     every host name, comma separated (``main1,sub1,sub2``)
* ``BACKENDAI_CLUSTER_REPLICAS``  members per role (``main:1,sub:2``)

and, to reach the others: the engine puts the members on one network where each reaches the others
by host name, as Backend.AI's cluster network does (``ReplicaSpec.cluster``; the local engine
peers their network namespaces on one machine, Docker gives them a bridge network of their own).
Main starts first, and each sub starts once main runs, with

* ``BACKENDAI_CLUSTER_MAIN_ADDR``  ``host:port`` of main's server as the members reach it,
* ``BACKENDAI_CLUSTER_ADDRS``      ``main1=host:port`` for every member already running (main's).

That is the head/worker rendezvous of Ray, torch.distributed (``MASTER_ADDR``) and vLLM's
multi-node mode: the subs join the main, which learns its subs when they connect.

Placement: multi-node puts every member on a distinct node, each with the service's slots, and
fails with what was asked and what is free when fewer nodes fit; it never packs several members on
one node (that would be single-node mode, and would hide a missing node). Single-node mode puts
all N members on one node that has N times the slots free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from serving.core import devices, slots
from serving.core.devices import Assignment

MAIN = "main"
SUB = "sub"


@dataclass(frozen=True)
class MemberName:
    role: str  # MAIN | SUB
    idx: int  # 1-based within its role

    @property
    def host(self) -> str:
        return f"{self.role}{self.idx}"


def member_names(size: int) -> list[MemberName]:
    """main1, then sub1 .. sub(size-1)."""
    if size < 1:
        raise ValueError("a cluster has at least one member")
    return [MemberName(MAIN, 1), *(MemberName(SUB, i) for i in range(1, size))]


def parse_member(raw: str | None) -> MemberName:
    """A member's host name as a user writes it (``main1``, ``sub2``; empty or ``main`` is main).

    Raises ValueError with a sentence saying what is accepted."""
    text = (raw or "").strip().lower()
    if text in ("", MAIN, "main1"):
        return MemberName(MAIN, 1)
    if text.startswith(SUB) and text[len(SUB) :].isdigit() and 1 <= int(text[len(SUB) :]) <= 999:
        return MemberName(SUB, int(text[len(SUB) :]))
    raise ValueError(f"member must be a cluster member's host name: main1, or sub1, sub2, ... (got {text[:40]!r})")


def cluster_env(size: int, me: MemberName, addresses: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of one member; ``addresses`` maps host names (main1, ...) to ``host:port`` of
    the members already running when it starts."""
    names = member_names(size)
    if me not in names:
        raise ValueError(f"{me.host} is not a member of a cluster of size {size}")
    subs = size - 1
    env = {
        "BACKENDAI_CLUSTER_SIZE": str(size),
        "BACKENDAI_CLUSTER_ROLE": me.role,
        "BACKENDAI_CLUSTER_IDX": str(me.idx),
        "BACKENDAI_CLUSTER_HOST": me.host,
        "BACKENDAI_CLUSTER_HOSTS": ",".join(n.host for n in names),
        "BACKENDAI_CLUSTER_REPLICAS": f"{MAIN}:1" + (f",{SUB}:{subs}" if subs else ""),
    }
    known = {n.host: addresses[n.host] for n in names if addresses and addresses.get(n.host) and n != me}
    if known:
        env["BACKENDAI_CLUSTER_ADDRS"] = ",".join(f"{host}={address}" for host, address in known.items())
    if me.role == SUB and addresses and addresses.get("main1"):
        env["BACKENDAI_CLUSTER_MAIN_ADDR"] = addresses["main1"]
    return env


@dataclass(frozen=True)
class NodeFree:
    """A candidate node as placement sees it: its name and free slots, in preference order, and its
    GPU devices with the shares already held on each (serving.core.devices)."""

    name: str
    free: Mapping[str, float]
    devices: tuple[str, ...] = ()
    device_used: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    nodes: tuple[str, ...] = ()  # one node name per member, main first; empty when it does not fit
    reason: str = ""
    # One device assignment per member, in the order of ``nodes`` ({} for a member without GPUs).
    devices: tuple[Assignment, ...] = ()


def place(request: Mapping[str, float], size: int, multi_node: bool, candidates: Sequence[NodeFree]) -> Placement:
    """Where the members of one route go; ``candidates`` come best first (the scheduler's order)."""
    shares = request.get(devices.SHARES, 0.0)
    if size <= 1 or not multi_node:
        count = max(size, 1)
        whole = {k: v * count for k, v in request.items()}
        for node in candidates:
            if slots.fits(whole, node.free):
                assigned = devices.assign_many(shares, count, node.devices, node.device_used)
                if assigned is not None:
                    return Placement(nodes=tuple([node.name] * count), devices=tuple(assigned))
        return Placement(reason=_single_node_reason(request, size, candidates))
    fitting: list[tuple[NodeFree, Assignment]] = []
    for node in candidates:
        if slots.fits(request, node.free):
            one = devices.assign(shares, node.devices, node.device_used)
            if one is not None:
                fitting.append((node, one))
    if len(fitting) >= size:
        chosen = fitting[:size]
        return Placement(nodes=tuple(n.name for n, _ in chosen), devices=tuple(a for _, a in chosen))
    free = "; ".join(_free_text(request, n) for n in candidates) or "no node is available"
    return Placement(
        reason=(
            f"Not enough nodes for multi-node cluster mode: a replica of cluster size {size} needs {size} "
            f"distinct nodes with {slots.describe(request)} free each, but only {len(fitting)} "
            f"{'has' if len(fitting) == 1 else 'have'} that ({free}). Add nodes, lower the resources or "
            "the cluster size, or use single-node cluster mode."
        )
    )


def _free_text(request: Mapping[str, float], node: NodeFree) -> str:
    text = f"node {node.name}: {slots.describe(node.free)}"
    if request.get(devices.SHARES, 0.0) > 0:
        text += f" ({devices.describe_free(node.devices, node.device_used)})"
    return text


def _single_node_reason(request: Mapping[str, float], size: int, candidates: Sequence[NodeFree]) -> str:
    free = "; ".join(_free_text(request, n) for n in candidates) or "no node is available"
    if size <= 1:
        return (
            f"Not enough resources: one replica asks for {slots.describe(request)}, "
            f"but no node has that much free (free now: {free}). "
            "Lower the replica's resources, reduce replicas, or add a node."
        )
    whole = {k: v * size for k, v in request.items()}
    return (
        f"Not enough resources for single-node cluster mode: a replica of cluster size {size} needs "
        f"{slots.describe(whole)} ({size} x {slots.describe(request)}) on one node, but no node has that "
        f"free ({free}). Lower the resources or the cluster size, or use multi-node cluster mode."
    )
