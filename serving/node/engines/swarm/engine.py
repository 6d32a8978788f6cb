"""``SwarmEngine``: the ``Engine`` protocol (engines/base.py) for replicas as Docker Swarm services
(the package's docstring says why one service per member, and the other choices)."""

from __future__ import annotations

import builtins
import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import CancellableStream

from serving.core import images
from serving.node.engines import firewall
from serving.node.engines.base import (
    LABEL_INSTALLATION,
    LABEL_ROUTE,
    EngineError,
    ImageNotFound,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
    ReplicaStats,
)
from serving.node.engines.docker import containers, pull
from serving.node.engines.docker.client import ClientFactory, LazyClient
from serving.node.engines.docker.containers import BUILD_HINT, PIDS_LIMIT
from serving.node.engines.docker.errors import API_TIMEOUT, docker_errors
from serving.node.engines.docker.pull import PullProgressCallback
from serving.node.engines.docker.rules import BridgeRules
from serving.node.engines.firewall import DEFAULT_GID, DEFAULT_UID, check_replica_ids
from serving.node.engines.swarm import hardening, nodes, services
from serving.node.engines.swarm.networks import REPLICA_NETWORK, ReplicaNetwork, is_local_daemon
from serving.node.engines.swarm.services import GPU_RESOURCE, LABEL_SWARM_CLUSTER

log = logging.getLogger(__name__)

# The repository's var/ (serving/node/engines/swarm/engine.py is four folders below it).
DEFAULT_STATE_DIR = Path(__file__).resolve().parents[4] / "var" / "engine" / "swarm"
PING_TIMEOUT = 2.0
NODE_TTL = 2.0  # seconds a Swarm node's state is reused between two looks


class SwarmEngine:
    """Replicas as Swarm services on a manager's Docker API. Thread-safe: one client behind a lock."""

    name = "swarm"

    def __init__(
        self,
        client_factory: ClientFactory = docker.from_env,
        bootstrap_path: Path | None = None,
        state_dir: Path | None = None,
        *,
        publish_mode: str = "host",
        placement_node: str = "",
        ingress_host: str = "127.0.0.1",
        installation: str = "",
        uid: int = DEFAULT_UID,
        gid: int = DEFAULT_GID,
        stop_grace: float = 10.0,
        timeout: float = API_TIMEOUT,
        ping_timeout: float = PING_TIMEOUT,
        pids_limit: int = PIDS_LIMIT,
        gpu_resource: str = GPU_RESOURCE,
        egress: str = "allow",
        replica_network: str | None = None,
        image_pull: str = "never",
        registries: Iterable[str] = (),
    ) -> None:
        """
        ``publish_mode``: "host" (the task's node publishes the port; reached at that node's
        address) or "ingress" (the routing mesh; reached at ``ingress_host``, the node's address).
        ``placement_node``: the Swarm node (its host name) this engine's replicas are pinned to;
        empty: the manager's own.
        ``installation``: labels every service with it and lists only those that carry it.
        ``stop_grace``: how long Swarm waits after SIGTERM before SIGKILL when a replica stops.
        ``pids_limit``: the most processes a replica may have (the Docker engine's).
        ``gpu_resource``: the Swarm generic resource kind GPUs are advertised as (SWARM_GPU_RESOURCE).
        ``egress``/``replica_network``: as on the Docker engine (networks.py says where rules act).
        ``image_pull``/``registries``: as on the Docker engine (SERVING_IMAGE_PULL, SERVING_REGISTRIES):
        a missing image is pulled onto the manager (``ensure_image``), and Swarm's nodes pull the
        same digest themselves with the credentials the service is created with.
        """
        if image_pull not in images.PULL_CHOICES:
            raise EngineError(f"image_pull={image_pull!r} is not one of {', '.join(images.PULL_CHOICES)}.")
        self.image_pull = image_pull
        self.registries = images.parse_registries(registries)
        check_replica_ids(
            uid, gid, who="The Swarm replicas'", uid_setting="DOCKER_REPLICA_UID", gid_setting="DOCKER_REPLICA_GID"
        )
        self.uid, self.gid = uid, gid
        self.publish_mode = services.check_publish_mode(publish_mode)
        self.placement_node = placement_node
        self.ingress_host = ingress_host
        self.installation = installation
        self.stop_grace = stop_grace
        self.timeout = timeout
        self.ping_timeout = ping_timeout
        self.pids_limit = pids_limit
        self.gpu_resource = gpu_resource
        self.egress = firewall.check_egress(egress)
        self._client_factory = client_factory
        self.bootstrap_path = Path(bootstrap_path) if bootstrap_path is not None else containers.BOOTSTRAP
        self.state_dir = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
        self._client = LazyClient(client_factory, timeout)
        self._nodes: dict[str, tuple[float, Mapping[str, Any]]] = {}
        # Serialises a cluster network's creation and removal with the members' starts in this process.
        self._network_lock = threading.Lock()
        self.replica_network = ReplicaNetwork(
            replica_network or (f"{REPLICA_NETWORK}-{installation}" if installation else REPLICA_NETWORK),
            installation,
            self.state_dir,
            BridgeRules(self.egress, ingress_host, firewall.find_iptables()),
            timeout,
        )
        self._python3: dict[str, bool] = {}  # image id -> it has python3 (the runner can set no_new_privs)
        self._warned: set[str] = set()

    # --- plumbing ---------------------------------------------------------------------------------

    def _errors(self, what: str, replica: str | None = None) -> contextlib.AbstractContextManager[None]:
        return docker_errors(what, replica, self.timeout)

    def _service(self, replica_id: str) -> Any:
        client = self._client()
        with self._errors(f"look up replica {replica_id}", replica=replica_id):
            return client.services.get(replica_id)

    def _task(self, service: Any) -> Any:
        with self._errors(f"read the tasks of replica {service.id}", replica=service.id):
            return services.latest_task(service.tasks())

    def not_a_manager(self) -> str:
        """Why this engine can not drive a swarm right now, as a sentence; "" when it can."""
        try:
            client = self._client_factory(timeout=self.ping_timeout)
        except Exception as exc:
            return f"SERVING_ENGINE=swarm but no Docker engine answers ({exc}); start dockerd or use local."
        try:
            swarm = client.info().get("Swarm") or {}
        except Exception as exc:
            return f"SERVING_ENGINE=swarm but no Docker engine answers ({exc}); start dockerd or use local."
        finally:
            with contextlib.suppress(Exception):
                client.close()
        if not swarm.get("ControlAvailable"):
            state = swarm.get("LocalNodeState") or "unknown"
            return (
                f"SERVING_ENGINE=swarm but the Docker engine is not a swarm manager (its swarm state is {state}); "
                "make it one with `docker swarm init` (or point DOCKER_HOST at a manager of your swarm), "
                "or use SERVING_ENGINE=docker."
            )
        return ""

    def _placement(self, client: docker.DockerClient) -> str:
        if self.placement_node:
            return self.placement_node
        with self._errors("look up this manager's swarm node"):
            node_id = (client.info().get("Swarm") or {}).get("NodeID") or ""
            self.placement_node = str(client.nodes.get(node_id).attrs["Description"]["Hostname"])
        return self.placement_node

    def _node(self, task: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The attributes of the Swarm node the task is on (read at most every NODE_TTL seconds:
        a sync looks at every replica); None when it has none yet, {} when Swarm forgot the node."""
        node_id = str((task or {}).get("NodeID") or "")
        if not node_id:
            return None
        now = time.monotonic()
        cached = self._nodes.get(node_id)
        if cached is None or now - cached[0] > NODE_TTL:
            with self._errors(f"look up the swarm node {node_id}"):
                try:
                    attrs: Mapping[str, Any] = self._client().nodes.get(node_id).attrs
                except docker.errors.NotFound:
                    attrs = {"Status": {"State": "unknown"}}  # removed from the swarm: lost
            cached = self._nodes[node_id] = (now, attrs)
        return cached[1]

    def _host_of(self, task: Mapping[str, Any] | None, node: Mapping[str, Any] | None) -> str:
        """Where the proxy reaches the task's published port."""
        if self.publish_mode == "ingress" or node is None:
            return self.ingress_host
        address = str((node.get("Status") or {}).get("Addr") or "")
        # 0.0.0.0: a node that did not say; its replicas are reached where the manager is.
        return address if address and address != "0.0.0.0" else self.ingress_host

    def _info(self, service: Any) -> ReplicaInfo:
        task = self._task(service)
        node = self._node(task)
        exit_text = ""
        if task is not None and services.TASK_STATES.get(services.state_of(task)) is None:
            exit_text = self._last_line(service.id)
        return services.task_info(service, task, self._host_of(task, node), exit_text, node)

    def _last_line(self, service_id: str) -> str:
        with contextlib.suppress(Exception):  # the error text is best effort; never fail inspect() over it
            lines = [line for line in self.logs(service_id, tail=20) if line.strip()]
            return lines[-1].strip() if lines else ""
        return ""

    # --- Engine protocol --------------------------------------------------------------------------

    def available(self) -> bool:
        """A quick check (2 s) that a Docker engine answers and is a swarm manager."""
        return not self.not_a_manager()

    def unavailable(self) -> str:
        """Why the Swarm node this engine's replicas are pinned to can take none now (drained,
        paused, down, not in the swarm: ``nodes.unavailable``), or that the manager does not
        answer; "" when it can. Asked with every heartbeat: one node list from the manager."""
        try:
            client = self._client()
            placement = self._placement(client)
            with self._errors("list the swarm's nodes"):
                found = [node.attrs for node in client.nodes.list()]
        except EngineError as exc:
            return f"the swarm manager could not list its nodes: {str(exc).rstrip('.')}"
        return nodes.unavailable(placement, found)

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        """Create the service; returns once its task runs, with the node address and port it got."""
        services.gpu_resources(spec, self.gpu_resource)  # refused before Swarm is asked anything
        mounts = [containers.bind_mount(m.source, m.target, m.read_only) for m in spec.mounts]
        client = self._client()
        image = self._image(client, spec.image)
        api = str(client.api.api_version)
        # no_new_privs: on the service where the manager's API has it, else by the bootstrap
        # runner (prctl before exec), which needs python3 in the image.
        on_service = services.version_at_least(api, services.NO_NEW_PRIVILEGES_API)
        by_runner = not on_service and hardening.has_python3(client, image, self._python3, self.timeout)
        if not on_service and not by_runner:
            self._warn_once(
                f"nnp:{image.id}",
                "The image %s has no python3, and the swarm manager's API (%s) can not set no-new-privileges "
                "on a service (that needs %s, Docker 25): its Swarm replicas run without no_new_privs.",
                spec.image,
                api,
                services.NO_NEW_PRIVILEGES_API,
            )
        pids = self.pids_limit if services.version_at_least(api, services.PIDS_API) else None
        if pids is None:
            self._warn_once(
                "pids",
                "The swarm manager's API (%s) can not limit a service's processes (that needs %s, Docker "
                "20.10): Swarm replicas run without a pids limit.",
                api,
                services.PIDS_API,
            )
        labels = dict(spec.labels)
        labels.setdefault(LABEL_ROUTE, spec.name)  # list() finds only services carrying it
        if self.installation:
            labels[LABEL_INSTALLATION] = self.installation
        plan_dir: Path | None = None
        service = None
        network: str | None = None
        try:
            if spec.pre_start_actions or by_runner:
                plan_dir = containers.write_plan(spec, image, self.bootstrap_path, self.state_dir, by_runner)
            placement = self._placement(client)
            with self._network_lock:
                if spec.cluster is not None:
                    network = self._cluster_network(client, spec.cluster.key)
                    attach = network
                else:
                    attach = self.replica_network.ensure(client, self._on_this_host(client))
                kwargs = services.create_kwargs(
                    spec,
                    mounts,
                    labels,
                    plan_dir,
                    uid=self.uid,
                    gid=self.gid,
                    publish_mode=self.publish_mode,
                    placement_node=placement,
                    network=attach,
                    stop_grace=self.stop_grace,
                    pids_limit=pids,
                    no_new_privileges=on_service,
                    gpu_kind=self.gpu_resource,
                )
                # Pinned to the digest the manager has, as `docker service create` pins it: a
                # task on another Swarm node pulls exactly that image (a moved tag can not give
                # it another), and one on a node that has it pulls nothing. docker-py sends the
                # Docker config's credentials for the image's registry with the service
                # (X-Registry-Auth, the CLI's --with-registry-auth): Swarm hands them to the
                # node that runs the task.
                service = self._create(client, spec, kwargs, pull.pinned(image, spec.image))
            return self._wait_started(service)
        except BaseException:
            # Leave nothing behind: a half-made service would hold the name on retry.
            if service is not None:
                with contextlib.suppress(Exception):
                    self._remove(client, service)
            if network is not None:
                self._remove_network_if_unused(client, network)
            if plan_dir is not None:
                shutil.rmtree(plan_dir, ignore_errors=True)
            raise

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _on_this_host(self, client: docker.DockerClient) -> bool:
        """The replicas run on this worker's host: the manager's daemon is local and they are
        pinned to its own Swarm node (only then do iptables here act on their bridge)."""
        if not is_local_daemon():
            return False
        with self._errors("look up this manager's swarm node"):
            node_id = (client.info().get("Swarm") or {}).get("NodeID") or ""
            own = str(client.nodes.get(node_id).attrs["Description"]["Hostname"])
        return own == self._placement(client)

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        """Every node's address, from the Node table (see DockerEngine.set_node_addresses): the
        plain replicas' bridge keeps them from the replica ports published there."""
        self.replica_network.set_node_addresses(self._client, addresses)

    def remove_replica_network(self) -> bool:
        """Remove this installation's network of plain replicas, its config-only network and its
        firewall rules, if no service uses it (for operators and tests). True if it was removed."""
        return self.replica_network.remove(self._client())

    def advertised_devices(self) -> builtins.list[dict[str, object]]:
        """The GPUs the Swarm node of this worker's replicas advertises as generic resources of
        kind ``gpu_resource`` (``node-generic-resources`` in its daemon.json), as the node's device
        inventory: Swarm, not nvidia-smi on this host, decides what its tasks get."""
        client = self._client()
        placement = self._placement(client)
        with self._errors(f"look up the swarm node {placement}"):
            found = [
                node
                for node in client.nodes.list()
                if (node.attrs.get("Description") or {}).get("Hostname") == placement
            ]
        if not found:
            return []
        resources = ((found[0].attrs.get("Description") or {}).get("Resources") or {}).get("GenericResources")
        return hardening.gpu_inventory(resources or [], self.gpu_resource)

    def ensure_image(self, image: str, progress: PullProgressCallback | None = None) -> float | None:
        """Have ``image`` on the manager: None when it already was, else the seconds its pull took.

        The rules and sentences are the Docker engine's (``pull.ensure_image``: refused with
        ``never`` or from a registry not in ``registries``; pulled with the node worker's Docker
        config's credentials, the bytes reported to ``progress``, which the node shows on the
        route). On the manager because the engine reads the image there before it makes the
        service (its command for the pre-start plan, whether it has python3); the task's Swarm
        node then pulls the digest the manager got, itself (see ``start``)."""
        return pull.ensure_image(
            self._client(),
            image,
            image_pull=self.image_pull,
            registries=self.registries,
            timeout=self.timeout,
            progress=progress,
        )

    def _image(self, client: docker.DockerClient, image: str) -> Any:
        # On the manager; the task's node pulls it itself, with the credentials sent along (start).
        self.ensure_image(image)
        with self._errors(f"look up the image {image}"):
            try:
                return client.images.get(image)
            except docker.errors.ImageNotFound as exc:
                raise ImageNotFound(f"The image {image} is not on this node; {BUILD_HINT}.") from exc

    def _create(self, client: docker.DockerClient, spec: ReplicaSpec, kwargs: dict[str, Any], image: str) -> Any:
        with self._errors(f"create the service {spec.name}"):
            try:
                return client.services.create(image, **kwargs)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise EngineError(
                        f"A Swarm service named {spec.name} already exists; stop that replica first."
                    ) from exc
                raise

    def _wait_started(self, service: Any) -> ReplicaInfo:
        """Swarm schedules asynchronously: wait (``timeout``) until the task runs or has ended."""
        deadline = time.monotonic() + self.timeout
        while True:
            info = self._info(service)
            if info.state is ReplicaState.EXITED:
                self._check_image(service)
                return info  # the caller's prober reports why (info.error)
            if info.state is ReplicaState.RUNNING and info.port:
                return info
            self._check_placeable(service)
            if time.monotonic() > deadline:
                task = self._task(service)
                message = ((task or {}).get("Status") or {}).get("Message") or "no task yet"
                err = ((task or {}).get("Status") or {}).get("Err") or ""
                raise EngineError(
                    f"Swarm did not start the replica {info.name} within {self.timeout:g} s "
                    f"(its task: {message}{'; ' + err if err else ''}); does the node "
                    f"{self.placement_node} have the resources and the image?"
                )
            time.sleep(0.2)

    def _check_image(self, service: Any) -> None:
        """A task rejected because its Swarm node could not pull the image: a failed start saying
        which image, which registry and what to do (``ImageNotFound``), as the Docker engine's
        failed pull is, rather than an exit for the prober to report."""
        task = self._task(service)
        node = self._node(task) or {}
        name = str((node.get("Description") or {}).get("Hostname") or self.placement_node)
        missing = services.no_image(task, services.service_image(service.attrs), name)
        if missing:
            raise ImageNotFound(missing)

    def _check_placeable(self, service: Any) -> None:
        """A task pending for want of a generic resource (GPUs) the node does not have free: an
        error naming it at once, not a timeout (the platform's device accounting and Swarm's
        disagree, or the node advertises fewer than the replica asks for)."""
        task = self._task(service)
        status = (task or {}).get("Status") or {}
        err = str(status.get("Err") or "")
        if services.state_of(task) != "pending" or "insufficient resources" not in err:
            return
        reservations = (((service.attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("Resources") or {}).get(
            "Reservations"
        ) or {}
        asked = {
            str(spec["Kind"]): int(spec.get("Value") or 0)
            for resource in reservations.get("GenericResources") or []
            if (spec := resource.get("DiscreteResourceSpec"))
        }
        if not asked:
            return  # CPU or memory: Swarm may place it once another replica is gone; the timeout says
        advertised = len(self.advertised_devices())
        wanted = ", ".join(f"{count} {kind}" for kind, count in sorted(asked.items()))
        raise EngineError(
            f"Swarm can not place the replica {service.name}: it asks for {wanted} (a Swarm generic resource) "
            f"and the Swarm node {self.placement_node} advertises {advertised} {self.gpu_resource}, not enough "
            f"free ({err}). Ask for fewer GPUs, or advertise more on that node (node-generic-resources in "
            "its /etc/docker/daemon.json)."
        )

    def _cluster_network(self, client: docker.DockerClient, key: str) -> str:
        name = services.cluster_network(key, self.installation)
        with self._errors(f"make the cluster network {name}"):
            if client.networks.list(names=[name], filters={"label": f"{LABEL_SWARM_CLUSTER}={key}"}):
                return name
            labels = {LABEL_SWARM_CLUSTER: key}
            if self.installation:
                labels[LABEL_INSTALLATION] = self.installation
            client.networks.create(name, driver="overlay", attachable=True, scope="swarm", labels=labels)
        return name

    def _remove_network_if_unused(self, client: docker.DockerClient, name: str) -> None:
        """Remove a cluster network once no service of ours is attached to it any more."""
        with (
            self._network_lock,
            contextlib.suppress(EngineError),
            self._errors(f"remove the cluster network {name}"),
        ):
            found = client.networks.list(names=[name])
            for network in found:
                if network.name != name:
                    continue
                key = (network.attrs.get("Labels") or {}).get(LABEL_SWARM_CLUSTER) or ""
                if client.services.list(filters={"label": f"{LABEL_ROUTE}={key}"}):
                    return
                deadline = time.monotonic() + self.timeout
                while True:
                    try:
                        network.remove()
                        return
                    except docker.errors.NotFound:
                        return
                    except docker.errors.APIError:
                        # The last task's endpoint goes a moment after its container.
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)

    def _remove(self, client: docker.DockerClient, service: Any) -> None:
        """Remove the service and wait until its task's container is gone (its port is free)."""
        service_id = service.id
        with self._errors(f"stop replica {service_id}"):
            with contextlib.suppress(docker.errors.NotFound):
                service.remove()
            deadline = time.monotonic() + self.stop_grace + self.timeout
            label = f"com.docker.swarm.service.id={service_id}"
            while (
                client.containers.list(all=True, filters={"label": label}, ignore_removed=True)
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)

    def stop(self, replica_id: str, grace: float = 10.0) -> None:
        """Remove the service (Swarm sends SIGTERM, SIGKILL after its stop grace period) and wait
        until its container is gone; then its plan folder and, with its last member, its cluster
        network. ``grace`` is the service's own (``stop_grace``), set when it was made."""
        try:
            service = self._service(replica_id)
        except ReplicaNotFound:
            return
        client = self._client()
        plan_dirs = services.plan_dirs(service.attrs, self.state_dir)
        attached = ((service.attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("Networks") or []
        network_ids = [str(n.get("Target") or "") for n in attached]
        self._remove(client, service)
        for path in plan_dirs:
            shutil.rmtree(path, ignore_errors=True)
        for network_id in network_ids:
            with contextlib.suppress(Exception):
                name = client.networks.get(network_id).name
                if name.startswith(services.CLUSTER_NETWORK_PREFIX):
                    self._remove_network_if_unused(client, name)

    def inspect(self, replica_id: str) -> ReplicaInfo:
        return self._info(self._service(replica_id))

    def logs(
        self, replica_id: str, tail: int = 200, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Decoded lines of the service's stdout+stderr; raises ReplicaNotFound at once."""
        client = self._client()
        api = client.api
        params = {"stdout": 1, "stderr": 1, "follow": int(follow), "tail": str(tail) if tail >= 0 else "all"}
        with self._errors(f"read the logs of replica {replica_id}", replica=replica_id):
            # docker-py's service_logs hands out a bare generator; the container logs' own
            # cancellable stream (the same calls) is what lets a follow be ended from outside.
            response = api._get(api._url("/services/{0}/logs", replica_id), params=params, stream=True)
            api._raise_for_status(response)
            stream = CancellableStream(api._multiplexed_response_stream_helper(response), response)
        return containers.log_lines(replica_id, stream, stop if follow else None, self.timeout)

    def stats(self, replica_id: str) -> ReplicaStats:
        """From the task's container, through this engine's client: only for a task on this host."""
        service = self._service(replica_id)
        task = self._task(service)
        resources = ((service.attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("Resources") or {}
        limit = int((resources.get("Limits") or {}).get("MemoryBytes") or 0)
        if services.state_of(task) != "running":
            return ReplicaStats(cpu_percent=0.0, mem_bytes=0, mem_limit_bytes=limit)
        client = self._client()
        with self._errors(f"read the stats of replica {replica_id}", replica=replica_id):
            try:
                container = client.containers.get(services.container_id(task))
            except docker.errors.NotFound as exc:
                raise EngineError(
                    f"The replica {replica_id} runs on another swarm node; its stats are read only for "
                    "replicas on the manager's own host."
                ) from exc
            return containers.sampled_stats(container, limit)

    def list(self, labels: Mapping[str, str] | None = None) -> builtins.list[ReplicaInfo]:
        """Our services (they carry LABEL_ROUTE), running or ended, filtered by label equality."""
        wanted = [LABEL_ROUTE] + [f"{key}={value}" for key, value in (labels or {}).items()]
        if self.installation:
            wanted.append(f"{LABEL_INSTALLATION}={self.installation}")
        client = self._client()
        with self._errors("list the replicas"):
            found = client.services.list(filters={"label": wanted})
        infos = []
        for service in found:
            with contextlib.suppress(ReplicaNotFound):
                infos.append(self._info(service))
        return infos
