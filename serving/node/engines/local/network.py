"""The local engine's networking as root: one network namespace per replica joined to the host by
a veth pair (one /30 of the ``subnet`` setting each), the machine-wide registry of those address
blocks, the iptables rule of ``SERVING_REPLICA_EGRESS=deny`` that keeps sandboxes off the host's
own addresses, and cluster peering (routes, forwarding, rules and hosts files that let the members
of one cluster reach each other by host name, and nothing else).

Without root the engine does not use this module: pasta gives the sandbox its network (engine.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from serving.node.engines import firewall
from serving.node.engines.base import ClusterPeering, EngineError
from serving.node.engines.local.proc import write_atomic

# Address blocks and interface names are a machine-wide resource: several engines (node workers,
# test suites) can run on one host, so claims live in one registry, not per state dir.
NET_REGISTRY = Path(os.environ.get("MODELSERVE_NET_REGISTRY", "/run/modelserve/net"))
# Cluster peering (see sync_cluster): the iptables chain jumped to from FORWARD, and the comment
# every rule of one cluster carries, so a cluster's rules are found, replaced and swept by its key.
PEER_CHAIN = "MODELSERVE-FWD"
PEER_COMMENT = "modelserve-peer "
EGRESS_COMMENT = "modelserve-egress "  # + the netns prefix: the INPUT rule of SERVING_REPLICA_EGRESS=deny
PEER_ROUTE_PROTO = "static"  # how our routes inside a member's namespace are told from the kernel's


def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip()
        raise EngineError(f"The command `{' '.join(args)}` failed: {detail}")
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_hosts(path: Path, members: Mapping[str, Mapping[str, Any]]) -> None:
    """Rewrite in place: the sandbox sees the file through a bind mount of this very inode (a
    rename would leave it the old one). Written before truncating, so it is never empty."""
    text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    text += "".join(f"{m['address']}\t{host}\n" for host, m in members.items())
    with contextlib.suppress(OSError), path.open("r+" if path.exists() else "w") as handle:
        handle.write(text)
        handle.truncate()
        os.fchmod(handle.fileno(), 0o644)  # the replica's unprivileged user resolves names with it


def disable_ipv6(interface: str) -> None:
    flag = Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")
    if not Path("/proc/sys/net/ipv6").exists():
        return  # a kernel without IPv6: nothing to reach the host with
    try:
        flag.write_text("1\n")
    except OSError as exc:
        raise EngineError(f"Could not turn IPv6 off on the replica's interface {interface}: {exc}.") from None


def rule_key(words: list[str]) -> str:
    return next((w.removeprefix(PEER_COMMENT) for w in words if w.startswith(PEER_COMMENT)), "")


def rule_pair(words: list[str]) -> tuple[str, str]:
    def value(flag: str) -> str:
        return words[words.index(flag) + 1].removesuffix("/32") if flag in words else ""

    return value("-s"), value("-d")


class ReplicaNetworks:
    """The namespaces, links, address blocks and firewall rules of the replicas of one engine
    (``netns_prefix``), carved out of ``subnet``; ``ip`` and ``iptables`` are the host's tools
    (None when missing)."""

    def __init__(self, subnet: str, netns_prefix: str, ip: str | None, iptables: str | None) -> None:
        try:
            self.subnet = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise EngineError(f"The local engine's subnet {subnet!r} is not a network: {exc}.") from None
        if self.subnet.version != 4 or self.subnet.num_addresses < 8:
            raise EngineError(f"The local engine's subnet {subnet} must be an IPv4 network of at least /29.")
        capacity = self.subnet.num_addresses // 4
        # Host-side interface names are "<prefix>h<block>"; the kernel allows 15 characters.
        if not re.fullmatch(r"[a-z][a-z0-9]*", netns_prefix) or len(netns_prefix) + 1 + len(str(capacity)) > 15:
            raise EngineError(
                f"The network namespace prefix {netns_prefix!r} must be lowercase letters/digits and short "
                f"enough that '{netns_prefix}h{capacity}' fits in 15 characters."
            )
        self.netns_prefix = netns_prefix
        self.ip = ip
        self.iptables = iptables

    # --- names and addresses ----------------------------------------------------------------------

    def netns(self, replica_id: str) -> str:
        return f"{self.netns_prefix}-{replica_id}"

    def host_if(self, index: int) -> str:
        return f"{self.netns_prefix}h{index}"

    def addresses(self, index: int) -> tuple[str, str]:
        base = int(self.subnet.network_address) + 4 * index
        return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))

    # --- the machine-wide address registry --------------------------------------------------------

    @contextlib.contextmanager
    def registry_lock(self) -> Iterator[Path]:
        NET_REGISTRY.mkdir(parents=True, exist_ok=True)
        with (NET_REGISTRY / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield NET_REGISTRY
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def registry_entries(registry: Path) -> dict[int, Path]:
        entries = {}
        for claim in registry.iterdir():
            if claim.name.isdigit():
                with contextlib.suppress(OSError):
                    entries[int(claim.name)] = Path(claim.read_text().strip())
        return entries

    def allocate_index(self, registry: Path, replica_dir: Path) -> int:
        """The lowest free /30 block (caller holds the registry lock), so freed blocks are reused."""
        entries = self.registry_entries(registry)
        for index in range(1, self.subnet.num_addresses // 4):  # block 0 holds the network address
            owner = entries.get(index)
            if owner is not None and owner.exists():
                continue  # a live replica (of any engine on this host) holds it
            (registry / str(index)).write_text(str(replica_dir))
            return index
        raise EngineError(f"No free addresses left in {self.subnet} for another replica; widen the subnet.")

    def release_index(self, index: int, replica_dir: Path) -> None:
        with self.registry_lock() as registry:
            claim = registry / str(index)
            with contextlib.suppress(OSError):
                if Path(claim.read_text().strip()) == replica_dir:
                    claim.unlink()

    # --- namespace and veth -----------------------------------------------------------------------

    def setup_netns(self, replica_id: str, index: int) -> str:
        """Namespace + veth pair (peer named eth0 inside); returns the replica's address."""
        assert self.ip is not None
        netns, host_if = self.netns(replica_id), self.host_if(index)
        host_addr, replica_addr = self.addresses(index)
        if Path(f"/sys/class/net/{host_if}").exists():
            run(self.ip, "link", "del", host_if, check=False)  # a leftover of a crashed worker
        try:
            # Two `ip -batch` calls instead of seven `ip` processes: start() stays fast.
            run(
                self.ip,
                "-batch",
                "-",
                stdin=(
                    f"netns add {netns}\n"
                    f"link add {host_if} type veth peer name eth0 netns {netns}\n"
                    f"addr add {host_addr}/30 dev {host_if}\n"
                    f"link set {host_if} up\n"
                ),
            )
            run(
                self.ip,
                "-n",
                netns,
                "-batch",
                "-",
                stdin=(
                    f"addr add {replica_addr}/30 dev eth0\nlink set dev eth0 addrgenmode none\n"
                    "link set eth0 up\nlink set lo up\n"
                ),
            )
            # No IPv6 on either end: the iptables rule of SERVING_REPLICA_EGRESS=deny is IPv4 only, and
            # the kernel's link-local addresses (fe80::) would otherwise let a sandbox reach host
            # services listening on [::]. A host end without IPv6 drops every IPv6 packet it gets.
            # (The sandbox's end gets no address either: addrgenmode none, above.)
            disable_ipv6(host_if)
        except EngineError:
            self.teardown_netns(replica_id, index)
            raise
        return replica_addr

    def teardown_netns(self, replica_id: str, index: int | None) -> None:
        if self.ip is None:
            return
        # Delete the host end explicitly: a namespace dies lazily, and its veth with it, so a
        # reused block could otherwise meet the old interface name.
        lines = f"link del {self.host_if(index)}\n" if index is not None else ""
        lines += f"netns del {self.netns(replica_id)}\n"
        run(self.ip, "-force", "-batch", "-", stdin=lines, check=False)

    def sweep_orphans(self, live: Mapping[int, Path]) -> int:
        """Kill the processes of and remove our namespaces and host-side links that belong to no
        live replica (``live``: the registry's live claims); returns how many were removed."""
        assert self.ip is not None
        removed = 0
        live_ids = {owner.name for owner in live.values()}
        live_links = {self.host_if(index) for index in live}
        prefix = f"{self.netns_prefix}-"
        for line in run(self.ip, "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(prefix) and name.removeprefix(prefix) not in live_ids:
                for pid_text in run(self.ip, "netns", "pids", name, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid_text), signal.SIGKILL)
                run(self.ip, "netns", "del", name, check=False)
                removed += 1
        link_name = re.compile(rf"^{re.escape(self.netns_prefix)}h\d+$")
        for link in Path("/sys/class/net").iterdir():
            if link_name.match(link.name) and link.name not in live_links:
                run(self.ip, "link", "del", link.name, check=False)
                removed += 1
        return removed

    # --- the firewall -------------------------------------------------------------------------------

    def usable_iptables(self) -> str | None:
        """iptables when this process may change the firewall with it (root, installed), else None."""
        return firewall.usable_iptables(self.iptables)

    def iptables_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = self.usable_iptables()
        assert binary is not None
        return firewall.run_iptables(binary, *args, check=check)

    # --- egress -------------------------------------------------------------------------------------

    def input_rule(self) -> list[str]:
        """Drops every connection a sandbox opens to the host itself, through any of this engine's
        host-side veths (``<prefix>h<block>``); answers to the host's own connections (health
        checks, the proxy) are not NEW and pass."""
        return [
            "INPUT", "-i", f"{self.netns_prefix}h+", "-m", "conntrack", "--ctstate", "NEW",
            "-m", "comment", "--comment", f"{EGRESS_COMMENT}{self.netns_prefix}", "-j", "DROP",
        ]  # fmt: skip

    def deny_host_input(self) -> None:
        if self.usable_iptables() is None:
            raise EngineError(
                "SERVING_REPLICA_EGRESS=deny needs iptables on the node to keep replicas off the host's "
                "addresses; install it with `apt-get install iptables`."
            )
        chain, *rule = self.input_rule()
        if self.iptables_run("-C", chain, *rule, check=False).returncode != 0:
            self.iptables_run("-I", chain, "1", *rule)

    def allow_host_input(self) -> None:
        """Remove the rule (no replica of this engine's prefix is left)."""
        if self.usable_iptables() is not None:
            chain, *rule = self.input_rule()
            while self.iptables_run("-D", chain, *rule, check=False).returncode == 0:
                pass

    # --- cluster peering --------------------------------------------------------------------------
    #
    # The members of one cluster (S4.1) reach each other, as on Backend.AI's cluster network, and
    # nothing else reaches them this way. Each sandbox has no default route, so by itself it reaches
    # only the host. For the members of a cluster (on any node of this machine: one kernel):
    #   * inside each member's namespace a /32 route to every other member via its host-side veth;
    #   * IPv4 forwarding on just those host-side veths (Linux checks the input interface's flag,
    #     so the machine-wide ip_forward is left alone);
    #   * in the chain MODELSERVE-FWD (jumped to from FORWARD) an ACCEPT per ordered pair of members,
    #     and one DROP of any other traffic between addresses of the subnet: a replica of another
    #     service can not use the forwarding to reach a member even if it had a route;
    #   * a generated /etc/hosts in each member mapping main1, sub1, ... to the members' addresses.
    # The state is the registry's clusters/<key>/<host> entries (machine-wide, under its lock);
    # sync_cluster makes routes, rules and hosts files match the live entries, so a start, a stop
    # and the orphan sweep all converge the same way, whatever a crashed worker left.

    def peering_unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return (
                "cluster members can not reach each other without root (pasta gives each sandbox only "
                "a port of the host); run the node worker as root or use the Docker engine"
            )
        if self.usable_iptables() is None:
            return (
                "cluster members can not reach each other: iptables is missing; "
                "install it with `apt-get install iptables`"
            )
        return None

    @staticmethod
    def cluster_dir(registry: Path, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-zA-Z-]{1,64}", key):
            raise EngineError(f"The cluster key {key!r} is not valid.")
        return registry / "clusters" / key

    def join_cluster(
        self, registry: Path, cluster: ClusterPeering, replica_dir: Path, network: Mapping[str, Any], address: str
    ) -> None:
        """Record this member (caller holds the registry lock) and peer the cluster's live members."""
        if not re.fullmatch(r"[a-z]+[0-9]+", cluster.host):
            raise EngineError(f"The cluster host name {cluster.host!r} is not valid.")
        members = self.cluster_dir(registry, cluster.key)
        members.mkdir(parents=True, exist_ok=True)
        entry = {
            "replica_dir": str(replica_dir),
            "address": address,
            "gateway": self.addresses(int(network["index"]))[0],
            "netns": network["netns"],
            "host_if": network["host_if"],
            "subnet": str(self.subnet),
        }
        write_atomic(members / cluster.host, json.dumps(entry))
        self.sync_cluster(registry, cluster.key)

    def leave_cluster(self, key: str, host: str, replica_dir: Path) -> None:
        with self.registry_lock() as registry:
            entry = self.cluster_dir(registry, key) / host
            with contextlib.suppress(OSError, ValueError, KeyError):
                if Path(json.loads(entry.read_text())["replica_dir"]) == replica_dir:
                    entry.unlink()
            self.sync_cluster(registry, key)

    def live_members(self, registry: Path, key: str) -> dict[str, dict[str, Any]]:
        """The cluster's members whose replica still exists; entries of gone ones are dropped."""
        members: dict[str, dict[str, Any]] = {}
        folder = self.cluster_dir(registry, key)
        if not folder.is_dir():
            return members
        for entry in sorted(folder.iterdir()):
            if entry.name.endswith(".tmp"):
                continue
            try:
                data = dict(json.loads(entry.read_text()))
                alive = Path(data["replica_dir"]).is_dir() and Path(f"/run/netns/{data['netns']}").exists()
            except (OSError, ValueError, KeyError):
                alive = False
            if alive:
                members[entry.name] = data
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
        return members

    def sync_cluster(self, registry: Path, key: str) -> None:
        """Make the routes, forwarding flags, firewall rules and hosts files of cluster ``key``
        match its live members (caller holds the registry lock)."""
        assert self.ip is not None
        members = self.live_members(registry, key)
        for host, me in members.items():
            others = {h: m for h, m in members.items() if h != host}
            write_hosts(Path(me["replica_dir"]) / "hosts", members)
            with contextlib.suppress(OSError):  # the interface is gone with a member being removed
                Path(f"/proc/sys/net/ipv4/conf/{me['host_if']}/forwarding").write_text("1" if others else "0")
            shown = run(self.ip, "-n", me["netns"], "-4", "route", "show", "proto", PEER_ROUTE_PROTO, check=False)
            present = {line.split()[0].removesuffix("/32") for line in shown.stdout.splitlines() if line.strip()}
            wanted = {m["address"] for m in others.values()}
            lines = [f"route del {a}/32 proto {PEER_ROUTE_PROTO}" for a in sorted(present - wanted)]
            lines += [
                f"route replace {a}/32 via {me['gateway']} dev eth0 proto {PEER_ROUTE_PROTO}"
                for a in sorted(wanted - present)
            ]
            if lines:
                run(self.ip, "-n", me["netns"], "-force", "-batch", "-", stdin="".join(f"{ln}\n" for ln in lines))
        pairs = {(a["address"], b["address"]) for ha, a in members.items() for hb, b in members.items() if ha != hb}
        self.sync_rules(key, pairs)
        if not members:
            with contextlib.suppress(OSError):
                self.cluster_dir(registry, key).rmdir()

    def peer_rules(self) -> list[list[str]]:
        """Our ACCEPT rules in the chain, as argument lists of `iptables -S`."""
        listed = self.iptables_run("-S", PEER_CHAIN, check=False)
        if listed.returncode != 0:
            return []
        rules = []
        for line in listed.stdout.splitlines():
            words = shlex.split(line)
            if words[:2] == ["-A", PEER_CHAIN] and any(w.startswith(PEER_COMMENT) for w in words):
                rules.append(words)
        return rules

    def sync_rules(self, key: str, pairs: set[tuple[str, str]]) -> None:
        if self.usable_iptables() is None:
            return
        rules = self.peer_rules()
        present = {rule_pair(r): r for r in rules if rule_key(r) == key}
        for pair, words in present.items():
            if pair not in pairs:
                self.iptables_run("-D", *words[1:], check=False)
        if pairs - present.keys():
            self.ensure_chain()
            for source, destination in sorted(pairs - present.keys()):
                self.iptables_run(
                    "-I", PEER_CHAIN, "1", "-s", f"{source}/32", "-d", f"{destination}/32",
                    "-m", "comment", "--comment", f"{PEER_COMMENT}{key}", "-j", "ACCEPT",
                )  # fmt: skip
        elif not pairs and not any(rule_key(r) != key for r in rules):
            self.remove_chain()  # no cluster peers any more: leave FORWARD as it was

    def ensure_chain(self) -> None:
        if self.iptables_run("-S", PEER_CHAIN, check=False).returncode != 0:
            self.iptables_run("-N", PEER_CHAIN, check=False)
        subnet = str(self.subnet)
        drop = ["-s", subnet, "-d", subnet, "-j", "DROP"]
        if self.iptables_run("-C", PEER_CHAIN, *drop, check=False).returncode != 0:
            self.iptables_run("-A", PEER_CHAIN, *drop)
        # First in FORWARD: Docker's FORWARD policy is DROP, and its chains must not decide first.
        if self.iptables_run("-C", "FORWARD", "-j", PEER_CHAIN, check=False).returncode != 0:
            self.iptables_run("-I", "FORWARD", "1", "-j", PEER_CHAIN)

    def remove_chain(self) -> None:
        if self.iptables_run("-S", PEER_CHAIN, check=False).returncode != 0:
            return
        while self.iptables_run("-D", "FORWARD", "-j", PEER_CHAIN, check=False).returncode == 0:
            pass
        self.iptables_run("-F", PEER_CHAIN, check=False)
        self.iptables_run("-X", PEER_CHAIN, check=False)

    def sweep_clusters(self, registry: Path) -> int:
        """Peer again every cluster this registry knows (caller holds its lock), dropping gone
        members, and remove rules of clusters with no member left; returns rules removed."""
        before = len(self.peer_rules()) if self.usable_iptables() is not None else 0
        clusters = registry / "clusters"
        keys = {c.name for c in clusters.iterdir() if c.is_dir()} if clusters.is_dir() else set()
        for key in sorted(keys):
            self.sync_cluster(registry, key)
        after = len(self.peer_rules()) if self.usable_iptables() is not None else 0
        return max(0, before - after)
