"""One replica's Swarm service, spec in and state out: the ``services.create`` arguments a
``ReplicaSpec`` becomes (command, user, reservations and limits, mounts, ports, placement), and
what the service's task says back (state, where its port is, why it ended).

The refusals and the pre-start plan are the Docker engine's own (``docker/containers.py``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from docker.types import DriverConfig, NetworkAttachmentConfig, Privileges, RestartPolicy
from docker.types import Mount as DockerMount

from serving.core import devices, images
from serving.node.engines.base import EngineError, ReplicaInfo, ReplicaSpec, ReplicaState
from serving.node.engines.docker.containers import BOOTSTRAP_DIR, BOOTSTRAP_FAILED, HOME

PUBLISH_MODES = ("host", "ingress")
CLUSTER_NETWORK_PREFIX = "ms-swarm-cluster-"
LABEL_SWARM_CLUSTER = "serving.swarm-cluster"  # on a cluster's overlay network: the route (key)
GPU_RESOURCE = "NVIDIA-GPU"  # the generic resource kind NVIDIA's docs advertise (SWARM_GPU_RESOURCE)
# The manager's API versions that can set these on a service (Docker 20.10 and 25.0).
PIDS_API = "1.41"  # Resources.Limits.Pids
NO_NEW_PRIVILEGES_API = "1.44"  # ContainerSpec.Privileges.NoNewPrivileges

# A task's state (docker/swarmkit's TaskState) -> our replica state.
TASK_STATES = {
    "new": ReplicaState.STARTING,
    "allocated": ReplicaState.STARTING,
    "pending": ReplicaState.STARTING,
    "assigned": ReplicaState.STARTING,
    "accepted": ReplicaState.STARTING,
    "preparing": ReplicaState.STARTING,
    "ready": ReplicaState.STARTING,
    "starting": ReplicaState.STARTING,
    "running": ReplicaState.RUNNING,
}  # anything else (complete, shutdown, failed, rejected, remove, orphaned) has ended


def check_publish_mode(mode: str) -> str:
    if mode not in PUBLISH_MODES:
        raise EngineError(
            f"SWARM_PUBLISH_MODE={mode!r} is not a publish mode; use 'host' (each task's port on its own "
            "Swarm node) or 'ingress' (the routing mesh, where the swarm's hosts support it)."
        )
    return mode


def cluster_network(key: str, installation: str) -> str:
    return f"{CLUSTER_NETWORK_PREFIX}{key}" + (f"-{installation}" if installation else "")


def create_kwargs(
    spec: ReplicaSpec,
    mounts: list[DockerMount],
    labels: dict[str, str],
    plan_dir: Path | None,
    *,
    uid: int,
    gid: int,
    publish_mode: str,
    placement_node: str,
    network: str | None,
    stop_grace: float,
    pids_limit: int | None = None,
    no_new_privileges: bool = False,
    gpu_kind: str = GPU_RESOURCE,
) -> dict[str, Any]:
    """The arguments of ``services.create`` (but the image) for ``spec``. ``network``: the cluster's
    overlay network, or the plain replicas' bridge (``cluster_alias`` only on the first);
    ``pids_limit``: None where the manager's API can not set it; ``no_new_privileges``: set it on
    the service (a manager from API 1.44; on an older one the bootstrap runner sets it, see
    engine.py); ``gpu_kind``: the Swarm generic resource a GPU is advertised as."""
    generic = gpu_resources(spec, gpu_kind)
    command: list[str] | None = None
    args: list[str] | None = None
    if plan_dir is not None:
        mounts = [*mounts, DockerMount(BOOTSTRAP_DIR, str(plan_dir), type="bind", read_only=True)]
        command = ["python3", f"{BOOTSTRAP_DIR}/bootstrap.py", f"{BOOTSTRAP_DIR}/plan.json"]
    elif spec.command is not None:
        # A service's "command" replaces the image's ENTRYPOINT (and drops its CMD), as on the
        # Docker engine: the definition's start command is the whole command line.
        command = [spec.shell, "-c", spec.command[0]] if spec.command_is_shell else list(spec.command)
    environment = dict(spec.env)
    if not any(os.path.normpath(m.target) == HOME for m in spec.mounts):
        mounts = [*mounts, home_mount(uid, gid)]
    if spec.shm_bytes > 0:
        mounts = [
            *mounts,
            DockerMount(
                "/dev/shm",  # noqa: S108 -- the replica's own shm, not a shared temporary folder
                None,
                type="tmpfs",
                tmpfs_size=spec.shm_bytes,
                tmpfs_mode=0o777,
            ),
        ]
    environment.setdefault("HOME", HOME)
    if generic:
        # Swarm picks which devices (DOCKER_RESOURCE_<kind> names them; NVIDIA's runtime with
        # swarm-resource shows the container those): whole devices, so the replica's share is 1.
        environment[devices.SHARE_ENV] = "1"
    if spec.cluster is not None and spec.cluster.host != "main1":
        # Members reach main by its host name on their overlay network, on any Swarm node.
        main = f"main1:{spec.port}"
        environment.update({"BACKENDAI_CLUSTER_MAIN_ADDR": main, "BACKENDAI_CLUSTER_ADDRS": f"main1={main}"})
    nano_cpus = int(spec.cpu * 1e9) if spec.cpu > 0 else None
    mem = spec.mem_bytes if spec.mem_bytes > 0 else None
    networks = None
    if network is not None:
        aliases = [spec.cluster.host] if spec.cluster is not None else None
        networks = [NetworkAttachmentConfig(network, aliases=aliases)]
    privileges = None
    if no_new_privileges:
        privileges = Privileges()
        privileges["NoNewPrivileges"] = True
    return {
        "name": spec.name,
        "labels": labels,
        "container_labels": labels,
        "command": command,
        "args": args,
        "env": [f"{key}={value}" for key, value in environment.items()],
        "user": f"{uid}:{gid}",
        "workdir": spec.workdir or None,
        "mounts": mounts,
        "hostname": spec.cluster.host if spec.cluster is not None else None,
        "init": True,
        "cap_drop": ["ALL"],
        "stop_grace_period": int(max(stop_grace, 0.0) * 1e9),
        "resources": resources(nano_cpus, mem, pids_limit, generic),
        "privileges": privileges,
        # The platform replaces a replica that ends; Swarm must not restart it behind the prober.
        "restart_policy": RestartPolicy(condition="none"),
        "constraints": [f"node.hostname=={placement_node}"],
        "endpoint_spec": {
            # dnsrr: no virtual IP (IPVS), which some hosts lack; members resolve to the task itself.
            "Mode": "dnsrr" if publish_mode == "host" else "vip",
            "Ports": [{"Protocol": "tcp", "TargetPort": spec.port, "PublishMode": publish_mode}],
        },
        "networks": networks,
        # Bounded logs: a chatty server must not fill the node's disk.
        "log_driver": "json-file",
        "log_driver_options": {"max-size": "10m", "max-file": "3"},
    }


def resources(
    nano_cpus: int | None, mem: int | None, pids_limit: int | None, generic: dict[str, int]
) -> dict[str, Any]:
    """The task's reservations and limits: CPU and memory both (Swarm places nothing where they do
    not fit, and the replica can not take more), the pids limit, and GPUs as generic resources
    (reservations only: Swarm hands out the devices it reserved)."""
    limits: dict[str, Any] = {}
    reservations: dict[str, Any] = {}
    for key, value in (("NanoCPUs", nano_cpus), ("MemoryBytes", mem)):
        if value is not None:
            limits[key] = reservations[key] = value
    if pids_limit is not None and pids_limit > 0:
        limits["Pids"] = pids_limit
    if generic:
        reservations["GenericResources"] = [
            {"DiscreteResourceSpec": {"Kind": kind, "Value": count}} for kind, count in generic.items()
        ]
    return {"Limits": limits, "Reservations": reservations}


def gpu_resources(spec: ReplicaSpec, kind: str) -> dict[str, int]:
    """``{kind: N}`` for a replica asking for N whole GPUs; {} for none. Refuses, with a sentence,
    what Swarm can not give: a fraction of a device (Swarm's generic resources are whole units,
    and the platform's device accounting would book the rest of that device for another replica
    Swarm could not place) and accelerators other than cuda.*."""
    wanted = {key: value for key, value in spec.accelerators.items() if value > 0}
    if not wanted:
        return {}
    others = sorted(key for key in wanted if key != devices.SHARES)
    if others:
        raise EngineError(
            f"The Swarm engine can not provide {', '.join(others)}: only NVIDIA GPUs (cuda.shares), "
            f"as the Swarm generic resource {kind}."
        )
    shares = wanted[devices.SHARES]
    count = round(shares)
    if abs(shares - count) > 1e-9 or count < 1:
        raise EngineError(
            f"The replica {spec.name} asks for cuda.shares {shares:g}, but Swarm hands out whole GPUs "
            f"(the generic resource {kind}); ask for a whole number of devices (1, 2, ...), or run "
            "services that share a GPU on a node worker with SERVING_ENGINE=docker."
        )
    return {kind: count}


def version_at_least(version: str, least: str) -> bool:
    """Docker API versions ("1.41") compared as numbers; an unreadable one is taken as too old."""
    try:
        return tuple(int(part) for part in version.split(".")) >= tuple(int(part) for part in least.split("."))
    except ValueError:
        return False


def home_mount(uid: int, gid: int) -> DockerMount:
    """``/home/work``, writable by the replica's user: an anonymous ``local`` volume that is a tmpfs
    mounted with that owner. A service's own tmpfs mount can not be given an owner, and over a folder
    the image has, Docker gives it that folder's owner and mode whatever ``tmpfs_mode`` says (root,
    0755 in our images). ``no_copy``: the image's folder's owner is not copied onto the volume
    either. Anonymous: Swarm removes it with the task's container, so it holds nothing after."""
    options = {"type": "tmpfs", "device": "tmpfs", "o": f"exec,uid={uid},gid={gid},mode=0755"}
    return DockerMount(HOME, None, type="volume", no_copy=True, driver_config=DriverConfig("local", options))


def latest_task(tasks: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The service's current task (restart policy none: there is one; take the newest anyway)."""
    if not tasks:
        return None
    return max(tasks, key=lambda task: (task.get("Version") or {}).get("Index") or 0)


def published_port(task: Mapping[str, Any] | None, service_attrs: Mapping[str, Any]) -> int:
    """Host mode: the port the task's node bound; ingress: the port the service got on every node."""
    sources = [((task or {}).get("Status") or {}).get("PortStatus") or {}, service_attrs.get("Endpoint") or {}]
    for source in sources:
        for port in source.get("Ports") or []:
            if port.get("PublishedPort"):
                return int(port["PublishedPort"])
    return 0


def service_image(service_attrs: Mapping[str, Any]) -> str:
    """The image a service's tasks run (pinned to a digest when the engine knew one)."""
    spec = ((service_attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}
    return str(spec.get("Image") or "")


def no_image(task: Mapping[str, Any] | None, image: str, node_name: str) -> str:
    """A task Swarm rejected because its node has not the image and could not pull it, as a
    sentence naming the image, its registry and what to do; "" for any other task. (Swarm only
    logs the node's failed pull, on that node: what the task says is "No such image".)"""
    status = (task or {}).get("Status") or {}
    err = str(status.get("Err") or "")
    if status.get("State") != "rejected" or "no such image" not in err.lower() or not image:
        return ""
    registry = images.registry_of(image)
    return (
        f"The Swarm node {node_name} has not the image {image} and could not pull it from its registry "
        f"{registry} (Swarm: {err}); make {registry} reachable from that node and give the swarm its "
        f"credentials (`docker login {registry}` for the node worker's Docker config, DOCKER_CONFIG: the "
        "engine sends them with every service), or load the image on that node by hand."
    )


def swarm_ended(task: Mapping[str, Any] | None, node: Mapping[str, Any] | None, image: str = "") -> str:
    """Why Swarm ended, or is ending, the task, whatever its process does, as a sentence; "" when
    it did not. Its node drained (Swarm shuts its tasks down), down or gone (a lost node's tasks
    stay "running" in the manager's view until they are orphaned), or the task shut down, rejected
    (``image``: the service's, for a node that could not pull it) or orphaned by Swarm. With
    restart policy none Swarm makes no other task (and the placement constraint pins it anyway):
    the platform must see the replica as ended, and replace it."""
    if not task:
        return ""
    status = task.get("Status") or {}
    state = str(status.get("State") or "")
    desired = str(task.get("DesiredState") or "")
    name = str(((node or {}).get("Description") or {}).get("Hostname") or task.get("NodeID") or "its node")
    availability = str(((node or {}).get("Spec") or {}).get("Availability") or "")
    node_state = str(((node or {}).get("Status") or {}).get("State") or "")
    if state == "orphaned":
        return f"the Swarm node {name} was lost: Swarm gave its task up (orphaned)"
    if state == "rejected":
        missing = no_image(task, image, name)
        if missing:
            return missing
        return f"Swarm rejected its task on {name}: {status.get('Err') or status.get('Message') or 'no reason given'}"
    if state in ("complete", "failed"):
        return ""  # its process ended: the exit code says why
    if availability == "drain":
        return f"the Swarm node {name} was drained: Swarm stops its tasks there"
    # "down": Swarm gave up on its heartbeats ("disconnected" is a passing state, not counted);
    # "unknown": no such node any more (engine.py), or one Swarm knows nothing of.
    if node_state in ("down", "unknown"):
        return f"the Swarm node {name} is {node_state}: its task is lost"
    if state in ("shutdown", "remove") or desired in ("shutdown", "remove", "orphaned"):
        return f"Swarm shut its task down on {name} (its desired state is {desired or state})"
    return ""


def task_info(
    service: Any,
    task: Mapping[str, Any] | None,
    host: str,
    exit_text: str = "",
    node: Mapping[str, Any] | None = None,
) -> ReplicaInfo:
    """``exit_text``: the last log line, for a task that ended with an error code; ``node``: the
    attributes of the Swarm node the task is on (a drained or lost node's task has ended)."""
    attrs = service.attrs
    labels = dict((attrs.get("Spec") or {}).get("Labels") or {})
    status = (task or {}).get("Status") or {}
    state = TASK_STATES.get(str(status.get("State") or "new"), ReplicaState.EXITED) if task else ReplicaState.STARTING
    exit_code: int | None = None
    error = ""
    by_swarm = swarm_ended(task, node, service_image(attrs))
    if by_swarm:
        state, error = ReplicaState.EXITED, by_swarm
    elif state is ReplicaState.EXITED:
        exit_code = int((status.get("ContainerStatus") or {}).get("ExitCode") or 0)
        error = task_error(status, exit_code, exit_text)
    return ReplicaInfo(
        replica_id=service.id,
        name=(attrs.get("Spec") or {}).get("Name") or service.name,
        state=state,
        host=host,
        port=published_port(task, attrs) if state is not ReplicaState.EXITED else 0,
        labels=labels,
        exit_code=exit_code,
        error=error,
    )


def task_error(status: Mapping[str, Any], code: int, exit_text: str) -> str:
    if status.get("Err") and not code:
        # Swarm could not run it: no such image on the node, a bad mount, no node fits...
        return f"could not start: {status['Err']}"
    if code == BOOTSTRAP_FAILED:
        return f"pre-start: {exit_text}" if exit_text else f"the pre-start runner failed (exit code {code})"
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"exited with code {code} ({name})"
    return f"exited with code {code}" + (f": {exit_text[:300]}" if exit_text and code else "")


def state_of(task: Mapping[str, Any] | None) -> str:
    return str(((task or {}).get("Status") or {}).get("State") or "")


def container_id(task: Mapping[str, Any] | None) -> str:
    return str((((task or {}).get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID") or "")


def plan_dirs(service_attrs: Mapping[str, Any], state_dir: Path) -> list[Path]:
    """The plan folders the engine made for a service (found by its mounts, not memory)."""
    root = os.path.realpath(state_dir)
    spec = ((service_attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec") or {}
    return [
        Path(mount["Source"])
        for mount in spec.get("Mounts") or []
        if mount.get("Target") == BOOTSTRAP_DIR
        and os.path.realpath(mount.get("Source") or "").startswith(root + os.sep)
    ]
