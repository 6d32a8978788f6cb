"""The Swarm engine's network for plain replicas: tenants apart, as on the Docker engine.

A service's task left without a network sits on the Swarm node's default bridge, where every
container reaches every other. Swarm can attach services to a **swarm-scoped bridge network made
from a config-only network** (``docker network create --config-only`` on each node, then
``docker network create --scope swarm --config-from``): the config-only network holds the
bridge's options, so inter-container communication can be off and the bridge's host interface
has a name we chose (``docker.networks.bridge_name``), and the Docker engine's firewall rules
(``docker.rules.BridgeRules``: egress deny, or no connections to the nodes' published replica
ports) apply to it unchanged.

Config-only networks are local to a Swarm node: the engine makes it on the manager's own node
(where its client is); a node worker whose replicas are pinned to another Swarm node needs it made
there by the operator, with the command ``operator_command`` prints. Firewall rules are iptables on
the host where the task runs, so the engine sets them only when that is this host (the manager
is local: ``DOCKER_HOST`` unset or a unix socket, and the replicas are pinned to its node).

The networks stay when their last replica stops (as the Docker engine's replica network): one
address pool each, and removing them would race with starts in other workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import docker
import docker.errors

from serving.node.engines.base import LABEL_INSTALLATION, EngineError
from serving.node.engines.docker.errors import API_TIMEOUT, docker_errors
from serving.node.engines.docker.networks import (
    BRIDGE_NAME_OPTION,
    ICC_OPTION,
    LABEL_NETWORK,
    bridge_name,
    network_lock,
)
from serving.node.engines.docker.rules import BridgeRules

log = logging.getLogger("serving.node.engines.swarm")

REPLICA_NETWORK = "ms-swarm-replicas"  # + "-<installation>"
CONFIG_SUFFIX = "-config"  # the config-only network the swarm one is made from


def options(name: str) -> dict[str, str]:
    """The bridge's options: no traffic between its containers, and a host interface we named."""
    return {ICC_OPTION: "false", BRIDGE_NAME_OPTION: bridge_name(name)}


def operator_command(name: str) -> str:
    """What an operator runs on another Swarm node so replicas pinned there can join ``name``."""
    opts = " ".join(f"--opt {key}={value}" for key, value in options(name).items())
    return f"docker network create --config-only {opts} {name}{CONFIG_SUFFIX}"


def is_local_daemon() -> bool:
    """The manager's API is this host's daemon (iptables here act on its bridges)."""
    host = os.environ.get("DOCKER_HOST", "")
    return not host or host.startswith("unix://")


class ReplicaNetwork:
    """The installation's network of plain Swarm replicas (``name``), its bridge's ``rules``, and
    the ``state_dir`` of the host's network lock (the Docker engine's, shared on purpose: both
    engines' workers on a host make networks on the same daemon)."""

    def __init__(self, name: str, installation: str, state_dir: Path, rules: BridgeRules, timeout: float = API_TIMEOUT):
        self.name = name
        self.installation = installation
        self.state_dir = state_dir
        self.rules = rules
        self.timeout = timeout
        self.bridge = bridge_name(name)
        self._warned_remote = False

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return docker_errors(what, None, self.timeout)

    def ensure(self, client: docker.DockerClient, on_this_host: bool) -> str:
        """Make the config-only network (only where this worker can: ``on_this_host``) and the
        swarm network from it, unless they exist; then the bridge's rules where they can act."""
        config = self.name + CONFIG_SUFFIX
        with network_lock(self.state_dir), self._errors(f"make the network {self.name}"):
            if on_this_host:
                found = [n for n in client.networks.list(names=[config]) if n.name == config]
                if found and (found[0].attrs.get("Options") or {}).get(ICC_OPTION) != "false":
                    raise EngineError(
                        f"The network {config} lets its containers reach each other; remove it and the swarm "
                        f"network made from it (`docker network rm {self.name} {config}`) so the platform "
                        "makes them again with that switched off."
                    )
                if not found:
                    labels = {LABEL_NETWORK: "swarm-replicas"}
                    if self.installation:
                        labels[LABEL_INSTALLATION] = self.installation
                    self._create(client, config, options=options(self.name), labels=labels, config_only=True)
            if not [n for n in client.networks.list(names=[self.name]) if n.name == self.name]:
                # A network made from a config one takes no options or labels of its own.
                self._create(client, self.name, driver="bridge", scope="swarm", config_from=config)
        self.guard(on_this_host)
        return self.name

    def _create(self, client: docker.DockerClient, name: str, **kwargs: object) -> None:
        api = client.api
        body: dict[str, object] = {"Name": name, "CheckDuplicate": True}
        for key, field in (
            ("driver", "Driver"),
            ("options", "Options"),
            ("labels", "Labels"),
            ("scope", "Scope"),
            ("config_only", "ConfigOnly"),
        ):
            if key in kwargs:
                body[field] = kwargs[key]
        if "config_from" in kwargs:
            body["ConfigFrom"] = {"Network": kwargs["config_from"]}  # docker-py has no argument for it
        try:
            api._result(api._post_json(api._url("/networks/create"), data=body), json=True)
        except docker.errors.APIError:
            # Another worker made it meanwhile (a 409, or "already exists").
            if not any(n.name == name for n in client.networks.list(names=[name])):
                raise

    def guard(self, on_this_host: bool) -> None:
        """The bridge's firewall rules (see docker.rules), where they can act: on this host."""
        if on_this_host:
            self.rules.guard_bridge(self.bridge)
            return
        if self.rules.egress == "deny":
            raise EngineError(
                "SERVING_REPLICA_EGRESS=deny needs firewall rules on the host the replicas run on, but this "
                "node worker's Swarm replicas run on another host (SWARM_NODE, or DOCKER_HOST is not a local "
                "socket); pin them to a manager and run the node worker on that manager's host with DOCKER_HOST at its "
                "local socket, or use SERVING_REPLICA_EGRESS=allow."
            )
        if not self._warned_remote:
            self._warned_remote = True
            log.warning(
                "Swarm replicas on another host than this node worker's: no firewall rule keeps them from the "
                "nodes' published replica ports (run the node worker on the Swarm node's host to have them)."
            )

    def set_node_addresses(self, client: Callable[[], docker.DockerClient], addresses: Iterable[str]) -> None:
        """Keep the rules for every node's address (see DockerEngine.set_node_addresses), once the
        network exists on this host."""
        self.rules.set_node_addresses(addresses)
        if self.rules.egress != "allow" or not self.rules.usable() or not is_local_daemon():
            return
        with self._errors("list the replica networks"):
            if not [n for n in client().networks.list(names=[self.name]) if n.name == self.name]:
                return
        self.rules.guard_bridge(self.bridge)
        self.rules.drop_stale_address_rules(self.bridge)

    def remove(self, client: docker.DockerClient) -> bool:
        """Remove the swarm network, its config-only one and the bridge's rules, once no service
        uses it (for operators and tests; the engine itself keeps them). True if it was removed."""
        config = self.name + CONFIG_SUFFIX
        with network_lock(self.state_dir), self._errors(f"remove the network {self.name}"):
            for network in client.networks.list(names=[self.name]):
                if network.name != self.name:
                    continue
                if any(
                    (attached.get("Target") or "") in (network.id, self.name)
                    for service in client.services.list()
                    for attached in ((service.attrs.get("Spec") or {}).get("TaskTemplate") or {}).get("Networks") or []
                ):
                    return False
                deadline = time.monotonic() + self.timeout
                while True:
                    try:
                        network.remove()
                        break
                    except docker.errors.NotFound:
                        break
                    except docker.errors.APIError:
                        # The last task's endpoint goes a moment after its container.
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
            for network in client.networks.list(names=[config]):
                if network.name == config:
                    with contextlib.suppress(docker.errors.NotFound):
                        network.remove()
        self.rules.unguard_bridge(self.bridge)
        return True
