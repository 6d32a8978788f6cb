"""``LocalEngine``: the ``Engine`` protocol (engines/base.py) for replicas in bubblewrap sandboxes,
composed of the package's parts: sandbox.py (what the replica sees), cgroups.py (its limits),
network.py (its namespace, address and firewall rules), supervisor.py (its processes and log).

This module holds what ties them together: where a replica's state lives (``state_dir/<id>/``,
``spec.json``), which of the host's tools are there and so whether a replica can start at all, the
order of a start and of a cleanup, and the sweep of what a crash left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from serving.node import prestart
from serving.node.engines import firewall
from serving.node.engines import mounts as mount_hygiene
from serving.node.engines.base import (
    EngineError,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
    ReplicaStats,
)

# Who replicas run as when the engine runs as root, and where host tools are found: shared.
from serving.node.engines.firewall import DEFAULT_GID, DEFAULT_UID, HOST_PATH
from serving.node.engines.local import cgroups, sandbox, supervisor
from serving.node.engines.local.network import ReplicaNetworks, free_port
from serving.node.engines.local.proc import write_atomic

MIB = 1 << 20


class LocalEngine:
    name = "local"

    def __init__(
        self,
        state_dir: Path,
        netns_prefix: str = "ms",
        subnet: str = "10.213.0.0/16",
        python_prefix: str | None = None,
        pids_limit: int = cgroups.DEFAULT_PIDS_LIMIT,
        uid: int = DEFAULT_UID,
        gid: int = DEFAULT_GID,
        egress: str = "allow",
        dev_root: str = "/dev",
    ) -> None:
        self.state_dir = Path(state_dir)
        # Where the host's GPU device nodes are: a replica sees only its assigned ones from there.
        self.dev_root = dev_root
        # A sandbox has no route past the host anyway; "deny" also keeps it off the host's own
        # addresses (services listening on 0.0.0.0), see ReplicaNetworks.deny_host_input.
        self.egress = firewall.check_egress(egress)
        firewall.check_replica_ids(
            uid, gid, who="The local engine's replica", uid_setting="LOCAL_ENGINE_UID", gid_setting="LOCAL_ENGINE_GID"
        )
        # Used only when the engine runs as root; 0/0 keeps replicas as (capability-less) root.
        self.uid, self.gid = uid, gid
        self.networks = ReplicaNetworks(
            subnet, netns_prefix, ip=shutil.which("ip", path=HOST_PATH), iptables=firewall.find_iptables()
        )
        self.subnet = self.networks.subnet
        self.netns_prefix = netns_prefix
        self.pids_limit = pids_limit
        if python_prefix is None:
            python_prefix = sandbox.host_python_prefix()
        self.python_prefix = python_prefix or None
        self._bwrap = shutil.which("bwrap", path=HOST_PATH)
        self._pasta = shutil.which("pasta", path=HOST_PATH)
        self._setpriv = shutil.which("setpriv", path=HOST_PATH)
        # The prelude runs as root: it calls its helpers by absolute path, never through a PATH.
        self._chown = shutil.which("chown", path=HOST_PATH)
        self._cat = shutil.which("cat", path=HOST_PATH)

    # --- availability -----------------------------------------------------------------------------

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable(self) -> str:
        """Always "": the host is the node, and takes replicas while its worker heartbeats (what the
        host lacks, ``unavailable_reason``, is checked when the engine is chosen)."""
        return ""

    def unavailable_reason(self) -> str | None:
        """Why no replica can start here (a sentence saying what to install or do), or None."""
        if self._bwrap is None:
            return "bubblewrap is not installed; install it with `apt-get install bubblewrap`"
        if os.geteuid() == 0:
            if self.networks.ip is None:
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

    def _sandbox(self) -> sandbox.Sandbox:
        return sandbox.Sandbox(
            python_prefix=self.python_prefix,
            rootful=self._rootful,
            drops_to_user=self._drops_to_user,
            uid=self.uid,
            gid=self.gid,
            setpriv=self._setpriv,
            chown=self._chown,
            cat=self._cat,
            dev_root=self.dev_root,
        )

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
                    "netns": self.networks.netns(replica_id),
                    "host_if": self.networks.host_if(index),
                }
        return meta

    # What tests (and the fault injection of tests/reliability) ask the engine directly.

    def _addresses(self, index: int) -> tuple[str, str]:
        return self.networks.addresses(index)

    def _allocate_index(self, registry: Path, replica_dir: Path) -> int:
        return self.networks.allocate_index(registry, replica_dir)

    def _sandbox_pid(self, replica_dir: Path) -> int | None:
        return supervisor.sandbox_pid(replica_dir)

    def _sandbox_members(self, replica_dir: Path, meta: Mapping[str, Any]) -> list[int]:
        return supervisor.sandbox_members(replica_dir, meta)

    # --- the protocol -----------------------------------------------------------------------------

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        reason = self.unavailable_reason()
        if reason:
            raise EngineError(f"The local engine can not start replicas here: {reason}.")
        box = self._sandbox()
        box.check_spec(spec)
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
        peering = self.networks.peering_unavailable() if spec.cluster else None
        if peering:
            notes.append(peering)
            meta["cluster"] = None
        try:
            if self._rootful:
                # Claim a block, make the namespace and the cgroups under one machine-wide lock, so
                # cleanup_orphans() (same lock) never takes a half-made replica for a leftover.
                with self.networks.registry_lock() as registry:
                    replica_dir.mkdir()
                    index = self.networks.allocate_index(registry, replica_dir)
                    meta["network"] = {
                        "mode": "netns",
                        "index": index,
                        "netns": self.networks.netns(replica_id),
                        "host_if": self.networks.host_if(index),
                    }
                    write_atomic(replica_dir / "spec.json", json.dumps(meta))
                    if self.egress == "deny":
                        self.networks.deny_host_input()
                    meta["host"] = self.networks.setup_netns(replica_id, index)
                    if spec.cluster and meta["cluster"]:
                        self.networks.join_cluster(registry, spec.cluster, replica_dir, meta["network"], meta["host"])
                        notes.append(f"cluster member {spec.cluster.host}: reaches its peers by host name")
                    meta["cgroups"], cgroup_notes = cgroups.make_cgroups(
                        self.networks.netns(replica_id), spec, self.pids_limit
                    )
                    notes += cgroup_notes
            else:
                replica_dir.mkdir()
                meta["network"] = {"mode": "pasta"}
                meta["host"], meta["port"] = "127.0.0.1", free_port()
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

            argv, with_plan = box.command(spec, notes)
            if with_plan:
                write_atomic(replica_dir / "plan.json", json.dumps(prestart.plan(spec)))
                # Read by the replica's unprivileged user, whatever the worker's umask.
                (replica_dir / "plan.json").chmod(0o644)
            if self._drops_to_user:
                sandbox.write_environ(replica_dir / sandbox.ENV_FILE_NAME, spec.env)
            bwrap_args = box.bwrap_args(spec, replica_dir, with_plan, hosts_file=bool(meta["cluster"]))
            (replica_dir / "args").write_bytes(b"".join(a.encode() + b"\0" for a in bwrap_args))
            (replica_dir / "cgroups").write_text("".join(p + "\n" for p in cgroups.procs_files(meta["cgroups"])))
            command = [str(self._bwrap), "--args", "3", "--", *argv]
            if meta["network"]["mode"] == "netns":
                command = [str(self.networks.ip), "netns", "exec", meta["network"]["netns"], *command]
            else:
                command = [
                    str(self._pasta), "--config-net", "--quiet", "--foreground",
                    "-t", f"127.0.0.1/{meta['port']}:{spec.port}", "-u", "none", "-T", "none", "-U", "none",
                    "--", *command,
                ]  # fmt: skip
            meta["command"] = command
            write_atomic(replica_dir / "spec.json", json.dumps(meta))
            with (replica_dir / "log").open("a") as log:
                log.writelines(f"[engine] {note}\n" for note in notes)
            supervisor.launch(replica_dir, command, env)
        except BaseException:
            if (replica_dir / "supervisor.pid").exists():
                self.stop(replica_id, grace=0)  # something runs already: take it down first
            else:
                self._cleanup(replica_id, meta)
            raise
        return dataclasses.replace(self.inspect(replica_id), warnings=tuple(w.public for w in warnings))

    def inspect(self, replica_id: str) -> ReplicaInfo:
        meta = self._meta(replica_id)
        replica_dir = self._dir(replica_id)
        code = supervisor.exit_code(replica_dir)
        error = ""
        if code is not None:
            state = ReplicaState.EXITED
            error = supervisor.exit_error(replica_dir, meta, code)
        elif supervisor.sandbox_pid(replica_dir) is not None:
            state = ReplicaState.RUNNING
        elif supervisor.supervisor_alive(replica_dir):
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

    def logs(
        self, replica_id: str, tail: int = 200, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        replica_dir = self._dir(replica_id)
        if not (replica_dir / "spec.json").exists():
            raise ReplicaNotFound(f"No replica {replica_id!r} on this node.")
        if follow:
            return supervisor.follow(replica_dir, tail, stop or threading.Event())
        return iter(supervisor.read_lines(replica_dir / "log", tail))

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
        supervisor.stop_processes(replica_dir, meta, grace)
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
                self.networks.leave_cluster(str(cluster["key"]), str(cluster["host"]), replica_dir)
        if network.get("mode") == "netns":
            self.networks.teardown_netns(replica_id, index)
        groups = meta.get("cgroups") or {}
        if groups:
            cgroups.remove_cgroup_dirs(list(groups.values()))
        if index is not None:
            self.networks.release_index(int(index), replica_dir)
        shutil.rmtree(replica_dir, ignore_errors=True)

    def stats(self, replica_id: str) -> ReplicaStats:
        meta = self._meta(replica_id)
        replica_dir = self._dir(replica_id)
        return cgroups.sample_stats(
            replica_dir,
            meta.get("cgroups") or {},
            lambda: supervisor.sandbox_members(replica_dir, meta),
            int(meta["mem_bytes"]),
        )

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
        if not self._rootful or self.networks.ip is None:
            return removed
        with self.networks.registry_lock() as registry:
            entries = self.networks.registry_entries(registry)
            live = {index: owner for index, owner in entries.items() if owner.exists()}
            for index in entries.keys() - live.keys():
                with contextlib.suppress(OSError):
                    (registry / str(index)).unlink()
            live_ids = {owner.name for owner in live.values()}
            live_links = {self.networks.host_if(index) for index in live}
            if not any(Path(f"/sys/class/net/{link}").exists() for link in live_links):
                self.networks.allow_host_input()  # a leftover of a deny engine with no replica left
            removed += self.networks.sweep_clusters(registry)
            removed += self.networks.sweep_orphans(live)
            removed += cgroups.sweep_orphans(f"{self.netns_prefix}-", live_ids)
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
