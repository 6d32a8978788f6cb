"""The local engine: replicas in bubblewrap sandboxes, each in its own network namespace.

What a laptop without Docker gets, and what most tests use (a sandbox is up in ~10 ms):

* the sandbox's root is built from parts (read-only /usr and /etc, the python installation if it
  lives outside /usr), the model folder is bound read-only at its mount path, /home/work and /tmp
  are private tmpfs, own PID/IPC/UTS/cgroup namespaces, every capability dropped, the environment
  cleared; nothing else of the host (the platform's files, other folders) is there;
* the replica runs as an unprivileged user, as Backend.AI runs kernels as ``work``: uid/gid 65534
  (nobody/nogroup) unless the engine is given another (settings ``LOCAL_ENGINE_UID``/``_GID``). As
  root, bwrap keeps just CHOWN/SETUID/SETGID/SETPCAP for a one-line prelude inside the sandbox that
  hands /home/work (and a workdir bwrap made in it) to that user and execs ``setpriv`` (util-linux),
  which takes the uid/gid, clears the groups and drops every capability, bounding set included,
  before the pre-start runner or the start command starts: both run as that user, with /home/work
  theirs, /tmp and /var/tmp sticky and world-writable, the model folder read-only (and readable
  where its modes let others read: storage writes 0644/0755 files). No user namespace: the uid
  is the host's, so the host sees (and kills, and accounts) the replica's processes as before.
  An engine not running as root runs replicas as its own user;
* as root: one network namespace per replica with a veth pair (one /30 per replica out of the
  ``subnet`` setting), so two replicas of a service both listen on the definition's port and the
  host reaches each at its own address. The server must listen on 0.0.0.0 (or the namespace's
  address), not 127.0.0.1, which is the namespace's own loopback. Without root, ``pasta`` (Debian
  ``passt``) gives the sandbox a network namespace and forwards a free port of 127.0.0.1 to it;
* memory, CPU and process-count limits from cgroup v1 controllers (setrlimit(RLIMIT_AS) when no
  cgroup can be made), applied before the sandbox starts;
* a tiny detached ``/bin/sh`` supervisor per replica (its own session, so replicas outlive a
  node-worker restart as Docker containers do) waits for the sandbox, so it never lingers as a
  zombie, and records its exit status.

Everything about a replica lives in ``state_dir/<replica id>/``: ``spec.json`` (what was asked),
``pid`` (the sandbox's PID-namespace init: "PID STARTTIME", the start time guards against a reused
pid), ``status.json`` (bwrap's own status), ``exit`` (exit status), ``log``. A new engine instance
finds the replicas again with ``list()``. The image is not used: sandboxes run the host's userland.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from serving.core import definitions
from serving.core.definitions import ENV_NAME
from serving.node import prestart
from serving.node.engines import firewall
from serving.node.engines import mounts as mount_hygiene
from serving.node.engines.base import (
    ClusterPeering,
    EngineError,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
    ReplicaStats,
)

# Who replicas run as when the engine runs as root, and where host tools are found: shared.
from serving.node.engines.firewall import DEFAULT_GID, DEFAULT_UID, HOST_PATH

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
CGROUP_PARENT = "modelserve"
CFS_PERIOD_US = 100_000
DEFAULT_PIDS_LIMIT = 1024
BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
BOOTSTRAP_DIR = "/opt/modelserve"  # where the pre-start runner and its plan appear in the sandbox
BOOTSTRAP_FAILED = prestart.BOOTSTRAP_FAILED_EXIT
# The user's environment variables, handed to the replica's own process only (see _command).
ENV_FILE_NAME = "environ"
ENV_FILE = f"{BOOTSTRAP_DIR}/{ENV_FILE_NAME}"
JOIN_FAILED = 111  # the supervisor could not put the sandbox into its cgroups / rlimit, or hand it its home
# Kept by bwrap for the prelude only: setpriv drops them all before the replica's own code runs.
PRELUDE_CAPS = ("CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
PRIVATE_TMPFS = ("/home/work", "/tmp", "/var/tmp")  # noqa: S108  (the sandbox's own tmpfs)
# Address blocks and interface names are a machine-wide resource: several engines (node workers,
# test suites) can run on one host, so claims live in one registry, not per state dir.
NET_REGISTRY = Path(os.environ.get("MODELSERVE_NET_REGISTRY", "/run/modelserve/net"))
# Cluster peering (see _sync_cluster): the iptables chain jumped to from FORWARD, and the comment
# every rule of one cluster carries, so a cluster's rules are found, replaced and swept by its key.
PEER_CHAIN = "MODELSERVE-FWD"
PEER_COMMENT = "modelserve-peer "
EGRESS_COMMENT = "modelserve-egress "  # + the netns prefix: the INPUT rule of SERVING_REPLICA_EGRESS=deny
PEER_ROUTE_PROTO = "static"  # how our routes inside a member's namespace are told from the kernel's
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT = 10.0
MIB = 1 << 20
# Sandbox paths a mount may not cover: the sandbox's own skeleton and the pre-start runner.
RESERVED_TARGETS = ("/usr", "/etc", "/proc", "/dev", "/bin", "/sbin", "/lib", "/lib64", BOOTSTRAP_DIR)
# Readable by uid 0 even without capabilities (it owns them); not the replica's business.
# The host's read-only skeleton in the sandbox: directories there exist already.
SKELETON = ("/usr", "/etc", "/proc", "/dev", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")
ETC_SECRET_DIRS = ("/etc/ssl/private",)

# The supervisor, one per replica: $1 = replica dir, the rest = the sandbox command. A child shell
# joins the replica's cgroups (or sets the rlimit) and then *becomes* the sandbox, so the server is
# limited from its first instruction; the supervisor itself stays outside the cgroup (an OOM kill
# never takes it) and waits, so the sandbox is reaped and its exit status written, atomically.
SUPERVISOR = r"""
cd "$1" || exit 1
shift
/bin/sh -c '
  while IFS= read -r procs; do
    [ -n "$procs" ] || continue
    echo $$ > "$procs" || { echo "[engine] could not join the cgroup $procs"; exit 111; }
  done < cgroups
  if [ -n "$MODELSERVE_RLIMIT_AS_KB" ]; then
    ulimit -v "$MODELSERVE_RLIMIT_AS_KB" || { echo "[engine] could not set RLIMIT_AS"; exit 111; }
  fi
  exec "$@"
' sandbox "$@" 3<args 4>status.json </dev/null >>log 2>&1 &
wait $!
code=$?
printf '%s\n' "$code" > exit.tmp && mv exit.tmp exit
"""
# Started by the engine and gone at once (so it is no zombie of the worker): it backgrounds the
# supervisor in the new session and prints its pid.
LAUNCHER = r"""
script=$1
shift
/bin/sh -c "$script" supervisor "$@" </dev/null >/dev/null 2>&1 &
echo $!
"""


def _run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip()
        raise EngineError(f"The command `{' '.join(args)}` failed: {detail}")
    return result


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (index 0 = field 3 of proc(5))."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str | None) -> bool:
    """The process runs and is the one we started (not a zombie, not a reused pid)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X") and (started is None or fields[19] == started)


def _read_pid_record(path: Path) -> tuple[int, str] | None:
    try:
        pid_text, started = path.read_text().split()[:2]
        return int(pid_text), started
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent_dirs(target: str) -> list[str]:
    """``--dir`` for the ancestors of a bind target: bwrap makes missing ones mode 0700, which the
    replica's unprivileged user could not pass (an existing directory is left as it is)."""
    chain: list[str] = []
    parent = os.path.dirname(os.path.normpath(target))
    while parent not in ("/", ""):
        chain.append(parent)
        parent = os.path.dirname(parent)
    args: list[str] = []
    for path in reversed(chain):
        if not any(path == s or path.startswith(s + "/") for s in SKELETON):
            args += ["--dir", path]
    return args


def _pidns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


class LocalEngine:
    name = "local"

    def __init__(
        self,
        state_dir: Path,
        netns_prefix: str = "ms",
        subnet: str = "10.213.0.0/16",
        python_prefix: str | None = None,
        pids_limit: int = DEFAULT_PIDS_LIMIT,
        uid: int = DEFAULT_UID,
        gid: int = DEFAULT_GID,
        egress: str = "allow",
    ) -> None:
        self.state_dir = Path(state_dir)
        # A sandbox has no route past the host anyway; "deny" also keeps it off the host's own
        # addresses (services listening on 0.0.0.0), see _deny_host_input.
        self.egress = firewall.check_egress(egress)
        firewall.check_replica_ids(
            uid, gid, who="The local engine's replica", uid_setting="LOCAL_ENGINE_UID", gid_setting="LOCAL_ENGINE_GID"
        )
        # Used only when the engine runs as root; 0/0 keeps replicas as (capability-less) root.
        self.uid, self.gid = uid, gid
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
        self.pids_limit = pids_limit
        if python_prefix is None:
            # The interpreter behind sys.executable (a venv's base); /usr is bound anyway.
            base = os.path.realpath(sys.base_prefix)
            python_prefix = None if base == "/usr" or base.startswith("/usr/") or base == "/" else base
        self.python_prefix = python_prefix or None
        self._bwrap = shutil.which("bwrap", path=HOST_PATH)
        self._ip = shutil.which("ip", path=HOST_PATH)
        self._pasta = shutil.which("pasta", path=HOST_PATH)
        self._iptables = firewall.find_iptables()
        self._setpriv = shutil.which("setpriv", path=HOST_PATH)
        # The prelude runs as root: it calls its helpers by absolute path, never through a PATH.
        self._chown = shutil.which("chown", path=HOST_PATH)
        self._cat = shutil.which("cat", path=HOST_PATH)

    # --- availability -----------------------------------------------------------------------------

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Why no replica can start here (a sentence saying what to install or do), or None."""
        if self._bwrap is None:
            return "bubblewrap is not installed; install it with `apt-get install bubblewrap`"
        if os.geteuid() == 0:
            if self._ip is None:
                return "iproute2 is not installed; install it with `apt-get install iproute2`"
            if self._drops_to_user and self._setpriv is None:
                return (
                    "setpriv is missing, which makes replicas run as an unprivileged user; install it "
                    "with `apt-get install util-linux` (or set LOCAL_ENGINE_UID=0 and LOCAL_ENGINE_GID=0 to "
                    "run them as root without capabilities)"
                )
            if self._drops_to_user and (self._chown is None or self._cat is None):
                return "chown or cat is missing; install them with `apt-get install coreutils`"
            return None
        if self.egress == "deny":
            # pasta gives the sandbox outbound NAT through the host's own sockets: no firewall rule
            # of ours sees it, so deny could not be kept.
            return (
                "SERVING_REPLICA_EGRESS=deny needs the node worker to run as root (without root the "
                "sandbox's network goes through pasta, which reaches everything the host reaches); run "
                "the node worker as root, or set SERVING_REPLICA_EGRESS=allow"
            )
        if self._pasta is None:
            return (
                "without root every replica needs pasta for its own network; install it with "
                "`apt-get install passt`, run the node worker as root, or use the Docker engine"
            )
        return None

    @property
    def _rootful(self) -> bool:
        return os.geteuid() == 0

    @property
    def _drops_to_user(self) -> bool:
        """Whether replicas switch to ``uid``/``gid`` inside the sandbox (an engine not running as
        root runs them as its own user, and can not switch)."""
        return self._rootful and (self.uid, self.gid) != (0, 0)

    # --- layout -----------------------------------------------------------------------------------

    def _dir(self, replica_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{6,64}", replica_id or ""):
            raise ReplicaNotFound(f"No replica {replica_id!r} on this node.")
        return self.state_dir / replica_id

    def _meta(self, replica_id: str) -> dict[str, Any]:
        replica_dir = self._dir(replica_id)
        try:
            meta = dict(json.loads((replica_dir / "spec.json").read_text()))
        except (OSError, ValueError):
            raise ReplicaNotFound(f"No replica {replica_id!r} on this node.") from None
        # Replicas started by the previous layout (cgroup.procs paths in a list, net.json) can
        # still be inspected and stopped after an upgrade.
        if isinstance(meta.get("cgroups"), list):
            meta["cgroups"] = {Path(p).parents[2].name: str(Path(p).parent) for p in meta["cgroups"]}
        if "network" not in meta:
            with contextlib.suppress(OSError, ValueError, KeyError):
                index = int(json.loads((replica_dir / "net.json").read_text())["index"])
                meta["network"] = {
                    "mode": "netns",
                    "index": index,
                    "netns": self._netns(replica_id),
                    "host_if": self._host_if(index),
                }
        return meta

    def _netns(self, replica_id: str) -> str:
        return f"{self.netns_prefix}-{replica_id}"

    def _host_if(self, index: int) -> str:
        return f"{self.netns_prefix}h{index}"

    def _addresses(self, index: int) -> tuple[str, str]:
        base = int(self.subnet.network_address) + 4 * index
        return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))

    # --- the machine-wide address registry --------------------------------------------------------

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[Path]:
        NET_REGISTRY.mkdir(parents=True, exist_ok=True)
        with (NET_REGISTRY / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield NET_REGISTRY
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _registry_entries(registry: Path) -> dict[int, Path]:
        entries = {}
        for claim in registry.iterdir():
            if claim.name.isdigit():
                with contextlib.suppress(OSError):
                    entries[int(claim.name)] = Path(claim.read_text().strip())
        return entries

    def _allocate_index(self, registry: Path, replica_dir: Path) -> int:
        """The lowest free /30 block (caller holds the registry lock), so freed blocks are reused."""
        entries = self._registry_entries(registry)
        for index in range(1, self.subnet.num_addresses // 4):  # block 0 holds the network address
            owner = entries.get(index)
            if owner is not None and owner.exists():
                continue  # a live replica (of any engine on this host) holds it
            (registry / str(index)).write_text(str(replica_dir))
            return index
        raise EngineError(f"No free addresses left in {self.subnet} for another replica; widen the subnet.")

    def _release_index(self, index: int, replica_dir: Path) -> None:
        with self._registry_lock() as registry:
            claim = registry / str(index)
            with contextlib.suppress(OSError):
                if Path(claim.read_text().strip()) == replica_dir:
                    claim.unlink()

    # --- cgroups ----------------------------------------------------------------------------------

    def _make_cgroups(self, replica_id: str, spec: ReplicaSpec) -> tuple[dict[str, str], list[str]]:
        """Create the replica's cgroups and set its limits; returns their paths and log notes."""
        dirs: dict[str, str] = {}
        notes: list[str] = []
        if not self._rootful:
            return dirs, ["cgroups need root"]
        for controller in CGROUP_CONTROLLERS:
            base = CGROUP_ROOT / controller
            if not (base / "cgroup.procs").exists():
                continue
            # Named like the namespace: cleanup_orphans() only ever touches its own prefix.
            path = base / CGROUP_PARENT / self._netns(replica_id)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                notes.append(f"cgroup {controller} unavailable ({exc.strerror})")
                continue
            dirs[controller] = str(path)
        try:
            if "memory" in dirs and spec.mem_bytes > 0:
                memory = Path(dirs["memory"])
                (memory / "memory.limit_in_bytes").write_text(str(spec.mem_bytes))
                memsw = memory / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(spec.mem_bytes))  # and no swapping past the limit
                else:
                    # Without swap accounting, keep the replica from swapping instead of being killed.
                    with contextlib.suppress(OSError):
                        (memory / "memory.swappiness").write_text("0")
        except OSError as exc:
            notes.append(f"cgroup memory limit not applied ({exc.strerror})")
            self._remove_cgroup_dirs([dirs.pop("memory")])  # so the setrlimit fallback applies
        try:
            if "cpu" in dirs and spec.cpu > 0:
                cpu = Path(dirs["cpu"])
                (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(str(max(1000, int(spec.cpu * CFS_PERIOD_US))))
        except OSError as exc:
            notes.append(f"cgroup cpu quota not applied ({exc.strerror})")
        try:
            if "pids" in dirs:
                (Path(dirs["pids"]) / "pids.max").write_text(str(self.pids_limit))
        except OSError as exc:
            notes.append(f"cgroup pids limit not applied ({exc.strerror})")
        return dirs, notes

    @staticmethod
    def _procs_files(dirs: Mapping[str, str]) -> list[str]:
        # cpu and cpuacct are often one hierarchy mounted twice: join each real directory once.
        seen: dict[str, str] = {}
        for path in dirs.values():
            seen.setdefault(os.path.realpath(path), str(Path(path) / "cgroup.procs"))
        return list(seen.values())

    @staticmethod
    def _cgroup_pids(dirs: Mapping[str, str]) -> set[int]:
        pids: set[int] = set()
        for path in dirs.values():
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (Path(path) / "cgroup.procs").read_text().split())
        return pids

    @staticmethod
    def _remove_cgroup_dirs(paths: list[str], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        for path in paths:
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY while the last processes are still leaving the group.
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)

    # --- network ----------------------------------------------------------------------------------

    def _setup_netns(self, replica_id: str, index: int) -> str:
        """Namespace + veth pair (peer named eth0 inside); returns the replica's address."""
        assert self._ip is not None
        netns, host_if = self._netns(replica_id), self._host_if(index)
        host_addr, replica_addr = self._addresses(index)
        if Path(f"/sys/class/net/{host_if}").exists():
            _run(self._ip, "link", "del", host_if, check=False)  # a leftover of a crashed worker
        try:
            # Two `ip -batch` calls instead of seven `ip` processes: start() stays fast.
            _run(
                self._ip,
                "-batch",
                "-",
                stdin=(
                    f"netns add {netns}\n"
                    f"link add {host_if} type veth peer name eth0 netns {netns}\n"
                    f"addr add {host_addr}/30 dev {host_if}\n"
                    f"link set {host_if} up\n"
                ),
            )
            _run(
                self._ip,
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
            self._disable_ipv6(host_if)
        except EngineError:
            self._teardown_netns(replica_id, index)
            raise
        return replica_addr

    @staticmethod
    def _disable_ipv6(interface: str) -> None:
        flag = Path(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")
        if not Path("/proc/sys/net/ipv6").exists():
            return  # a kernel without IPv6: nothing to reach the host with
        try:
            flag.write_text("1\n")
        except OSError as exc:
            raise EngineError(f"Could not turn IPv6 off on the replica's interface {interface}: {exc}.") from None

    def _teardown_netns(self, replica_id: str, index: int | None) -> None:
        if self._ip is None:
            return
        # Delete the host end explicitly: a namespace dies lazily, and its veth with it, so a
        # reused block could otherwise meet the old interface name.
        lines = f"link del {self._host_if(index)}\n" if index is not None else ""
        lines += f"netns del {self._netns(replica_id)}\n"
        _run(self._ip, "-force", "-batch", "-", stdin=lines, check=False)

    # --- egress ---------------------------------------------------------------------------------

    def _input_rule(self) -> list[str]:
        """Drops every connection a sandbox opens to the host itself, through any of this engine's
        host-side veths (``<prefix>h<block>``); answers to the host's own connections (health
        checks, the proxy) are not NEW and pass."""
        return [
            "INPUT", "-i", f"{self.netns_prefix}h+", "-m", "conntrack", "--ctstate", "NEW",
            "-m", "comment", "--comment", f"{EGRESS_COMMENT}{self.netns_prefix}", "-j", "DROP",
        ]  # fmt: skip

    def _deny_host_input(self) -> None:
        if self._iptables is None:
            raise EngineError(
                "SERVING_REPLICA_EGRESS=deny needs iptables on the node to keep replicas off the host's "
                "addresses; install it with `apt-get install iptables`."
            )
        chain, *rule = self._input_rule()
        if self._iptables_run("-C", chain, *rule, check=False).returncode != 0:
            self._iptables_run("-I", chain, "1", *rule)

    def _allow_host_input(self) -> None:
        """Remove the rule (no replica of this engine's prefix is left)."""
        if self._iptables is not None:
            chain, *rule = self._input_rule()
            while self._iptables_run("-D", chain, *rule, check=False).returncode == 0:
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
    # _sync_cluster makes routes, rules and hosts files match the live entries, so a start, a stop
    # and the orphan sweep all converge the same way, whatever a crashed worker left.

    def _peering_unavailable(self) -> str | None:
        if not self._rootful:
            return (
                "cluster members can not reach each other without root (pasta gives each sandbox only "
                "a port of the host); run the node worker as root or use the Docker engine"
            )
        if self._iptables is None:
            return (
                "cluster members can not reach each other: iptables is missing; "
                "install it with `apt-get install iptables`"
            )
        return None

    @staticmethod
    def _cluster_dir(registry: Path, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-zA-Z-]{1,64}", key):
            raise EngineError(f"The cluster key {key!r} is not valid.")
        return registry / "clusters" / key

    def _join_cluster(
        self, registry: Path, cluster: ClusterPeering, replica_dir: Path, network: Mapping[str, Any], address: str
    ) -> None:
        """Record this member (caller holds the registry lock) and peer the cluster's live members."""
        if not re.fullmatch(r"[a-z]+[0-9]+", cluster.host):
            raise EngineError(f"The cluster host name {cluster.host!r} is not valid.")
        members = self._cluster_dir(registry, cluster.key)
        members.mkdir(parents=True, exist_ok=True)
        entry = {
            "replica_dir": str(replica_dir),
            "address": address,
            "gateway": self._addresses(int(network["index"]))[0],
            "netns": network["netns"],
            "host_if": network["host_if"],
            "subnet": str(self.subnet),
        }
        _write_atomic(members / cluster.host, json.dumps(entry))
        self._sync_cluster(registry, cluster.key)

    def _leave_cluster(self, key: str, host: str, replica_dir: Path) -> None:
        with self._registry_lock() as registry:
            entry = self._cluster_dir(registry, key) / host
            with contextlib.suppress(OSError, ValueError, KeyError):
                if Path(json.loads(entry.read_text())["replica_dir"]) == replica_dir:
                    entry.unlink()
            self._sync_cluster(registry, key)

    def _live_members(self, registry: Path, key: str) -> dict[str, dict[str, Any]]:
        """The cluster's members whose replica still exists; entries of gone ones are dropped."""
        members: dict[str, dict[str, Any]] = {}
        folder = self._cluster_dir(registry, key)
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

    def _sync_cluster(self, registry: Path, key: str) -> None:
        """Make the routes, forwarding flags, firewall rules and hosts files of cluster ``key``
        match its live members (caller holds the registry lock)."""
        assert self._ip is not None
        members = self._live_members(registry, key)
        for host, me in members.items():
            others = {h: m for h, m in members.items() if h != host}
            self._write_hosts(Path(me["replica_dir"]) / "hosts", members)
            with contextlib.suppress(OSError):  # the interface is gone with a member being removed
                Path(f"/proc/sys/net/ipv4/conf/{me['host_if']}/forwarding").write_text("1" if others else "0")
            shown = _run(self._ip, "-n", me["netns"], "-4", "route", "show", "proto", PEER_ROUTE_PROTO, check=False)
            present = {line.split()[0].removesuffix("/32") for line in shown.stdout.splitlines() if line.strip()}
            wanted = {m["address"] for m in others.values()}
            lines = [f"route del {a}/32 proto {PEER_ROUTE_PROTO}" for a in sorted(present - wanted)]
            lines += [
                f"route replace {a}/32 via {me['gateway']} dev eth0 proto {PEER_ROUTE_PROTO}"
                for a in sorted(wanted - present)
            ]
            if lines:
                _run(self._ip, "-n", me["netns"], "-force", "-batch", "-", stdin="".join(f"{ln}\n" for ln in lines))
        pairs = {(a["address"], b["address"]) for ha, a in members.items() for hb, b in members.items() if ha != hb}
        self._sync_rules(key, pairs)
        if not members:
            with contextlib.suppress(OSError):
                self._cluster_dir(registry, key).rmdir()

    @staticmethod
    def _write_hosts(path: Path, members: Mapping[str, Mapping[str, Any]]) -> None:
        """Rewrite in place: the sandbox sees the file through a bind mount of this very inode (a
        rename would leave it the old one). Written before truncating, so it is never empty."""
        text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        text += "".join(f"{m['address']}\t{host}\n" for host, m in members.items())
        with contextlib.suppress(OSError), path.open("r+" if path.exists() else "w") as handle:
            handle.write(text)
            handle.truncate()
            os.fchmod(handle.fileno(), 0o644)  # the replica's unprivileged user resolves names with it

    def _iptables_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self._iptables is not None
        return firewall.run_iptables(self._iptables, *args, check=check)

    def _peer_rules(self) -> list[list[str]]:
        """Our ACCEPT rules in the chain, as argument lists of `iptables -S`."""
        listed = self._iptables_run("-S", PEER_CHAIN, check=False)
        if listed.returncode != 0:
            return []
        rules = []
        for line in listed.stdout.splitlines():
            words = shlex.split(line)
            if words[:2] == ["-A", PEER_CHAIN] and any(w.startswith(PEER_COMMENT) for w in words):
                rules.append(words)
        return rules

    @staticmethod
    def _rule_key(words: list[str]) -> str:
        return next((w.removeprefix(PEER_COMMENT) for w in words if w.startswith(PEER_COMMENT)), "")

    @staticmethod
    def _rule_pair(words: list[str]) -> tuple[str, str]:
        def value(flag: str) -> str:
            return words[words.index(flag) + 1].removesuffix("/32") if flag in words else ""

        return value("-s"), value("-d")

    def _sync_rules(self, key: str, pairs: set[tuple[str, str]]) -> None:
        if self._iptables is None:
            return
        rules = self._peer_rules()
        present = {self._rule_pair(r): r for r in rules if self._rule_key(r) == key}
        for pair, words in present.items():
            if pair not in pairs:
                self._iptables_run("-D", *words[1:], check=False)
        if pairs - present.keys():
            self._ensure_chain()
            for source, destination in sorted(pairs - present.keys()):
                self._iptables_run(
                    "-I", PEER_CHAIN, "1", "-s", f"{source}/32", "-d", f"{destination}/32",
                    "-m", "comment", "--comment", f"{PEER_COMMENT}{key}", "-j", "ACCEPT",
                )  # fmt: skip
        elif not pairs and not any(self._rule_key(r) != key for r in rules):
            self._remove_chain()  # no cluster peers any more: leave FORWARD as it was

    def _ensure_chain(self) -> None:
        if self._iptables_run("-S", PEER_CHAIN, check=False).returncode != 0:
            self._iptables_run("-N", PEER_CHAIN, check=False)
        subnet = str(self.subnet)
        drop = ["-s", subnet, "-d", subnet, "-j", "DROP"]
        if self._iptables_run("-C", PEER_CHAIN, *drop, check=False).returncode != 0:
            self._iptables_run("-A", PEER_CHAIN, *drop)
        # First in FORWARD: Docker's FORWARD policy is DROP, and its chains must not decide first.
        if self._iptables_run("-C", "FORWARD", "-j", PEER_CHAIN, check=False).returncode != 0:
            self._iptables_run("-I", "FORWARD", "1", "-j", PEER_CHAIN)

    def _remove_chain(self) -> None:
        if self._iptables_run("-S", PEER_CHAIN, check=False).returncode != 0:
            return
        while self._iptables_run("-D", "FORWARD", "-j", PEER_CHAIN, check=False).returncode == 0:
            pass
        self._iptables_run("-F", PEER_CHAIN, check=False)
        self._iptables_run("-X", PEER_CHAIN, check=False)

    def _sweep_clusters(self, registry: Path) -> int:
        """Peer again every cluster this registry knows (caller holds its lock), dropping gone
        members, and remove rules of clusters with no member left; returns rules removed."""
        before = len(self._peer_rules()) if self._iptables is not None else 0
        clusters = registry / "clusters"
        keys = {c.name for c in clusters.iterdir() if c.is_dir()} if clusters.is_dir() else set()
        for key in sorted(keys):
            self._sync_cluster(registry, key)
        after = len(self._peer_rules()) if self._iptables is not None else 0
        return max(0, before - after)

    @staticmethod
    def _free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    # --- the sandbox ------------------------------------------------------------------------------

    def _check_spec(self, spec: ReplicaSpec) -> None:
        if spec.command is None or not spec.command or not spec.command[0]:
            raise EngineError(
                "The local engine runs the host's userland, not the image, so it needs a start command; "
                "give the service one (or use the Docker engine for the image's own command)."
            )
        if not 0 < spec.port < 65536:
            raise EngineError(f"The port {spec.port} is not a TCP port (1-65535).")
        for key in spec.env:
            # A shell hands the variables to the replica (see _command): names must be its names.
            if not ENV_NAME.match(key) or "\0" in spec.env[key]:
                raise EngineError(
                    f"The environment variable {key!r} can not be handed to the replica: a name must be "
                    f"{definitions.ENV_NAME_RULE}, and a value must not hold NUL bytes; change it in the "
                    "service's environment."
                )
        for mount in spec.mounts:
            target = os.path.normpath(mount.target)
            if not mount.target.startswith("/") or target == "/":
                raise EngineError(f"The mount target {mount.target!r} must be an absolute path below /.")
            reserved = [*RESERVED_TARGETS, *self._python_dirs()]
            if any(target == r or target.startswith(r.rstrip("/") + "/") for r in reserved):
                raise EngineError(f"The mount target {mount.target} is reserved for the sandbox itself.")
            if not Path(mount.source).is_dir() and not Path(mount.source).is_file():
                raise EngineError(
                    f"The folder to mount at {mount.target} does not exist on this node ({mount.source})."
                )

    def _python_dirs(self) -> list[str]:
        if not self.python_prefix:
            return []
        return [str(Path(self.python_prefix) / sub) for sub in ("bin", "lib", "lib64")]

    def _root_args(self) -> list[str]:
        """The sandbox's skeleton: the host's /usr and /etc read-only, the rest private."""
        args = ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / name
            if host.is_symlink():  # merged /usr (Debian 12): the same symlinks as the host
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        args += ["--ro-bind", "/etc", "/etc"]
        for secret in ETC_SECRETS:
            if os.path.isfile(secret):
                args += ["--ro-bind", "/dev/null", secret]
        for secret_dir in ETC_SECRET_DIRS:
            if os.path.isdir(secret_dir):
                args += ["--tmpfs", secret_dir]
        # Only bin/ and lib/ of a python installation outside /usr: if it (or a venv) lies inside
        # the platform's own tree, nothing else of that tree becomes visible.
        for path in self._python_dirs():
            if os.path.islink(path):
                args += [*_parent_dirs(path), "--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += [*_parent_dirs(path), "--ro-bind", path, path]
        args += [
            "--perms", "0755", "--tmpfs", "/home/work",  # handed to the replica's user by the prelude
            "--perms", "1777", "--tmpfs", "/tmp",  # noqa: S108  (the sandbox's own tmpfs)
            "--perms", "1777", "--tmpfs", "/var/tmp",  # noqa: S108
            "--dev", "/dev",
            "--proc", "/proc",
        ]  # fmt: skip
        return args

    def _bwrap_args(self, spec: ReplicaSpec, replica_dir: Path, with_plan: bool, hosts_file: bool = False) -> list[str]:
        """Everything but the command, for ``bwrap --args`` (no quoting, no ARG_MAX worries)."""
        args = self._root_args()
        if hosts_file:
            # Over the host's /etc/hosts: the cluster's host names (main1, sub1, ...) resolve.
            args += ["--ro-bind", str(replica_dir / "hosts"), "/etc/hosts"]
        if with_plan or self._drops_to_user:
            args += [*_parent_dirs(f"{BOOTSTRAP_DIR}/bootstrap.py")]
        if with_plan:
            args += ["--ro-bind", str(BOOTSTRAP), f"{BOOTSTRAP_DIR}/bootstrap.py"]
            args += ["--ro-bind", str(replica_dir / "plan.json"), f"{BOOTSTRAP_DIR}/plan.json"]
        if self._drops_to_user:
            args += ["--ro-bind", str(replica_dir / ENV_FILE_NAME), ENV_FILE]
        # Parents before children, so a mount inside another one lands on top of it.
        for mount in sorted(spec.mounts, key=lambda m: os.path.normpath(m.target).count("/")):
            target = os.path.normpath(mount.target)
            args += [*_parent_dirs(target), "--ro-bind" if mount.read_only else "--bind", mount.source, target]
        workdir = spec.workdir or "/home/work"
        hostname = re.sub(r"[^A-Za-z0-9-]", "-", spec.name)[:63].strip("-") or "replica"
        path = SANDBOX_PATH + (f":{self.python_prefix}/bin" if self.python_prefix else "")
        args += [
            "--dir", workdir,
            "--chdir", workdir,
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", hostname,
            "--new-session",
            "--json-status-fd", "4",
            "--clearenv",
            "--setenv", "PATH", path,
            "--setenv", "HOME", "/home/work",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONUNBUFFERED", "1",  # logs appear as they are written
        ]  # fmt: skip
        if self._rootful:
            args += ["--cap-drop", "ALL"]
            if self._drops_to_user:
                for cap in PRELUDE_CAPS:
                    args += ["--cap-add", cap]
        if not self._drops_to_user:
            # Nothing privileged runs before the replica's own process: it may have them at once.
            for key, value in spec.env.items():
                args += ["--setenv", key, value]
        return args

    def _command(self, spec: ReplicaSpec, notes: list[str]) -> tuple[list[str], bool]:
        """The argv bwrap runs, and whether it goes through the pre-start runner."""
        argv, with_plan = self._replica_command(spec, notes)
        if not self._drops_to_user:
            return argv, with_plan
        assert self._setpriv is not None and self._chown is not None and self._cat is not None
        notes.append(f"runs as uid {self.uid}, gid {self.gid}")
        # As root with PRELUDE_CAPS: hand the home to the user, then become it for good. setpriv
        # execs in place, so the server keeps the pid the engine watches and signals.
        #
        # The prelude and every program it runs are root with CHOWN/SETUID/SETGID: not one byte of
        # the user's environment may reach them, or LD_PRELOAD=/models/evil.so (or PATH, GCONV_PATH,
        # BASH_ENV, ...) runs the user's code as root. So bwrap starts it with the engine's fixed
        # environment only, it calls its helpers by absolute path, and it opens the user's variables
        # (a root-only file, never on a command line the host's users could read) as fd 5 for the
        # last step: a shell that already is the replica's user exports them and execs the server.
        owned = " ".join(shlex.quote(d) for d in self._home_dirs(spec))
        prelude = (
            f"exec 5< {ENV_FILE} || "
            f"{{ echo '[engine] could not read the environment of the replica'; exit {JOIN_FAILED}; }}\n"
            'exec "$@"'
        )
        if owned:
            prelude = (
                f"{self._chown} {self.uid}:{self.gid} {owned} || "
                f"{{ echo '[engine] could not hand /home/work to uid {self.uid}'; exit {JOIN_FAILED}; }}\n{prelude}"
            )
        setpriv = [
            self._setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip
        handoff = (
            f'eval "$({self._cat} <&5)" || '
            f"{{ echo '[engine] could not set the environment variables of the replica'; exit {JOIN_FAILED}; }}\n"
            'exec 5<&-\nexec "$@"'
        )
        return ["/bin/sh", "-c", prelude, "prelude", *setpriv, "/bin/sh", "-c", handoff, "sh", *argv], with_plan

    @staticmethod
    def _home_dirs(spec: ReplicaSpec) -> list[str]:
        """The sandbox's own directories the replica's user must own: /home/work and whatever bwrap
        makes for the workdir inside a private tmpfs. Never a mount: a host folder keeps its owner."""
        targets = [os.path.normpath(m.target) for m in spec.mounts]

        def mounted(path: str) -> bool:
            return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)

        dirs = ["/home/work"]
        workdir = os.path.normpath(spec.workdir or "/home/work")
        for root in PRIVATE_TMPFS:
            if workdir.startswith(root + "/"):
                parts = workdir.removeprefix(root + "/").split("/")
                dirs += [f"{root}/{'/'.join(parts[: i + 1])}" for i in range(len(parts))]
        return [d for d in dict.fromkeys(dirs) if not mounted(d)]

    def _replica_command(self, spec: ReplicaSpec, notes: list[str]) -> tuple[list[str], bool]:
        assert spec.command is not None
        if spec.pre_start_actions:
            # The runner handles the shell form and its fallback itself.
            return ["python3", "-I", f"{BOOTSTRAP_DIR}/bootstrap.py", f"{BOOTSTRAP_DIR}/plan.json"], True
        if spec.command_is_shell:
            shell = spec.shell or "/bin/bash"
            if not os.path.exists(shell):  # the sandbox's /usr is the host's
                notes.append(f"the shell {shell} is not installed; running the start command with /bin/sh")
                shell = "/bin/sh"
            return [shell, "-c", spec.command[0]], False
        return list(spec.command), False

    # --- the protocol -----------------------------------------------------------------------------

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        reason = self.unavailable_reason()
        if reason:
            raise EngineError(f"The local engine can not start replicas here: {reason}.")
        self._check_spec(spec)
        replica_id = uuid.uuid4().hex[:12]
        replica_dir = self.state_dir / replica_id
        self.state_dir.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "id": replica_id,
            "name": spec.name,
            "labels": dict(spec.labels),
            "port": spec.port,
            "container_port": spec.port,
            "host": "",
            "mem_bytes": spec.mem_bytes,
            "cpu": spec.cpu,
            "created": time.time(),
            "network": {},
            "cgroups": {},
            "cluster": {"key": spec.cluster.key, "host": spec.cluster.host} if spec.cluster else None,
            # Cleared of setuid/setgid bits when the replica stops (serving/node/engines/mounts.py).
            "writable": [m.source for m in spec.mounts if not m.read_only],
        }
        notes: list[str] = []
        peering = self._peering_unavailable() if spec.cluster else None
        if peering:
            notes.append(peering)
            meta["cluster"] = None
        try:
            if self._rootful:
                # Claim a block, make the namespace and the cgroups under one machine-wide lock, so
                # cleanup_orphans() (same lock) never takes a half-made replica for a leftover.
                with self._registry_lock() as registry:
                    replica_dir.mkdir()
                    index = self._allocate_index(registry, replica_dir)
                    meta["network"] = {
                        "mode": "netns",
                        "index": index,
                        "netns": self._netns(replica_id),
                        "host_if": self._host_if(index),
                    }
                    _write_atomic(replica_dir / "spec.json", json.dumps(meta))
                    if self.egress == "deny":
                        self._deny_host_input()
                    meta["host"] = self._setup_netns(replica_id, index)
                    if spec.cluster and meta["cluster"]:
                        self._join_cluster(registry, spec.cluster, replica_dir, meta["network"], meta["host"])
                        notes.append(f"cluster member {spec.cluster.host}: reaches its peers by host name")
                    meta["cgroups"], cgroup_notes = self._make_cgroups(replica_id, spec)
                    notes += cgroup_notes
            else:
                replica_dir.mkdir()
                meta["network"] = {"mode": "pasta"}
                meta["host"], meta["port"] = "127.0.0.1", self._free_port()
                notes.append("running without root: no cgroups, network through pasta")
            env = {"PATH": HOST_PATH, "LANG": "C.UTF-8"}
            if spec.mem_bytes <= 0:
                limits = "memory unlimited"
            elif "memory" in meta["cgroups"]:
                limits = f"memory {spec.mem_bytes // MIB} MiB (cgroup)"
            else:
                # setrlimit is a poor substitute (address space, not resident memory), but it keeps
                # a runaway replica from taking the whole machine down.
                env["MODELSERVE_RLIMIT_AS_KB"] = str(max(spec.mem_bytes // 1024, 64 * 1024))
                limits = f"memory {spec.mem_bytes // MIB} MiB (setrlimit RLIMIT_AS: no memory cgroup available)"
            limits += f", cpu {spec.cpu:g}" + (" (cfs quota)" if "cpu" in meta["cgroups"] else " (not enforced)")
            limits += f", pids {self.pids_limit}" if "pids" in meta["cgroups"] else ", pids (not enforced)"
            notes.insert(0, f"limits: {limits}")
            # Who the replica's code runs as: the engine's uid/gid as root, else the worker's own.
            ids = (self.uid, self.gid) if self._rootful else (os.geteuid(), os.getegid())
            warnings = mount_hygiene.unwritable_mounts(spec.mounts, *ids)
            notes += [f"warning: {warning.log}" for warning in warnings]

            argv, with_plan = self._command(spec, notes)
            if with_plan:
                _write_atomic(replica_dir / "plan.json", json.dumps(prestart.plan(spec)))
                # Read by the replica's unprivileged user, whatever the worker's umask.
                (replica_dir / "plan.json").chmod(0o644)
            if self._drops_to_user:
                self._write_environ(replica_dir / ENV_FILE_NAME, spec.env)
            bwrap_args = self._bwrap_args(spec, replica_dir, with_plan, hosts_file=bool(meta["cluster"]))
            (replica_dir / "args").write_bytes(b"".join(a.encode() + b"\0" for a in bwrap_args))
            (replica_dir / "cgroups").write_text("".join(p + "\n" for p in self._procs_files(meta["cgroups"])))
            command = [str(self._bwrap), "--args", "3", "--", *argv]
            if meta["network"]["mode"] == "netns":
                command = [str(self._ip), "netns", "exec", meta["network"]["netns"], *command]
            else:
                command = [
                    str(self._pasta), "--config-net", "--quiet", "--foreground",
                    "-t", f"127.0.0.1/{meta['port']}:{spec.port}", "-u", "none", "-T", "none", "-U", "none",
                    "--", *command,
                ]  # fmt: skip
            meta["command"] = command
            _write_atomic(replica_dir / "spec.json", json.dumps(meta))
            with (replica_dir / "log").open("a") as log:
                log.writelines(f"[engine] {note}\n" for note in notes)
            self._launch(replica_dir, command, env)
        except BaseException:
            if (replica_dir / "supervisor.pid").exists():
                self.stop(replica_id, grace=0)  # something runs already: take it down first
            else:
                self._cleanup(replica_id, meta)
            raise
        return dataclasses.replace(self.inspect(replica_id), warnings=tuple(w.public for w in warnings))

    @staticmethod
    def _write_environ(path: Path, env: Mapping[str, str]) -> None:
        """The user's variables as shell assignments for the last step of the prelude, readable by
        root only: they may hold secrets, and only the prelude (root) opens the file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the worker's umask or a leftover file said
            handle.writelines(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())

    def _launch(self, replica_dir: Path, command: list[str], env: dict[str, str]) -> None:
        launcher = subprocess.run(
            ["/bin/sh", "-c", LAUNCHER, "launcher", SUPERVISOR, str(replica_dir), *command],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            start_new_session=True,  # not in the worker's session: Ctrl-C / its exit do not reach it
            timeout=10,
            check=False,
        )
        try:
            supervisor = int(launcher.stdout.strip())
        except ValueError:
            raise EngineError(f"The replica's supervisor did not start: {launcher.stderr.strip()}") from None
        _write_atomic(replica_dir / "supervisor.pid", f"{supervisor} {_start_time(supervisor) or 0}\n")
        # Return once the sandbox's init runs (bwrap reports its pid) or the attempt is over.
        deadline = time.monotonic() + START_TIMEOUT
        pause = 0.001
        while time.monotonic() < deadline:
            if isinstance(self._bwrap_status(replica_dir).get("child-pid"), int):
                child = self._locate_init(replica_dir)
                if child is not None:
                    _write_atomic(replica_dir / "pid", f"{child} {_start_time(child) or 0}\n")
                    return
            if (replica_dir / "exit").exists():
                return  # failed early (bad mount, ...); inspect() tells why
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        raise EngineError(f"The replica's sandbox did not start within {START_TIMEOUT:g} s; see its log.")

    @staticmethod
    def _bwrap_status(replica_dir: Path) -> dict[str, Any]:
        """bwrap's --json-status-fd output: one JSON document per line (child-pid, exit-code...)."""
        status: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            for line in (replica_dir / "status.json").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    document = json.loads(line)
                    if isinstance(document, dict):
                        status.update(document)
        return status

    def _locate_init(self, replica_dir: Path) -> int | None:
        """The host pid of the sandbox's PID-namespace init (bwrap's child), if it runs."""
        status = self._bwrap_status(replica_dir)
        pid = status.get("child-pid")
        # As root bwrap runs in the host's PID namespace and reports the host pid; checking the
        # namespace also guards against a reused pid.
        if isinstance(pid, int) and "pid-namespace" in status and _pidns_inode(pid) == status["pid-namespace"]:
            return pid if _alive(pid, None) else None
        # Under pasta bwrap reports a pid of another namespace: walk down from the supervisor to
        # the outer bwrap and take its child.
        record = _read_pid_record(replica_dir / "supervisor.pid")
        if record is None:
            return None
        children: dict[int, list[int]] = {}
        names: dict[int, str] = {}
        for candidate in _all_pids():
            with contextlib.suppress(OSError, IndexError):
                text = Path(f"/proc/{candidate}/stat").read_text()
                names[candidate] = text[text.index("(") + 1 : text.rindex(")")]
                children.setdefault(int(text.rsplit(")", 1)[1].split()[1]), []).append(candidate)
        queue = [record[0]]
        while queue:
            current = queue.pop(0)
            if names.get(current) == "bwrap" and current != record[0]:
                inner = [c for c in children.get(current, []) if names.get(c) == "bwrap"]
                return inner[0] if inner else None
            queue.extend(children.get(current, []))
        return None

    def _sandbox_pid(self, replica_dir: Path) -> int | None:
        """The live PID-namespace init of the sandbox, or None."""
        record = _read_pid_record(replica_dir / "pid")
        if record is not None:
            return record[0] if _alive(*record) else None
        # The engine that started it died before writing "pid".
        return self._locate_init(replica_dir)

    def _supervisor_alive(self, replica_dir: Path) -> bool:
        record = _read_pid_record(replica_dir / "supervisor.pid")
        return record is not None and _alive(*record)

    def _sandbox_members(self, replica_dir: Path, meta: Mapping[str, Any]) -> list[int]:
        """Every process inside the sandbox's PID namespace (init included)."""
        namespace = self._bwrap_status(replica_dir).get("pid-namespace")
        if not isinstance(namespace, int):  # bwrap without root does not report it
            init = self._sandbox_pid(replica_dir)
            namespace = _pidns_inode(init) if init is not None else None
            if namespace is None:
                return []
        candidates = self._cgroup_pids(meta.get("cgroups") or {}) or set(_all_pids())
        return sorted(pid for pid in candidates if _pidns_inode(pid) == namespace)

    @staticmethod
    def _exit_code(replica_dir: Path) -> int | None:
        try:
            return int((replica_dir / "exit").read_text().strip())
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError, ValueError, TypeError):  # the previous layout
            old = json.loads((replica_dir / "exit.json").read_text())
            return 128 + int(old["signal"]) if old.get("signal") else int(old["code"])
        return None

    def inspect(self, replica_id: str) -> ReplicaInfo:
        meta = self._meta(replica_id)
        replica_dir = self._dir(replica_id)
        code = self._exit_code(replica_dir)
        error = ""
        if code is not None:
            state = ReplicaState.EXITED
            error = self._exit_error(replica_dir, meta, code)
        elif self._sandbox_pid(replica_dir) is not None:
            state = ReplicaState.RUNNING
        elif self._supervisor_alive(replica_dir):
            # Between launch and bwrap's report, or between the sandbox's end and its exit record.
            state = ReplicaState.RUNNING if (replica_dir / "pid").exists() else ReplicaState.STARTING
        else:
            state = ReplicaState.EXITED
            error = "the replica's processes are gone without an exit status (was the machine restarted?)"
        return ReplicaInfo(
            replica_id=replica_id,
            name=meta["name"],
            state=state,
            host=meta["host"],
            port=int(meta["port"]),
            labels=dict(meta["labels"]),
            exit_code=code,
            error=error,
        )

    def _oom_killed(self, meta: Mapping[str, Any], code: int) -> bool:
        memory = (meta.get("cgroups") or {}).get("memory")
        if memory is None:
            return False
        try:
            control = (Path(memory) / "memory.oom_control").read_text()
        except OSError:
            return False
        for line in control.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1]) > 0
        # Kernels before 4.13 do not count kills: a SIGKILL after hitting the limit is one.
        with contextlib.suppress(OSError, ValueError):
            return code == 128 + signal.SIGKILL and int((Path(memory) / "memory.failcnt").read_text()) > 0
        return False

    def _exit_error(self, replica_dir: Path, meta: Mapping[str, Any], code: int) -> str:
        limit = f"limit {int(meta['mem_bytes']) // MIB} MiB"
        if self._oom_killed(meta, code):
            return f"killed: out of memory ({limit})"
        lines = self._read_lines(replica_dir / "log", 200)
        if code == BOOTSTRAP_FAILED:
            return prestart.failure_reason(lines) or f"the pre-start runner failed (exit code {code})"
        if code == JOIN_FAILED:
            found = next((ln for ln in reversed(lines) if ln.startswith("[engine] could not")), "")
            return found.removeprefix("[engine] ") or "the sandbox could not be put under its limits"
        tail = next((ln.strip() for ln in reversed(lines) if ln.strip() and not ln.startswith("[engine]")), "")
        if "memory" not in (meta.get("cgroups") or {}) and code != 0 and "MemoryError" in tail:
            return f"out of memory (address-space {limit}, setrlimit)"
        if code == 1 and tail.startswith("bwrap:"):
            return f"the sandbox could not be set up: {tail.removeprefix('bwrap:').strip()}"
        if code > 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            return f"killed by {name} (exit code {code})"
        return f"exited with code {code}" + (f": {tail[:300]}" if tail and code else "")

    @staticmethod
    def _read_lines(path: Path, tail: int) -> list[str]:
        try:
            with path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 256 * 1024))
                data = handle.read()
        except OSError:
            return []
        lines = data.decode("utf-8", "replace").splitlines()
        return lines[-tail:] if tail > 0 else []

    def logs(
        self, replica_id: str, tail: int = 200, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        replica_dir = self._dir(replica_id)
        if not (replica_dir / "spec.json").exists():
            raise ReplicaNotFound(f"No replica {replica_id!r} on this node.")
        if follow:
            return self._follow(replica_dir, tail, stop or threading.Event())
        return iter(self._read_lines(replica_dir / "log", tail))

    def _follow(self, replica_dir: Path, tail: int, stop: threading.Event) -> Iterator[str]:
        log_path = replica_dir / "log"
        # Read the tail and remember exactly where it ended, so no line is lost or repeated
        # between the tail and the follow.
        position = 0
        with contextlib.suppress(OSError), log_path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            start = handle.seek(max(0, end - 256 * 1024))
            complete, _, partial = handle.read(end - start).rpartition(b"\n")
            position = end - len(partial)
            recent = complete.decode("utf-8", "replace").splitlines() if complete else []
            yield from (recent[-tail:] if tail > 0 else [])
        buffer = b""
        while not stop.is_set():
            ended = self._ended(replica_dir)  # checked before reading, so the last lines are not lost
            try:
                with log_path.open("rb") as handle:
                    handle.seek(position)
                    chunk = handle.read()
            except OSError:
                return
            position += len(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
            if not chunk:
                if ended:
                    if buffer:
                        yield buffer.decode("utf-8", "replace")
                    return
                stop.wait(0.05)

    def _ended(self, replica_dir: Path) -> bool:
        if not replica_dir.exists() or (replica_dir / "exit").exists():
            return True
        return self._sandbox_pid(replica_dir) is None and not self._supervisor_alive(replica_dir)

    def stop(self, replica_id: str, grace: float = 10.0) -> None:
        try:
            replica_dir = self._dir(replica_id)
        except ReplicaNotFound:
            return
        if not replica_dir.exists():
            return
        try:
            meta: dict[str, Any] = self._meta(replica_id)
        except ReplicaNotFound:
            meta = {}
        init = self._sandbox_pid(replica_dir)
        had_sandbox = init is not None
        if init is not None:
            # SIGTERM to everything inside (the namespace's init ignores it); the init ends when the
            # server does, and the kernel then kills whatever else is left in the namespace.
            signalled: set[int] = {init}
            deadline = time.monotonic() + max(0.0, grace)
            pause = 0.002
            while self._sandbox_pid(replica_dir) is not None:
                # Again each round: right after start() the server may not have been forked yet.
                for pid in set(self._sandbox_members(replica_dir, meta)) - signalled:
                    signalled.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                if time.monotonic() >= deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            init = self._sandbox_pid(replica_dir)
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, signal.SIGKILL)  # kills the whole PID namespace at once
        # bwrap exits once its init is gone and the supervisor right after it; let them, so each
        # process is reaped by its own parent instead of left to the host's init as a zombie.
        deadline = time.monotonic() + (2.0 if had_sandbox else 0.2)
        while self._supervisor_alive(replica_dir) and time.monotonic() < deadline:
            time.sleep(0.005)
        # Whatever is still in the cgroups (a sandbox that never got going, a stuck bwrap).
        for pid in self._cgroup_pids(meta.get("cgroups") or {}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 0.5
        while self._supervisor_alive(replica_dir) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._supervisor_alive(replica_dir):
            record = _read_pid_record(replica_dir / "supervisor.pid")
            if record is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record[0], signal.SIGKILL)
        for source in meta.get("writable") or []:
            # Gone, so it can set no bit again: what it left is made harmless for the host.
            mount_hygiene.strip_setid_bits(str(source))
        self._cleanup(replica_id, meta)

    def _cleanup(self, replica_id: str, meta: Mapping[str, Any]) -> None:
        """Remove the replica's namespace, link, cgroups, address claim and state directory."""
        replica_dir = self.state_dir / replica_id
        network = meta.get("network") or {}
        index = network.get("index")
        cluster = meta.get("cluster") or {}
        if cluster.get("key") and cluster.get("host"):
            # First, while its namespace still exists: the peers forget it and its rules go.
            with contextlib.suppress(EngineError):
                self._leave_cluster(str(cluster["key"]), str(cluster["host"]), replica_dir)
        if network.get("mode") == "netns":
            self._teardown_netns(replica_id, index)
        cgroups = meta.get("cgroups") or {}
        if cgroups:
            self._remove_cgroup_dirs(list(cgroups.values()))
        if index is not None:
            self._release_index(int(index), replica_dir)
        shutil.rmtree(replica_dir, ignore_errors=True)

    def stats(self, replica_id: str) -> ReplicaStats:
        meta = self._meta(replica_id)
        replica_dir = self._dir(replica_id)
        cgroups = meta.get("cgroups") or {}
        mem: int | None = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            mem = int((Path(cgroups["memory"]) / "memory.usage_in_bytes").read_text())

        def cpu_ns() -> int | None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                return int((Path(cgroups["cpuacct"]) / "cpuacct.usage").read_text())
            # No cgroup: user + system time of the processes in the sandbox, from /proc.
            ticks, hertz = 0, os.sysconf("SC_CLK_TCK")
            members = self._sandbox_members(replica_dir, meta)
            if not members:
                return None
            for pid in members:
                fields = _proc_stat(pid)
                if fields:
                    ticks += int(fields[11]) + int(fields[12])
            return ticks * 1_000_000_000 // hertz

        if mem is None:
            page = os.sysconf("SC_PAGE_SIZE")
            mem = sum(int(f[21]) * page for pid in self._sandbox_members(replica_dir, meta) if (f := _proc_stat(pid)))
        # The previous sample is kept on disk, so a rate comes out of any engine instance (the
        # worker calls stats() from different processes); without a recent one, sample briefly.
        sample_path = replica_dir / "cpu.sample"
        previous: tuple[float, int] | None = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(sample_path.read_text())
            previous = (float(saved["t"]), int(saved["ns"]))
        now, usage = time.monotonic(), cpu_ns()
        percent = 0.0
        if usage is not None:
            if previous is None or not 0.05 <= now - previous[0] <= 60:
                previous = (now, usage)
                time.sleep(0.1)
                now, usage = time.monotonic(), cpu_ns() or usage
            elapsed = now - previous[0]
            if elapsed > 0:
                percent = max(0.0, 100.0 * (usage - previous[1]) / 1e9 / elapsed)
            with contextlib.suppress(OSError):
                _write_atomic(sample_path, json.dumps({"t": now, "ns": usage}))
        return ReplicaStats(cpu_percent=percent, mem_bytes=mem, mem_limit_bytes=int(meta["mem_bytes"]))

    def list(self, labels: Mapping[str, str] | None = None) -> list[ReplicaInfo]:
        out: list[ReplicaInfo] = []
        if not self.state_dir.is_dir():
            return out
        for spec_path in sorted(self.state_dir.glob("*/spec.json")):
            try:
                info = self.inspect(spec_path.parent.name)
            except ReplicaNotFound:
                continue  # stopped meanwhile
            if labels and any(info.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(info)
        return out

    def cleanup_orphans(self) -> int:
        """Remove what a crash left behind: namespaces, links and cgroups of ours that belong to no
        replica on this host any more (its state directory is gone), and their processes.
        Returns how many things were removed."""
        removed = 0
        if not self._rootful or self._ip is None:
            return removed
        with self._registry_lock() as registry:
            entries = self._registry_entries(registry)
            live = {index: owner for index, owner in entries.items() if owner.exists()}
            for index in entries.keys() - live.keys():
                with contextlib.suppress(OSError):
                    (registry / str(index)).unlink()
            live_ids = {owner.name for owner in live.values()}
            live_links = {self._host_if(index) for index in live}
            if not any(Path(f"/sys/class/net/{link}").exists() for link in live_links):
                self._allow_host_input()  # a leftover of a deny engine with no replica left
            removed += self._sweep_clusters(registry)
            prefix = f"{self.netns_prefix}-"
            for line in _run(self._ip, "netns", "list", check=False).stdout.splitlines():
                name = line.split()[0] if line.strip() else ""
                if name.startswith(prefix) and name.removeprefix(prefix) not in live_ids:
                    for pid_text in _run(self._ip, "netns", "pids", name, check=False).stdout.split():
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            os.kill(int(pid_text), signal.SIGKILL)
                    _run(self._ip, "netns", "del", name, check=False)
                    removed += 1
            link_name = re.compile(rf"^{re.escape(self.netns_prefix)}h\d+$")
            for link in Path("/sys/class/net").iterdir():
                if link_name.match(link.name) and link.name not in live_links:
                    _run(self._ip, "link", "del", link.name, check=False)
                    removed += 1
            for controller in CGROUP_CONTROLLERS:
                parent = CGROUP_ROOT / controller / CGROUP_PARENT
                if not parent.is_dir():
                    continue
                for group in parent.iterdir():
                    if (
                        not group.is_dir()
                        or not group.name.startswith(prefix)
                        or group.name.removeprefix(prefix) in live_ids
                    ):
                        continue
                    for pid in self._cgroup_pids({controller: str(group)}):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self._remove_cgroup_dirs([str(group)])
                    removed += 0 if group.exists() else 1
        # Replica folders of this engine that never got a spec (a start killed half way).
        if self.state_dir.is_dir():
            for folder in self.state_dir.iterdir():
                if (
                    folder.is_dir()
                    and not (folder / "spec.json").exists()
                    and time.time() - folder.stat().st_mtime > 60
                ):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
        return removed
