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


def test_a_task_rejected_for_want_of_its_image_names_the_image_and_its_registry() -> None:
    image = "10.0.0.5:5000/team/llm:1@sha256:" + "a" * 64

    class Pinned(Service):
        attrs: dict[str, Any] = {
            **Service.attrs,
            "Spec": {**Service.attrs["Spec"], "TaskTemplate": {"ContainerSpec": {"Image": image}}},
        }

    rejected = task("rejected", "shutdown", err=f"No such image: {image}")
    info = task_info(Pinned(), rejected, "h", node=node())
    assert info.state is ReplicaState.EXITED
    assert info.error.startswith(
        f"The Swarm node host-a has not the image {image} and could not pull it from its registry 10.0.0.5:5000 "
    )
    assert "`docker login 10.0.0.5:5000`" in info.error
    # Any other rejection keeps Swarm's own words.
    other = task_info(Pinned(), task("rejected", "shutdown", err="invalid mount config"), "h", node=node())
    assert other.error == "Swarm rejected its task on host-a: invalid mount config"


def test_a_service_is_pinned_to_the_digest_of_its_own_repository_only() -> None:
    from serving.node.engines.docker.pull import pinned

    class Image:
        attrs = {"RepoDigests": ["other.io/x/y@sha256:1", "10.0.0.5:5000/team/llm@sha256:2"]}

    assert pinned(Image(), "10.0.0.5:5000/team/llm:1") == "10.0.0.5:5000/team/llm:1@sha256:2"
    assert pinned(Image(), "10.0.0.5:5000/team/other:1") == "10.0.0.5:5000/team/other:1"  # no digest of it
    assert pinned(Image(), "x@sha256:3") == "x@sha256:3"  # named by digest already

    class Built:  # built or loaded here: no registry gave it a digest
        attrs: dict[str, Any] = {"RepoDigests": []}

    assert pinned(Built(), "modelserve/python:3.11") == "modelserve/python:3.11"
