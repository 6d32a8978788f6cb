"""Autoscaling rules (S6): pure evaluation with an injected clock, and the tick that applies it.

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
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

log = logging.getLogger(__name__)

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "LESS_THAN": operator.lt,
    "LESS_THAN_OR_EQUAL": operator.le,
    "GREATER_THAN": operator.gt,
    "GREATER_THAN_OR_EQUAL": operator.ge,
}
SYMBOLS = {"LESS_THAN": "<", "LESS_THAN_OR_EQUAL": "<=", "GREATER_THAN": ">", "GREATER_THAN_OR_EQUAL": ">="}
NOT_MATCHED = "not matched"  # a rule's state when its condition is false (recorded as state, no event)
# The decision of a scale-up refused because the service's replicas could not start
# (Endpoint.shared_definition_problem): short, so the stored reason and state keep all of it; the
# whole sentence, which may be longer than the 255 characters a decision keeps, goes to the
# service's events.
SHARED_DEFINITION_REFUSAL = (
    "refused: the model folder can be changed by others while the service mounts private folders; "
    "see the service's events"
)


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


# --- the tick (shell) ----------------------------------------------------------------------------

_RULE_FIELDS = (
    "pk",
    "endpoint_id",
    "direction",
    "source",
    "metric",
    "comparator",
    "threshold",
    "step",
    "min_replicas",
    "max_replicas",
    "cooldown",
    "aggregation",
    "window",
    "enabled",
    "last_triggered_at",
    "last_decision",
)


def tick(now: datetime | None = None, client: Any = None) -> int:
    """Evaluate every live endpoint's rules; returns how many endpoints changed their count.

    One query for the rules, one for their endpoints, one Redis round trip for every rule's window
    (values only); then, only for what changed: the decisions (bulk), the rules' states, and for the
    scaled endpoints one transaction (``_apply_scaling``): a compare-and-set on each desired count,
    the writes in bulk, and an immediate reconcile of each.
    """
    from django.db import transaction
    from django.utils import timezone

    from serving.bus import metrics
    from serving.models import AutoScalingRule, Endpoint, ScalingEvent

    now = now or timezone.now()
    now_ts = now.timestamp()
    rows = list(
        AutoScalingRule.objects.filter(endpoint__lifecycle=Endpoint.Lifecycle.CREATED)
        .order_by("endpoint_id", "created_at", "pk")
        .values_list(*_RULE_FIELDS)
    )
    if not rows:
        return 0
    endpoints = {
        pk: (desired, cooldown, last.timestamp() if last else None)
        for pk, desired, cooldown, last in Endpoint.objects.filter(
            pk__in={row[1] for row in rows}, lifecycle=Endpoint.Lifecycle.CREATED
        ).values_list("pk", "desired_replicas", "scaling_cooldown", "last_scaled_at")
    }
    rules_by_endpoint: dict[Any, list[Rule]] = {}
    last_decision: dict[int, str] = {}
    for (
        pk,
        endpoint_id,
        direction,
        source,
        metric,
        comparator,
        threshold,
        step,
        low,
        high,
        cooldown,
        aggregation,
        window,
        enabled,
        last_triggered,
        decided,
    ) in rows:
        rule = Rule(
            id=pk,
            direction=direction,
            source=source,
            metric=metric,
            comparator=comparator,
            threshold=threshold,
            step=step,
            min_replicas=low,
            max_replicas=high,
            cooldown=float(cooldown),
            aggregation=aggregation,
            window=float(window),
            enabled=enabled,
            last_triggered_at=last_triggered.timestamp() if last_triggered else None,
        )
        rules_by_endpoint.setdefault(endpoint_id, []).append(rule)
        last_decision[pk] = decided
    wanted = [
        (str(endpoint_id), rule.source, rule.metric, now_ts - rule.window)
        for endpoint_id, rules in rules_by_endpoint.items()
        for rule in rules
    ]
    # Redis selects each window by time (since = now - window, until = now, both inclusive, as in
    # ``aggregate``), so the values alone are read: half the reply to parse.
    series = iter(metrics.read_many(wanted, now_ts, client=client, with_times=False))

    events: list[ScalingEvent] = []
    states: dict[str, list[int]] = {}  # new last_decision -> rules
    scaled: list[tuple[Any, int, int, list[Decision]]] = []
    for endpoint_id, rules in rules_by_endpoint.items():
        observed = {rule.id: combine(next(series), rule.aggregation) for rule in rules}
        if endpoint_id not in endpoints:
            continue
        current, endpoint_cooldown, last_scaled = endpoints[endpoint_id]
        new, decisions = evaluate(
            current,
            rules,
            observed,
            now_ts,
            last_scaled,
            None if endpoint_cooldown is None else float(endpoint_cooldown),
        )
        decided = {d.rule.id for d in decisions}
        for rule in rules:
            if rule.id not in decided and last_decision[rule.id] != NOT_MATCHED:
                states.setdefault(NOT_MATCHED, []).append(rule.id)
        if new != current:
            scaled.append((endpoint_id, current, new, decisions))
            continue
        for decision in decisions:
            if decision.key[:255] != last_decision[decision.rule.id]:  # what is stored is compared
                events.append(_event(endpoint_id, decision, now, acted=False))
                states.setdefault(decision.key[:255], []).append(decision.rule.id)

    with transaction.atomic():
        ScalingEvent.objects.bulk_create(events, batch_size=500)
        for state, ids in states.items():
            AutoScalingRule.objects.filter(pk__in=ids).update(last_decision=state)

    return _apply_scaling(scaled, last_decision, now) if scaled else 0


def _apply_scaling(
    scaled: list[tuple[Any, int, int, list[Decision]]], last_decision: Mapping[int, str], now: datetime
) -> int:
    """Write the tick's scalings in one transaction: per endpoint a compare-and-set of its desired
    count (the rows are locked and their count checked against the one evaluated, then updated by
    (old, new) group with the same condition), and in bulk the decisions, the rules' states, the audit
    lines and, after the commit, a reconcile per scaled endpoint. Returns how many were scaled."""
    # Imported here, not at the top: the evaluation above is pure and imports no Django.
    from django.db import transaction

    from serving.bus import dispatch
    from serving.bus import events as audit
    from serving.models import AutoScalingRule, Endpoint, ScalingEvent, ServiceEvent

    with transaction.atomic():
        # Locked (PostgreSQL: FOR UPDATE; SQLite: the transaction holds the write lock), so the
        # count read here is the one the update replaces; the update says so again.
        locked = {
            endpoint.pk: endpoint
            for endpoint in Endpoint.objects.select_for_update(no_key=True)
            .filter(pk__in=[endpoint_id for endpoint_id, *_ in scaled], lifecycle=Endpoint.Lifecycle.CREATED)
            .order_by("pk")  # the reconcile's lock order: two orders of one set deadlock
        }
        groups: dict[tuple[int, int], list[Any]] = {}
        refused: dict[Any, str] = {}
        for endpoint_id, current, new, _ in scaled:
            endpoint = locked.get(endpoint_id)
            if endpoint is None or endpoint.desired_replicas != current:
                continue
            # No more replicas that would only fail at start (a service configured before the
            # project-folder rule): the decision records why instead (actions.do_scale refuses too).
            problem = endpoint.shared_definition_problem(name_folders=False) if new > current else None
            if problem:
                refused[endpoint_id] = problem
            else:
                groups.setdefault((current, new), []).append(endpoint_id)
        acted_ids: set[Any] = set()
        for (current, new), ids in groups.items():
            updated = Endpoint.objects.filter(
                pk__in=ids, desired_replicas=current, lifecycle=Endpoint.Lifecycle.CREATED
            ).update(desired_replicas=new, last_scaled_at=now, updated_at=now)
            if updated != len(ids):  # cannot happen under the lock; never act on a guess
                raise RuntimeError(f"autoscaling: {updated} of {len(ids)} locked endpoints updated")
            acted_ids.update(ids)

        events: list[ScalingEvent] = []
        triggered: list[AutoScalingRule] = []
        states: dict[str, list[int]] = {}
        lines = []
        for endpoint_id, current, new, decisions in scaled:
            acted = endpoint_id in acted_ids
            for decision in decisions:
                problem = None
                if decision.acted and not acted:
                    problem = refused.get(endpoint_id)
                    why = SHARED_DEFINITION_REFUSAL if problem else "the count changed meanwhile"
                    decision = Decision(decision.rule, decision.observed, current, current, False, why)
                if decision.acted or decision.key[:255] != last_decision[decision.rule.id]:
                    events.append(_event(endpoint_id, decision, now, acted=decision.acted))
                    if problem:
                        # The whole sentence (who can change the model folder, how to fix it) is too long
                        # for a decision; the service's events keep it, once per refusal, not per tick.
                        lines.append(
                            audit.new_event(
                                locked[endpoint_id],
                                "scale_refused",
                                f"Autoscaling did not add a replica: {problem}",
                                level=ServiceEvent.Level.WARNING,
                                data={"old": current, "new": new, "rule_id": decision.rule.id},
                            )
                        )
                    if decision.acted:
                        triggered.append(
                            AutoScalingRule(
                                pk=decision.rule.id, last_decision=decision.reason[:255], last_triggered_at=now
                            )
                        )
                    else:
                        states.setdefault(decision.key[:255], []).append(decision.rule.id)
            if acted:
                winner = next(d for d in decisions if d.acted)
                lines.append(
                    audit.new_event(
                        locked[endpoint_id],
                        "scaled",
                        f"Autoscaling: replicas {current} -> {new} ({winner.rule.source}:{winner.reason}).",
                        data={"old": current, "new": new, "rule_id": winner.rule.id},
                    )
                )
                # Reconcile at once; the reconcile's route changes tell the open pages (a page update
                # from here too would cost a channel-layer round trip per scaled service and tick).
                transaction.on_commit(partial(dispatch.enqueue_reconcile, str(endpoint_id)))
        ScalingEvent.objects.bulk_create(events, batch_size=500)
        AutoScalingRule.objects.bulk_update(triggered, ["last_decision", "last_triggered_at"], batch_size=500)
        for state, rule_ids in states.items():
            AutoScalingRule.objects.filter(pk__in=rule_ids).update(last_decision=state)
        ServiceEvent.objects.bulk_create(lines, batch_size=500)
    return len(acted_ids)


def _event(endpoint_id: Any, decision: Decision, now: datetime, *, acted: bool) -> Any:
    from serving.models import ScalingEvent

    return ScalingEvent(
        endpoint_id=endpoint_id,
        rule_id=decision.rule.id,
        metric=f"{decision.rule.source}:{decision.rule.metric}",
        observed=decision.observed,
        window=int(decision.rule.window),
        old_replicas=decision.old,
        new_replicas=decision.new if acted else decision.old,
        acted=acted,
        reason=decision.reason[:255],
        created_at=now,
    )
