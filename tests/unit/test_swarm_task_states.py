"""What a Swarm task's state (and its node's) means for a replica (serving/node/engines/swarm/services.py)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.node.engines.base import ReplicaState
from serving.node.engines.swarm.services import home_mount, swarm_ended, task_info


class Service:
    id = "svc1"
    name = "ms-1"
    attrs: dict[str, Any] = {"Spec": {"Name": "ms-1", "Labels": {"serving.route": "r1"}}, "Endpoint": {}}


def task(state: str, desired: str = "running", exit_code: int | None = None, err: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"State": state, "PortStatus": {"Ports": [{"PublishedPort": 30001}]}}
    if exit_code is not None:
        status["ContainerStatus"] = {"ExitCode": exit_code}
    if err:
        status["Err"] = err
    return {"NodeID": "n1", "DesiredState": desired, "Status": status}


def node(availability: str = "active", state: str = "ready") -> dict[str, Any]:
    return {"Description": {"Hostname": "host-a"}, "Spec": {"Availability": availability}, "Status": {"State": state}}


def test_a_running_task_on_a_ready_node_runs() -> None:
    info = task_info(Service(), task("running"), "10.0.0.5", node=node())
    assert (info.state, info.port, info.error) == (ReplicaState.RUNNING, 30001, "")


@pytest.mark.parametrize(
    ("the_task", "the_node", "sentence"),
    [
        (task("running"), node(availability="drain"), "the Swarm node host-a was drained: Swarm stops its tasks there"),
        (task("shutdown", "shutdown", exit_code=143), node(availability="drain"), "the Swarm node host-a was drained"),
        (task("running"), node(state="down"), "the Swarm node host-a is down: its task is lost"),
        (task("running"), {"Status": {"State": "unknown"}}, "the Swarm node n1 is unknown: its task is lost"),
        (task("orphaned", "shutdown"), node(state="down"), "the Swarm node host-a was lost: Swarm gave its task up"),
        (
            task("rejected", "shutdown", err="invalid mount config"),
            node(),
            "Swarm rejected its task on host-a: invalid mount",
        ),
        (task("running", "shutdown"), node(), "Swarm shut its task down on host-a (its desired state is shutdown)"),
        (task("shutdown", "shutdown", exit_code=0), node(), "Swarm shut its task down on host-a"),
    ],
)
def test_a_task_swarm_ended_or_is_ending_has_exited_with_the_reason(
    the_task: dict[str, Any], the_node: dict[str, Any], sentence: str
) -> None:
    assert swarm_ended(the_task, the_node).startswith(sentence)
    info = task_info(Service(), the_task, "10.0.0.5", node=the_node)
    assert info.state is ReplicaState.EXITED and info.error.startswith(sentence) and info.port == 0


def test_a_process_that_ended_is_told_by_its_exit_code_not_by_swarm() -> None:
    assert swarm_ended(task("failed", "shutdown", exit_code=137), node()) == ""
    info = task_info(Service(), task("failed", "shutdown", exit_code=137), "h", node=node())
    assert (
        info.state is ReplicaState.EXITED and info.exit_code == 137 and info.error == "exited with code 137 (SIGKILL)"
    )


def test_a_task_not_placed_yet_is_starting() -> None:
    pending = {"DesiredState": "running", "Status": {"State": "pending"}}
    assert swarm_ended(pending, None) == "" and swarm_ended(None, None) == ""
    assert task_info(Service(), pending, "h").state is ReplicaState.STARTING


def test_home_is_a_tmpfs_volume_owned_by_the_replica_user() -> None:
    mount = home_mount(1234, 5678)
    assert (mount["Target"], mount["Type"], mount.get("Source")) == ("/home/work", "volume", None)
    assert mount["VolumeOptions"]["NoCopy"] is True
    driver = mount["VolumeOptions"]["DriverConfig"]
    assert driver["Name"] == "local"
    assert driver["Options"] == {"type": "tmpfs", "device": "tmpfs", "o": "exec,uid=1234,gid=5678,mode=0755"}
