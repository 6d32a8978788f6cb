"""The writers of autoscaling rules (S6; docs/architecture.md): save (create or change) and delete.

A rule is validated as a whole before it is saved; every change is recorded in the service's
events. The rules are evaluated by ``serving.control.autoscaling``, which writes their states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.models import User
from serving.bus.events import record_event
from serving.models import AutoScalingRule


@transaction.atomic
def do_save_rule(
    rule: AutoScalingRule, *, acting_user: User, changes: Mapping[str, Any] | None = None
) -> AutoScalingRule:
    """Create (unsaved ``rule``) or update a rule, validated as a whole (min <= max, step != 0)."""
    creating = rule._state.adding
    for field, value in (changes or {}).items():
        setattr(rule, field, value)
    rule.full_clean(exclude=["endpoint"])
    if rule.min_replicas > rule.max_replicas:
        raise ValidationError({"min_replicas": "The minimum must not exceed the maximum replicas."})
    if rule.step == 0:
        raise ValidationError({"step": "The step must not be 0; use a positive or negative number."})
    rule.save()
    record_event(
        rule.endpoint,
        "rule_created" if creating else "rule_changed",
        f"Autoscaling rule {rule} {'added' if creating else 'changed'}.",
        actor=acting_user,
        data={"rule_id": rule.pk},
    )
    return rule


@transaction.atomic
def do_delete_rule(rule: AutoScalingRule, *, acting_user: User) -> None:
    """Delete an autoscaling rule; its past decisions stay in the log."""
    record_event(rule.endpoint, "rule_deleted", f"Autoscaling rule {rule} deleted.", actor=acting_user)
    rule.delete()
