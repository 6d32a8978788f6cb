"""``DockerEngine``: the ``Engine`` protocol (engines/base.py) for replicas as Docker containers,
composed of the package's parts: containers.py (spec -> create arguments, container -> state),
networks.py (the replica and cluster networks), rules.py (their bridges' firewall rules) and
errors.py (Docker's failures as sentences).

This module holds what ties them together: the shared docker-py client, the order of a start
(network and create under the host's network lock, one retry when the network vanished between
create and start) and of a stop, and the engine's own ``[engine]`` notes for a replica's log.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import math
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors

from serving.core import images
from serving.node.engines import firewall
from serving.node.engines import mounts as mount_hygiene
from serving.node.engines.base import (
    LABEL_INSTALLATION,
    LABEL_ROUTE,
    EngineError,
    ImageNotFound,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaStats,
)
from serving.node.engines.docker import containers, networks, pull
from serving.node.engines.docker.client import ClientFactory, LazyClient
from serving.node.engines.docker.containers import BUILD_HINT, PIDS_LIMIT
from serving.node.engines.docker.errors import API_TIMEOUT, docker_errors, explain, network_missing
from serving.node.engines.docker.networks import CLUSTER_NETWORK_PREFIX, REPLICA_NETWORK, Networks
from serving.node.engines.docker.pull import PullProgressCallback
from serving.node.engines.docker.rules import BridgeRules
from serving.node.engines.firewall import DEFAULT_GID, DEFAULT_UID

# The package's name, as before the split: operators' logging configuration names it.
log = logging.getLogger("serving.node.engines.docker")

# The repository's var/ (serving/node/engines/docker/engine.py is four folders below it).
DEFAULT_STATE_DIR = Path(__file__).resolve().parents[4] / "var" / "engine" / "docker"
PING_TIMEOUT = 2.0


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
        image_pull: str = "never",
        registries: Iterable[str] = (),
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
        ``image_pull``: "never" (a missing image fails the start) or "missing" (pulled, from the
        ``registries`` only: ``serving.core.images.parse_registries``'s entries).
        """
        if image_pull not in images.PULL_CHOICES:
            raise EngineError(f"image_pull={image_pull!r} is not one of {', '.join(images.PULL_CHOICES)}.")
        self.image_pull = image_pull
        self.registries = images.parse_registries(registries)
        firewall.check_replica_ids(
            uid, gid, who="The Docker replicas'", uid_setting="DOCKER_REPLICA_UID", gid_setting="DOCKER_REPLICA_GID"
        )
        self.uid, self.gid = uid, gid
        self.egress = firewall.check_egress(egress)
        self.replica_network = replica_network or (
            f"{REPLICA_NETWORK}-{installation}" if installation else REPLICA_NETWORK
        )
        self._client_factory = client_factory
        self.bootstrap_path = Path(bootstrap_path) if bootstrap_path is not None else containers.BOOTSTRAP
        self.state_dir = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
        self.publish_host = publish_host
        self.gpus = gpus
        self.pids_limit = pids_limit
        self.cap_add = tuple(cap_add)
        self.timeout = timeout
        self.ping_timeout = ping_timeout
        self.installation = installation
        self._client = LazyClient(client_factory, timeout)
        self.networks = Networks(
            installation=installation,
            replica_network=self.replica_network,
            state_dir=self.state_dir,
            rules=BridgeRules(self.egress, publish_host, firewall.find_iptables()),
            timeout=timeout,
        )

    # --- plumbing ---------------------------------------------------------------------------------

    def _errors(self, what: str, replica: str | None = None) -> contextlib.AbstractContextManager[None]:
        return docker_errors(what, replica, self.timeout)

    def _container(self, replica_id: str) -> Any:
        client = self._client()
        with self._errors(f"look up replica {replica_id}", replica=replica_id):
            return client.containers.get(replica_id)

    # What tests ask the engine directly (the networks' and rules' own names are public there).

    @staticmethod
    def _bridge_name(network: str) -> str:
        return networks.bridge_name(network)

    def _network_lock(self) -> contextlib.AbstractContextManager[None]:
        return self.networks.lock()

    def _guard_bridge(self, bridge: str) -> None:
        self.networks.rules.guard_bridge(bridge)

    def _remove_network_if_unused(self, client: docker.DockerClient, name: str) -> None:
        self.networks.remove_if_unused(client, name)

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

    def unavailable(self) -> str:
        """Always "": a Docker host takes replicas while its worker heartbeats (a daemon that stops
        answering fails the starts, each with its sentence)."""
        return ""

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        """Create and start the container; returns once it runs, with the host port it got."""
        device_requests = containers.device_requests(spec, self.gpus)
        mounts = [containers.bind_mount(m.source, m.target, m.read_only) for m in spec.mounts]
        client = self._client()
        image = self._image(client, spec.image)

        labels = dict(spec.labels)
        # list() only sees containers carrying the route label; never start one it can not find.
        labels.setdefault(LABEL_ROUTE, spec.name)
        if self.installation:
            labels[LABEL_INSTALLATION] = self.installation

        plan_dir: Path | None = None
        if spec.pre_start_actions:
            plan_dir = containers.write_plan(spec, image, self.bootstrap_path, self.state_dir)
        kwargs = containers.create_kwargs(
            spec,
            mounts,
            labels,
            plan_dir,
            device_requests,
            uid=self.uid,
            gid=self.gid,
            publish_host=self.publish_host,
            pids_limit=self.pids_limit,
            cap_add=self.cap_add,
        )

        container = None
        network: str | None = None
        warnings = mount_hygiene.unwritable_mounts(spec.mounts, self.uid, self.gid)
        self._write_notes(spec.name, [f"warning: {warning.log}" for warning in warnings])
        try:
            for attempt in (1, 2):
                # The network is made (if need be) and the container created on it under the
                # node's network lock, which Networks.remove takes too: from then on the
                # created container is attached, so no worker removes the network under it.
                with self.networks.lock():
                    network = kwargs["network"] = self.networks.network_for(client, spec, kwargs)
                    container = self._create(client, spec, kwargs)
                try:
                    with self._errors(f"start the container {spec.name}"):
                        container.start()
                        container.reload()  # the host port is only known once it runs
                    break
                except EngineError as exc:
                    # Removed by hand (or by a worker of an older release) between create and start:
                    # make it again, once.
                    if attempt == 2 or not network_missing(str(exc)):
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
                self.networks.remove_if_unused(client, network)
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

    def _image(self, client: docker.DockerClient, image: str) -> Any:
        self.ensure_image(image)
        with self._errors(f"look up the image {image}"):
            try:
                return client.images.get(image)
            except docker.errors.ImageNotFound as exc:  # removed since it was pulled
                raise ImageNotFound(f"The image {image} is not on this node; {BUILD_HINT}.") from exc

    def ensure_image(self, image: str, progress: PullProgressCallback | None = None) -> float | None:
        """Have ``image`` on this node: None when it already was, else the seconds its pull took
        (``pull.ensure_image``: refused with ``never`` or from a registry not allowed, pulled with
        the Docker config's credentials and its bytes reported to ``progress`` otherwise)."""
        return pull.ensure_image(
            self._client(),
            image,
            image_pull=self.image_pull,
            registries=self.registries,
            timeout=self.timeout,
            progress=progress,
        )

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

    def _info(self, container: Any) -> ReplicaInfo:
        return containers.replica_info(container, self.publish_host)

    def stop(self, replica_id: str, grace: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``grace`` s, then remove with its plan folder; gone is fine."""
        try:
            container = self._container(replica_id)
        except ReplicaNotFound:
            return
        plan_dirs = containers.plan_dirs(container, self.state_dir)
        writable = [
            str(m.get("Source"))
            for m in container.attrs.get("Mounts") or []
            if m.get("Type") == "bind" and m.get("RW") and m.get("Source")
        ]
        # Only a cluster's own network goes with its last member; the replica network stays.
        cluster_networks = [
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
                if exc.status_code != 409 or "in progress" not in explain(exc):
                    raise
        for path in plan_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._notes_path(container.name).unlink(missing_ok=True)
        for source in writable:
            # Gone, so it can set no bit again: what it left is made harmless for the host.
            mount_hygiene.strip_setid_bits(source)
        for name in cluster_networks:
            self.networks.remove_if_unused(self._client(), name)

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
        return containers.log_lines(
            replica_id, stream, stop if follow else None, self.timeout, tuple(self._notes(container.name))
        )

    def stats(self, replica_id: str) -> ReplicaStats:
        container = self._container(replica_id)
        limit = int((container.attrs.get("HostConfig") or {}).get("Memory") or 0)
        if container.status != "running":
            return ReplicaStats(cpu_percent=0.0, mem_bytes=0, mem_limit_bytes=limit)
        with self._errors(f"read the stats of replica {replica_id}", replica=replica_id):
            return containers.sampled_stats(container, limit)

    def list(self, labels: Mapping[str, str] | None = None) -> builtins.list[ReplicaInfo]:
        """Our containers (they carry LABEL_ROUTE), running or not, filtered by label equality."""
        wanted = [LABEL_ROUTE] + [f"{key}={value}" for key, value in (labels or {}).items()]
        if self.installation:
            wanted.append(f"{LABEL_INSTALLATION}={self.installation}")
        client = self._client()
        with self._errors("list the replicas"):
            # ignore_removed: a container removed between the listing and its inspect is just gone.
            found = client.containers.list(all=True, filters={"label": wanted}, ignore_removed=True)
        infos = []
        for container in found:
            with contextlib.suppress(ReplicaNotFound):
                infos.append(self._info(container))
        return infos

    # --- networks ---------------------------------------------------------------------------------

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
        self.networks.set_node_addresses(self._client, addresses)

    def remove_replica_network(self) -> bool:
        """Remove this installation's replica network and its firewall rules, if no container is
        attached (for operators and tests; the engine itself keeps it). True if it was removed."""
        return self.networks.remove(self._client(), self.replica_network, replicas_too=True)
