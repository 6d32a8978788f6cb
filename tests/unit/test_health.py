"""S5.1/S5.2 to the letter, with a fake clock: no sleeping."""

from __future__ import annotations

import pytest

from serving.core.health import (
    DEGRADED,
    HEALTHY,
    UNHEALTHY,
    HealthConfig,
    ProbeState,
    apply_probe,
    next_probe_at,
    time_to_unhealthy,
)

DEFAULTS = HealthConfig(path="/health")


def run_until_unhealthy(config: HealthConfig, state: ProbeState, limit: int = 1000) -> float:
    """Probe (always failing) at exactly the times the prober would; return when UNHEALTHY."""
    for _ in range(limit):
        now = next_probe_at(config, state)
        state = apply_probe(config, state, ok=False, now=now)
        if state.status == UNHEALTHY:
            return now
    raise AssertionError("never became unhealthy")


def test_defaults_match_the_manual() -> None:
    assert (DEFAULTS.interval, DEFAULTS.max_retries, DEFAULTS.max_wait_time) == (10.0, 10, 15.0)
    assert (DEFAULTS.expected_status_code, DEFAULTS.initial_delay) == (200, 60.0)


def test_no_check_during_initial_delay_and_first_check_after_one_interval() -> None:
    state = ProbeState(started_at=1000.0)
    assert state.status == DEGRADED
    assert next_probe_at(DEFAULTS, state) == 1000.0 + 60.0 + 10.0


def test_time_to_unhealthy_at_start_is_170_seconds_with_defaults() -> None:
    start = 1000.0
    at = run_until_unhealthy(DEFAULTS, ProbeState(started_at=start))
    assert at - start == pytest.approx(170.0)
    assert time_to_unhealthy(DEFAULTS, after_healthy=False) == 170.0


def test_time_to_unhealthy_after_healthy_is_110_seconds_with_defaults() -> None:
    state = ProbeState(started_at=0.0)
    first = next_probe_at(DEFAULTS, state)
    state = apply_probe(DEFAULTS, state, ok=True, now=first)
    assert state.status == HEALTHY
    at = run_until_unhealthy(DEFAULTS, state)
    assert at - first == pytest.approx(110.0)
    assert time_to_unhealthy(DEFAULTS, after_healthy=True) == 110.0


def test_failures_up_to_max_retries_keep_the_status() -> None:
    state = ProbeState(status=HEALTHY, started_at=0.0, last_probe_at=0.0)
    for expected in range(1, DEFAULTS.max_retries + 1):
        state = apply_probe(DEFAULTS, state, ok=False, now=float(expected))
        assert state.status == HEALTHY
        assert state.failures == expected
    state = apply_probe(DEFAULTS, state, ok=False, now=99.0)
    assert state.status == UNHEALTHY


def test_a_success_resets_the_failure_count_and_heals() -> None:
    state = ProbeState(status=UNHEALTHY, failures=20, started_at=0.0, last_probe_at=0.0)
    state = apply_probe(DEFAULTS, state, ok=True, now=5.0)
    assert (state.status, state.failures, state.last_probe_at) == (HEALTHY, 0, 5.0)


def test_degraded_stays_degraded_while_failing_within_retries() -> None:
    state = ProbeState(started_at=0.0)
    state = apply_probe(DEFAULTS, state, ok=False, now=70.0)
    assert (state.status, state.failures) == (DEGRADED, 1)


def test_custom_values_follow_the_formula() -> None:
    config = HealthConfig(path="/", interval=0.5, max_retries=2, initial_delay=3.0)
    at = run_until_unhealthy(config, ProbeState(started_at=0.0))
    assert at == pytest.approx(3.0 + 0.5 * 3)


def test_json_round_trip_and_tcp_default() -> None:
    config = HealthConfig(path="/h", interval=2, max_retries=1, headers=(("X-Key", "v"),))
    assert HealthConfig.from_json(config.to_json()) == config
    assert HealthConfig.from_json({}).path is None
