"""Autoscaling rules (S6): pure evaluation with an injected clock, and the tick that applies it.

Beyond the original: rules can be disabled; a rule aggregates its metric over a window (average by
default, or max/min) instead of reading one sample; a rule whose result would leave its min/max is
*clamped* to the range (the original skipped it) as long as the current count is inside the range;
scale-out rules win over scale-in rules in the same tick and the largest scale-out wins; scale-in
happens only when every enabled scale-in rule agrees (fast up, slow down); an endpoint-level cooldown
(the longest cooldown of its rules) stops flapping; and every decision that matched is recorded with
its reason, acted on or not.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "LESS_THAN": operator.lt,
    "LESS_THAN_OR_EQUAL": operator.le,
    "GREATER_THAN": operator.gt,
    "GREATER_THAN_OR_EQUAL": operator.ge,
}
# Names a proxy-source rule may use, mapped to the fields the proxy pushes (proxy/app.py).
PROXY_METRICS = {
    "in_flight": "in_flight",
    "requests_in_flight": "in_flight",
    "rps": "rps",
    "requests_per_second": "rps",
    "p95": "p95",
    "p95_latency": "p95",
    "latency_p95": "p95",
}


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


def aggregate(samples: Iterable[tuple[float, float]], how: str, window: float, now: float) -> float | None:
    """Aggregate the samples of the last ``window`` seconds; None when there are none."""
    values = [value for at, value in samples if now - window <= at <= now]
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


def evaluate(
    current: int,
    rules: list[Rule],
    observed: Mapping[int, float | None],
    now: float,
    last_scaled_at: float | None,
) -> tuple[int, list[Decision]]:
    """The new desired count and the decisions that explain it. Pure."""
    decisions: list[Decision] = []
    candidates: list[tuple[Rule, float, int]] = []  # matched, not blocked: (rule, value, proposal)
    matched_in: list[Rule] = []
    enabled_in = [r for r in rules if r.enabled and r.direction == "in"]
    for rule in rules:
        value = observed.get(rule.id)
        if not rule.enabled:
            continue  # a disabled rule is not evaluated; the admin and API show it as disabled
        if value is None:
            decisions.append(
                Decision(
                    rule, None, current, current, False, f"no data for {rule.metric} in the last {rule.window:g} s"
                )
            )
            continue
        if not COMPARATORS[rule.comparator](value, rule.threshold):
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
            losers = [(c, "not every scale-in rule agrees") for c in ins]

    if chosen is not None and last_scaled_at is not None:
        endpoint_cooldown = max((r.cooldown for r in rules if r.enabled), default=0.0)
        if now - last_scaled_at < endpoint_cooldown:
            left = endpoint_cooldown - (now - last_scaled_at)
            losers.append((chosen, f"service cooldown after the last scaling ({left:.0f} s left)"))
            chosen = None

    for (rule, value, _), reason in losers:
        decisions.append(Decision(rule, value, current, current, False, reason))
    if chosen is None:
        return current, decisions
    rule, value, proposal = chosen
    decisions.append(
        Decision(rule, value, current, proposal, True, f"{rule.metric} {value:g} {rule.comparator} {rule.threshold:g}")
    )
    return proposal, decisions


# --- the tick (shell) ----------------------------------------------------------------------------

# rule id -> the reason last recorded for it (in this worker), to record repeats once.
_last_reason: dict[int, str] = {}


def _proxy_samples(client: Any, prefix: str, endpoint_id: str, field: str) -> list[tuple[float, float]]:
    raw = client.zrange(f"{prefix}:metrics:proxy:{endpoint_id}", 0, -1)
    out = []
    for item in raw:
        with_value = json.loads(item)
        if field in with_value:
            out.append((float(with_value["t"]), float(with_value[field])))
    return out


def samples_for(client: Any, prefix: str, endpoint_id: str, source: str, metric: str) -> list[tuple[float, float]]:
    """The stored time series of one metric (the last 10 minutes)."""
    if source == "proxy":
        field = PROXY_METRICS.get(metric)
        return _proxy_samples(client, prefix, endpoint_id, field) if field else []
    # kernel and inference series: "<prefix>:metrics:<source>:<endpoint>:<metric>" -> zset of "t:value".
    raw = client.zrange(f"{prefix}:metrics:{source}:{endpoint_id}:{metric}", 0, -1, withscores=True)
    out = []
    for member, score in raw:
        value = member.decode().split(":", 1)[1] if isinstance(member, bytes) else str(member).split(":", 1)[1]
        out.append((float(score), float(value)))
    return out


def tick(now: datetime | None = None) -> int:
    """Evaluate every live endpoint's rules; returns how many endpoints changed their count."""
    from django.conf import settings
    from django.db import transaction
    from django.utils import timezone

    from serving import actions, routing
    from serving.models import AutoScalingRule, Endpoint, ScalingEvent

    now = now or timezone.now()
    now_ts = now.timestamp()
    client = routing.get_redis()
    changed = 0
    rules_by_endpoint: dict[Any, list[AutoScalingRule]] = {}
    for row in AutoScalingRule.objects.filter(endpoint__lifecycle=Endpoint.Lifecycle.CREATED).select_related(
        "endpoint"
    ):
        rules_by_endpoint.setdefault(row.endpoint_id, []).append(row)
    for rows in rules_by_endpoint.values():
        endpoint = rows[0].endpoint
        rules = [
            Rule(
                id=r.pk,
                direction=r.direction,
                source=r.source,
                metric=r.metric,
                comparator=r.comparator,
                threshold=r.threshold,
                step=r.step,
                min_replicas=r.min_replicas,
                max_replicas=r.max_replicas,
                cooldown=float(r.cooldown),
                aggregation=r.aggregation,
                window=float(r.window),
                enabled=r.enabled,
                last_triggered_at=r.last_triggered_at.timestamp() if r.last_triggered_at else None,
            )
            for r in rows
        ]
        observed = {
            rule.id: aggregate(
                samples_for(client, settings.REDIS_PREFIX, str(endpoint.pk), rule.source, rule.metric),
                rule.aggregation,
                rule.window,
                now_ts,
            )
            for rule in rules
            if rule.enabled
        }
        last = ScalingEvent.objects.filter(endpoint=endpoint, acted=True).order_by("-created_at").first()
        new, decisions = evaluate(
            endpoint.desired_replicas, rules, observed, now_ts, last.created_at.timestamp() if last else None
        )
        with transaction.atomic():
            acted = False
            if new != endpoint.desired_replicas:
                # Compare-and-set: act only if nobody changed the count since we read it.
                acted = bool(
                    Endpoint.objects.filter(
                        pk=endpoint.pk, desired_replicas=endpoint.desired_replicas, lifecycle=Endpoint.Lifecycle.CREATED
                    ).update(desired_replicas=new)
                )
            for decision in decisions:
                did = decision.acted and acted
                # A rule that keeps failing for the same reason is recorded once, not every tick.
                reason_key = decision.reason.split("(")[0].strip()
                if not did and _last_reason.get(decision.rule.id) == reason_key:
                    continue
                _last_reason[decision.rule.id] = "" if did else reason_key
                ScalingEvent.objects.create(
                    endpoint=endpoint,
                    rule_id=decision.rule.id,
                    metric=f"{decision.rule.source}:{decision.rule.metric}",
                    observed=decision.observed,
                    window=int(decision.rule.window),
                    old_replicas=decision.old,
                    new_replicas=decision.new if did else decision.old,
                    acted=did,
                    reason=decision.reason if did or not decision.acted else "the count changed meanwhile",
                )
                if did:
                    AutoScalingRule.objects.filter(pk=decision.rule.id).update(last_triggered_at=now)
            if acted:
                changed += 1
                actions.record_event(
                    endpoint,
                    "scaled",
                    f"Autoscaling: replicas {endpoint.desired_replicas} -> {new}.",
                    data={"old": endpoint.desired_replicas, "new": new},
                )
                actions._kick(endpoint.pk)
    return changed
