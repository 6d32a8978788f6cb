"""The local engine's resource limits and usage: one cgroup v1 group per controller and replica
(memory, CPU quota, process count), made before the sandbox starts and removed after it, and the
replica's CPU and memory figures read from them (or from /proc when no cgroup could be made).

Groups are named like the replica's network namespace (``<prefix>-<replica id>``) under
``CGROUP_PARENT``, so the orphan sweep only ever touches groups of its own prefix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from serving.node.engines.base import ReplicaSpec, ReplicaStats
from serving.node.engines.local.proc import proc_stat, write_atomic

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
CGROUP_PARENT = "modelserve"
CFS_PERIOD_US = 100_000
DEFAULT_PIDS_LIMIT = 1024


def make_cgroups(name: str, spec: ReplicaSpec, pids_limit: int) -> tuple[dict[str, str], list[str]]:
    """Create the replica's cgroups (``name``: its namespace's) and set its limits; returns their
    paths and log notes."""
    dirs: dict[str, str] = {}
    notes: list[str] = []
    if os.geteuid() != 0:
        return dirs, ["cgroups need root"]
    for controller in CGROUP_CONTROLLERS:
        base = CGROUP_ROOT / controller
        if not (base / "cgroup.procs").exists():
            continue
        # Named like the namespace: LocalEngine.cleanup_orphans() only ever touches its own prefix.
        path = base / CGROUP_PARENT / name
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
        remove_cgroup_dirs([dirs.pop("memory")])  # so the setrlimit fallback applies
    try:
        if "cpu" in dirs and spec.cpu > 0:
            cpu = Path(dirs["cpu"])
            (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(max(1000, int(spec.cpu * CFS_PERIOD_US))))
    except OSError as exc:
        notes.append(f"cgroup cpu quota not applied ({exc.strerror})")
    try:
        if "pids" in dirs:
            (Path(dirs["pids"]) / "pids.max").write_text(str(pids_limit))
    except OSError as exc:
        notes.append(f"cgroup pids limit not applied ({exc.strerror})")
    return dirs, notes


def procs_files(dirs: Mapping[str, str]) -> list[str]:
    # cpu and cpuacct are often one hierarchy mounted twice: join each real directory once.
    seen: dict[str, str] = {}
    for path in dirs.values():
        seen.setdefault(os.path.realpath(path), str(Path(path) / "cgroup.procs"))
    return list(seen.values())


def cgroup_pids(dirs: Mapping[str, str]) -> set[int]:
    pids: set[int] = set()
    for path in dirs.values():
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in (Path(path) / "cgroup.procs").read_text().split())
    return pids


def remove_cgroup_dirs(paths: list[str], timeout: float = 3.0) -> None:
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


def oom_killed(cgroups: Mapping[str, str], code: int) -> bool:
    memory = cgroups.get("memory")
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


def sweep_orphans(prefix: str, live_ids: set[str]) -> int:
    """Kill the processes of and remove our groups (named ``prefix<replica id>``) whose replica is
    gone; returns how many groups were removed."""
    removed = 0
    for controller in CGROUP_CONTROLLERS:
        parent = CGROUP_ROOT / controller / CGROUP_PARENT
        if not parent.is_dir():
            continue
        for group in parent.iterdir():
            if not group.is_dir() or not group.name.startswith(prefix) or group.name.removeprefix(prefix) in live_ids:
                continue
            for pid in cgroup_pids({controller: str(group)}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            remove_cgroup_dirs([str(group)])
            removed += 0 if group.exists() else 1
    return removed


def sample_stats(
    replica_dir: Path, cgroups: Mapping[str, str], members: Callable[[], list[int]], mem_limit: int
) -> ReplicaStats:
    """CPU and memory use of the replica: from its cgroups, else from /proc for ``members()`` (the
    processes in its sandbox, listed only when needed)."""
    mem: int | None = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        mem = int((Path(cgroups["memory"]) / "memory.usage_in_bytes").read_text())

    def cpu_ns() -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int((Path(cgroups["cpuacct"]) / "cpuacct.usage").read_text())
        # No cgroup: user + system time of the processes in the sandbox, from /proc.
        ticks, hertz = 0, os.sysconf("SC_CLK_TCK")
        pids = members()
        if not pids:
            return None
        for pid in pids:
            fields = proc_stat(pid)
            if fields:
                ticks += int(fields[11]) + int(fields[12])
        return ticks * 1_000_000_000 // hertz

    if mem is None:
        page = os.sysconf("SC_PAGE_SIZE")
        mem = sum(int(f[21]) * page for pid in members() if (f := proc_stat(pid)))
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
            write_atomic(sample_path, json.dumps({"t": now, "ns": usage}))
    return ReplicaStats(cpu_percent=percent, mem_bytes=mem, mem_limit_bytes=mem_limit)
