"""Moving a service between its revisions (issue 16): the one write that promote, rollback and the
reconcile's automatic rollback share. The caller holds the endpoint's row lock (its transaction)."""

from __future__ import annotations

from typing import Any

from serving.core.revisions import CONFIG_FIELDS
from serving.models import Endpoint, Revision


def stand_on(endpoint: Endpoint, revision: Revision, traffic: dict[int, int] | None = None) -> None:
    """Make ``revision`` the one the service stands on: its configuration on the endpoint, its number
    as ``spec_version`` (new replicas run it), ``traffic`` (default: all of it to this revision),
    no rollout in progress, start failures forgotten. Saves the endpoint."""
    revision.apply(endpoint)
    endpoint.spec_version = revision.number
    endpoint.traffic = {str(n): share for n, share in (traffic or {revision.number: 100}).items()}
    endpoint.rollout = {}
    endpoint.retries = 0
    endpoint.save(update_fields=[*CONFIG_FIELDS, "spec_version", "traffic", "rollout", "retries", "updated_at"])


def previous(endpoint: Endpoint) -> Revision | None:
    """The revision a rollback returns to: the stable one of a rollout in progress, else the newest
    revision older than the one the service stands on."""
    stable: Any = (endpoint.rollout or {}).get("stable")
    if stable:
        found = endpoint.revisions.filter(number=stable).first()
        if found is not None:
            return found
    return endpoint.revisions.filter(number__lt=endpoint.spec_version).order_by("-number").first()
