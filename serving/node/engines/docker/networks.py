"""The Docker engine's networks (issue 13, S4.1): the installation's replica network (one bridge,
no traffic between its containers) every plain replica joins, a cluster's own bridge network
(members reach each other by host name) made with its first member and removed with its last, the
host-wide lock around making and removing them, and a cluster sub's address of its main.

The firewall rules of these networks' bridges are ``rules.BridgeRules``'s; this module applies
them to a bridge when it makes or finds the network, and drops them with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import EndpointConfig

from serving.node.engines.base import (
    LABEL_INSTALLATION,
    LABEL_ROLE,
    LABEL_ROUTE,
    ClusterPeering,
    EngineError,
    ReplicaSpec,
)
from serving.node.engines.docker.errors import API_TIMEOUT, docker_errors
from serving.node.engines.docker.rules import BridgeRules

CLUSTER_NETWORK_PREFIX = "ms-cluster-"
REPLICA_NETWORK = "ms-replicas"  # + "-<installation>": every plain replica's network
ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
LABEL_CLUSTER = "serving.cluster"  # on a cluster's network: the route (key) it belongs to
LABEL_NETWORK = "serving.network"  # on the replica network: "replicas"
# Machine-wide: every node worker on this host talks to the same daemon and its networks.
NETWORK_LOCK = Path(os.environ.get("MODELSERVE_DOCKER_NETWORK_LOCK", "/run/modelserve/docker-networks.lock"))
NETWORK_LOCK_TIMEOUT = 30.0  # seconds a start or a removal waits for it


def bridge_name(network: str) -> str:
    """The host interface of one of our networks: named by us, so firewall rules can name it
    before and after Docker's own id is known (15 characters at most, the kernel's limit)."""
    return "msr" + hashlib.sha256(network.encode()).hexdigest()[:12]


def open_lock(path: Path) -> Any:
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


@contextlib.contextmanager
def network_lock(state_dir: Path) -> Iterator[None]:
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
    for path in (NETWORK_LOCK, state_dir / "networks.lock"):
        with contextlib.suppress(OSError):
            handle = open_lock(path)
            break
    if handle is None:
        raise EngineError(f"Could not open the network lock {NETWORK_LOCK} nor one under {state_dir}.")
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


class Networks:
    """The networks of one engine: ``installation`` (labels them and tells ours from another
    installation's on the same daemon), ``replica_network``'s name, the ``state_dir`` of the
    fallback lock, the API ``timeout``, and the ``rules`` of their bridges."""

    def __init__(
        self,
        *,
        installation: str,
        replica_network: str,
        state_dir: Path,
        rules: BridgeRules,
        timeout: float = API_TIMEOUT,
    ) -> None:
        self.installation = installation
        self.replica_network = replica_network
        self.state_dir = state_dir
        self.rules = rules
        self.timeout = timeout

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return docker_errors(what, None, self.timeout)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return network_lock(self.state_dir)

    def network_for(self, client: docker.DockerClient, spec: ReplicaSpec, kwargs: dict[str, Any]) -> str:
        """The replica's network, made if missing; a cluster member's alias and main's address."""
        if spec.cluster is None:
            return self.replicas(client)
        network = self.cluster(client, spec.cluster)
        kwargs["networking_config"] = {network: EndpointConfig(client.api._version, aliases=[spec.cluster.host])}
        kwargs["environment"].update(self.peer_env(client, spec.cluster, network, spec.port))
        return network

    def ensure(self, client: docker.DockerClient, name: str, labels: Mapping[str, str], icc: bool) -> str:
        """Make the bridge network ``name`` unless it exists, then its firewall rules."""
        bridge = bridge_name(name)
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
        self.rules.guard_bridge(bridge)
        return name

    def replicas(self, client: docker.DockerClient) -> str:
        """The network of plain replicas: one bridge, no traffic between its containers."""
        return self.ensure(client, self.replica_network, {LABEL_NETWORK: "replicas"}, icc=False)

    def cluster(self, client: docker.DockerClient, cluster: ClusterPeering) -> str:
        """The cluster's own bridge network, made by whichever member comes first."""
        name = f"{CLUSTER_NETWORK_PREFIX}{cluster.key}"
        return self.ensure(client, name, {LABEL_CLUSTER: cluster.key}, icc=True)

    def peer_env(self, client: docker.DockerClient, cluster: ClusterPeering, network: str, port: int) -> dict[str, str]:
        """Main's address on the cluster network, for a sub: what the node reports (a port published
        on its loopback) can not be reached from inside a container."""
        if cluster.host == "main1":
            return {}
        with self._errors(f"look up the main member on {network}"):
            found = client.containers.list(
                filters={"label": [f"{LABEL_ROUTE}={cluster.key}"], "network": network}, ignore_removed=True
            )
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

    def set_node_addresses(self, client: Callable[[], docker.DockerClient], addresses: Iterable[str]) -> None:
        """See DockerEngine.set_node_addresses; ``client`` is called only when rules are to be kept."""
        self.rules.set_node_addresses(addresses)
        if self.rules.egress != "allow" or not self.rules.usable():
            return
        docker_client = client()
        with self._errors("list the replica networks"):
            networks = docker_client.networks.list()
        for network in networks:
            if not self.is_ours(network.name, network.attrs.get("Labels") or {}):
                continue
            bridge = (network.attrs.get("Options") or {}).get(BRIDGE_NAME_OPTION)
            if bridge:
                self.rules.guard_bridge(bridge)
                self.rules.drop_stale_address_rules(bridge)

    def is_ours(self, name: str, labels: Mapping[str, str]) -> bool:
        """This installation's replica network or one of its cluster networks: never another
        installation's (another REDIS_PREFIX, or a test suite's) on the same daemon."""
        if name == self.replica_network:
            return True
        return name.startswith(CLUSTER_NETWORK_PREFIX) and (labels.get(LABEL_INSTALLATION) or "") == self.installation

    def is_replica_network(self, name: str, labels: Mapping[str, str]) -> bool:
        return (
            name == self.replica_network or name.startswith(REPLICA_NETWORK) or labels.get(LABEL_NETWORK) == "replicas"
        )

    def remove_if_unused(self, client: docker.DockerClient, name: str) -> None:
        """Remove a cluster network once no container, created or running, is attached (its last
        member left): each holds one of the daemon's few address pools (about 30 by default).

        The replica network (one per installation) is never removed here, nor its rules: keeping
        it costs one pool, removing it raced with starts in other workers."""
        with contextlib.suppress(Exception):
            self.remove(client, name, replicas_too=False)

    def remove(self, client: docker.DockerClient, name: str, replicas_too: bool) -> bool:
        with self.lock(), self._errors(f"remove the network {name}"):
            for network in client.networks.list(names=[name]):
                if network.name != name:
                    continue
                network.reload()
                if not replicas_too and self.is_replica_network(name, network.attrs.get("Labels") or {}):
                    return False
                # Docker lists only running containers in the network's attrs; a created one that
                # is not started yet is found by the containers' network filter.
                if network.attrs.get("Containers") or client.containers.list(
                    all=True, filters={"network": name}, ignore_removed=True
                ):
                    return False
                bridge = (network.attrs.get("Options") or {}).get(BRIDGE_NAME_OPTION)
                try:
                    network.remove()
                except docker.errors.NotFound:
                    return False
                if bridge:
                    self.rules.unguard_bridge(bridge)
                return True
        return False
