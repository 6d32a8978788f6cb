"""What every part of the local engine reads of the host's processes (/proc), and the atomic write
every record in a replica's state directory goes through: shared by the supervisor (pid records),
the cgroup stats (CPU time without a cgroup), the network (cluster entries) and the engine.
"""

from __future__ import annotations

import os
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (index 0 = field 3 of proc(5))."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[19] if fields else None


def alive(pid: int, started: str | None) -> bool:
    """The process runs and is the one we started (not a zombie, not a reused pid)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X") and (started is None or fields[19] == started)


def read_pid_record(path: Path) -> tuple[int, str] | None:
    try:
        pid_text, started = path.read_text().split()[:2]
        return int(pid_text), started
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pidns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None
