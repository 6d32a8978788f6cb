"""Pure GPU device allocation: a node's devices, the shares its replicas hold on each, and where a
new replica's ``cuda.shares`` go.

A node advertises devices by id (``cuda:0``, ``cuda:1``, ...). A replica's ``cuda.shares`` is either
a fraction below 1 (packed onto one device next to others, up to 1.0 per device: best fit, the
device with the least room that still holds it, so whole devices stay free for whole asks) or a
whole number N (N devices nobody else holds anything of). An assignment is ``{"cuda:0": 0.5}``.

No ORM, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

SHARES = "cuda.shares"
_EPSILON = 1e-9
_DEVICE_ID = re.compile(r"^cuda:(\d{1,3})$")
# Exported to a replica with a share of a device, so that its server sizes its memory (vLLM's
# --gpu-memory-utilization, a PyTorch memory fraction) to it.
SHARE_ENV = "MODELSERVE_CUDA_SHARE"

Assignment = dict[str, float]


class DeviceError(ValueError):
    """A device list or a request we can not understand; str() is a sentence naming the fix."""


def parse_inventory(text: str) -> list[str]:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]`` (validated, without duplicates, in order)."""
    out: list[str] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if not _DEVICE_ID.match(item):
            raise DeviceError(f"{item!r} is not a device id; write devices as cuda:0,cuda:1.")
        if item not in out:
            out.append(item)
    return out


def index(device: str) -> str:
    """``cuda:1`` -> ``"1"`` (the NVIDIA index, as Docker's device_ids and CUDA_VISIBLE_DEVICES take it)."""
    return device.partition(":")[2]


def check_request(shares: float) -> None:
    if shares > 1 + _EPSILON and abs(shares - round(shares)) > _EPSILON:
        raise DeviceError(
            f"cuda.shares {shares:g} can not be allocated: ask for a fraction of one device (below 1) "
            "or a whole number of devices (1, 2, ...)."
        )


def held(assignments: Iterable[Mapping[str, float]]) -> Assignment:
    """What many replicas' assignments hold per device, summed."""
    total: Assignment = {}
    for assignment in assignments:
        for device, share in assignment.items():
            total[device] = total.get(device, 0.0) + float(share)
    return total


def assign(shares: float, devices: Sequence[str], used: Mapping[str, float]) -> Assignment | None:
    """Where ``shares`` go on a node with ``devices`` of which ``used`` is held; None when they do not
    fit. No shares: an empty assignment. A share above 1 that is not whole (refused by
    ``check_request`` when a service is saved; an older service may hold one) takes whole devices,
    rounded up."""
    if shares <= _EPSILON:
        return {}
    if shares < 1 - _EPSILON:
        fitting = [d for d in devices if 1.0 - used.get(d, 0.0) + _EPSILON >= shares]
        if not fitting:
            return None
        # Best fit: the fullest device that holds it; ties by the inventory's order.
        best = min(fitting, key=lambda d: (1.0 - used.get(d, 0.0), devices.index(d)))
        return {best: shares}
    count = math.ceil(shares - _EPSILON)
    free = [d for d in devices if used.get(d, 0.0) <= _EPSILON]
    if len(free) < count:
        return None
    return {d: 1.0 for d in free[:count]}


def assign_many(
    shares: float, times: int, devices: Sequence[str], used: Mapping[str, float]
) -> list[Assignment] | None:
    """``times`` assignments of ``shares`` on one node (a single-node cluster's members), each seeing
    the ones before it; None when they do not all fit."""
    held_now = dict(used)
    out: list[Assignment] = []
    for _ in range(times):
        one = assign(shares, devices, held_now)
        if one is None:
            return None
        out.append(one)
        held_now = held([held_now, one])
    return out


def describe_free(devices: Sequence[str], used: Mapping[str, float]) -> str:
    """``cuda:0 0.5 free, cuda:1 1 free`` for error messages."""
    if not devices:
        return "no GPU devices"
    return ", ".join(f"{d} {max(0.0, 1.0 - used.get(d, 0.0)):g} free" for d in devices)


def visible_devices(assignment: Mapping[str, float], renumbered: bool) -> str:
    """CUDA_VISIBLE_DEVICES for a replica: the host's indices, or 0..n-1 where the engine renumbers
    them (Docker's NVIDIA runtime shows a container its devices from 0)."""
    ids = sorted(assignment, key=lambda d: int(index(d)))
    if renumbered:
        return ",".join(str(i) for i in range(len(ids)))
    return ",".join(index(d) for d in ids)


def replica_env(assignment: Mapping[str, float], renumbered: bool = False) -> dict[str, str]:
    """The variables a replica with ``assignment`` gets: which devices, and its share of each."""
    if not assignment:
        return {}
    share = max(assignment.values())
    return {"CUDA_VISIBLE_DEVICES": visible_devices(assignment, renumbered), SHARE_ENV: f"{min(share, 1.0):g}"}


def default_shm(mem_bytes: float) -> int:
    """Shared memory (/dev/shm) when a replica does not say: a quarter of its memory (NCCL and
    vLLM's tensor parallelism pass tensors through it; it counts against the memory limit), at
    least Docker's 64 MiB."""
    return max(64 << 20, int(mem_bytes // 4)) if mem_bytes > 0 else 64 << 20


def legacy_count(shares: float) -> int:
    """``NODE_ACCELERATORS=cuda.shares=N`` (before devices were advertised) as a device count."""
    if shares < 0 or not math.isfinite(shares) or abs(shares - round(shares)) > _EPSILON:
        raise DeviceError(
            f"NODE_ACCELERATORS cuda.shares={shares:g} is not a whole number of devices; list the "
            "node's devices instead, e.g. NODE_ACCELERATORS=cuda:0,cuda:1."
        )
    return round(shares)


def parse_node_accelerators(text: str) -> tuple[list[str], dict[str, str]]:
    """``NODE_ACCELERATORS`` -> (device ids, other slots as written). Devices are listed by id
    (``cuda:0,cuda:1``); ``cuda.shares=N``, the syntax from before devices, still reads as N devices
    cuda:0..cuda:N-1; any other ``key=value`` is a plain slot. Raises DeviceError naming the fix."""
    found: list[str] = []
    legacy: int | None = None
    others: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            found += [d for d in parse_inventory(item) if d not in found]
        elif key == SHARES:
            try:
                legacy = legacy_count(float(value))
            except ValueError:
                raise DeviceError(
                    f"NODE_ACCELERATORS {item!r} is not a number of devices; list the node's devices "
                    "instead, e.g. NODE_ACCELERATORS=cuda:0,cuda:1."
                ) from None
        else:
            others[key] = value.strip()
    if legacy is not None and found:
        raise DeviceError(
            "NODE_ACCELERATORS lists devices and cuda.shares=N both; list the devices only "
            "(e.g. NODE_ACCELERATORS=cuda:0,cuda:1)."
        )
    if legacy is not None:
        found = [f"cuda:{i}" for i in range(legacy)]
    return found, others


def parse_nvidia_smi(text: str) -> list[dict[str, object]]:
    """The output of ``nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits``
    as an inventory: ``[{"id": "cuda:0", "name": ..., "memory": <bytes>, "uuid": ...}]``; lines it
    can not read are skipped."""
    out: list[dict[str, object]] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        entry: dict[str, object] = {"id": f"cuda:{int(parts[0])}", "name": parts[1]}
        if len(parts) > 2 and parts[2].isdigit():
            entry["memory"] = int(parts[2]) << 20
        if len(parts) > 3 and parts[3]:
            entry["uuid"] = parts[3]
        out.append(entry)
    return out


def inventory_ids(inventory: Iterable[Mapping[str, object]]) -> list[str]:
    """The device ids of a node's stored inventory (``Node.devices``)."""
    return [str(entry["id"]) for entry in inventory if isinstance(entry, Mapping) and entry.get("id")]
