"""The only writers of serving rows (docs/architecture.md; Zulip's ``do_*``): the services themselves.

Every action runs in one transaction, takes ``acting_user`` as a keyword, writes a ServiceEvent,
and schedules side effects (reconciliation, routing updates) with ``transaction.on_commit`` so that
nothing outside the database ever sees a change that was rolled back. This module creates, dry-run
validates, modifies, scales and terminates a service and clears its errors; the checks they run are
in ``serving.actions.validators``, tokens in ``serving.actions.tokens``, autoscaling rules in
``serving.actions.rules``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User
from serving.actions import revisions
from serving.actions.validators import (
    MODIFIABLE_FIELDS,
    REPLACING_FIELDS,
    build,
    check_cluster_mode,
    check_definition_path,
    check_environ,
    check_extra_mounts,
    check_forward_cookies,
    check_model_folder,
    check_model_names,
    check_mount_path,
    check_resource_group,
    check_retry_policy,
    check_runtime,
    check_service_config,
    check_shared_definition,
    normalize_resources,
)
from serving.bus import dispatch, dryrun, events, routing
from serving.bus.events import record_event
from serving.control import scheduler
from serving.models import Endpoint, EndpointToken, Route, ServiceEvent
from storage.models import Folder


def _kick(endpoint_id: Any) -> None:
    """Reconcile the endpoint right after the commit instead of waiting for the next beat tick,
    and tell open pages (services list, service page) that it changed."""
    transaction.on_commit(lambda: dispatch.enqueue_reconcile(str(endpoint_id)))
    transaction.on_commit(lambda: events.notify_endpoint_changed(str(endpoint_id)))


def _name_taken(owner: User, name: str) -> ValidationError:
    return ValidationError({"name": f"You already have a service named {name!r}; choose another name."})


@transaction.atomic
def do_create_service(*, acting_user: User, **fields: Any) -> Endpoint:
    """Create a model service (S4.1); its replicas are started by reconciliation after commit."""
    config = check_service_config(acting_user=acting_user, **fields)
    if Endpoint.objects.live().filter(owner=acting_user, name=config.name).exists():
        raise _name_taken(acting_user, config.name)
    endpoint = build(config, acting_user)
    try:
        with transaction.atomic():
            endpoint.save()
    except IntegrityError:
        raise _name_taken(acting_user, config.name) from None
    revisions.record_revision(endpoint, acting_user=acting_user)
    record_event(
        endpoint,
        "created",
        f"Service {config.name!r} created with {config.replicas} replica(s) of runtime {config.runtime}.",
        actor=acting_user,
        data={"replicas": config.replicas, "runtime": config.runtime, "image": endpoint.image},
    )
    for warning in config.warnings:
        record_event(endpoint, "config_warning", warning, level=ServiceEvent.Level.WARNING, actor=acting_user)
    endpoint.warnings = list(config.warnings)  # type: ignore[attr-defined]  # for the API's answer
    _kick(endpoint.pk)
    return endpoint


def do_validate_service(*, acting_user: User, timeout: float | None = None, **fields: Any) -> str:
    """Run the configuration once as a throwaway replica (S4.2); returns the validation id.

    Its events and log stream to the websocket ``/ws/validations/<id>/`` until ``finished``.
    """
    config = check_service_config(acting_user=acting_user, **fields)
    endpoint = build(config, acting_user)
    with transaction.atomic():
        choice = scheduler.choose_node(endpoint, scheduler.replica_request(endpoint), timezone.now())
    if choice.node is None:
        raise ValidationError({"resources": choice.reason})
    validation_id = dryrun.new_id()
    payload = {
        "name": config.name,
        "folder": str(config.folder.pk),
        "runtime": config.runtime,
        "model_mount": config.model_mount,
        "model_definition_path": config.model_definition_path,
        "extra_mounts": config.extra_mounts,
        "image": config.image,
        "resources": config.resources,
        "environ": config.environ,
        "devices": choice.devices,
    }
    request = dryrun.ValidationRequest(
        id=validation_id,
        user_id=acting_user.pk,
        node=choice.node.name,
        config=payload,
        timeout=timeout or dryrun.DEFAULT_TIMEOUT,
    )
    dryrun.save_request(request)
    dryrun.publish(validation_id, "lifecycle", message=f"Validation queued on node {choice.node.name}.")
    dispatch.send_validation(validation_id, choice.node)
    return validation_id


@transaction.atomic
def do_modify_service(
    endpoint: Endpoint, *, acting_user: User, changes: Mapping[str, Any], rollout: Mapping[str, Any] | None = None
) -> Endpoint:
    """Apply only the fields that changed (S4.5).

    A change of replicas scales; a change of image, definition, resources, mounts or environment
    makes a new revision (issue 16): ``spec_version`` becomes its number and ``rollout`` says how it
    replaces the old one: rolling (the default: one replica at a time, each new one healthy before
    an old one is drained), canary (a share of the requests) or blue-green (all at once, once all
    its replicas are healthy).
    """
    endpoint = Endpoint.objects.select_for_update(no_key=True).get(pk=endpoint.pk)
    if endpoint.lifecycle != Endpoint.Lifecycle.CREATED:
        raise ValidationError({"detail": f"Service {endpoint.name!r} is being terminated; it can not be modified."})
    unknown = set(changes) - MODIFIABLE_FIELDS
    if unknown:
        raise ValidationError({"detail": f"These fields can not be modified: {', '.join(sorted(unknown))}."})
    applied: dict[str, Any] = {}
    old_replicas = endpoint.desired_replicas
    visible = Folder.objects.visible_to(acting_user)
    for field, value in changes.items():
        if field == "model_folder":
            check_model_folder(value)
        elif field == "runtime":
            check_runtime(value)
        elif field == "resources":
            value = normalize_resources(value)
        elif field == "environ":
            value = check_environ(value)
        elif field == "model_mount":
            check_mount_path(value, "model_mount")
        elif field == "model_definition_path" and value:
            check_definition_path(value)
        elif field == "forward_cookies" and value and not endpoint.forward_cookies:
            check_forward_cookies(value)
        elif field == "retry_policy":
            check_retry_policy(value)
        elif field == "model_names":
            value = check_model_names(value, endpoint)
        elif field == "resource_group" and value != endpoint.resource_group:
            check_resource_group(value or "default")
        elif field == "extra_mounts":
            value = check_extra_mounts(list(value or []), changes.get("model_mount", endpoint.model_mount), visible)
        elif (
            field == "name"
            and value != endpoint.name
            and Endpoint.objects.live().filter(owner=endpoint.owner, name=value).exclude(pk=endpoint.pk).exists()
        ):
            raise ValidationError({"name": f"You already have a service named {value!r}; choose another name."})
        if getattr(endpoint, field) != value:
            applied[field] = value
            setattr(endpoint, field, value)
    check_cluster_mode(endpoint.cluster_mode)
    if rollout is not None:
        revisions.check_rollout(rollout)
        if not REPLACING_FIELDS & applied.keys():
            raise ValidationError(
                {
                    "rollout": "A rollout applies to a change of what the replicas run ("
                    + ", ".join(sorted(REPLACING_FIELDS))
                    + "); this change has none: leave the rollout out."
                }
            )
    if not applied:
        return endpoint
    # Every change that places new replicas is checked, not only a change of the folders: a service
    # configured before the rule would otherwise get replicas that all fail at start
    # (replicas.build_spec), until MAX_START_FAILURES.
    if REPLACING_FIELDS & applied.keys():
        check_shared_definition(endpoint)
    elif applied.get("desired_replicas", 0) > old_replicas:
        check_shared_definition(endpoint, "desired_replicas")
    endpoint.full_clean(exclude=["slug", "owner", "model_folder", "preset", "project"], validate_constraints=False)
    how = ""
    if REPLACING_FIELDS & applied.keys():
        # During a rollout the new one replaces its stable revision, not the canary.
        stable = int((endpoint.rollout or {}).get("stable") or endpoint.spec_version)
        endpoint.spec_version = revisions.next_number(endpoint)
        how = " " + revisions.start_rollout(endpoint, rollout, stable)
    if "desired_replicas" in applied:  # a count set by hand ends a sleep (scale to zero)
        endpoint.slept_at = endpoint.woke_at = None
    endpoint.retries = 0
    endpoint.save()
    if REPLACING_FIELDS & applied.keys():
        revision = revisions.record_revision(endpoint, acting_user=acting_user)
        how = f" Revision {revision.number}: {revision.summary}" + how
    shown = {k: (str(v.pk) if hasattr(v, "pk") else v) for k, v in applied.items()}
    record_event(
        endpoint,
        "modified",
        f"Changed {', '.join(sorted(applied))}." + how,
        actor=acting_user,
        data={"changes": shown, "spec_version": endpoint.spec_version, "traffic": endpoint.traffic},
    )
    publish_routing(endpoint.pk)  # e.g. open_to_public, forward_cookies apply in the proxy at once
    _kick(endpoint.pk)
    return endpoint


@transaction.atomic
def do_scale(endpoint: Endpoint, replicas: int, *, acting_user: User | None, reason: str = "") -> bool:
    """Set the desired replica count; returns False when the service is not live (nothing done).
    A scale-up of a service whose replicas can not start (Endpoint.shared_definition_problem) is
    refused with that sentence."""
    if replicas < 0 or replicas > 64:
        raise ValidationError({"desired_replicas": "Replicas must be between 0 and 64."})
    old = endpoint.desired_replicas
    if replicas > old:
        check_shared_definition(endpoint, "desired_replicas")
    # A count set by hand ends a sleep (scale to zero): the service no longer waits for a request.
    changed = Endpoint.objects.filter(pk=endpoint.pk, lifecycle=Endpoint.Lifecycle.CREATED).update(
        desired_replicas=replicas, slept_at=None, woke_at=None, updated_at=timezone.now()
    )
    if not changed:
        return False
    if endpoint.slept_at is not None:
        publish_routing(endpoint.pk)
    endpoint.desired_replicas, endpoint.slept_at, endpoint.woke_at = replicas, None, None
    if old != replicas:
        record_event(
            endpoint,
            "scaled",
            f"Replicas {old} -> {replicas}" + (f" ({reason})" if reason else "") + ".",
            actor=acting_user,
            data={"old": old, "new": replicas},
        )
        _kick(endpoint.pk)
    return True


@transaction.atomic
def do_terminate_service(endpoint: Endpoint, *, acting_user: User | None) -> None:
    """Terminate (S4.6): mark destroying; reconciliation drains and stops every replica, then
    marks the service destroyed. Idempotent."""
    updated = Endpoint.objects.filter(pk=endpoint.pk, lifecycle=Endpoint.Lifecycle.CREATED).update(
        lifecycle=Endpoint.Lifecycle.DESTROYING, updated_at=timezone.now()
    )
    endpoint.refresh_from_db()
    if updated:
        # Tokens of a terminated service must stop working at once, not after the last replica.
        EndpointToken.objects.filter(endpoint=endpoint, revoked_at__isnull=True).update(revoked_at=timezone.now())
        record_event(endpoint, "terminating", f"Service {endpoint.name!r} is being terminated.", actor=acting_user)
        publish_routing(endpoint.pk)
    _kick(endpoint.pk)


@transaction.atomic
def do_clear_errors(endpoint: Endpoint, *, acting_user: User | None) -> int:
    """Clear errors and retry (S4.4): remove failed routes, reset the retry count, start again."""
    # The endpoint first, then its routes: the reconcile's lock order (docs/architecture.md).
    Endpoint.objects.select_for_update(no_key=True).filter(pk=endpoint.pk).first()
    failed = list(endpoint.routes.filter(status__in=[Route.Status.FAILED_TO_START, Route.Status.UNHEALTHY]))
    for route in failed:
        Route.objects.filter(pk=route.pk).update(status=Route.Status.TERMINATING)
    Endpoint.objects.filter(pk=endpoint.pk).update(retries=0)
    endpoint.retries = 0
    record_event(
        endpoint,
        "errors_cleared",
        f"Cleared {len(failed)} failed replica(s); starting again.",
        actor=acting_user,
    )
    _kick(endpoint.pk)
    return len(failed)


def publish_routing(endpoint_id: Any) -> None:
    """Update the proxies' routing table for the endpoint after the commit."""
    transaction.on_commit(lambda: routing.publish_endpoint_safely(str(endpoint_id)))
