"""Crash injection for the fault tests (tests/reliability/test_worker_crashes.py). Inert unless set.

``MODELSERVE_CRASH_AT`` is a comma-separated list of step names; a process whose environment names a
step ends at once (``os._exit``: no cleanup, no acknowledgement, as under SIGKILL) when it reaches
that step. Unset, as it always is outside those tests, ``crash_point`` returns at once.

The steps (each right after a commit, where a crash leaves the most half-done work behind):

* ``reconcile.committed``  the reconcile's rows are written, its start/stop tasks not yet sent
* ``node.started``         a replica runs, its route not yet marked started
* ``node.stopped``         a terminating replica is stopped, its row not yet deleted
* ``validation.started``   a validation's replica runs, its run neither finished nor cleaned up
"""

from __future__ import annotations

import os
import sys

CRASH_EXIT_CODE = 86
_STEPS = frozenset(filter(None, (s.strip() for s in os.environ.get("MODELSERVE_CRASH_AT", "").split(","))))


def crash_point(step: str) -> None:
    """End the process here when the environment asks for a crash at ``step`` (tests only)."""
    if step in _STEPS:
        print(f"[faults] crashing at {step} (MODELSERVE_CRASH_AT)", file=sys.stderr, flush=True)
        os._exit(CRASH_EXIT_CODE)
