"""Revisions and traffic shares, pure (issue 16): what a revision holds, how two differ, how many
replicas a share needs, and the checks of a rollout or a traffic split.

A revision ``n`` of a service is the configuration its replicas run (``CONFIG_FIELDS``) as a plain
JSON-able dict; ``spec_version`` of the endpoint and of its routes is the revision number. The
traffic split is ``{revision: percent}``, whole percents adding up to 100; empty means "rolling":
every healthy replica serves (today's behaviour, S4.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# What a replica runs: the fields whose change makes a new revision (the actions' REPLACING_FIELDS;
# a test keeps the two equal). Foreign keys are stored as their primary key, as a string.
CONFIG_FIELDS = (
    "image",
    "resources",
    "environ",
    "runtime",
    "model_folder",
    "model_mount",
    "model_definition_path",
    "extra_mounts",
    "cluster_mode",
    "cluster_size",
    "resource_group",
    "preset",
)
SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")

ROLLING, CANARY, BLUE_GREEN = "rolling", "canary", "blue_green"
STRATEGIES = (ROLLING, CANARY, BLUE_GREEN)


class RolloutError(ValueError):
    """A rollout or a traffic split that can not be applied; the message names the fix."""


def _show(field: str, value: Any) -> str:
    if field == "environ" and isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(
                f"{k}=…" if any(h in k.upper() for h in SECRET_HINTS) else f"{k}={v}" for k, v in sorted(value.items())
            )
            + "}"
        )
    return repr(value)


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [f for f in CONFIG_FIELDS if old.get(f) != new.get(f)]


def diff_line(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """One line saying what changed from ``old`` to ``new`` (``old`` None: the first revision)."""
    if old is None:
        return "First revision."
    fields = changed_fields(old, new)
    if not fields:
        return "Same configuration."
    parts = []
    for field in fields:
        if field in ("environ", "resources", "extra_mounts") and isinstance(new.get(field), Mapping | list):
            before, after = old.get(field), new.get(field)
            if isinstance(before, Mapping) and isinstance(after, Mapping):
                keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                parts.append(f"{field}: {', '.join(keys)} changed")
                continue
        parts.append(f"{field}: {_show(field, old.get(field))} -> {_show(field, new.get(field))}")
    line = "; ".join(parts)
    return line if len(line) <= 250 else line[:249] + "…"


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Field by field: ``[{"field", "old", "new"}]`` for every field that differs (the page's diff)."""
    return [{"field": f, "old": old.get(f), "new": new.get(f)} for f in changed_fields(old, new)]


def replicas_for_share(desired: int, share: int) -> int:
    """Replicas a revision needs for ``share`` percent of ``desired``: at least one while it has a
    share (a canary of 10 % of 2 replicas still runs one), all of them at 100 %."""
    if share <= 0:
        return 0
    return max(1, min(desired, math.ceil(desired * share / 100))) if desired else 0


def check_traffic(raw: Any, revisions: set[int]) -> dict[int, int]:
    """``{"<n>": percent}`` -> ``{n: percent}``: known revisions, whole percents adding up to 100."""
    if not isinstance(raw, Mapping) or not raw:
        raise RolloutError('Give the shares as {"<revision>": percent, ...}, for example {"1": 90, "2": 10}.')
    shares: dict[int, int] = {}
    for key, value in raw.items():
        try:
            number = int(str(key))
        except ValueError:
            raise RolloutError(f"{key!r} is not a revision number; use the numbers the revisions list shows.") from None
        if number not in revisions:
            known = ", ".join(str(n) for n in sorted(revisions))
            raise RolloutError(f"This service has no revision {number}; its revisions are {known}.")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            raise RolloutError(f"The share of revision {number} must be a whole percent from 0 to 100, not {value!r}.")
        shares[number] = value
    total = sum(shares.values())
    if total != 100:
        raise RolloutError(f"The shares add up to {total}; make them add up to 100.")
    return {n: s for n, s in sorted(shares.items()) if s > 0}


def check_rollout(raw: Any) -> tuple[str, int]:
    """``{"strategy": ..., "percent": P}`` -> (strategy, percent of the new revision at first)."""
    if raw is None:
        return ROLLING, 100
    if not isinstance(raw, Mapping):
        raise RolloutError('Give the rollout as {"strategy": "rolling" | "canary" | "blue_green"}.')
    strategy = raw.get("strategy", ROLLING)
    if strategy not in STRATEGIES:
        raise RolloutError(f"Unknown rollout strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    unknown = set(raw) - {"strategy", "percent"}
    if unknown:
        raise RolloutError(f"A rollout takes strategy and percent only, not {', '.join(sorted(unknown))}.")
    if strategy != CANARY:
        if "percent" in raw:
            raise RolloutError(f"Only a canary rollout takes a percent; {strategy} moves all traffic.")
        return strategy, 100 if strategy == ROLLING else 0
    percent = raw.get("percent")
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
        raise RolloutError('A canary needs "percent": a whole number from 1 to 99, the new revision\'s share.')
    return strategy, percent


def error_rate_verdict(canary: tuple[int, int], stable: tuple[int, int], margin: float, minimum: int) -> str | None:
    """Whether a canary's 5xx rate is too high: ``canary`` and ``stable`` are (requests, 5xx) over
    the window. None while the canary had fewer than ``minimum`` requests, or is within ``margin``
    (a fraction: 0.05 = five points) of the stable revision; else the sentence saying why."""
    total, errors = canary
    if total < minimum:
        return None
    rate = errors / total
    stable_rate = stable[1] / stable[0] if stable[0] else 0.0
    if rate > stable_rate + margin:
        return (
            f"its 5xx rate was {rate:.1%} ({errors} of {total} requests) against {stable_rate:.1%} "
            f"({stable[1]} of {stable[0]}) for the stable revision, more than the {margin:.1%} margin"
        )
    return None
