"""Whether the Swarm node a node worker stands for can take replicas now (``SwarmEngine.unavailable``).

A node worker's replicas are pinned to one Swarm node (``SWARM_NODE``, the package's docstring).
When an operator drains or pauses that node, or Swarm loses it, a replica placed there would wait
for a task Swarm never starts: the node worker says so with its heartbeat, the scheduler places the
replicas elsewhere in the resource group, and the mark clears by itself once the node is back.
Pure: the nodes' attributes (``docker node inspect``) in, a sentence out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Node.Status.State: only "ready" runs tasks. "disconnected" passes (or becomes "down"), but Swarm
# assigns nothing to it meanwhile either.
NOT_READY = ("down", "disconnected", "unknown")
# Node.Spec.Availability: "drain" stops its tasks and takes none, "pause" keeps its tasks and takes none.
NOT_ACTIVE = {"drain": "drained", "pause": "paused"}


def hostname(node: Mapping[str, Any]) -> str:
    return str((node.get("Description") or {}).get("Hostname") or "")


def why_not(node: Mapping[str, Any], name: str) -> str:
    """Why this one Swarm node takes no task now, as a sentence; "" when it does."""
    availability = str((node.get("Spec") or {}).get("Availability") or "active")
    state = str((node.get("Status") or {}).get("State") or "unknown")
    if state in NOT_READY:
        return f"the Swarm node {name} is {'in an unknown state' if state == 'unknown' else state}"
    if availability in NOT_ACTIVE:
        return f"the Swarm node {name} is {NOT_ACTIVE[availability]}"
    return ""


def unavailable(name: str, nodes: Iterable[Mapping[str, Any]]) -> str:
    """Why the Swarm node with host name ``name`` (the replicas' placement constraint) can take no
    replica now, as a sentence; "" when it can.

    The constraint matches every node of that host name: a host that left the swarm and joined it
    again is listed twice (the old entry stays "down" until removed), and Swarm places on whichever
    is ready and active. So it is unavailable only when none of them is; the sentence is the one of
    the node that is ready (drained or paused), else of any."""
    reasons = [why_not(node, name) for node in nodes if hostname(node) == name]
    if not reasons:
        return (
            f"the Swarm node {name} is not in the swarm (SWARM_NODE names a host name of `docker node ls`; "
            "an empty SWARM_NODE means the manager's own)"
        )
    if "" in reasons:
        return ""
    for reason in reasons:
        if reason.endswith(tuple(NOT_ACTIVE.values())):
            return reason
    return reasons[0]
