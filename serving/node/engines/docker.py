"""The Docker engine: one container per replica, driven through docker-py.

Every replica is a container named after ``ReplicaSpec.name`` and carrying its labels, so a node
worker that restarts finds its replicas again with ``list()`` (docs/architecture.md). Choices that matter:

* the image must already be on the node: we look it up first and raise ``ImageNotFound`` with how
  to build or load it, because asking the engine for a missing image makes it try a registry pull;
* ``init=True``: a tiny init is PID 1 and forwards SIGTERM, otherwise a Python server ignores it
  and every stop waits the whole grace period;
* locked down: every capability dropped, ``no-new-privileges``, a pids limit, never privileged,
  never the host network, and the Docker socket (or a folder holding it) can not be mounted;
* not root (issue 13): replicas run as ``uid``:``gid`` (65534, nobody/nogroup, by default; settings
  ``DOCKER_REPLICA_UID``/``_GID``), whatever user the image names, so what they write on a
  read-write mount is not root's on the host and a read-write mount is writable only where the
  folder's modes let that user write (as on the local engine). ``/home/work`` is a private tmpfs
  owned by that user (the image's one belongs to root), ``HOME`` points there. When a replica
  stops, setuid/setgid bits of files on its read-write mounts are cleared (``mounts.py``);
* the server's port is published on 127.0.0.1 (a setting) at a host port the engine picks, so
  replicas of one service never collide and ports are never exhausted (S4.3, S10);
* tenants apart (issue 13): replicas are never on Docker's default bridge, where every container
  reaches every other. A plain replica joins the installation's replica network
  (``ms-replicas[-<installation>]``), a bridge with inter-container communication off, so it
  reaches no other replica (of another service or its own) by its address there, while the proxy
  reaches it through its published port. Docker keeps different bridges apart, so other containers
  on the daemon do not reach it either. With ``egress="deny"`` (``SERVING_REPLICA_EGRESS``) the
  replica and cluster networks' bridges get iptables rules dropping every connection a replica
  opens to anything outside its own network: the host's addresses (INPUT) and everything the host
  routes to (DOCKER-USER); answers on the published ports still flow. Docker's ``internal``
  networks would do that too, but Docker publishes no port of a container on one. Either way a
  replica can not open a TCP connection to the ports Docker publishes replicas on (the host's
  ephemeral range) at any node's address (``set_node_addresses``, from the Node table at each
  heartbeat and before each start): a replica calling another service's replica that way, on this
  node or another, would skip the proxy's tokens. Other ports there (the proxy's, say) stay open;
* cluster mode (S4.1): the members of one cluster share a user-defined bridge network of their own
  (``ms-cluster-<route>``, made with the first member, removed with the last, created or running) where each has its
  host name (main1, sub1, ...) as alias, as on Backend.AI; a sub's ``BACKENDAI_CLUSTER_MAIN_ADDR``
  and ``BACKENDAI_CLUSTER_ADDRS`` are main's address on that network (the published 127.0.0.1
  port means nothing inside a container). Containers of other networks can not reach it (Docker's
  isolation between bridges). One daemon owns the network, so the members must share one Docker
  host: several node workers on one machine do, real hosts would need an overlay (Swarm) network;
* pre-start actions (S2.3) run inside the container by ``bootstrap.py``, bind-mounted read-only
  at /opt/modelserve with a JSON plan written to a per-replica folder under ``state_dir``;
* every Docker call is bounded in time (30 s, 2 s for the liveness ping) and every Docker error
  becomes an ``EngineError`` whose text is a sentence.

The daemon must share the host's filesystem (bind mounts use host paths): a local dockerd.
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.types import DeviceRequest, EndpointConfig, LogConfig
from docker.types import Mount as DockerMount

from serving.node.engines import firewall
from serving.node.engines import mounts as mount_hygiene
from serving.node.engines.base import (
    LABEL_INSTALLATION,
    LABEL_ROLE,
    LABEL_ROUTE,
    ClusterPeering,
    EngineError,
    ImageNotFound,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
    ReplicaStats,
)
from serving.node.engines.firewall import DEFAULT_GID, DEFAULT_UID

log = logging.getLogger(__name__)

BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
BOOTSTRAP_DIR = "/opt/modelserve"  # where the runner and its plan appear inside the container
BOOTSTRAP_FAILED = 97  # bootstrap.py's exit code for "a pre-start action failed"
DEFAULT_STATE_DIR = Path(__file__).resolve().parents[2] / "var" / "engine" / "docker"
API_TIMEOUT = 30.0
PING_TIMEOUT = 2.0
PIDS_LIMIT = 1024
HOME = "/home/work"
MIB = 1 << 20
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
CLUSTER_NETWORK_PREFIX = "ms-cluster-"
REPLICA_NETWORK = "ms-replicas"  # + "-<installation>": every plain replica's network
ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
# Every iptables rule the engine adds carries this comment and its bridge's name, so the rules of
# a removed network are found and removed with it.
RULE_COMMENT = "modelserve-replicas "
LABEL_CLUSTER = "serving.cluster"  # on a cluster's network: the route (key) it belongs to
LABEL_NETWORK = "serving.network"  # on the replica network: "replicas"
# Machine-wide: every node worker on this host talks to the same daemon and its networks.
NETWORK_LOCK = Path(os.environ.get("MODELSERVE_DOCKER_NETWORK_LOCK", "/run/modelserve/docker-networks.lock"))
NETWORK_LOCK_TIMEOUT = 30.0  # seconds a start or a removal waits for it
BUILD_HINT = (
    "build it on this node with `make image` (scripts/build-image.sh, for modelserve/python:3.11) "
    "or load it with `docker load -i IMAGE.tar` / `docker pull IMAGE` by hand; "
    "the platform never pulls images itself"
)

# Docker's container status -> our replica state. "paused" still holds its port and memory.
_STATES = {
    "created": ReplicaState.STARTING,
    "restarting": ReplicaState.STARTING,
    "running": ReplicaState.RUNNING,
    "paused": ReplicaState.RUNNING,
    "removing": ReplicaState.EXITED,
    "exited": ReplicaState.EXITED,
    "dead": ReplicaState.EXITED,
}

ClientFactory = Callable[..., docker.DockerClient]


def _explain(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip().rstrip(".")


@contextlib.contextmanager
def _docker_errors(what: str, replica: str | None = None, timeout: float = API_TIMEOUT) -> Iterator[None]:
    """Turn docker-py / requests failures into EngineError sentences (ReplicaNotFound for a 404)."""
    try:
        yield
    except EngineError:
        raise
    except docker.errors.NotFound as exc:
        if replica is not None:
            raise ReplicaNotFound(f"The replica {replica} does not exist (any more).") from exc
        raise EngineError(f"Docker could not {what}: {_explain(exc)}.") from exc
    except docker.errors.APIError as exc:
        raise EngineError(f"Docker could not {what}: {_explain(exc)}.") from exc
    except requests.exceptions.Timeout as exc:
        raise EngineError(
            f"The Docker engine did not answer within {timeout:g} s while trying to {what}; is dockerd overloaded?"
        ) from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise EngineError(
            f"Docker could not {what}: the engine is unreachable: {_explain(exc)}; "
            "start it with scripts/docker-up.sh or use SERVING_ENGINE=local."
        ) from exc


def _network_missing(text: str) -> bool:
    return "network" in text and "not found" in text


def _cpu_percent(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> float | None:
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


def _memory_used(memory_stats: Mapping[str, Any]) -> int:
    """Memory in use as `docker stats` shows it: usage minus reclaimable page cache."""
    usage = int(memory_stats.get("usage") or 0)
    stats = memory_stats.get("stats") or {}
    # cgroup v1 reports total_inactive_file, v2 inactive_file.
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0)) or 0
    return usage - int(inactive) if inactive < usage else usage


def _close_when_stopped(stop: threading.Event, done: threading.Event, stream: Any) -> None:
    while not done.is_set():
        if stop.wait(0.2):
            with contextlib.suppress(Exception):
                stream.close()
            return


def _decode_lines(chunks: Iterator[bytes]) -> Iterator[str]:
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


class DockerEngine:
    """Replicas as Docker containers. Thread-safe: one docker-py client shared behind a lock."""

    name = "docker"

    def __init__(
        self,
        client_factory: ClientFactory = docker.from_env,
        bootstrap_path: Path | None = None,
        state_dir: Path | None = None,
        *,
        publish_host: str = "127.0.0.1",
        gpus: bool = False,
        pids_limit: int = PIDS_LIMIT,
        cap_add: tuple[str, ...] = (),
        timeout: float = API_TIMEOUT,
        ping_timeout: float = PING_TIMEOUT,
        installation: str = "",
        egress: str = "allow",
        replica_network: str | None = None,
        uid: int = DEFAULT_UID,
        gid: int = DEFAULT_GID,
    ) -> None:
        """
        ``client_factory`` is called with ``timeout=`` (seconds) and must return a DockerClient.
        ``state_dir`` holds one folder per replica with its pre-start plan (default var/engine/docker).
        ``publish_host`` is the host address replica ports are published on (and reported).
        ``gpus``: the node has NVIDIA GPUs and the NVIDIA runtime; without it cuda.* slots are refused.
        ``cap_add``: capabilities an installation's images need back (none for ours).
        ``installation``: labels every container with it and lists only those that carry it.
        ``egress``: "allow" (replicas reach what the host reaches, but not other replicas) or "deny"
        (replicas reach nothing outside their own network; needs root and iptables on the node).
        ``replica_network``: the network plain replicas join (default ms-replicas[-<installation>]).
        ``uid``/``gid``: who replicas run as (0 and 0: root without capabilities, not for tenants).
        """
        firewall.check_replica_ids(
            uid, gid, who="The Docker replicas'", uid_setting="DOCKER_REPLICA_UID", gid_setting="DOCKER_REPLICA_GID"
        )
        self.uid, self.gid = uid, gid
        self.egress = firewall.check_egress(egress)
        self.replica_network = replica_network or (
            f"{REPLICA_NETWORK}-{installation}" if installation else REPLICA_NETWORK
        )
        self._client_factory = client_factory
        self.bootstrap_path = Path(bootstrap_path) if bootstrap_path is not None else BOOTSTRAP
        self.state_dir = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
        self.publish_host = publish_host
        self.gpus = gpus
        self.pids_limit = pids_limit
        self.cap_add = tuple(cap_add)
        self.timeout = timeout
        self.ping_timeout = ping_timeout
        self.installation = installation
        self._client_lock = threading.Lock()
        self._client_instance: docker.DockerClient | None = None
        self._iptables = firewall.find_iptables()
        self._rules_lock = threading.Lock()
        self._warned_unguarded = False
        self._logged_guard: tuple[tuple[str, ...], tuple[int, int]] | None = None
        # Every node's address (NODE_ADDRESS of each row in the Node table), refreshed by the node
        # agent at each heartbeat (set_node_addresses): replicas' ports are published there.
        self._node_addresses: frozenset[str] = frozenset()

    # --- plumbing ---------------------------------------------------------------------------------

    def _client(self) -> docker.DockerClient:
        with self._client_lock:
            if self._client_instance is None:
                with _docker_errors("connect to the engine", timeout=self.timeout):
                    self._client_instance = self._client_factory(timeout=self.timeout)
            return self._client_instance

    def _errors(self, what: str, replica: str | None = None) -> contextlib.AbstractContextManager[None]:
        return _docker_errors(what, replica, self.timeout)

    def _container(self, replica_id: str) -> Any:
        client = self._client()
        with self._errors(f"look up replica {replica_id}", replica=replica_id):
            return client.containers.get(replica_id)

    # --- Engine protocol --------------------------------------------------------------------------

    def available(self) -> bool:
        """A quick ping (2 s); any failure, even building the client, means "not available"."""
        try:
            client = self._client_factory(timeout=self.ping_timeout)
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        """Create and start the container; returns once it runs, with the host port it got."""
        device_requests = self._device_requests(spec)
        mounts = [self._mount(m.source, m.target, m.read_only) for m in spec.mounts]
        client = self._client()
        image = self._image(client, spec.image)

        labels = dict(spec.labels)
        # list() only sees containers carrying the route label; never start one it can not find.
        labels.setdefault(LABEL_ROUTE, spec.name)
        if self.installation:
            labels[LABEL_INSTALLATION] = self.installation

        entrypoint: list[str] | None = None
        command: list[str] | None = None
        plan_dir: Path | None = None
        if spec.pre_start_actions:
            plan_dir = self._write_plan(spec, image)
            mounts.append(DockerMount(BOOTSTRAP_DIR, str(plan_dir), type="bind", read_only=True))
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
            tmpfs[HOME] = f"exec,uid={self.uid},gid={self.gid},mode=0755"
        # The user's passwd entry, if the image has one, would say /nonexistent (nobody's).
        environment.setdefault("HOME", HOME)
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "labels": labels,
            "environment": environment,
            "user": f"{self.uid}:{self.gid}",
            "tmpfs": tmpfs or None,
            "entrypoint": entrypoint,
            "command": command,
            "working_dir": spec.workdir or None,
            "mounts": mounts,
            "ports": {f"{spec.port}/tcp": (self.publish_host, None)},
            "init": True,
            "detach": True,
            "pids_limit": self.pids_limit,
            "security_opt": ["no-new-privileges"],
            "cap_drop": ["ALL"],
            "cap_add": list(self.cap_add) or None,
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
        if device_requests:
            kwargs["device_requests"] = device_requests

        container = None
        network: str | None = None
        warnings = mount_hygiene.unwritable_mounts(spec.mounts, self.uid, self.gid)
        self._write_notes(spec.name, [f"warning: {warning.log}" for warning in warnings])
        try:
            for attempt in (1, 2):
                # The network is made (if need be) and the container created on it under the
                # node's network lock, which _remove_network_if_unused takes too: from then on the
                # created container is attached, so no worker removes the network under it.
                with self._network_lock():
                    network = kwargs["network"] = self._network_for(client, spec, kwargs)
                    container = self._create(client, spec, kwargs)
                try:
                    with self._errors(f"start the container {spec.name}"):
                        container.start()
                        container.reload()  # the host port is only known once it runs
                    break
                except EngineError as exc:
                    # Removed by hand (or by a worker of an older release) between create and start:
                    # make it again, once.
                    if attempt == 2 or not _network_missing(str(exc)):
                        raise
                    with contextlib.suppress(Exception):
                        container.remove(force=True, v=True)
                    container = None
            assert container is not None
            return dataclasses.replace(self._info(container), warnings=tuple(w.public for w in warnings))
        except BaseException:
            # Leave nothing behind: a half-created container would block the name on retry.
            if container is not None:
                with contextlib.suppress(Exception):
                    container.remove(force=True, v=True)
            if network is not None:
                self._remove_network_if_unused(client, network)
            if plan_dir is not None:
                shutil.rmtree(plan_dir, ignore_errors=True)
            self._notes_path(spec.name).unlink(missing_ok=True)
            raise

    def _notes_path(self, name: str) -> Path:
        return self.state_dir / "notes" / f"{name}.log"

    def _write_notes(self, name: str, notes: builtins.list[str]) -> None:
        """The engine's own lines for a replica's log (the container's log is the server's only):
        ``logs()`` shows them first, prefixed ``[engine]`` as on the local engine."""
        path = self._notes_path(name)
        if not notes:
            path.unlink(missing_ok=True)  # a reused name must not show an old replica's notes
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"[engine] {note}\n" for note in notes))
        except OSError as exc:
            log.warning("could not keep the engine's notes for %s: %s", name, exc)

    def _notes(self, name: str) -> builtins.list[str]:
        try:
            return self._notes_path(name).read_text().splitlines()
        except OSError:
            return []

    def _network_for(self, client: docker.DockerClient, spec: ReplicaSpec, kwargs: dict[str, Any]) -> str:
        """The replica's network, made if missing; a cluster member's alias and main's address."""
        if spec.cluster is None:
            return self._replica_network(client)
        network = self._cluster_network(client, spec.cluster)
        kwargs["networking_config"] = {network: EndpointConfig(client.api._version, aliases=[spec.cluster.host])}
        kwargs["environment"].update(self._peer_env(client, spec.cluster, network, spec.port))
        return network

    def _create(self, client: docker.DockerClient, spec: ReplicaSpec, kwargs: dict[str, Any]) -> Any:
        with self._errors(f"create the container {spec.name}"):
            try:
                return client.containers.create(spec.image, **kwargs)
            except docker.errors.ImageNotFound as exc:  # removed since we looked it up
                raise ImageNotFound(f"The image {spec.image} is not on this node; {BUILD_HINT}.") from exc
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise EngineError(
                        f"A container named {spec.name} already exists on this node; stop that replica first."
                    ) from exc
                raise

    def stop(self, replica_id: str, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``grace`` s, then remove with its plan folder; gone is fine."""
        try:
            container = self._container(replica_id)
        except ReplicaNotFound:
            return
        plan_dirs = self._plan_dirs(container)
        writable = [
            str(m.get("Source"))
            for m in container.attrs.get("Mounts") or []
            if m.get("Type") == "bind" and m.get("RW") and m.get("Source")
        ]
        # Only a cluster's own network goes with its last member; the replica network stays.
        networks = [
            name
            for name in ((container.attrs.get("NetworkSettings") or {}).get("Networks") or {})
            if name.startswith(CLUSTER_NETWORK_PREFIX)
        ]
        with self._errors(f"stop replica {replica_id}"):
            with contextlib.suppress(docker.errors.NotFound):
                # The API takes whole seconds; round up so a short grace is never zero by accident.
                container.stop(timeout=math.ceil(max(grace, 0.0)))
            try:
                container.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # Another worker is removing it right now: the outcome we want.
                if exc.status_code != 409 or "in progress" not in _explain(exc):
                    raise
        for path in plan_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._notes_path(container.name).unlink(missing_ok=True)
        for source in writable:
            # Gone, so it can set no bit again: what it left is made harmless for the host.
            mount_hygiene.strip_setid_bits(source)
        for name in networks:
            self._remove_network_if_unused(self._client(), name)

    def inspect(self, replica_id: str) -> ReplicaInfo:
        return self._info(self._container(replica_id))

    def logs(
        self, replica_id: str, tail: int = 200, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Decoded lines of stdout+stderr; raises ReplicaNotFound at once, not at the first line."""
        container = self._container(replica_id)
        with self._errors(f"read the logs of replica {replica_id}", replica=replica_id):
            stream = container.logs(
                stdout=True, stderr=True, stream=True, follow=follow, tail=tail if tail >= 0 else "all"
            )
        return self._log_lines(replica_id, stream, stop if follow else None, tuple(self._notes(container.name)))

    def _log_lines(
        self, replica_id: str, stream: Any, stop: threading.Event | None, notes: tuple[str, ...] = ()
    ) -> Iterator[str]:
        yield from notes
        done = threading.Event()
        if stop is not None:
            # A quiet replica leaves the reader blocked on the daemon's socket: closing the stream
            # from here is the only way to end that read when nobody follows any more.
            threading.Thread(
                target=_close_when_stopped, args=(stop, done, stream), name=f"logs-stop-{replica_id[:12]}", daemon=True
            ).start()
        try:
            with self._errors(f"read the logs of replica {replica_id}", replica=replica_id):
                yield from _decode_lines(iter(stream))
        except Exception:
            if stop is None or not stop.is_set():
                raise
        finally:
            done.set()
            # A consumer that stops early (a closed websocket) must not leave the socket open.
            with contextlib.suppress(Exception):
                stream.close()

    def stats(self, replica_id: str) -> ReplicaStats:
        container = self._container(replica_id)
        limit = int((container.attrs.get("HostConfig") or {}).get("Memory") or 0)
        if container.status != "running":
            return ReplicaStats(cpu_percent=0.0, mem_bytes=0, mem_limit_bytes=limit)
        with self._errors(f"read the stats of replica {replica_id}", replica=replica_id):
            # stream=False makes the daemon wait for a second sample and fill precpu_stats...
            sample = container.stats(stream=False)
            cpu = _cpu_percent(sample.get("precpu_stats") or {}, sample.get("cpu_stats") or {})
            if cpu is None:
                # ...except right after start, when there is no earlier sample: take our own.
                later = container.stats(stream=False)
                cpu = _cpu_percent(sample.get("cpu_stats") or {}, later.get("cpu_stats") or {})
                sample = later
        memory = sample.get("memory_stats") or {}
        return ReplicaStats(
            cpu_percent=round(cpu or 0.0, 2),
            mem_bytes=_memory_used(memory),
            mem_limit_bytes=int(memory.get("limit") or limit),
        )

    def list(self, labels: Mapping[str, str] | None = None) -> builtins.list[ReplicaInfo]:
        """Our containers (they carry LABEL_ROUTE), running or not, filtered by label equality."""
        wanted = [LABEL_ROUTE] + [f"{key}={value}" for key, value in (labels or {}).items()]
        if self.installation:
            wanted.append(f"{LABEL_INSTALLATION}={self.installation}")
        client = self._client()
        with self._errors("list the replicas"):
            # ignore_removed: a container removed between the listing and its inspect is just gone.
            containers = client.containers.list(all=True, filters={"label": wanted}, ignore_removed=True)
        infos = []
        for container in containers:
            with contextlib.suppress(ReplicaNotFound):
                infos.append(self._info(container))
        return infos

    # --- networks ---------------------------------------------------------------------------------

    @staticmethod
    def _bridge_name(network: str) -> str:
        """The host interface of one of our networks: named by us, so firewall rules can name it
        before and after Docker's own id is known (15 characters at most, the kernel's limit)."""
        return "msr" + hashlib.sha256(network.encode()).hexdigest()[:12]

    def _ensure_network(self, client: docker.DockerClient, name: str, labels: Mapping[str, str], icc: bool) -> str:
        """Make the bridge network ``name`` unless it exists, then its firewall rules."""
        bridge = self._bridge_name(name)
        with self._errors(f"make the network {name}"):
            # The daemon's name filter matches parts of names too.
            found = [n for n in client.networks.list(names=[name]) if n.name == name]
            if found:
                options = found[0].attrs.get("Options") or {}
                bridge = options.get(BRIDGE_NAME_OPTION) or f"br-{found[0].id[:12]}"
                if not icc and options.get(ICC_OPTION) != "false":
                    raise EngineError(
                        f"The network {name} lets its containers reach each other; remove it "
                        f"(`docker network rm {name}`) so the platform makes it again with that switched off."
                    )
            else:
                options = {BRIDGE_NAME_OPTION: bridge}
                if not icc:
                    options[ICC_OPTION] = "false"
                labels = {**labels, **({LABEL_INSTALLATION: self.installation} if self.installation else {})}
                try:
                    client.networks.create(name, driver="bridge", options=options, labels=labels, check_duplicate=True)
                except docker.errors.APIError:
                    # Another replica made it meanwhile: Docker says so with a 409, or (the bridge's
                    # name is ours, so a second network of that name can never be made) with
                    # "networks have same bridge name".
                    if not any(n.name == name for n in client.networks.list(names=[name])):
                        raise
        self._guard_bridge(bridge)
        return name

    def _replica_network(self, client: docker.DockerClient) -> str:
        """The network of plain replicas: one bridge, no traffic between its containers."""
        return self._ensure_network(client, self.replica_network, {LABEL_NETWORK: "replicas"}, icc=False)

    def _cluster_network(self, client: docker.DockerClient, cluster: ClusterPeering) -> str:
        """The cluster's own bridge network, made by whichever member comes first."""
        name = f"{CLUSTER_NETWORK_PREFIX}{cluster.key}"
        return self._ensure_network(client, name, {LABEL_CLUSTER: cluster.key}, icc=True)

    # --- firewall rules of our bridges --------------------------------------------------------------

    def _guarded_addresses(self) -> builtins.list[str]:
        """Every node's address replicas' ports are published on (this node's and the others'),
        but loopback ones (a container's 127.0.0.1 is its own: it never reaches the host's) and
        IPv6 ones (replica networks are IPv4 only)."""
        guarded = set()
        for address in {self.publish_host, *self._node_addresses}:
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                continue
            if parsed.version == 4 and not parsed.is_loopback and not parsed.is_unspecified:
                guarded.add(str(parsed))
        return sorted(guarded, key=ipaddress.ip_address)

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        """The addresses of every node of the installation (the Node table's): in ``allow`` mode
        replicas may not open connections to the ports Docker publishes replicas on at any of
        them, or a replica on one node would call another node's published replica ports past the
        proxy's tokens.

        The node agent calls this at every heartbeat, and the node side before every start (in
        whichever worker process runs it: a forked worker's engine knows no address until then).
        Each call re-asserts the rules of every bridge of this installation, so a rule deleted by
        hand comes back at the next heartbeat, and drops the rules of addresses no longer in the
        table: the one place rules of addresses are dropped (a start only adds)."""
        self._node_addresses = frozenset(a.strip() for a in addresses if a and a.strip())
        if self.egress != "allow" or firewall.usable_iptables(self._iptables) is None:
            return
        client = self._client()
        with self._errors("list the replica networks"):
            networks = client.networks.list()
        for network in networks:
            if not self._is_our_network(network.name, network.attrs.get("Labels") or {}):
                continue
            bridge = (network.attrs.get("Options") or {}).get(BRIDGE_NAME_OPTION)
            if bridge:
                self._guard_bridge(bridge)
                self._drop_stale_address_rules(bridge)

    def _is_our_network(self, name: str, labels: Mapping[str, str]) -> bool:
        """This installation's replica network or one of its cluster networks: never another
        installation's (another REDIS_PREFIX, or a test suite's) on the same daemon."""
        if name == self.replica_network:
            return True
        return name.startswith(CLUSTER_NETWORK_PREFIX) and (labels.get(LABEL_INSTALLATION) or "") == self.installation

    def _bridge_rules(self, bridge: str) -> builtins.list[builtins.list[str]]:
        """The rules (chain first) that keep the replicas on ``bridge`` where they belong."""
        comment = ["-m", "comment", "--comment", f"{RULE_COMMENT}{bridge}"]
        new = ["-m", "conntrack", "--ctstate", "NEW"]
        rules: builtins.list[builtins.list[str]] = []
        if self.egress == "deny":
            # Connections the replicas open to the host itself (any of its addresses), and to
            # whatever the host routes to. Answers to connections made to them are not NEW.
            rules.append(["INPUT", "-i", bridge, *new, *comment, "-j", "DROP"])
            rules.append([self._forward_chain(), "-i", bridge, "!", "-o", bridge, *new, *comment, "-j", "DROP"])
            return rules
        guarded = self._guarded_addresses()
        if not guarded:
            return rules
        forward = self._forward_chain() if firewall.usable_iptables(self._iptables) else "FORWARD"
        # Only the ports Docker publishes replicas on (random host ports, from the ephemeral
        # range): the proxy or any other service on a host that is also a node stays reachable.
        low, high = firewall.ephemeral_port_range()
        ports = ["-p", "tcp", "-m", "tcp", "--dport", f"{low}:{high}"]
        for address in guarded:
            # This node's address arrives in INPUT, another node's is routed (FORWARD).
            for chain in ("INPUT", forward):
                rules.append([chain, "-i", bridge, "-d", f"{address}/32", *ports, *new, *comment, "-j", "DROP"])
        return rules

    def _log_guard(self, addresses: builtins.list[str], ports: tuple[int, int]) -> None:
        if (tuple(addresses), ports) != self._logged_guard:
            self._logged_guard = (tuple(addresses), ports)
            log.info(
                "Docker replicas can not open connections to TCP ports %d-%d (where Docker publishes "
                "replicas) of the nodes' addresses %s",
                *ports,
                ", ".join(addresses),
            )

    def _forward_chain(self) -> str:
        # Docker jumps to DOCKER-USER first in FORWARD, before its own accepts; without it
        # (dockerd --iptables=false) our rule goes first in FORWARD itself.
        return "DOCKER-USER" if self._iptables_run("-S", "DOCKER-USER", check=False).returncode == 0 else "FORWARD"

    def _iptables_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = firewall.usable_iptables(self._iptables)
        if binary is None:
            raise EngineError(
                "SERVING_REPLICA_EGRESS=deny (and a NODE_ADDRESS other than 127.0.0.1) need firewall rules "
                "on the node: run the node worker as root with iptables installed (`apt-get install iptables`)."
            )
        return firewall.run_iptables(binary, *args, check=check)

    def _guard_bridge(self, bridge: str) -> None:
        """Add the bridge's rules that are missing (idempotent; several workers may race here).
        Never removes one: this runs at every start, in engines that may not know every node's
        address (set_node_addresses drops the rules of addresses gone from the Node table)."""
        rules = self._bridge_rules(bridge)
        if not rules:
            return
        if self.egress == "allow" and firewall.usable_iptables(self._iptables) is None:
            # Hardening only, not a switch someone turned on: a worker that is not root (the docker
            # group is enough for Docker) keeps starting replicas, and says once what is missing.
            if not self._warned_unguarded:
                self._warned_unguarded = True
                log.warning(
                    "Docker replicas can open connections to the published replica ports of the nodes' "
                    "addresses %s: run the node worker as root with iptables so the engine can stop that.",
                    ", ".join(self._guarded_addresses()),
                )
            return
        if self.egress == "allow":
            self._log_guard(self._guarded_addresses(), firewall.ephemeral_port_range())
        with self._rules_lock:
            for chain, *rule in rules:
                if self._iptables_run("-C", chain, *rule, check=False).returncode != 0:
                    self._iptables_run("-I", chain, "1", *rule)

    def _drop_stale_address_rules(self, bridge: str) -> None:
        """Remove the bridge's rules of an address (or a port range) that is no longer guarded."""
        wanted = {self._address_key(rule) for rule in self._bridge_rules(bridge)}
        with self._rules_lock:
            for words in self._our_rules(bridge):
                if "-d" in words and self._address_key(words) not in wanted:
                    self._iptables_run("-D", *words[1:], check=False)

    @staticmethod
    def _address_key(words: builtins.list[str]) -> tuple[str, str]:
        """What tells an address rule from another: its address and its destination ports."""
        address = words[words.index("-d") + 1] if "-d" in words else ""
        ports = words[words.index("--dport") + 1] if "--dport" in words else ""
        return address, ports

    def _our_rules(self, bridge: str) -> builtins.list[builtins.list[str]]:
        """Our rules of ``bridge`` in the chains we use, as argument lists of `iptables -S` (-A
        first), from one listing of the filter table."""
        found = []
        for line in self._iptables_run("-S", check=False).stdout.splitlines():
            if f'"{RULE_COMMENT}{bridge}"' in line or f"{RULE_COMMENT}{bridge} " in line:
                words = shlex.split(line)
                if len(words) > 1 and words[0] == "-A" and words[1] in ("INPUT", "DOCKER-USER", "FORWARD"):
                    found.append(words)
        return found

    def _unguard_bridge(self, bridge: str) -> None:
        """Remove every rule of ours that names ``bridge`` (its network is gone)."""
        if firewall.usable_iptables(self._iptables) is None:
            return
        with self._rules_lock:
            for words in self._our_rules(bridge):
                self._iptables_run("-D", *words[1:], check=False)

    def _peer_env(
        self, client: docker.DockerClient, cluster: ClusterPeering, network: str, port: int
    ) -> dict[str, str]:
        """Main's address on the cluster network, for a sub: what the node reports (a port published
        on its loopback) can not be reached from inside a container."""
        if cluster.host == "main1":
            return {}
        with self._errors(f"look up the main member on {network}"):
            found = client.containers.list(filters={"label": [f"{LABEL_ROUTE}={cluster.key}"], "network": network})
        for other in found:
            if (other.labels or {}).get(LABEL_ROLE) != "main":
                continue
            address = (((other.attrs.get("NetworkSettings") or {}).get("Networks") or {}).get(network) or {}).get(
                "IPAddress"
            )
            if address:
                main = f"{address}:{port}"
                return {"BACKENDAI_CLUSTER_MAIN_ADDR": main, "BACKENDAI_CLUSTER_ADDRS": f"main1={main}"}
        return {}

    @contextlib.contextmanager
    def _network_lock(self) -> Iterator[None]:
        """One lock per host around "make the network and create a container on it" and "remove
        the network if nothing is attached": node workers are separate processes (prefork), so a
        threading lock would not keep one from removing a network another is about to use.

        The file is NETWORK_LOCK (/run/modelserve/docker-networks.lock), in a folder made 0700 and
        itself 0600, both root's: flock works on a read-only descriptor too, so a file others may
        open would let any local user hold it and stall every start. A worker that is not root
        (the docker group is enough for Docker) can not open it and uses ``state_dir``/networks.lock
        instead: it then shares the lock only with workers of the same state_dir, so run every
        node worker of a host as root, or all with one state_dir. Waiting is bounded
        (NETWORK_LOCK_TIMEOUT): a lock held that long is an EngineError naming the file."""
        handle = None
        for path in (NETWORK_LOCK, self.state_dir / "networks.lock"):
            with contextlib.suppress(OSError):
                handle = self._open_lock(path)
                break
        if handle is None:
            raise EngineError(f"Could not open the network lock {NETWORK_LOCK} nor one under {self.state_dir}.")
        with handle:
            deadline = time.monotonic() + NETWORK_LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EngineError(
                            f"The network lock {path} has been held for over {NETWORK_LOCK_TIMEOUT:g} s; "
                            f"see which process holds it (`fuser -v {path}`)."
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _open_lock(path: Path) -> Any:
        """Open (make) a lock file readable and writable by its owner only, in a folder of the
        owner's only when we make it; never through a symlink."""
        with contextlib.suppress(FileExistsError):
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o600)  # one an older version made 0644
            return os.fdopen(fd, "r+")
        except BaseException:
            os.close(fd)
            raise

    def _is_replica_network(self, name: str, labels: Mapping[str, str]) -> bool:
        return (
            name == self.replica_network or name.startswith(REPLICA_NETWORK) or labels.get(LABEL_NETWORK) == "replicas"
        )

    def _remove_network_if_unused(self, client: docker.DockerClient, name: str) -> None:
        """Remove a cluster network once no container, created or running, is attached (its last
        member left): each holds one of the daemon's few address pools (about 30 by default).

        The replica network (one per installation) is never removed here, nor its rules: keeping
        it costs one pool, removing it raced with starts in other workers."""
        with contextlib.suppress(Exception):
            self._remove_network(client, name, replicas_too=False)

    def remove_replica_network(self) -> bool:
        """Remove this installation's replica network and its firewall rules, if no container is
        attached (for operators and tests; the engine itself keeps it). True if it was removed."""
        return self._remove_network(self._client(), self.replica_network, replicas_too=True)

    def _remove_network(self, client: docker.DockerClient, name: str, replicas_too: bool) -> bool:
        with self._network_lock(), self._errors(f"remove the network {name}"):
            for network in client.networks.list(names=[name]):
                if network.name != name:
                    continue
                network.reload()
                if not replicas_too and self._is_replica_network(name, network.attrs.get("Labels") or {}):
                    return False
                # Docker lists only running containers in the network's attrs; a created one that
                # is not started yet is found by the containers' network filter.
                if network.attrs.get("Containers") or client.containers.list(all=True, filters={"network": name}):
                    return False
                bridge = (network.attrs.get("Options") or {}).get(BRIDGE_NAME_OPTION)
                try:
                    network.remove()
                except docker.errors.NotFound:
                    return False
                if bridge:
                    self._unguard_bridge(bridge)
                return True
        return False

    # --- helpers ----------------------------------------------------------------------------------

    def _image(self, client: docker.DockerClient, image: str) -> Any:
        with self._errors(f"look up the image {image}"):
            try:
                return client.images.get(image)
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(f"The image {image} is not on this node; {BUILD_HINT}.") from exc

    def _device_requests(self, spec: ReplicaSpec) -> builtins.list[DeviceRequest]:
        wanted = {key: value for key, value in spec.accelerators.items() if value > 0}
        if not wanted:
            return []
        asked = ", ".join(f"{key} {value:g}" for key, value in sorted(wanted.items()))
        others = sorted(key for key in wanted if not key.startswith("cuda."))
        if others:
            raise EngineError(
                f"The Docker engine can not provide {', '.join(others)}: only NVIDIA GPUs (cuda.*) are supported."
            )
        if not self.gpus:
            raise EngineError(
                f"The replica {spec.name} asks for {asked}, but this node has no GPU; the scheduler should "
                "not have placed it here (advertise accelerators only on GPU nodes)."
            )
        # Plain Docker hands out whole devices: a fractional cuda.shares gets one whole GPU.
        count = max(math.ceil(value) for value in wanted.values())
        return [DeviceRequest(count=count, capabilities=[["gpu"]])]

    def _mount(self, source: str, target: str, read_only: bool) -> DockerMount:
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

    def _write_plan(self, spec: ReplicaSpec, image: Any) -> Path:
        """A per-replica folder with bootstrap.py and plan.json, mounted read-only in the container."""
        if not self.bootstrap_path.is_file():
            raise EngineError(f"The pre-start runner {self.bootstrap_path} is missing; reinstall the platform.")
        if spec.command is not None:
            command = list(spec.command)
        else:
            # Pre-start actions replace the entrypoint, so the image's own command runs after them.
            config = (image.attrs or {}).get("Config") or {}
            command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
            if not command:
                raise EngineError(
                    f"The image {spec.image} has no command of its own; give the service a start command."
                )
        plan = {
            "actions": [{"action": a.action, "args": dict(a.args)} for a in spec.pre_start_actions],
            "command": command,
            "command_is_shell": spec.command_is_shell and spec.command is not None,
            "shell": spec.shell,
            "workdir": spec.workdir,
        }
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            plan_dir = Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=self.state_dir))
            # Readable by whatever user the image runs as; the folder holds no secrets of ours.
            plan_dir.chmod(0o755)
            shutil.copyfile(self.bootstrap_path, plan_dir / "bootstrap.py")
            (plan_dir / "plan.json").write_text(json.dumps(plan, default=list))
            for item in plan_dir.iterdir():
                item.chmod(0o644)
        except OSError as exc:
            raise EngineError(f"Could not write the pre-start plan under {self.state_dir}: {exc}.") from exc
        return plan_dir

    def _plan_dirs(self, container: Any) -> builtins.list[Path]:
        """The plan folders this engine made for ``container`` (found by its mounts, not memory)."""
        root = os.path.realpath(self.state_dir)
        found = []
        for mount in container.attrs.get("Mounts") or []:
            source = mount.get("Source") or ""
            if mount.get("Destination") == BOOTSTRAP_DIR and os.path.realpath(source).startswith(root + os.sep):
                found.append(Path(source))
        return found

    def _host_port(self, attrs: Mapping[str, Any]) -> int:
        ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
        for key, bindings in ports.items():
            if not key.endswith("/tcp"):
                continue
            for binding in bindings or []:
                if binding.get("HostPort"):
                    return int(binding["HostPort"])
        return 0  # not running: no port is held

    def _info(self, container: Any) -> ReplicaInfo:
        attrs = container.attrs
        state = attrs.get("State") or {}
        status = state.get("Status") or container.status
        replica_state = _STATES.get(status, ReplicaState.EXITED)
        exit_code: int | None = None
        error = ""
        if replica_state is ReplicaState.EXITED:
            exit_code = int(state.get("ExitCode") or 0)
            error = self._exit_error(container, state, attrs, exit_code)
        return ReplicaInfo(
            replica_id=container.id,
            name=container.name,
            state=replica_state,
            host=self.publish_host,
            port=self._host_port(attrs),
            labels=dict((attrs.get("Config") or {}).get("Labels") or {}),
            exit_code=exit_code,
            error=error,
        )

    def _exit_error(self, container: Any, state: Mapping[str, Any], attrs: Mapping[str, Any], code: int) -> str:
        if state.get("OOMKilled"):
            limit = int((attrs.get("HostConfig") or {}).get("Memory") or 0)
            return f"killed: out of memory (limit {limit // MIB} MiB)"
        if state.get("Error"):  # Docker itself could not run it (bad mount, missing executable...)
            return f"could not start: {state['Error']}"
        if code == BOOTSTRAP_FAILED:
            return self._prestart_error(container)
        if code > 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            return f"exited with code {code} ({name})"
        last = self._last_lines(container, 20)
        tail = next((line for line in reversed(last) if line.strip()), "")
        return f"exited with code {code}" + (f": {tail.strip()[:300]}" if tail and code else "")

    def _prestart_error(self, container: Any) -> str:
        """bootstrap.py prints ``[prestart] action N (kind) failed: why`` before exiting 97."""
        lines = [line.strip() for line in self._last_lines(container, 200)]
        prestart = [line.removeprefix("[prestart]").strip() for line in lines if line.startswith("[prestart]")]
        for line in reversed(prestart):
            if "failed:" in line:
                return f"pre-start {line}"
        if prestart:
            return f"pre-start: {prestart[-1]}"
        return f"the pre-start runner failed (exit code {BOOTSTRAP_FAILED})"

    def _last_lines(self, container: Any, tail: int) -> builtins.list[str]:
        try:
            raw = container.logs(stdout=True, stderr=True, tail=tail)
        except Exception:  # the error text is best effort; never fail inspect() over it
            return []
        return raw.decode("utf-8", "replace").splitlines()
