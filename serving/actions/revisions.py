"""The writers of revisions and traffic shares (issue 16): record a revision, start a rollout,
promote, roll back, set shares by hand. Each runs in one transaction holding the endpoint's row
lock (the reconcile's lock order: the endpoint first), writes a ServiceEvent, and after the commit
updates the proxies' table and reconciles. The pure parts (diffs, shares, checks) are in
``serving.core.revisions``; the write shared with the reconcile's automatic rollback is
``serving.control.revisions.stand_on``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from accounts.models import User
from serving.bus import dispatch, events, routing
from serving.bus.events import record_event
from serving.control import revisions as moves
from serving.core import revisions as pure
from serving.models import Endpoint, Revision


def _after(endpoint_id: Any) -> None:
    transaction.on_commit(lambda: routing.publish_endpoint_safely(str(endpoint_id)))
    transaction.on_commit(lambda: dispatch.enqueue_reconcile(str(endpoint_id)))
    transaction.on_commit(lambda: events.notify_endpoint_changed(str(endpoint_id)))


def next_number(endpoint: Endpoint) -> int:
    """The number of the next revision: after every revision there ever was (a rollback lowers
    ``spec_version``; numbers are never reused)."""
    top = endpoint.revisions.aggregate(top=Max("number"))["top"] or 0
    return max(top, endpoint.spec_version) + 1


def record_revision(endpoint: Endpoint, *, acting_user: User | None) -> Revision:
    """The revision ``endpoint.spec_version`` as the endpoint holds it now, with its one-line diff."""
    config = Revision.snapshot(endpoint)
    before = endpoint.revisions.filter(number__lt=endpoint.spec_version).order_by("-number").first()
    return Revision.objects.create(
        endpoint=endpoint,
        number=endpoint.spec_version,
        config=config,
        created_by=acting_user,
        summary=pure.diff_line(before.config if before is not None else None, config),
    )


def start_rollout(endpoint: Endpoint, rollout: Any, stable: int) -> str:
    """Set the shares for a new revision (``endpoint.spec_version``, already recorded) replacing
    ``stable``; returns the sentence for the event log. The caller saves the endpoint."""
    strategy, percent = check_rollout(rollout)
    new = endpoint.spec_version
    if strategy == pure.CANARY:
        endpoint.traffic = {str(stable): 100 - percent, str(new): percent}
        endpoint.rollout = {
            "strategy": strategy,
            "revision": new,
            "stable": stable,
            "since": timezone.now().isoformat(),
        }
        return f"Canary: revision {new} starts beside revision {stable} and gets {percent}% of requests."
    if strategy == pure.BLUE_GREEN:
        endpoint.traffic = {str(stable): 100}
        endpoint.rollout = {
            "strategy": strategy,
            "revision": new,
            "stable": stable,
            "since": timezone.now().isoformat(),
        }
        return f"Blue-green: revision {new} starts all its replicas; traffic moves once they are all healthy."
    endpoint.traffic = {}
    endpoint.rollout = {}
    return "Replicas will be replaced one at a time."


def check_rollout(rollout: Any) -> tuple[str, int]:
    try:
        return pure.check_rollout(rollout)
    except pure.RolloutError as exc:
        raise ValidationError({"rollout": str(exc)}) from None


def _locked(endpoint: Endpoint) -> Endpoint:
    locked = Endpoint.objects.select_for_update(no_key=True).get(pk=endpoint.pk)
    if locked.lifecycle != Endpoint.Lifecycle.CREATED:
        raise ValidationError({"detail": f"Service {locked.name!r} is being terminated; its revisions can not change."})
    return locked


def _revision(endpoint: Endpoint, number: int) -> Revision:
    revision = endpoint.revisions.filter(number=number).first()
    if revision is None:
        known = ", ".join(str(n) for n in endpoint.revisions.values_list("number", flat=True))
        raise ValidationError(
            {"revision": f"Service {endpoint.name!r} has no revision {number}; its revisions are {known}."}
        )
    return revision


@transaction.atomic
def do_promote(endpoint: Endpoint, number: int, *, acting_user: User | None) -> Endpoint:
    """All traffic to revision ``number``; the others are drained once it has its replicas."""
    endpoint = _locked(endpoint)
    revision = _revision(endpoint, number)
    before = dict(endpoint.traffic or {})
    moves.stand_on(endpoint, revision)
    record_event(
        endpoint,
        "promoted",
        f"Revision {number} promoted: it gets all traffic; the other revisions are drained once its "
        f"{endpoint.desired_replicas} replica(s) are healthy.",
        actor=acting_user,
        data={"revision": number, "traffic_before": before},
    )
    _after(endpoint.pk)
    return endpoint


@transaction.atomic
def do_rollback(endpoint: Endpoint, *, acting_user: User | None) -> Endpoint:
    """Back to the previous revision (the stable one of a rollout in progress), its replicas
    restarted with its configuration if they are gone."""
    endpoint = _locked(endpoint)
    target = moves.previous(endpoint)
    if target is None:
        raise ValidationError(
            {
                "detail": f"Revision {endpoint.spec_version} is the first revision of {endpoint.name!r}; "
                "there is none to roll back to."
            }
        )
    left = endpoint.spec_version
    moves.stand_on(endpoint, target)
    record_event(
        endpoint,
        "rolled_back",
        f"Rolled back from revision {left} to revision {target.number}.",
        actor=acting_user,
        data={"from": left, "to": target.number, "automatic": False},
    )
    _after(endpoint.pk)
    return endpoint


@transaction.atomic
def do_set_traffic(endpoint: Endpoint, shares: Mapping[str, Any], *, acting_user: User | None) -> Endpoint:
    """Set the revisions' shares by hand: whole percents adding up to 100."""
    endpoint = _locked(endpoint)
    known = set(endpoint.revisions.values_list("number", flat=True))
    try:
        traffic = pure.check_traffic(shares, known)
    except pure.RolloutError as exc:
        raise ValidationError({"traffic": str(exc)}) from None
    endpoint.traffic = {str(n): share for n, share in traffic.items()}
    endpoint.rollout = {}
    endpoint.retries = 0
    endpoint.save(update_fields=["traffic", "rollout", "retries", "updated_at"])
    shown = ", ".join(f"revision {n}: {share}%" for n, share in traffic.items())
    record_event(
        endpoint, "traffic_set", f"Traffic set by hand: {shown}.", actor=acting_user, data={"traffic": endpoint.traffic}
    )
    _after(endpoint.pk)
    return endpoint
