"""Gateway usage figures (issue 17), pure: latency quantiles from a bucket histogram and the
parsing of a proxy's usage hash fields (proxy/usage.py writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

COUNTS = ("requests", "prompt", "completion", "errors")


# The proxy's latency buckets (proxy/metrics.py BOUNDS, seconds; a unit test keeps them equal): a
# bucket's lower bound is the previous one.
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LABELS = (*(f"{b:g}" for b in BOUNDS), "inf")


def quantile(histogram: dict[str, int], q: float) -> float | None:
    """The q-quantile in seconds of ``{bucket label: count}`` (labels of LABELS), interpolated inside
    its bucket; in the last bucket (past 300 s), its lower bound. None: no requests."""
    counts = [int(histogram.get(label, 0)) for label in LABELS]
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            low = BOUNDS[i - 1] if i > 0 else 0.0
            return low + (BOUNDS[i] - low) * ((rank - seen) / count)
        seen += count
    return BOUNDS[-1]


@dataclass
class Counts:
    """One (key, service, day)'s counts as folded from Redis."""

    requests: int = 0
    prompt: int = 0
    completion: int = 0
    errors: int = 0
    latency: dict[str, int] = field(default_factory=dict)


def parse_fields(raw: dict[str, int]) -> dict[str, Counts]:
    """``{"<endpoint id>:requests": n, "<endpoint id>:le:0.25": n, ...}`` -> endpoint id -> Counts.
    Fields of another shape are skipped (only a foreign writer makes them)."""
    out: dict[str, Counts] = {}
    for name, value in raw.items():
        parts = name.split(":")
        if len(parts) == 2 and parts[1] in COUNTS:
            counts = out.setdefault(parts[0], Counts())
            setattr(counts, parts[1], getattr(counts, parts[1]) + int(value))
        elif len(parts) == 3 and parts[1] == "le" and parts[2] in LABELS:
            counts = out.setdefault(parts[0], Counts())
            counts.latency[parts[2]] = counts.latency.get(parts[2], 0) + int(value)
    return out


def merge_latency(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for label, count in b.items():
        out[label] = out.get(label, 0) + count
    return out
