"""The iptables rules on the bridges of the Docker engine's networks (issue 13): with
``egress="deny"`` every connection a replica opens outside its own network is dropped (the host's
addresses in INPUT, whatever the host routes to in DOCKER-USER); with ``allow`` only connections to
the ports Docker publishes replicas on (the host's ephemeral range) at any node's address, so no
replica calls another one past the proxy's tokens.

Every rule carries ``RULE_COMMENT`` and its bridge's name, so the rules of a removed network are
found and removed with it. Adding is idempotent and never removes (engines of other workers may
know fewer node addresses); only ``drop_stale_address_rules`` drops rules of gone addresses.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import subprocess
import threading
from collections.abc import Iterable

from serving.node.engines import firewall
from serving.node.engines.base import EngineError

# The engine's logger: operators grep the engine's log lines by its name.
log = logging.getLogger("serving.node.engines.docker")

# Every iptables rule the engine adds carries this comment and its bridge's name, so the rules of
# a removed network are found and removed with it.
RULE_COMMENT = "modelserve-replicas "


def address_key(words: list[str]) -> tuple[str, str]:
    """What tells an address rule from another: its address and its destination ports."""
    address = words[words.index("-d") + 1] if "-d" in words else ""
    ports = words[words.index("--dport") + 1] if "--dport" in words else ""
    return address, ports


class BridgeRules:
    """The rules of one engine's bridges: ``egress`` ("allow" or "deny"), ``publish_host`` and the
    node addresses (``set_node_addresses``) replicas' ports are published on, and the iptables
    binary found on the host (used only where ``firewall.usable_iptables`` says it may be)."""

    def __init__(self, egress: str, publish_host: str, iptables: str | None) -> None:
        self.egress = egress
        self.publish_host = publish_host
        self.iptables = iptables
        self._lock = threading.Lock()
        self._warned_unguarded = False
        self._logged_guard: tuple[tuple[str, ...], tuple[int, int]] | None = None
        # Every node's address (NODE_ADDRESS of each row in the Node table), refreshed by the node
        # agent at each heartbeat (DockerEngine.set_node_addresses): replicas' ports are published there.
        self.node_addresses: frozenset[str] = frozenset()

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        self.node_addresses = frozenset(a.strip() for a in addresses if a and a.strip())

    def usable(self) -> bool:
        return firewall.usable_iptables(self.iptables) is not None

    def guarded_addresses(self) -> list[str]:
        """Every node's address replicas' ports are published on (this node's and the others'),
        but loopback ones (a container's 127.0.0.1 is its own: it never reaches the host's) and
        IPv6 ones (replica networks are IPv4 only)."""
        guarded = set()
        for address in {self.publish_host, *self.node_addresses}:
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                continue
            if parsed.version == 4 and not parsed.is_loopback and not parsed.is_unspecified:
                guarded.add(str(parsed))
        return sorted(guarded, key=ipaddress.ip_address)

    def bridge_rules(self, bridge: str) -> list[list[str]]:
        """The rules (chain first) that keep the replicas on ``bridge`` where they belong."""
        comment = ["-m", "comment", "--comment", f"{RULE_COMMENT}{bridge}"]
        new = ["-m", "conntrack", "--ctstate", "NEW"]
        rules: list[list[str]] = []
        if self.egress == "deny":
            # Connections the replicas open to the host itself (any of its addresses), and to
            # whatever the host routes to. Answers to connections made to them are not NEW.
            rules.append(["INPUT", "-i", bridge, *new, *comment, "-j", "DROP"])
            rules.append([self.forward_chain(), "-i", bridge, "!", "-o", bridge, *new, *comment, "-j", "DROP"])
            return rules
        guarded = self.guarded_addresses()
        if not guarded:
            return rules
        forward = self.forward_chain() if firewall.usable_iptables(self.iptables) else "FORWARD"
        # Only the ports Docker publishes replicas on (random host ports, from the ephemeral
        # range): the proxy or any other service on a host that is also a node stays reachable.
        low, high = firewall.ephemeral_port_range()
        ports = ["-p", "tcp", "-m", "tcp", "--dport", f"{low}:{high}"]
        for address in guarded:
            # This node's address arrives in INPUT, another node's is routed (FORWARD).
            for chain in ("INPUT", forward):
                rules.append([chain, "-i", bridge, "-d", f"{address}/32", *ports, *new, *comment, "-j", "DROP"])
        return rules

    def log_guard(self, addresses: list[str], ports: tuple[int, int]) -> None:
        if (tuple(addresses), ports) != self._logged_guard:
            self._logged_guard = (tuple(addresses), ports)
            log.info(
                "Docker replicas can not open connections to TCP ports %d-%d (where Docker publishes "
                "replicas) of the nodes' addresses %s",
                *ports,
                ", ".join(addresses),
            )

    def forward_chain(self) -> str:
        # Docker jumps to DOCKER-USER first in FORWARD, before its own accepts; without it
        # (dockerd --iptables=false) our rule goes first in FORWARD itself.
        return "DOCKER-USER" if self.iptables_run("-S", "DOCKER-USER", check=False).returncode == 0 else "FORWARD"

    def iptables_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = firewall.usable_iptables(self.iptables)
        if binary is None:
            raise EngineError(
                "SERVING_REPLICA_EGRESS=deny (and a NODE_ADDRESS other than 127.0.0.1) need firewall rules "
                "on the node: run the node worker as root with iptables installed (`apt-get install iptables`)."
            )
        return firewall.run_iptables(binary, *args, check=check)

    def guard_bridge(self, bridge: str) -> None:
        """Add the bridge's rules that are missing (idempotent; several workers may race here).
        Never removes one: this runs at every start, in engines that may not know every node's
        address (set_node_addresses drops the rules of addresses gone from the Node table)."""
        rules = self.bridge_rules(bridge)
        if not rules:
            return
        if self.egress == "allow" and firewall.usable_iptables(self.iptables) is None:
            # Hardening only, not a switch someone turned on: a worker that is not root (the docker
            # group is enough for Docker) keeps starting replicas, and says once what is missing.
            if not self._warned_unguarded:
                self._warned_unguarded = True
                log.warning(
                    "Docker replicas can open connections to the published replica ports of the nodes' "
                    "addresses %s: run the node worker as root with iptables so the engine can stop that.",
                    ", ".join(self.guarded_addresses()),
                )
            return
        if self.egress == "allow":
            self.log_guard(self.guarded_addresses(), firewall.ephemeral_port_range())
        with self._lock:
            for chain, *rule in rules:
                if self.iptables_run("-C", chain, *rule, check=False).returncode != 0:
                    self.iptables_run("-I", chain, "1", *rule)

    def drop_stale_address_rules(self, bridge: str) -> None:
        """Remove the bridge's rules of an address (or a port range) that is no longer guarded."""
        wanted = {address_key(rule) for rule in self.bridge_rules(bridge)}
        with self._lock:
            for words in self.our_rules(bridge):
                if "-d" in words and address_key(words) not in wanted:
                    self.iptables_run("-D", *words[1:], check=False)

    def our_rules(self, bridge: str) -> list[list[str]]:
        """Our rules of ``bridge`` in the chains we use, as argument lists of `iptables -S` (-A
        first), from one listing of the filter table."""
        found = []
        for line in self.iptables_run("-S", check=False).stdout.splitlines():
            if f'"{RULE_COMMENT}{bridge}"' in line or f"{RULE_COMMENT}{bridge} " in line:
                words = shlex.split(line)
                if len(words) > 1 and words[0] == "-A" and words[1] in ("INPUT", "DOCKER-USER", "FORWARD"):
                    found.append(words)
        return found

    def unguard_bridge(self, bridge: str) -> None:
        """Remove every rule of ours that names ``bridge`` (its network is gone)."""
        if firewall.usable_iptables(self.iptables) is None:
            return
        with self._lock:
            for words in self.our_rules(bridge):
                self.iptables_run("-D", *words[1:], check=False)
