"""Pre-start actions (S2.3) as plain data for the engines' bootstrap runner (engines/bootstrap.py).

The actions themselves run inside the replica, before its start command, by a standalone script
that only needs the image's python3; this module only turns parsed definitions into that plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from serving.definitions import PreStartAction
from serving.engines.base import PreStartActionSpec, ReplicaSpec

BOOTSTRAP_FAILED_EXIT = 97  # the bootstrap's exit code when an action fails


def to_specs(actions: Iterable[PreStartAction]) -> list[PreStartActionSpec]:
    specs = []
    for action in actions:
        args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in action.args.items()}
        specs.append(PreStartActionSpec(action=action.action, args=args))
    return specs


def plan(spec: ReplicaSpec) -> dict[str, Any]:
    """The JSON document the bootstrap runner reads: actions, then the command to exec."""
    return {
        "actions": [{"action": a.action, "args": dict(a.args)} for a in spec.pre_start_actions],
        "command": list(spec.command) if spec.command is not None else None,
        "command_is_shell": spec.command_is_shell,
        "shell": spec.shell,
        "workdir": spec.workdir,
    }
