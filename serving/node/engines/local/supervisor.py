"""A replica's processes and what they leave on disk: the detached ``/bin/sh`` supervisor that
puts the sandbox under its limits, waits for it and records its exit status; finding the sandbox's
PID-namespace init and its members; stopping them (SIGTERM to everything inside, then SIGKILL);
why a replica exited; and its log file, read as a tail or followed.

The records live in the replica's state directory: ``supervisor.pid`` and ``pid`` ("PID STARTTIME",
the start time guards against a reused pid), ``status.json`` (bwrap's own status), ``exit``, ``log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from serving.node import prestart
from serving.node.engines.base import EngineError
from serving.node.engines.local import cgroups
from serving.node.engines.local.proc import alive, all_pids, pidns_inode, read_pid_record, start_time, write_atomic

BOOTSTRAP_FAILED = prestart.BOOTSTRAP_FAILED_EXIT
JOIN_FAILED = 111  # the supervisor could not put the sandbox into its cgroups / rlimit, or hand it its home
START_TIMEOUT = 10.0
MIB = 1 << 20

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


def launch(replica_dir: Path, command: list[str], env: dict[str, str]) -> None:
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
    write_atomic(replica_dir / "supervisor.pid", f"{supervisor} {start_time(supervisor) or 0}\n")
    # Return once the sandbox's init runs (bwrap reports its pid) or the attempt is over.
    deadline = time.monotonic() + START_TIMEOUT
    pause = 0.001
    while time.monotonic() < deadline:
        if isinstance(bwrap_status(replica_dir).get("child-pid"), int):
            child = locate_init(replica_dir)
            if child is not None:
                write_atomic(replica_dir / "pid", f"{child} {start_time(child) or 0}\n")
                return
        if (replica_dir / "exit").exists():
            return  # failed early (bad mount, ...); inspect() tells why
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    raise EngineError(f"The replica's sandbox did not start within {START_TIMEOUT:g} s; see its log.")


def bwrap_status(replica_dir: Path) -> dict[str, Any]:
    """bwrap's --json-status-fd output: one JSON document per line (child-pid, exit-code...)."""
    status: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in (replica_dir / "status.json").read_text().splitlines():
            with contextlib.suppress(ValueError):
                document = json.loads(line)
                if isinstance(document, dict):
                    status.update(document)
    return status


def locate_init(replica_dir: Path) -> int | None:
    """The host pid of the sandbox's PID-namespace init (bwrap's child), if it runs."""
    status = bwrap_status(replica_dir)
    pid = status.get("child-pid")
    # As root bwrap runs in the host's PID namespace and reports the host pid; checking the
    # namespace also guards against a reused pid.
    if isinstance(pid, int) and "pid-namespace" in status and pidns_inode(pid) == status["pid-namespace"]:
        return pid if alive(pid, None) else None
    # Under pasta bwrap reports a pid of another namespace: walk down from the supervisor to
    # the outer bwrap and take its child.
    record = read_pid_record(replica_dir / "supervisor.pid")
    if record is None:
        return None
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for candidate in all_pids():
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


def sandbox_pid(replica_dir: Path) -> int | None:
    """The live PID-namespace init of the sandbox, or None."""
    record = read_pid_record(replica_dir / "pid")
    if record is not None:
        return record[0] if alive(*record) else None
    # The engine that started it died before writing "pid".
    return locate_init(replica_dir)


def supervisor_alive(replica_dir: Path) -> bool:
    record = read_pid_record(replica_dir / "supervisor.pid")
    return record is not None and alive(*record)


def sandbox_members(replica_dir: Path, meta: Mapping[str, Any]) -> list[int]:
    """Every process inside the sandbox's PID namespace (init included)."""
    namespace = bwrap_status(replica_dir).get("pid-namespace")
    if not isinstance(namespace, int):  # bwrap without root does not report it
        init = sandbox_pid(replica_dir)
        namespace = pidns_inode(init) if init is not None else None
        if namespace is None:
            return []
    candidates = cgroups.cgroup_pids(meta.get("cgroups") or {}) or set(all_pids())
    return sorted(pid for pid in candidates if pidns_inode(pid) == namespace)


def stop_processes(replica_dir: Path, meta: Mapping[str, Any], grace: float) -> None:
    """End the sandbox (SIGTERM, SIGKILL after ``grace`` s), whatever is left in its cgroups, and
    its supervisor, each reaped by its own parent where it can be."""
    init = sandbox_pid(replica_dir)
    had_sandbox = init is not None
    if init is not None:
        # SIGTERM to everything inside (the namespace's init ignores it); the init ends when the
        # server does, and the kernel then kills whatever else is left in the namespace.
        signalled: set[int] = {init}
        deadline = time.monotonic() + max(0.0, grace)
        pause = 0.002
        while sandbox_pid(replica_dir) is not None:
            # Again each round: right after start() the server may not have been forked yet.
            for pid in set(sandbox_members(replica_dir, meta)) - signalled:
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        init = sandbox_pid(replica_dir)
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)  # kills the whole PID namespace at once
    # bwrap exits once its init is gone and the supervisor right after it; let them, so each
    # process is reaped by its own parent instead of left to the host's init as a zombie.
    deadline = time.monotonic() + (2.0 if had_sandbox else 0.2)
    while supervisor_alive(replica_dir) and time.monotonic() < deadline:
        time.sleep(0.005)
    # Whatever is still in the cgroups (a sandbox that never got going, a stuck bwrap).
    for pid in cgroups.cgroup_pids(meta.get("cgroups") or {}):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 0.5
    while supervisor_alive(replica_dir) and time.monotonic() < deadline:
        time.sleep(0.005)
    if supervisor_alive(replica_dir):
        record = read_pid_record(replica_dir / "supervisor.pid")
        if record is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record[0], signal.SIGKILL)


def exit_code(replica_dir: Path) -> int | None:
    try:
        return int((replica_dir / "exit").read_text().strip())
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError, TypeError):  # the previous layout
        old = json.loads((replica_dir / "exit.json").read_text())
        return 128 + int(old["signal"]) if old.get("signal") else int(old["code"])
    return None


def exit_error(replica_dir: Path, meta: Mapping[str, Any], code: int) -> str:
    limit = f"limit {int(meta['mem_bytes']) // MIB} MiB"
    if cgroups.oom_killed(meta.get("cgroups") or {}, code):
        return f"killed: out of memory ({limit})"
    lines = read_lines(replica_dir / "log", 200)
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


def read_lines(path: Path, tail: int) -> list[str]:
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


def follow(replica_dir: Path, tail: int, stop: threading.Event) -> Iterator[str]:
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
        done = ended(replica_dir)  # checked before reading, so the last lines are not lost
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
            if done:
                if buffer:
                    yield buffer.decode("utf-8", "replace")
                return
            stop.wait(0.05)


def ended(replica_dir: Path) -> bool:
    if not replica_dir.exists() or (replica_dir / "exit").exists():
        return True
    return sandbox_pid(replica_dir) is None and not supervisor_alive(replica_dir)
