"""scripts/respawn.sh: `make run` keeps a crashed process running instead of stopping the product."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.live import ROOT, wait_for

RESPAWN = str(ROOT / "scripts" / "respawn.sh")


def starts(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_crashing_command_is_started_again_and_sigterm_stops_it_for_good(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    # Dies at once twice, then runs until it is told to stop.
    script = f'echo start >> {log}; [ "$(wc -l < {log})" -ge 3 ] && exec sleep 300; exit 7'
    wrapper = subprocess.Popen(
        [RESPAWN, "demo", "sh", "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for(lambda: starts(log) >= 3, timeout=15, what="three starts (1 s, then 2 s apart)")
        time.sleep(0.5)
        assert wrapper.poll() is None and starts(log) == 3  # the third one runs: no more restarts
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=10) != 0  # sleep was terminated, and the wrapper did not restart it
        _, err = wrapper.communicate()
        assert err.count("demo exited with code 7") == 2, err
        assert subprocess.run(["pgrep", "-f", f"echo start >> {log}"], check=False).returncode == 1
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)


def test_a_clean_exit_ends_the_wrapper_with_it(tmp_path: Path) -> None:
    done = subprocess.run([RESPAWN, "once", "true"], timeout=10, check=False)
    assert done.returncode == 0


def test_every_long_running_process_of_make_run_is_respawned() -> None:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, command = line.split(":", 1)
        assert command.split()[:2] == ["scripts/respawn.sh", name], line


CHILD = """
import signal, sys, time
log = open(sys.argv[1], "a")
def said(what, then=None):
    def handler(*_):
        log.write(what + "\\n")
        log.flush()
        if then is not None:
            sys.exit(then)
    return handler
signal.signal(signal.SIGINT, said("INT"))
signal.signal(signal.SIGTERM, said("TERM", 0))
open(sys.argv[2], "w").close()
while True:
    time.sleep(0.05)
"""


def test_ctrl_c_reaches_the_command_only_as_the_wrappers_sigterm(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group; a Celery worker's pool
    processes used to die of it mid-shutdown. The command runs in a session of its own, so it
    hears only the SIGTERM its wrapper forwards."""
    log, ready = tmp_path / "signals", tmp_path / "ready"
    wrapper = subprocess.Popen(
        [RESPAWN, "demo", str(ROOT / ".venv" / "bin" / "python"), "-c", CHILD, str(log), str(ready)],
        start_new_session=True,  # the wrapper leads a process group, as a terminal's foreground job
    )
    try:
        wait_for(ready.exists, timeout=15, what="the command to start")
        os.killpg(wrapper.pid, signal.SIGINT)  # what Ctrl-C does
        assert wrapper.wait(timeout=10) == 0
        assert log.read_text().splitlines() == ["TERM"]
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)


def test_a_command_that_ignores_sigterm_is_killed_with_its_children_before_honcho_gives_up(tmp_path: Path) -> None:
    """honcho SIGKILLs the wrapper's group 5 s after its SIGTERM; the command, in a session of its
    own, would outlive that (a second worker on the queue, the port taken at the next start)."""
    pids = tmp_path / "pids"
    script = f"trap '' TERM; sleep 300 & echo $$ $! > {pids}; wait"
    wrapper = subprocess.Popen(
        [RESPAWN, "stubborn", "bash", "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=15, what="the command")
        shell, sleeper = (int(p) for p in pids.read_text().split())
        started = time.monotonic()
        os.killpg(wrapper.pid, signal.SIGTERM)  # what honcho does first
        assert wrapper.wait(timeout=10) != 0
        assert time.monotonic() - started < 5.0  # before honcho's SIGKILL
        _, err = wrapper.communicate()
        assert "stubborn did not stop within 4s of SIGTERM; killing it" in err
        for pid in (shell, sleeper):
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), timeout=5, what=f"process {pid} gone")  # type: ignore[misc]
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
