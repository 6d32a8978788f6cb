"""The pure autoscaling evaluator (S6.1 and our extensions), with a fake clock."""

from __future__ import annotations

import pytest

from serving.autoscaling import Rule, aggregate, evaluate

NOW = 10_000.0


def rule(
    rule_id: int = 1,
    direction: str = "out",
    comparator: str = "GREATER_THAN",
    threshold: float = 5,
    step: int = 1,
    low: int = 1,
    high: int = 5,
    cooldown: float = 60,
    **extra: object,
) -> Rule:
    return Rule(
        id=rule_id,
        direction=direction,
        source="proxy",
        metric="in_flight",
        comparator=comparator,
        threshold=threshold,
        step=step,
        min_replicas=low,
        max_replicas=high,
        cooldown=cooldown,
        **extra,
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("comparator", "value", "fires"),
    [
        ("GREATER_THAN", 5, False),
        ("GREATER_THAN", 5.1, True),
        ("GREATER_THAN_OR_EQUAL", 5, True),
        ("GREATER_THAN_OR_EQUAL", 4.9, False),
        ("LESS_THAN", 5, False),
        ("LESS_THAN", 4.9, True),
        ("LESS_THAN_OR_EQUAL", 5, True),
        ("LESS_THAN_OR_EQUAL", 5.1, False),
    ],
)
def test_every_comparator(comparator: str, value: float, fires: bool) -> None:
    new, _ = evaluate(
        2, [rule(comparator=comparator, step=1 if comparator.startswith("G") else -1)], {1: value}, NOW, None
    )
    assert (new != 2) is fires


@pytest.mark.parametrize(("how", "expected"), [("avg", 4.0), ("max", 6.0), ("min", 2.0)])
def test_aggregation_over_the_window_only(how: str, expected: float) -> None:
    samples = [(NOW - 100, 100.0), (NOW - 50, 2.0), (NOW - 10, 4.0), (NOW, 6.0)]
    assert aggregate(samples, how, 60, NOW) == expected
    assert aggregate(samples, how, 1, NOW - 1000) is None


def test_no_data_does_not_fire_and_says_so() -> None:
    new, decisions = evaluate(2, [rule()], {1: None}, NOW, None)
    assert new == 2
    assert "no data" in decisions[0].reason and not decisions[0].acted


def test_disabled_rule_is_not_evaluated() -> None:
    assert evaluate(2, [rule(enabled=False)], {1: 100}, NOW, None) == (2, [])


def test_clamped_into_the_range_when_current_is_inside() -> None:
    new, decisions = evaluate(4, [rule(step=3, high=5)], {1: 10}, NOW, None)
    assert new == 5 and decisions[-1].acted
    new, decisions = evaluate(
        2, [rule(direction="in", comparator="LESS_THAN", threshold=1, step=-5, low=1)], {1: 0}, NOW, None
    )
    assert new == 1


def test_at_the_bound_or_outside_the_range_does_not_act() -> None:
    new, decisions = evaluate(5, [rule(high=5)], {1: 10}, NOW, None)
    assert new == 5 and "maximum" in decisions[0].reason
    new, decisions = evaluate(9, [rule(high=5)], {1: 10}, NOW, None)
    assert new == 9 and "outside" in decisions[0].reason


def test_rule_cooldown_and_service_cooldown() -> None:
    new, decisions = evaluate(2, [rule(cooldown=60, last_triggered_at=NOW - 30)], {1: 10}, NOW, None)
    assert new == 2 and "rule cooldown" in decisions[0].reason
    assert evaluate(2, [rule(cooldown=60, last_triggered_at=NOW - 61)], {1: 10}, NOW, None)[0] == 3
    new, decisions = evaluate(2, [rule(cooldown=60)], {1: 10}, NOW, last_scaled_at=NOW - 10)
    assert new == 2 and "service cooldown" in decisions[0].reason


def test_scale_out_wins_over_scale_in_and_the_largest_out_wins() -> None:
    rules = [rule(1, step=1), rule(2, step=2), rule(3, direction="in", comparator="LESS_THAN", threshold=100, step=-1)]
    new, decisions = evaluate(2, rules, {1: 10, 2: 10, 3: 10}, NOW, None)
    assert new == 4
    reasons = {d.rule.id: d.reason for d in decisions}
    assert decisions[-1].rule.id == 2 and decisions[-1].acted
    assert "asked for more" in reasons[1] and "scale-out rule matched" in reasons[3]


def test_scale_in_only_when_every_scale_in_rule_agrees() -> None:
    low_traffic = rule(1, direction="in", comparator="LESS_THAN", threshold=1, step=-1)
    low_latency = Rule(
        id=2,
        direction="in",
        source="proxy",
        metric="p95",
        comparator="LESS_THAN",
        threshold=0.1,
        step=-2,
        min_replicas=1,
        max_replicas=5,
        cooldown=60,
    )
    new, decisions = evaluate(4, [low_traffic, low_latency], {1: 0, 2: 0.5}, NOW, None)
    assert new == 4 and "not every scale-in rule agrees" in decisions[0].reason
    new, _ = evaluate(4, [low_traffic, low_latency], {1: 0, 2: 0.05}, NOW, None)
    assert new == 3  # the most conservative shrink
