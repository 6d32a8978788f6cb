"""Health checks (S5), to the letter.

The state machine is pure and takes the time as an argument:

* from the replica's start, ``initial_delay`` seconds with no checks (the route is DEGRADED);
* then every ``interval`` an HTTP GET of ``path`` with timeout ``max_wait_time``;
* the expected status code -> HEALTHY and the failure count resets;
* a timeout, an error or another code -> failures + 1; once failures exceed ``max_retries`` ->
  UNHEALTHY (out of traffic); otherwise the status stays as it was.

So the first check happens at ``initial_delay + interval`` and the (max_retries + 1)-th failure, at
``initial_delay + interval * (max_retries + 1)`` (170 s with the defaults), or
``interval * (max_retries + 1)`` after the last success (110 s): exactly S5.2.

The shell that feeds it is ``serving.node.prober``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

DEGRADED = "degraded"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class HealthConfig:
    path: str | None = None  # None: no HTTP check, healthy when the port accepts a connection
    interval: float = 10.0
    max_retries: int = 10
    max_wait_time: float = 15.0
    expected_status_code: int = 200
    initial_delay: float = 60.0
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HealthConfig:
        if not data:
            return TCP_DEFAULT
        return cls(
            path=data.get("path"),
            interval=float(data.get("interval", 10.0)),
            max_retries=int(data.get("max_retries", 10)),
            max_wait_time=float(data.get("max_wait_time", 15.0)),
            expected_status_code=int(data.get("expected_status_code", 200)),
            initial_delay=float(data.get("initial_delay", 60.0)),
            headers=tuple((str(k), str(v)) for k, v in (data.get("headers") or {}).items()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "interval": self.interval,
            "max_retries": self.max_retries,
            "max_wait_time": self.max_wait_time,
            "expected_status_code": self.expected_status_code,
            "initial_delay": self.initial_delay,
            "headers": dict(self.headers),
        }


# A server without a health check (the "Predefined Image Command" runtime, or a custom definition
# that has none) is healthy as soon as its port accepts connections; checked every second.
TCP_DEFAULT = HealthConfig(path=None, interval=1.0, max_retries=3, max_wait_time=2.0, initial_delay=0.0)


@dataclass(frozen=True)
class ProbeState:
    status: str = DEGRADED
    failures: int = 0
    started_at: float = 0.0
    last_probe_at: float | None = None


def next_probe_at(config: HealthConfig, state: ProbeState) -> float:
    """When the next check is due: ``interval`` after the last one, or after the initial delay."""
    base = state.last_probe_at if state.last_probe_at is not None else state.started_at + config.initial_delay
    return base + config.interval


def apply_probe(config: HealthConfig, state: ProbeState, ok: bool, now: float) -> ProbeState:
    """The state after one check (S5.1)."""
    if ok:
        return replace(state, status=HEALTHY, failures=0, last_probe_at=now)
    failures = state.failures + 1
    status = UNHEALTHY if failures > config.max_retries else state.status
    return replace(state, status=status, failures=failures, last_probe_at=now)


def time_to_unhealthy(config: HealthConfig, after_healthy: bool) -> float:
    """S5.2's formula, for documentation and tests."""
    cycle = config.interval * (config.max_retries + 1)
    return cycle if after_healthy else config.initial_delay + cycle
