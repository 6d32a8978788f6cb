"""One replica's container, spec in and state out: the ``containers.create`` arguments a
``ReplicaSpec`` becomes (command, user, limits, mounts and their refusals, GPUs, the pre-start
plan folder), and what a container's attributes, logs and stats say back (state, host port, why
it exited, CPU and memory use, log lines).

No engine state here: the engine passes what it was configured with.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

from serving.core import devices
from serving.node.engines.base import EngineError, ReplicaInfo, ReplicaSpec, ReplicaState, ReplicaStats
from serving.node.engines.docker.errors import docker_errors

BOOTSTRAP = Path(__file__).parents[1] / "bootstrap.py"
BOOTSTRAP_DIR = "/opt/modelserve"  # where the runner and its plan appear inside the container
BOOTSTRAP_FAILED = 97  # bootstrap.py's exit code for "a pre-start action failed"
PIDS_LIMIT = 1024
HOME = "/home/work"
MIB = 1 << 20
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
BUILD_HINT = (
    "build it on this node with `make image` (scripts/build-image.sh, for modelserve/python:3.11) "
    "or load it with `docker load -i IMAGE.tar` / `docker pull IMAGE` by hand; "
    "a node pulls images itself only with SERVING_IMAGE_PULL=missing and the image's registry in SERVING_REGISTRIES"
)

# Docker's container status -> our replica state. "paused" still holds its port and memory.
STATES = {
    "created": ReplicaState.STARTING,
    "restarting": ReplicaState.STARTING,
    "running": ReplicaState.RUNNING,
    "paused": ReplicaState.RUNNING,
    "removing": ReplicaState.EXITED,
    "exited": ReplicaState.EXITED,
    "dead": ReplicaState.EXITED,
}


# --- spec -> create arguments -----------------------------------------------------------------------


def device_requests(spec: ReplicaSpec, gpus: bool) -> list[DeviceRequest]:
    wanted = {key: value for key, value in spec.accelerators.items() if value > 0}
    if not wanted:
        return []
    asked = ", ".join(f"{key} {value:g}" for key, value in sorted(wanted.items()))
    others = sorted(key for key in wanted if not key.startswith("cuda."))
    if others:
        raise EngineError(
            f"The Docker engine can not provide {', '.join(others)}: only NVIDIA GPUs (cuda.*) are supported."
        )
    if not gpus:
        raise EngineError(
            f"The replica {spec.name} asks for {asked}, but this node has no GPU; the scheduler should "
            "not have placed it here (advertise accelerators only on GPU nodes)."
        )
    if not spec.devices:
        raise EngineError(
            f"The replica {spec.name} asks for {asked} but was assigned no GPU device (it was placed "
            "before devices were allocated); restart the service so the scheduler assigns devices."
        )
    # The devices the scheduler assigned, never a count: a count would give every replica GPU 0.
    ids = sorted({devices.index(d) for d in spec.devices}, key=int)
    return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


def bind_mount(source: str, target: str, read_only: bool) -> DockerMount:
    if not os.path.isabs(source) or not os.path.isabs(target):
        raise EngineError(f"The mount {source} -> {target} needs absolute paths on both sides.")
    if not os.path.exists(source):
        # A bind of a missing path would fail in Docker with a less clear message.
        raise EngineError(f"The folder {source} to mount at {target} does not exist on this node.")
    real = os.path.realpath(source)
    sockets = list(DOCKER_SOCKETS)
    if os.environ.get("DOCKER_HOST", "").startswith("unix://"):
        sockets.append(os.environ["DOCKER_HOST"].removeprefix("unix://"))
    for sock in sockets:
        sock_real = os.path.realpath(sock)
        if real in (sock, sock_real) or sock_real.startswith(real.rstrip("/") + "/"):
            raise EngineError(
                f"Refusing to mount {source}: it holds the Docker socket, which would give the replica "
                "control of the node."
            )
    if target.rstrip("/") == BOOTSTRAP_DIR or target.startswith(BOOTSTRAP_DIR + "/"):
        raise EngineError(f"The mount target {target} is reserved for the platform ({BOOTSTRAP_DIR}).")
    return DockerMount(target, source, type="bind", read_only=read_only)


def write_plan(
    spec: ReplicaSpec, image: Any, bootstrap_path: Path, state_dir: Path, no_new_privs: bool = False
) -> Path:
    """A per-replica folder with bootstrap.py and plan.json, mounted read-only in the container;
    ``no_new_privs``: the runner sets that bit before anything else (the Swarm engine, where the
    manager can not set it on a service)."""
    if not bootstrap_path.is_file():
        raise EngineError(f"The pre-start runner {bootstrap_path} is missing; reinstall the platform.")
    if spec.command is not None:
        command = list(spec.command)
    else:
        # Pre-start actions replace the entrypoint, so the image's own command runs after them.
        config = (image.attrs or {}).get("Config") or {}
        command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
        if not command:
            raise EngineError(f"The image {spec.image} has no command of its own; give the service a start command.")
    plan = {
        "actions": [{"action": a.action, "args": dict(a.args)} for a in spec.pre_start_actions],
        "command": command,
        "command_is_shell": spec.command_is_shell and spec.command is not None,
        "shell": spec.shell,
        "workdir": spec.workdir,
        "no_new_privs": no_new_privs,
    }
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        plan_dir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=state_dir))
        # Readable by whatever user the image runs as; the folder holds no secrets of ours.
        plan_dir.chmod(0o755)
        shutil.copyfile(bootstrap_path, plan_dir / "bootstrap.py")
        (plan_dir / "plan.json").write_text(json.dumps(plan, default=list))
        for item in plan_dir.iterdir():
            item.chmod(0o644)
    except OSError as exc:
        raise EngineError(f"Could not write the pre-start plan under {state_dir}: {exc}.") from exc
    return plan_dir


def plan_dirs(container: Any, state_dir: Path) -> list[Path]:
    """The plan folders the engine made for ``container`` (found by its mounts, not memory)."""
    root = os.path.realpath(state_dir)
    found = []
    for mount in container.attrs.get("Mounts") or []:
        source = mount.get("Source") or ""
        if mount.get("Destination") == BOOTSTRAP_DIR and os.path.realpath(source).startswith(root + os.sep):
            found.append(Path(source))
    return found


def create_kwargs(
    spec: ReplicaSpec,
    mounts: list[DockerMount],
    labels: dict[str, str],
    plan_dir: Path | None,
    gpu_requests: list[DeviceRequest],
    *,
    uid: int,
    gid: int,
    publish_host: str,
    pids_limit: int,
    cap_add: tuple[str, ...],
) -> dict[str, Any]:
    """The arguments of ``containers.create`` (but the network) for ``spec``; ``plan_dir``: its
    pre-start plan folder, if it has actions."""
    entrypoint: list[str] | None = None
    command: list[str] | None = None
    if plan_dir is not None:
        mounts = [*mounts, DockerMount(BOOTSTRAP_DIR, str(plan_dir), type="bind", read_only=True)]
        entrypoint = ["python3", f"{BOOTSTRAP_DIR}/bootstrap.py", f"{BOOTSTRAP_DIR}/plan.json"]
    elif spec.command is not None:
        argv = [spec.shell, "-c", spec.command[0]] if spec.command_is_shell else list(spec.command)
        # Setting the entrypoint replaces the image's ENTRYPOINT too (and its CMD is dropped),
        # so the definition's start_command is the whole command line, as users expect.
        entrypoint, command = argv[:1], argv[1:]
    # else: the image's own entrypoint and command (NIM, "Predefined Image Command").

    environment = dict(spec.env)
    tmpfs: dict[str, str] = {}
    if not any(os.path.normpath(m.target) == HOME for m in spec.mounts):
        # The image's /home/work belongs to root: the replica's user gets a private one, as on
        # the local engine (in memory, so it counts against the memory limit).
        tmpfs[HOME] = f"exec,uid={uid},gid={gid},mode=0755"
    # The user's passwd entry, if the image has one, would say /nonexistent (nobody's).
    environment.setdefault("HOME", HOME)
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "labels": labels,
        "environment": environment,
        "user": f"{uid}:{gid}",
        "tmpfs": tmpfs or None,
        "entrypoint": entrypoint,
        "command": command,
        "working_dir": spec.workdir or None,
        "mounts": mounts,
        "ports": {f"{spec.port}/tcp": (publish_host, None)},
        "init": True,
        "detach": True,
        "pids_limit": pids_limit,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "cap_add": list(cap_add) or None,
        "privileged": False,
        # Bounded logs: a chatty server must not fill the node's disk.
        "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
    }
    if spec.cpu > 0:
        kwargs["nano_cpus"] = int(spec.cpu * 1e9)
    if spec.mem_bytes > 0:
        # Same memswap as memory: no swap, so going past the limit is an OOM kill, not a crawl.
        kwargs["mem_limit"] = spec.mem_bytes
        kwargs["memswap_limit"] = spec.mem_bytes
    if spec.shm_bytes > 0:
        kwargs["shm_size"] = spec.shm_bytes
    if gpu_requests:
        kwargs["device_requests"] = gpu_requests
        # The NVIDIA runtime shows the container its devices numbered from 0.
        environment.update(devices.replica_env(spec.devices, renumbered=True))
    return kwargs


# --- container -> state -----------------------------------------------------------------------------


def host_port(attrs: Mapping[str, Any]) -> int:
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for key, bindings in ports.items():
        if not key.endswith("/tcp"):
            continue
        for binding in bindings or []:
            if binding.get("HostPort"):
                return int(binding["HostPort"])
    return 0  # not running: no port is held


def replica_info(container: Any, publish_host: str) -> ReplicaInfo:
    attrs = container.attrs
    state = attrs.get("State") or {}
    status = state.get("Status") or container.status
    replica_state = STATES.get(status, ReplicaState.EXITED)
    exit_code: int | None = None
    error = ""
    if replica_state is ReplicaState.EXITED:
        exit_code = int(state.get("ExitCode") or 0)
        error = exit_error(container, state, attrs, exit_code)
    return ReplicaInfo(
        replica_id=container.id,
        name=container.name,
        state=replica_state,
        host=publish_host,
        port=host_port(attrs),
        labels=dict((attrs.get("Config") or {}).get("Labels") or {}),
        exit_code=exit_code,
        error=error,
    )


def exit_error(container: Any, state: Mapping[str, Any], attrs: Mapping[str, Any], code: int) -> str:
    if state.get("OOMKilled"):
        limit = int((attrs.get("HostConfig") or {}).get("Memory") or 0)
        return f"killed: out of memory (limit {limit // MIB} MiB)"
    if state.get("Error"):  # Docker itself could not run it (bad mount, missing executable...)
        return f"could not start: {state['Error']}"
    if code == BOOTSTRAP_FAILED:
        return prestart_error(container)
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"exited with code {code} ({name})"
    last = last_lines(container, 20)
    tail = next((line for line in reversed(last) if line.strip()), "")
    return f"exited with code {code}" + (f": {tail.strip()[:300]}" if tail and code else "")


def prestart_error(container: Any) -> str:
    """bootstrap.py prints ``[prestart] action N (kind) failed: why`` before exiting 97."""
    lines = [line.strip() for line in last_lines(container, 200)]
    prestart = [line.removeprefix("[prestart]").strip() for line in lines if line.startswith("[prestart]")]
    for line in reversed(prestart):
        if "failed:" in line:
            return f"pre-start {line}"
    if prestart:
        return f"pre-start: {prestart[-1]}"
    return f"the pre-start runner failed (exit code {BOOTSTRAP_FAILED})"


def last_lines(container: Any, tail: int) -> list[str]:
    try:
        raw = container.logs(stdout=True, stderr=True, tail=tail)
    except Exception:  # the error text is best effort; never fail inspect() over it
        return []
    return raw.decode("utf-8", "replace").splitlines()


def cpu_percent(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> float | None:
    """CPU use between two cgroup samples, 100.0 = one core; None when ``prev`` is not a sample."""
    prev_system = prev.get("system_cpu_usage") or 0
    cur_system = cur.get("system_cpu_usage") or 0
    prev_total = (prev.get("cpu_usage") or {}).get("total_usage")
    cur_total = (cur.get("cpu_usage") or {}).get("total_usage") or 0
    if not prev_system or prev_total is None or cur_system <= prev_system:
        return None
    online = cur.get("online_cpus") or len((cur.get("cpu_usage") or {}).get("percpu_usage") or ()) or 1
    delta = max(cur_total - prev_total, 0)
    # system_cpu_usage counts all host cores, so scale by their number to get "cores used".
    return float(delta) / float(cur_system - prev_system) * online * 100.0


def memory_used(memory_stats: Mapping[str, Any]) -> int:
    """Memory in use as `docker stats` shows it: usage minus reclaimable page cache."""
    usage = int(memory_stats.get("usage") or 0)
    stats = memory_stats.get("stats") or {}
    # cgroup v1 reports total_inactive_file, v2 inactive_file.
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0)) or 0
    return usage - int(inactive) if inactive < usage else usage


def close_when_stopped(stop: threading.Event, done: threading.Event, stream: Any) -> None:
    while not done.is_set():
        if stop.wait(0.2):
            with contextlib.suppress(Exception):
                stream.close()
            return


def sampled_stats(container: Any, limit: int) -> ReplicaStats:
    """A running container's CPU and memory now, from the daemon (``limit``: its memory limit, for
    a daemon that reports none). Raises docker's errors: the caller names what failed."""
    # stream=False makes the daemon wait for a second sample and fill precpu_stats...
    sample = container.stats(stream=False)
    cpu = cpu_percent(sample.get("precpu_stats") or {}, sample.get("cpu_stats") or {})
    if cpu is None:
        # ...except right after start, when there is no earlier sample: take our own.
        later = container.stats(stream=False)
        cpu = cpu_percent(sample.get("cpu_stats") or {}, later.get("cpu_stats") or {})
        sample = later
    memory = sample.get("memory_stats") or {}
    return ReplicaStats(
        cpu_percent=round(cpu or 0.0, 2),
        mem_bytes=memory_used(memory),
        mem_limit_bytes=int(memory.get("limit") or limit),
    )


def log_lines(
    replica_id: str, stream: Any, stop: threading.Event | None, timeout: float, notes: tuple[str, ...] = ()
) -> Iterator[str]:
    """A replica's log lines from a docker log ``stream`` (a container's, or a Swarm service's), after
    the engine's own ``notes``; with ``stop``, a follow that ends when it is set."""
    yield from notes
    done = threading.Event()
    if stop is not None:
        # A quiet replica leaves the reader blocked on the daemon's socket: closing the stream
        # from here is the only way to end that read when nobody follows any more.
        threading.Thread(
            target=close_when_stopped,
            args=(stop, done, stream),
            name=f"logs-stop-{replica_id[:12]}",
            daemon=True,
        ).start()
    try:
        with docker_errors(f"read the logs of replica {replica_id}", replica_id, timeout):
            yield from decode_lines(iter(stream))
    except Exception:
        if stop is None or not stop.is_set():
            raise
    finally:
        done.set()
        # A consumer that stops early (a closed websocket) must not leave the socket open.
        with contextlib.suppress(Exception):
            stream.close()


def decode_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Docker hands out frames, not lines: reassemble lines, decoding UTF-8 across frame edges."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.rstrip("\r")
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending.rstrip("\r")
