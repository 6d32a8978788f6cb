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
