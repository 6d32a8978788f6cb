"""Pure resource-slot arithmetic: cpu (cores), mem (bytes) and accelerators such as cuda.shares.

Slots are plain ``dict[str, float]``. Missing keys are zero. No ORM, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from serving.core.definitions import parse_mem

Slots = dict[str, float]
# Keys a replica may ask for; accelerators are "<vendor>.<unit>" (cuda.shares, cuda.device, ...).
BASE_KEYS = ("cpu", "mem")
# Sizes a replica asks for that no node counts as a slot: shm (its /dev/shm) is part of its mem.
UNSCHEDULED_KEYS = ("shm",)
SIZE_KEYS = ("mem", "shm")
_EPSILON = 1e-9


class SlotError(ValueError):
    """A resource request a user wrote that we cannot understand; str() names the key."""


def _is_accelerator_key(key: str) -> bool:
    vendor, dot, unit = key.partition(".")
    return bool(dot and vendor.isidentifier() and unit.replace("_", "").isalnum())


def normalize(raw: Mapping[str, object]) -> Slots:
    """``{"cpu": "2", "mem": "8g", "cuda.shares": "0.5"}`` -> ``{"cpu": 2.0, "mem": 8589934592.0, ...}``."""
    out: Slots = {}
    for key, value in raw.items():
        if key in SIZE_KEYS:
            if isinstance(value, bool):
                raise SlotError(f"{key}: must be a size such as '512m' or '8g', not a boolean.")
            try:
                out[key] = float(parse_mem(value))  # type: ignore[arg-type]
            except ValueError as exc:
                raise SlotError(f"{key}: {exc}") from None
            continue
        if key != "cpu" and not _is_accelerator_key(key):
            raise SlotError(f"{key}: unknown resource; use cpu, mem, shm or an accelerator such as cuda.shares.")
        if isinstance(value, bool):
            raise SlotError(f"{key}: must be a number, not a boolean.")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise SlotError(f"{key}: must be a number, got {value!r}.") from None
        if not math.isfinite(number) or number < 0:
            raise SlotError(f"{key}: must be a finite number of at least 0, got {value!r}.")
        out[key] = number
    return out


# What a replica gets when neither the service, its preset nor its definition says.
DEFAULT_REQUEST: dict[str, float] = {"cpu": 1.0, "mem": float(1024**3)}


def replica_request(resources: Mapping[str, object] | None) -> Slots:
    """The slots one replica (one container of it) asks for, from a service's resources."""
    request = dict(DEFAULT_REQUEST)
    request.update({k: float(v) for k, v in (resources or {}).items()})  # type: ignore[arg-type]
    return request


def add(*many: Mapping[str, float]) -> Slots:
    total: Slots = {}
    for slots in many:
        for key, value in slots.items():
            total[key] = total.get(key, 0.0) + value
    return total


def subtract(a: Mapping[str, float], b: Mapping[str, float]) -> Slots:
    keys = set(a) | set(b)
    return {key: a.get(key, 0.0) - b.get(key, 0.0) for key in keys}


def total(many: Iterable[Mapping[str, float]]) -> Slots:
    return add(*many)


def fits(request: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(
        value <= free.get(key, 0.0) + _EPSILON
        for key, value in request.items()
        if value > 0 and key not in UNSCHEDULED_KEYS
    )


def shortfall(request: Mapping[str, float], free: Mapping[str, float]) -> Slots:
    """How much of each requested slot is missing (only the keys that do not fit)."""
    return {
        key: value - free.get(key, 0.0)
        for key, value in request.items()
        if value > free.get(key, 0.0) + _EPSILON and key not in UNSCHEDULED_KEYS
    }


def describe(slots: Mapping[str, float]) -> str:
    """Human text: ``cpu 2, mem 8.0 GiB, cuda.shares 0.5``."""
    parts = []
    for key in sorted(slots, key=lambda k: (k not in BASE_KEYS, BASE_KEYS.index(k) if k in BASE_KEYS else 0, k)):
        value = slots[key]
        if key in SIZE_KEYS:
            parts.append(f"{key} {format_bytes(value)}")
        else:
            parts.append(f"{key} {value:g}")
    return ", ".join(parts) if parts else "nothing"


def format_bytes(value: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"
