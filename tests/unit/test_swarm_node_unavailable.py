"""Whether a node worker's Swarm node takes replicas, as a sentence (serving/node/engines/swarm/nodes.py),
and how the scheduler says why a replica waits for such nodes (serving/control/scheduler.py)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.control.scheduler import UNAVAILABLE_WAIT, NodeView, explain_unavailable
from serving.node.engines.swarm.nodes import unavailable


def node(host: str = "worker-2", availability: str = "active", state: str = "ready") -> dict[str, Any]:
    """A node as ``docker node inspect`` gives it (the parts read)."""
    return {
        "ID": f"id-{host}-{availability}-{state}",
        "Description": {"Hostname": host},
        "Spec": {"Availability": availability, "Role": "worker"},
        "Status": {"State": state, "Addr": "10.0.0.7"},
    }


def test_a_ready_active_node_takes_replicas() -> None:
    assert unavailable("worker-2", [node("manager-1"), node()]) == ""


@pytest.mark.parametrize(
    ("availability", "state", "said"),
    [
        ("drain", "ready", "the Swarm node worker-2 is drained"),
        ("pause", "ready", "the Swarm node worker-2 is paused"),
        ("active", "down", "the Swarm node worker-2 is down"),
        ("active", "disconnected", "the Swarm node worker-2 is disconnected"),
        ("active", "unknown", "the Swarm node worker-2 is in an unknown state"),
        # Down says more than drained: a drained node that is also down takes nothing back by activating it.
        ("drain", "down", "the Swarm node worker-2 is down"),
    ],
)
def test_a_drained_paused_or_lost_node_says_so(availability: str, state: str, said: str) -> None:
    assert unavailable("worker-2", [node("manager-1"), node(availability=availability, state=state)]) == said


def test_only_the_pinned_host_counts() -> None:
    # Another node drained or down is not this node worker's business.
    assert unavailable("worker-2", [node("worker-3", "drain"), node("worker-4", state="down"), node()]) == ""


def test_a_host_that_rejoined_takes_replicas_on_its_new_entry() -> None:
    """A host that left and joined again is listed twice; the old entry stays down. The placement
    constraint (node.hostname) matches both, and Swarm uses the ready one."""
    assert unavailable("worker-2", [node(state="down"), node()]) == ""
    # Both entries unusable: the one a `docker node update --availability active` would fix is named.
    assert unavailable("worker-2", [node(state="down"), node(availability="drain")]) == (
        "the Swarm node worker-2 is drained"
    )


def test_a_host_name_the_swarm_does_not_have_says_how_to_fix_it() -> None:
    said = unavailable("wroker-2", [node("manager-1"), node()])
    assert said.startswith("the Swarm node wroker-2 is not in the swarm")
    assert "SWARM_NODE" in said and "docker node ls" in said


def view(name: str, cpu: float = 4.0, used: float = 0.0) -> NodeView:
    return NodeView(name=name, capacity={"cpu": cpu, "mem": 2.0**33}, used={"cpu": used}, same_endpoint_routes=0)


def test_the_waiting_sentence_names_each_unavailable_node_and_its_reason() -> None:
    said = explain_unavailable(
        {"cpu": 1.0},
        [("sw-a", "the Swarm node worker-2 is drained"), ("sw-b", "the Swarm node worker-3 is down.")],
        [],
        "gpu",
    )
    assert said == (
        f"{UNAVAILABLE_WAIT}this replica in resource group 'gpu' now (node sw-a: the Swarm node worker-2 is "
        "drained; node sw-b: the Swarm node worker-3 is down)."
    )


def test_the_waiting_sentence_says_the_others_are_full_without_their_moving_figures() -> None:
    said = explain_unavailable(
        {"cpu": 2.0}, [("sw-a", "the Swarm node worker-2 is paused")], [view("b", 4, 3.5)], "default"
    )
    assert said.endswith("and the others (b) have not enough free for cpu 2.")
    # The free slots change from tick to tick; the sentence must not, or the event log repeats it.
    assert said == explain_unavailable(
        {"cpu": 2.0}, [("sw-a", "the Swarm node worker-2 is paused")], [view("b", 4, 3.0)], "default"
    )
