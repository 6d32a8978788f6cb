"""The pure autoscaling evaluator (S6.1 and our extensions), with a fake clock."""

from __future__ import annotations

import pytest

from serving.core.scaling import Rule, aggregate, evaluate

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


def test_disabled_rule_does_not_act_and_says_so_when_it_matches() -> None:
    new, decisions = evaluate(2, [rule(enabled=False)], {1: 100}, NOW, None)
    assert new == 2 and [d.reason for d in decisions] == ["the rule is disabled"]
    assert evaluate(2, [rule(enabled=False)], {1: 0}, NOW, None) == (2, [])  # not matched: nothing to say
    assert evaluate(2, [rule(enabled=False)], {1: None}, NOW, None) == (2, [])  # no "no data" either


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
    assert decisions[0].key == "service cooldown after the last scaling"  # figures stripped: one record


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


def out_rule(rule_id: int, cooldown: float, step: int = 1, high: int = 5) -> Rule:
    return rule(rule_id, step=step, cooldown=cooldown, high=high)


def in_rule(rule_id: int, cooldown: float, step: int = -1, threshold: float = 1) -> Rule:
    return rule(rule_id, direction="in", comparator="LESS_THAN", threshold=threshold, step=step, cooldown=cooldown)


def test_service_cooldown_is_fast_up_slow_down() -> None:
    rules = [out_rule(1, cooldown=30), in_rule(2, cooldown=300)]
    # After any scaling, a scale-out waits the longest scale-out cooldown only...
    assert evaluate(2, rules, {1: 10, 2: 5}, NOW, last_scaled_at=NOW - 20)[0] == 2
    assert evaluate(2, rules, {1: 10, 2: 5}, NOW, last_scaled_at=NOW - 31)[0] == 3
    # ...and a scale-in the longest cooldown of all the rules.
    new, decisions = evaluate(2, rules, {1: 0, 2: 0}, NOW, last_scaled_at=NOW - 200)
    assert new == 2 and "service cooldown" in decisions[-1].reason and "100 s left" in decisions[-1].reason
    assert evaluate(2, rules, {1: 0, 2: 0}, NOW, last_scaled_at=NOW - 301)[0] == 1


def test_the_service_cooldown_setting_overrides_both_directions() -> None:
    rules = [out_rule(1, cooldown=30), in_rule(2, cooldown=300)]
    assert evaluate(2, rules, {1: 10, 2: 5}, NOW, NOW - 31, endpoint_cooldown=60)[0] == 2
    assert evaluate(2, rules, {1: 10, 2: 5}, NOW, NOW - 61, endpoint_cooldown=60)[0] == 3
    assert evaluate(2, rules, {1: 0, 2: 0}, NOW, NOW - 61, endpoint_cooldown=60)[0] == 1
    assert evaluate(2, rules, {1: 0, 2: 0}, NOW, NOW - 1, endpoint_cooldown=0)[0] == 1


def test_a_scale_in_rule_without_data_blocks_the_other_scale_ins() -> None:
    rules = [in_rule(1, cooldown=10), in_rule(2, cooldown=10)]
    new, decisions = evaluate(3, rules, {1: 0, 2: None}, NOW, None)
    assert new == 3
    reasons = {d.rule.id: d.reason for d in decisions}
    assert reasons[2].startswith("no data") and reasons[1].startswith("not every scale-in rule agrees")


def test_a_disabled_scale_in_rule_does_not_veto() -> None:
    rules = [
        in_rule(1, cooldown=10),
        rule(2, direction="in", comparator="LESS_THAN", threshold=1, step=-1, enabled=False),
    ]
    assert evaluate(3, rules, {1: 0, 2: 99}, NOW, None)[0] == 2


def test_a_scale_in_rule_in_its_own_cooldown_still_agrees_but_does_not_act() -> None:
    rules = [
        in_rule(1, cooldown=60, step=-2),
        rule(2, direction="in", comparator="LESS_THAN", threshold=1, step=-1, cooldown=60, last_triggered_at=NOW - 10),
    ]
    new, decisions = evaluate(4, rules, {1: 0, 2: 0}, NOW, None)
    assert new == 2  # rule 1 acts; rule 2, cooling down, did not veto
    assert any("rule cooldown" in d.reason for d in decisions)


def test_scale_out_wins_even_when_every_scale_in_agrees() -> None:
    rules = [out_rule(1, cooldown=10), in_rule(2, cooldown=10, threshold=100)]
    new, decisions = evaluate(2, rules, {1: 50, 2: 50}, NOW, None)
    assert new == 3
    assert {d.rule.id: d.acted for d in decisions} == {1: True, 2: False}


def test_the_acted_decision_names_value_aggregation_window_and_counts() -> None:
    new, decisions = evaluate(1, [rule(aggregation="max", window=30)], {1: 7.5}, NOW, None)
    assert new == 2
    assert decisions[-1].reason == "in_flight 7.5 > 5 (maximum over 30 s): replicas 1 -> 2"


def test_an_injected_clock_walks_a_whole_story() -> None:
    """1 -> 3 under load (rule cooldown 10 s), then back to 1 after the service cooldown (60 s)."""
    out = out_rule(1, cooldown=10, high=3)
    scale_in = in_rule(2, cooldown=60)
    count, last_scaled, fired = 1, None, {1: None, 2: None}
    story = []
    for t in range(0, 300, 5):
        now = NOW + t
        load = 10.0 if t < 60 else 0.0
        rules = [
            Rule(**{**out.__dict__, "last_triggered_at": fired[1]}),
            Rule(**{**scale_in.__dict__, "last_triggered_at": fired[2]}),
        ]
        new, decisions = evaluate(count, rules, {1: load, 2: load}, now, last_scaled)
        if new != count:
            acted = next(d for d in decisions if d.acted)
            fired[acted.rule.id] = now
            last_scaled = now
            story.append((t, count, new))
            count = new
    # Scale-outs wait the out rule's cooldown; scale-ins wait 60 s after any scaling.
    assert story[:2] == [(0, 1, 2), (10, 2, 3)]
    assert count == 1
    assert story[2:] == [(70, 3, 2), (130, 2, 1)]
