"""The local engine: replicas in bubblewrap sandboxes, each in its own network namespace.

What a laptop without Docker gets, and what most tests use (a replica starts in tens of ms):

* the sandbox's root is built from parts (read-only /usr, /etc), the model folder is bound
  read-only at its mount path, /home/work and /tmp are private tmpfs, own PID/IPC/UTS namespaces,
  every capability dropped; nothing else of the host (the platform's files, other folders) is there;
* one network namespace per replica with a veth pair (one /30 per replica out of a setting's
  subnet), so two replicas of a service both listen on the definition's port and the host reaches
  each at its own address;
* memory, CPU and process-count limits from cgroup v1 controllers (setrlimit fallback);
* a small supervisor process per replica (detached, so replicas outlive a node-worker restart as
  Docker containers do) runs the sandbox, writes its log and, when it ends, its exit status
  (including "killed: out of memory").

Everything about a replica lives in ``state_dir/<replica id>/``: a new engine instance finds the
replicas again with ``list()``. The image is not used: sandboxes run the host's userland.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from serving.engines.base import (
    EngineError,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
    ReplicaStats,
)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
CGROUP_PARENT = "modelserve"
BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
BOOTSTRAP_FAILED = 97
NET_REGISTRY = Path(os.environ.get("MODELSERVE_NET_REGISTRY", "/run/modelserve/net"))
PIDS_LIMIT = 1024
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise EngineError(f"`{' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a recycled pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class LocalEngine:
    name = "local"

    def __init__(
        self,
        state_dir: Path,
        netns_prefix: str = "ms",
        subnet: str = "10.213.0.0/16",
        python_prefix: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.netns_prefix = netns_prefix
        self.subnet = ipaddress.ip_network(subnet)
        self.python_prefix = python_prefix
        self._cpu_samples: dict[str, tuple[float, int]] = {}

    # --- availability -----------------------------------------------------------------------------

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        if shutil.which("bwrap") is None:
            return "bubblewrap is not installed: apt-get install bubblewrap"
        if os.geteuid() != 0:
            return (
                "the local engine needs root to give each replica its own network namespace; "
                "run the node worker as root, or use the Docker engine (SERVING_ENGINE=docker)"
            )
        if shutil.which("ip") is None:
            return "iproute2 is not installed: apt-get install iproute2"
        return None

    # --- layout -----------------------------------------------------------------------------------

    def _dir(self, replica_id: str) -> Path:
        if not replica_id or "/" in replica_id or replica_id.startswith("."):
            raise ReplicaNotFound(f"No replica {replica_id!r}.")
        return self.state_dir / replica_id

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _netns(self, replica_id: str) -> str:
        return f"{self.netns_prefix}-{replica_id}"

    def _addresses(self, index: int) -> tuple[str, str]:
        base = int(self.subnet.network_address) + 4 * index
        return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))

    # Address blocks and interface names are a machine-wide resource: several engines (node
    # workers, test suites) can run on one host, so claims live in one registry, not per state dir.

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

    def _allocate_index(self, replica_dir: Path) -> int:
        with self._registry_lock() as registry:
            entries = self._registry_entries(registry)
            capacity = self.subnet.num_addresses // 4
            for index in range(1, capacity):  # block 0 holds the network's own address
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

    def _cgroup_dirs(self, replica_id: str) -> dict[str, Path]:
        return {
            c: CGROUP_ROOT / c / CGROUP_PARENT / replica_id for c in CGROUP_CONTROLLERS if (CGROUP_ROOT / c).is_dir()
        }

    def _make_cgroups(self, replica_id: str, spec: ReplicaSpec) -> list[str]:
        notes = []
        dirs = self._cgroup_dirs(replica_id)
        for controller, path in dirs.items():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                notes.append(f"cgroup {controller} unavailable ({exc.strerror})")
        try:
            if "memory" in dirs:
                (dirs["memory"] / "memory.limit_in_bytes").write_text(str(spec.mem_bytes))
                memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(spec.mem_bytes))  # no swapping past the limit either
            if "cpu" in dirs and spec.cpu > 0:
                (dirs["cpu"] / "cpu.cfs_period_us").write_text("100000")
                (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(max(1000, int(spec.cpu * 100000))))
            if "pids" in dirs:
                (dirs["pids"] / "pids.max").write_text(str(PIDS_LIMIT))
        except OSError as exc:
            notes.append(f"cgroup limits not applied ({exc.strerror})")
        return notes

    def _remove_cgroups(self, replica_id: str) -> None:
        for path in self._cgroup_dirs(replica_id).values():
            for _ in range(20):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # processes still leaving the group

    def _cgroup_pids(self, replica_id: str) -> list[int]:
        pids: set[int] = set()
        for path in self._cgroup_dirs(replica_id).values():
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return sorted(pids)

    # --- network ----------------------------------------------------------------------------------

    def _setup_network(self, replica_id: str, index: int) -> tuple[str, str]:
        netns = self._netns(replica_id)
        host_if, inner_if = f"{self.netns_prefix}h{index}", f"{self.netns_prefix}c{index}"
        host_addr, replica_addr = self._addresses(index)
        _run("ip", "link", "del", host_if, check=False)  # a leftover of a crashed worker
        _run("ip", "netns", "add", netns)
        try:
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", inner_if)
            _run("ip", "link", "set", inner_if, "netns", netns)
            _run("ip", "addr", "add", f"{host_addr}/30", "dev", host_if)
            _run("ip", "link", "set", host_if, "up")
            _run("ip", "netns", "exec", netns, "ip", "addr", "add", f"{replica_addr}/30", "dev", inner_if)
            _run("ip", "netns", "exec", netns, "ip", "link", "set", inner_if, "up")
            _run("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        except EngineError:
            self._teardown_network(replica_id, index)
            raise
        return host_addr, replica_addr

    def _teardown_network(self, replica_id: str, index: int | None) -> None:
        _run("ip", "netns", "del", self._netns(replica_id), check=False)  # takes its veth end along
        if index is not None:
            _run("ip", "link", "del", f"{self.netns_prefix}h{index}", check=False)

    # --- the sandbox command ---------------------------------------------------------------------

    def _bwrap_args(self, spec: ReplicaSpec, replica_dir: Path) -> list[str]:
        args = [
            "bwrap",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--ro-bind", "/etc", "/etc",
            "--tmpfs", "/home/work",
            "--tmpfs", "/tmp",  # noqa: S108  (the sandbox's own tmpfs)
            "--dev", "/dev",
            "--proc", "/proc",
            "--ro-bind", str(BOOTSTRAP), "/opt/modelserve/bootstrap.py",
            "--ro-bind", str(replica_dir / "plan.json"), "/opt/modelserve/plan.json",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--hostname", spec.name[:63],
            "--die-with-parent",
            "--new-session",
            "--cap-drop", "ALL",
            "--clearenv",
            "--setenv", "PATH", SANDBOX_PATH,
            "--setenv", "HOME", "/home/work",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONUNBUFFERED", "1",
        ]  # fmt: skip
        if self.python_prefix and not self.python_prefix.startswith("/usr"):
            args += ["--ro-bind", self.python_prefix, self.python_prefix]
        for mount in spec.mounts:
            source = Path(mount.source)
            if not source.exists():
                raise EngineError(f"The folder to mount at {mount.target} does not exist on this node ({source}).")
            args += ["--ro-bind" if mount.read_only else "--bind", str(source), mount.target]
        for key, value in spec.env.items():
            args += ["--setenv", key, value]
        args += ["--chdir", "/", "--", "python3", "/opt/modelserve/bootstrap.py", "/opt/modelserve/plan.json"]
        return args

    # --- the protocol -----------------------------------------------------------------------------

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        reason = self.unavailable_reason()
        if reason:
            raise EngineError(f"The local engine can not start replicas here: {reason}.")
        replica_id = uuid.uuid4().hex[:12]
        replica_dir = self.state_dir / replica_id
        with self._lock():
            replica_dir.mkdir(parents=True)
            index = self._allocate_index(replica_dir)
            (replica_dir / "net.json").write_text(json.dumps({"index": index}))
        from serving.prestart import plan

        (replica_dir / "plan.json").write_text(json.dumps(plan(spec)))
        try:
            _host_addr, replica_addr = self._setup_network(replica_id, index)
            notes = self._make_cgroups(replica_id, spec)
            meta = {
                "name": spec.name,
                "labels": dict(spec.labels),
                "port": spec.port,
                "host": replica_addr,
                "mem_bytes": spec.mem_bytes,
                "created": time.time(),
                "notes": notes,
                "command": ["ip", "netns", "exec", self._netns(replica_id), *self._bwrap_args(spec, replica_dir)],
                "cgroups": [str(p / "cgroup.procs") for p in self._cgroup_dirs(replica_id).values()],
            }
            (replica_dir / "spec.json").write_text(json.dumps(meta))
            with (replica_dir / "log").open("a") as log:
                for note in notes:
                    log.write(f"[engine] {note}\n")
            self._spawn_supervisor(replica_dir)
        except Exception:
            self._cleanup(replica_id)
            raise
        return ReplicaInfo(
            replica_id=replica_id,
            name=spec.name,
            state=ReplicaState.RUNNING,
            host=replica_addr,
            port=spec.port,
            labels=dict(spec.labels),
        )

    def _spawn_supervisor(self, replica_dir: Path) -> None:
        # The supervisor double-forks (see supervise()): the process we wait for exits at once,
        # so nothing becomes a zombie of the worker, and the replica outlives the worker.
        subprocess.run(
            [sys.executable, "-m", "serving.engines.local", "supervise", str(replica_dir)],
            cwd=str(Path(__file__).resolve().parents[2]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=10,
        )
        deadline = time.monotonic() + 5
        while not (replica_dir / "supervisor.pid").exists():
            if time.monotonic() > deadline:
                raise EngineError("The replica's supervisor did not start; see its log.")
            time.sleep(0.005)

    def _supervisor_alive(self, replica_dir: Path) -> bool:
        try:
            pid_text, started = (replica_dir / "supervisor.pid").read_text().split()
        except (OSError, ValueError):
            return False
        return _process_start_time(int(pid_text)) == started

    def _meta(self, replica_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self._dir(replica_id) / "spec.json").read_text()))
        except (OSError, ValueError):
            raise ReplicaNotFound(f"No replica {replica_id!r} on this node.") from None

    def inspect(self, replica_id: str) -> ReplicaInfo:
        meta = self._meta(replica_id)
        replica_dir = self._dir(replica_id)
        exit_file = replica_dir / "exit.json"
        state = ReplicaState.RUNNING
        exit_code: int | None = None
        error = ""
        if exit_file.exists():
            state = ReplicaState.EXITED
            status = json.loads(exit_file.read_text())
            exit_code = status.get("code")
            error = self._exit_error(replica_dir, status, meta)
        elif not self._supervisor_alive(replica_dir):
            state = ReplicaState.EXITED
            error = "The replica's supervisor is gone (the node restarted?)."
        return ReplicaInfo(
            replica_id=replica_id,
            name=meta["name"],
            state=state,
            host=meta["host"],
            port=meta["port"],
            labels=meta["labels"],
            exit_code=exit_code,
            error=error,
        )

    def _exit_error(self, replica_dir: Path, status: dict[str, Any], meta: dict[str, Any]) -> str:
        if status.get("oom"):
            return f"killed: out of memory (limit {meta['mem_bytes'] // (1024 * 1024)} MiB)"
        if status.get("code") == BOOTSTRAP_FAILED:
            for line in reversed(self._read_lines(replica_dir / "log", 200)):
                if line.startswith("[prestart]") and ("failed" in line or "can not" in line or "no start" in line):
                    return line.removeprefix("[prestart] ").replace("action ", "pre-start action ", 1)
        if status.get("signal"):
            return f"The replica was killed by signal {status['signal']}."
        return f"The replica exited with code {status.get('code')}."

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

    def logs(self, replica_id: str, tail: int = 200, follow: bool = False) -> Iterator[str]:
        replica_dir = self._dir(replica_id)
        log_path = replica_dir / "log"
        if not follow:
            if not (replica_dir / "spec.json").exists():
                raise ReplicaNotFound(f"No replica {replica_id!r} on this node.")
            yield from self._read_lines(log_path, tail)
            return
        # Read the tail and remember exactly where it ended, so no line is lost or repeated
        # between the tail and the follow.
        position = 0
        with contextlib.suppress(OSError), log_path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            handle.seek(max(0, end - 256 * 1024))
            data = handle.read(end - handle.tell())
            position = end
            complete, _, partial = data.rpartition(b"\n")
            position -= len(partial)
            recent = complete.decode("utf-8", "replace").splitlines() if complete else []
            yield from (recent[-tail:] if tail > 0 else [])
        buffer = b""
        while True:
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
                if (replica_dir / "exit.json").exists() or not replica_dir.exists():
                    if buffer:
                        yield buffer.decode("utf-8", "replace")
                    return
                time.sleep(0.05)

    def stop(self, replica_id: str, grace: float = 10.0) -> None:
        replica_dir = self.state_dir / replica_id
        if not replica_dir.exists():
            return
        pids = self._cgroup_pids(replica_id)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._cgroup_pids(replica_id):
            time.sleep(0.02)
        for pid in self._cgroup_pids(replica_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The supervisor is not in the cgroup (it must outlive the sandbox to record the exit).
        deadline = time.monotonic() + 3
        while self._supervisor_alive(replica_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._cleanup(replica_id)

    def _cleanup(self, replica_id: str) -> None:
        replica_dir = self.state_dir / replica_id
        index = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            index = int(json.loads((replica_dir / "net.json").read_text())["index"])
        if self._supervisor_alive(replica_dir):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((replica_dir / "supervisor.pid").read_text().split()[0]), signal.SIGKILL)
        self._teardown_network(replica_id, index)
        if index is not None:
            self._release_index(index, replica_dir)
        self._remove_cgroups(replica_id)
        with self._lock():
            shutil.rmtree(replica_dir, ignore_errors=True)

    def stats(self, replica_id: str) -> ReplicaStats:
        meta = self._meta(replica_id)
        dirs = self._cgroup_dirs(replica_id)
        mem = 0
        with contextlib.suppress(OSError, ValueError):
            mem = int((dirs["memory"] / "memory.usage_in_bytes").read_text())
        usage = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            usage = int((dirs["cpuacct"] / "cpuacct.usage").read_text())
        percent = 0.0
        now = time.monotonic()
        if usage is not None:
            previous = self._cpu_samples.get(replica_id)
            if previous is None:
                time.sleep(0.1)
                first = usage
                usage = int((dirs["cpuacct"] / "cpuacct.usage").read_text())
                previous = (now, first)
                now = time.monotonic()
            elapsed = now - previous[0]
            if elapsed > 0:
                percent = 100.0 * (usage - previous[1]) / 1e9 / elapsed
            self._cpu_samples[replica_id] = (now, usage)
        return ReplicaStats(cpu_percent=max(0.0, percent), mem_bytes=mem, mem_limit_bytes=int(meta["mem_bytes"]))

    def list(self, labels: Mapping[str, str] | None = None) -> list[ReplicaInfo]:
        out: list[ReplicaInfo] = []
        if not self.state_dir.is_dir():
            return out
        for spec_path in self.state_dir.glob("*/spec.json"):
            replica_id = spec_path.parent.name
            try:
                info = self.inspect(replica_id)
            except ReplicaNotFound:
                continue
            if labels and any(info.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(info)
        return out

    def cleanup_orphans(self) -> int:
        """Remove namespaces and links of ours that no live replica on this host owns (after crashes)."""
        removed = 0
        with self._registry_lock() as registry:
            entries = self._registry_entries(registry)
            live = {index: owner for index, owner in entries.items() if owner.exists()}
            for index in entries:
                if index not in live:
                    with contextlib.suppress(OSError):
                        (registry / str(index)).unlink()
            live_netns = {self._netns(owner.name) for owner in live.values()}
            live_links = {f"{self.netns_prefix}h{index}" for index in live}
        prefix = f"{self.netns_prefix}-"
        for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(prefix) and name not in live_netns:
                _run("ip", "netns", "del", name, check=False)
                removed += 1
        for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
            parts = line.split(":")
            if len(parts) > 1:
                ifname = parts[1].strip().split("@")[0]
                rest = ifname[len(self.netns_prefix) + 1 :]
                if ifname.startswith(f"{self.netns_prefix}h") and rest.isdigit() and ifname not in live_links:
                    _run("ip", "link", "del", ifname, check=False)
                    removed += 1
        return removed


# --- the supervisor (runs detached, one per replica) -------------------------------------------


def supervise(replica_dir: Path) -> None:
    """Run the replica's sandbox, log its output, record how it ended. Double-forks first."""
    if os.fork() > 0:
        os._exit(0)  # the engine waits for this parent; the child lives on, adopted by init
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    meta = json.loads((replica_dir / "spec.json").read_text())
    pid = os.getpid()
    started = _process_start_time(pid) or "0"
    log = (replica_dir / "log").open("ab", buffering=0)

    def enter_cgroups() -> None:
        # Runs in the child between fork and exec: the sandbox (and all it starts) is limited,
        # the supervisor itself is not (it must survive an OOM kill to record it).
        for procs in meta["cgroups"]:
            with contextlib.suppress(OSError):
                Path(procs).write_text(str(os.getpid()))

    child = subprocess.Popen(
        meta["command"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=enter_cgroups,  # noqa: PLW1509  (the supervisor has no threads)
    )
    (replica_dir / "supervisor.pid.tmp").write_text(f"{pid} {started}")
    os.replace(replica_dir / "supervisor.pid.tmp", replica_dir / "supervisor.pid")

    def forward(signum: int, _: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    code = child.wait()
    oom = False
    for procs in meta["cgroups"]:
        control = Path(procs).parent / "memory.oom_control"
        if control.exists():
            with contextlib.suppress(OSError, ValueError):
                for line in control.read_text().splitlines():
                    if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                        oom = True
    status = {"code": code if code >= 0 else None, "signal": -code if code < 0 else None, "oom": oom, "at": time.time()}
    # bwrap reports a killed child as exit 128+N; translate so "killed by SIGKILL" reads as such.
    if code > 128 and code - 128 in (signal.SIGKILL, signal.SIGTERM):
        status["signal"] = code - 128
    log.write(f"[engine] replica ended: {json.dumps(status)}\n".encode())
    (replica_dir / "exit.json.tmp").write_text(json.dumps(status))
    os.replace(replica_dir / "exit.json.tmp", replica_dir / "exit.json")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "supervise":
    supervise(Path(sys.argv[2]))
