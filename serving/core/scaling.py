"""Autoscaling rules (S6), pure: a service's rules and observed values -> its new count and why.

Beyond the original: rules can be disabled; a rule aggregates its metric over a window (average by
default, or max/min, over the replicas and the window's samples) instead of reading one sample; a rule
whose result would leave its min/max is *clamped* to the range (the original skipped it) as long as
the current count is inside the range; scale-out rules win over scale-in rules in the same tick and
the largest scale-out wins; scale-in happens only when every enabled scale-in rule agrees, and then by
the smallest step asked; an endpoint-level cooldown stops flapping, asymmetrically (fast up, slow
down): after any scaling by the rules, a scale-in waits the endpoint's cooldown (its
``scaling_cooldown``, else the longest cooldown of its enabled rules) and a scale-out waits the
longest cooldown of its enabled scale-out rules (or ``scaling_cooldown`` when set); every decision
that matched is recorded with its reason, acted on or not (a repeat of the same reason once).

Pure, with an injected clock: ``evaluate`` reads no database, no Redis and no Django, and neither
does anything here. The tick that reads the rules and the metrics, and writes the decisions and the
new counts, is ``serving.control.autoscaling``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "LESS_THAN": operator.lt,
    "LESS_THAN_OR_EQUAL": operator.le,
    "GREATER_THAN": operator.gt,
    "GREATER_THAN_OR_EQUAL": operator.ge,
}
SYMBOLS = {"LESS_THAN": "<", "LESS_THAN_OR_EQUAL": "<=", "GREATER_THAN": ">", "GREATER_THAN_OR_EQUAL": ">="}
NOT_MATCHED = "not matched"  # a rule's state when its condition is false (recorded as state, no event)


@dataclass(frozen=True)
class Rule:
    id: int
    direction: str  # "out" | "in"
    source: str
    metric: str
    comparator: str
    threshold: float
    step: int
    min_replicas: int
    max_replicas: int
    cooldown: float
    aggregation: str = "avg"
    window: float = 60.0
    enabled: bool = True
    last_triggered_at: float | None = None


@dataclass(frozen=True)
class Decision:
    rule: Rule
    observed: float | None
    old: int
    new: int
    acted: bool
    reason: str

    @property
    def key(self) -> str:
        """The reason without its figures ("rule cooldown", not "rule cooldown (12 s left)"): the same
        key twice in a row is the same decision, recorded once."""
        return self.reason.split(" (", 1)[0].strip()


def aggregate(samples: Iterable[tuple[float, float]], how: str, window: float, now: float) -> float | None:
    """Aggregate the samples of the last ``window`` seconds; None when there are none."""
    return combine([value for at, value in samples if now - window <= at <= now], how)


def combine(values: list[float], how: str) -> float | None:
    """Aggregate values already taken from the window (``aggregate`` without the time filter)."""
    if not values:
        return None
    if how == "max":
        return max(values)
    if how == "min":
        return min(values)
    return sum(values) / len(values)


def _proposal(rule: Rule, current: int) -> tuple[int, str]:
    """The count this rule asks for, clamped to its range, or the current count and why not."""
    if not rule.min_replicas <= current <= rule.max_replicas:
        return (
            current,
            f"the current count {current} is outside the rule's range {rule.min_replicas}-{rule.max_replicas}",
        )
    wanted = min(rule.max_replicas, max(rule.min_replicas, current + rule.step))
    if wanted == current:
        bound = "maximum" if rule.step > 0 else "minimum"
        return current, f"already at the rule's {bound} ({current})"
    return wanted, ""


def cooldowns(rules: Iterable[Rule], endpoint_cooldown: float | None) -> tuple[float, float]:
    """(scale-out, scale-in) seconds to wait after the endpoint's last scaling by its rules."""
    enabled = [r for r in rules if r.enabled]
    if endpoint_cooldown is not None:
        return endpoint_cooldown, endpoint_cooldown
    out = max((r.cooldown for r in enabled if r.direction == "out"), default=0.0)
    return out, max((r.cooldown for r in enabled), default=0.0)


def evaluate(
    current: int,
    rules: list[Rule],
    observed: Mapping[int, float | None],
    now: float,
    last_scaled_at: float | None,
    endpoint_cooldown: float | None = None,
) -> tuple[int, list[Decision]]:
    """The new desired count and the decisions that explain it. Pure.

    A rule with no data, a disabled rule whose condition holds, a rule in its own cooldown or at its
    bound, and a rule that lost to another all get a decision that did not act, with the reason; a
    rule whose condition is false gets none.
    """
    decisions: list[Decision] = []
    candidates: list[tuple[Rule, float, int]] = []  # matched, not blocked: (rule, value, proposal)
    matched_in: list[Rule] = []
    enabled_in = [r for r in rules if r.enabled and r.direction == "in"]
    for rule in rules:
        value = observed.get(rule.id)
        if value is None:
            if rule.enabled:
                decisions.append(
                    Decision(
                        rule, None, current, current, False, f"no data for {rule.metric} in the last {rule.window:g} s"
                    )
                )
            continue
        if not COMPARATORS[rule.comparator](value, rule.threshold):
            continue
        if not rule.enabled:
            decisions.append(Decision(rule, value, current, current, False, "the rule is disabled"))
            continue
        if rule.direction == "in":
            matched_in.append(rule)
        if rule.last_triggered_at is not None and now - rule.last_triggered_at < rule.cooldown:
            left = rule.cooldown - (now - rule.last_triggered_at)
            decisions.append(Decision(rule, value, current, current, False, f"rule cooldown ({left:.0f} s left)"))
            continue
        proposal, why_not = _proposal(rule, current)
        if why_not:
            decisions.append(Decision(rule, value, current, current, False, why_not))
            continue
        candidates.append((rule, value, proposal))

    outs = [c for c in candidates if c[2] > current]
    ins = [c for c in candidates if c[2] < current]
    chosen: tuple[Rule, float, int] | None = None
    losers: list[tuple[tuple[Rule, float, int], str]] = []
    if outs:
        chosen = max(outs, key=lambda c: c[2])
        losers = [(c, "another scale-out rule asked for more") for c in outs if c is not chosen]
        losers += [(c, "a scale-out rule matched in the same tick") for c in ins]
    elif ins:
        if len(matched_in) == len(enabled_in):
            chosen = max(ins, key=lambda c: c[2])  # the most conservative shrink
            losers = [(c, "another scale-in rule shrinks less") for c in ins if c is not chosen]
        else:
            waiting = ", ".join(sorted(r.metric for r in enabled_in if r not in matched_in))
            losers = [(c, f"not every scale-in rule agrees (not yet: {waiting})") for c in ins]

    if chosen is not None and last_scaled_at is not None:
        out_wait, in_wait = cooldowns(rules, endpoint_cooldown)
        wait = out_wait if chosen[2] > current else in_wait
        if now - last_scaled_at < wait:
            left = wait - (now - last_scaled_at)
            losers.append((chosen, f"service cooldown after the last scaling ({left:.0f} s left)"))
            chosen = None

    for (rule, value, _), reason in losers:
        decisions.append(Decision(rule, value, current, current, False, reason))
    if chosen is None:
        return current, decisions
    rule, value, proposal = chosen
    how = {"avg": "average", "max": "maximum", "min": "minimum"}.get(rule.aggregation, rule.aggregation)
    decisions.append(
        Decision(
            rule,
            value,
            current,
            proposal,
            True,
            f"{rule.metric} {value:g} {SYMBOLS.get(rule.comparator, rule.comparator)} {rule.threshold:g}"
            f" ({how} over {rule.window:g} s): replicas {current} -> {proposal}",
        )
    )
    return proposal, decisions
