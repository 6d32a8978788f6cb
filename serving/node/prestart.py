"""Pre-start actions (S2.3) as plain data for the engines' runner (``serving/node/engines/bootstrap.py``).

The actions themselves run inside the replica, before its start command, by a standalone script that
only needs the replica's python3; this module turns parsed definitions into that script's plan and
reads its verdict back from the replica's log. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from serving.node.engines.base import PreStartActionSpec, ReplicaSpec

if TYPE_CHECKING:
    from serving.core.definitions import PreStartAction

BOOTSTRAP_FAILED_EXIT = 97  # the runner's exit code when an action (or its own setup) fails
# What the runner prints before exiting with BOOTSTRAP_FAILED_EXIT.
_ACTION_FAILED = re.compile(r"^\[prestart\] action (\d+) \(([a-z_]+)\) failed: (.*)$")
_SETUP_FAILED = re.compile(r"^\[prestart\] (setup failed: .*)$")


def _plain(value: Any) -> Any:
    """Tuples (from frozen definitions) become lists, so the args are JSON as they are."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def to_specs(actions: Iterable[PreStartAction]) -> list[PreStartActionSpec]:
    """Parsed definition actions -> the engine protocol's plain specs, in order."""
    return [PreStartActionSpec(action=a.action, args=_plain(dict(a.args)), ref=a.ref) for a in actions]


def plan(spec: ReplicaSpec) -> dict[str, Any]:
    """The document the runner reads: the actions in order, then the command to exec.

    ``command`` is the argv list, or for the string form (``command_is_shell``) a one-element list
    holding the string the runner passes to ``shell -c``.
    """
    return {
        "actions": [
            {"action": a.action, "args": _plain(dict(a.args)), **({"ref": a.ref} if a.ref else {})}
            for a in spec.pre_start_actions
        ],
        "command": list(spec.command) if spec.command is not None else None,
        "command_is_shell": spec.command_is_shell,
        "shell": spec.shell,
        "workdir": spec.workdir,
    }


def plan_json(spec: ReplicaSpec) -> str:
    return json.dumps(plan(spec), ensure_ascii=False)


def failure_reason(lines: Iterable[str]) -> str | None:
    """The user-facing error from a replica's log after the runner exited with BOOTSTRAP_FAILED_EXIT:
    ``pre-start action N (kind) failed: why`` (N counts from 0, like ``pre_start_actions[N]``)."""
    found: str | None = None
    for line in lines:
        line = line.rstrip("\r\n")
        if match := _ACTION_FAILED.match(line):
            found = f"pre-start action {match[1]} ({match[2]}) failed: {match[3]}"
        elif match := _SETUP_FAILED.match(line):
            found = f"pre-start {match[1]}"
    return found
