"""A fixed pure-Python workload, timed in the same run as a benchmark, so that its figures can be
read as "N x reference" and compared across machines (a CPU twice as slow doubles both).

The workload is deterministic and touches what the control plane's ticks spend their time on
(dict and list building, attribute access, small function calls, string formatting), with no I/O
and no allocation that grows with the machine. It is timed in process CPU seconds, several times,
and the fastest run is the figure: noise from other processes only ever makes a run slower.

    from bench import reference  (or ``import reference`` from a script in bench/)
    ref = reference.measure()
    print(reference.ratio_text(tick_cpu, ref))  # "3.1x reference"
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# The size of the workload: about 0.2 s of CPU on the README's 2-core machine.
ROUNDS = 20_000


@dataclass(frozen=True)
class _Row:
    pk: int
    name: str
    status: str
    weight: float


def _one_round(i: int) -> int:
    rows = [_Row(i * 8 + k, f"row-{i}-{k}", "healthy" if k % 3 else "provisioning", k / 7) for k in range(8)]
    by_status: dict[str, list[_Row]] = {}
    for row in rows:
        by_status.setdefault(row.status, []).append(row)
    healthy = sorted(by_status.get("healthy", []), key=lambda r: (-r.weight, r.name))
    text = "|".join(f"{r.pk}:{r.weight:.3f}" for r in healthy)
    return len(text) + sum(int(part.split(":", 1)[0]) for part in text.split("|") if part)


def workload(rounds: int = ROUNDS) -> int:
    """The reference workload itself; returns a checksum so that nothing is optimised away."""
    total = 0
    for i in range(rounds):
        total = (total + _one_round(i)) % 1_000_000_007
    return total


CHECKSUM = workload(10)  # the same on every machine: a changed workload is a different reference


def measure(repeat: int = 5) -> float:
    """CPU seconds of the reference workload: the fastest of ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        workload()
        best = min(best, time.process_time() - started)
    return best


def ratio(seconds: float, reference_seconds: float) -> float:
    return seconds / reference_seconds if reference_seconds > 0 else float("nan")


def ratio_text(seconds: float, reference_seconds: float) -> str:
    return f"{ratio(seconds, reference_seconds):.2f}x reference"


def describe(reference_seconds: float) -> str:
    return (
        f"reference: {ROUNDS:,} rounds of bench/reference.py's pure-Python workload = "
        f"{reference_seconds:.3f} s CPU (fastest of several runs in this process)"
    )


if __name__ == "__main__":  # `make bench` runs every script here: this one prints the reference
    print(describe(measure()))
