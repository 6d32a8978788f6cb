"""The autoscaling tick (S6): read every live service's rules and metrics, evaluate, write, scale.

The evaluation itself, and what the rules mean (windows, clamping, which rule wins, cooldowns), is
pure and lives in ``serving.core.scaling``; this is its shell. One tick reads the rules, their
endpoints and every rule's metric window in a few round trips, and writes only what changed: the
decisions (``ScalingEvent``), the rules' states, and for the scaled endpoints a compare-and-set of
their desired count with an immediate reconcile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Any

from django.db import transaction
from django.utils import timezone

from serving.bus import dispatch, metrics, telemetry
from serving.bus import events as audit
from serving.core.scaling import NOT_MATCHED, Decision, Rule, combine, evaluate
from serving.models import AutoScalingRule, Endpoint, ScalingEvent, ServiceEvent

log = logging.getLogger(__name__)

# The decision of a scale-up refused because the service's replicas could not start
# (Endpoint.shared_definition_problem): short, so the stored reason and state keep all of it; the
# whole sentence, which may be longer than the 255 characters a decision keeps, goes to the
# service's events.
SHARED_DEFINITION_REFUSAL = (
    "refused: the model folder can be changed by others while the service mounts private folders; "
    "see the service's events"
)


# --- the tick (shell) ----------------------------------------------------------------------------

# What the tick reads of a rule: what a user sets on it (AutoScalingRule.SETTINGS), and its state.
_RULE_FIELDS = ("pk", "endpoint_id", *AutoScalingRule.SETTINGS, "enabled", "last_triggered_at", "last_decision")


def tick(now: datetime | None = None, client: Any = None) -> int:
    """Evaluate every live endpoint's rules; returns how many endpoints changed their count.

    One query for the rules, one for their endpoints, one Redis round trip for every rule's window
    (values only); then, only for what changed: the decisions (bulk), the rules' states, and for the
    scaled endpoints one transaction (``_apply_scaling``): a compare-and-set on each desired count,
    the writes in bulk, and an immediate reconcile of each.
    """
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
            # project-folder rule): the decision records why instead (serving.actions.services.do_scale refuses too).
            problem = endpoint.shared_definition_problem(name_folders=False) if new > current else None
            if problem:
                refused[endpoint_id] = problem
            else:
                groups.setdefault((current, new), []).append(endpoint_id)
        acted_ids: set[Any] = set()
        for (current, new), ids in groups.items():
            updated = Endpoint.objects.filter(
                pk__in=ids, desired_replicas=current, lifecycle=Endpoint.Lifecycle.CREATED
            ).update(
                desired_replicas=new,
                last_scaled_at=now,
                updated_at=now,
                # At 0 (a rule with min_replicas 0) the service sleeps: a request wakes it (control/sleep.py).
                **({"slept_at": now, "wake_replicas": current} if new == 0 else {}),
            )
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
                    telemetry.count_decision(locked[endpoint_id].slug, decision.old, decision.new, decision.acted)
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
