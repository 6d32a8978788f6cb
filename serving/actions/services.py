"""The only writers of serving rows (docs/architecture.md; Zulip's ``do_*``).

Every action runs in one transaction, takes ``acting_user`` as a keyword, writes a ServiceEvent,
and schedules side effects (reconciliation, routing updates) with ``transaction.on_commit`` so that
nothing outside the database ever sees a change that was rolled back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Project, User
from serving.bus import dispatch, events
from serving.bus.events import record_event
from serving.core import definitions, slots, tokens
from serving.core.runtimes import RUNTIMES
from serving.models import (
    AutoScalingRule,
    Endpoint,
    EndpointToken,
    Node,
    ResourcePreset,
    Route,
)
from storage.models import Folder

# Fields whose change needs new replicas (rolling replacement); the rest apply in place.
REPLACING_FIELDS = frozenset(
    {
        "image",
        "resources",
        "environ",
        "runtime",
        "model_folder",
        "model_mount",
        "model_definition_path",
        "extra_mounts",
        "cluster_mode",
        "cluster_size",
        "resource_group",
        "preset",
    }
)
# Mount targets that would hide what the replica needs to run.
SYSTEM_PATHS = frozenset({"", "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/lib", "/tmp", "/opt/modelserve"})  # noqa: S108
MODIFIABLE_FIELDS = REPLACING_FIELDS | {
    "desired_replicas",
    "open_to_public",
    "forward_cookies",
    "name",
    "scaling_cooldown",
}


def _kick(endpoint_id: Any) -> None:
    """Reconcile the endpoint right after the commit instead of waiting for the next beat tick,
    and tell open pages (services list, service page) that it changed."""
    transaction.on_commit(lambda: dispatch.enqueue_reconcile(str(endpoint_id)))
    transaction.on_commit(lambda: events.notify_endpoint_changed(str(endpoint_id)))


# --- validation shared by create and modify ------------------------------------------------------


def _check_model_folder(folder: Folder | None) -> None:
    if folder is None:
        raise ValidationError({"folder": "Choose the model folder to mount."})
    if folder.usage_mode != Folder.UsageMode.MODEL:
        raise ValidationError(
            {
                "folder": f"Folder {folder.name!r} is a {folder.usage_mode} folder; a service mounts a "
                "model folder. Change its usage mode to 'model' or choose another folder."
            }
        )


def _check_extra_mounts(extra_mounts: list[dict[str, Any]], model_mount: str, visible: Any) -> list[dict[str, str]]:
    """General/data folders only (S4.1), each at a distinct absolute path not under the model."""
    cleaned: list[dict[str, str]] = []
    targets = {model_mount.rstrip("/")}
    for index, mount in enumerate(extra_mounts):
        field = f"extra_mounts[{index}]"
        if not isinstance(mount, Mapping) or "folder" not in mount:
            raise ValidationError({field: "Each additional mount is {'folder': <id>, 'target': <path>}."})
        folder = visible.filter(pk=mount["folder"]).first() if _is_uuid(mount["folder"]) else None
        if folder is None:
            raise ValidationError({field: f"No folder {mount['folder']!r} that you can use."})
        if folder.usage_mode == Folder.UsageMode.MODEL:
            raise ValidationError(
                {
                    field: f"Folder {folder.name!r} is a model folder; a model folder can not be an "
                    "additional mount. Mount it as the service's model folder instead."
                }
            )
        target = str(mount.get("target") or f"/home/work/{folder.name}")
        _check_mount_path(target, field + ".target")
        if target.rstrip("/") in targets:
            raise ValidationError({field + ".target": f"{target} is already used by another mount."})
        targets.add(target.rstrip("/"))
        cleaned.append({"folder": str(folder.pk), "target": target})
    return cleaned


def _check_mount_path(path: str, field: str) -> None:
    if not path.startswith("/") or "\x00" in path or ".." in path.split("/") or len(path) > 255:
        raise ValidationError({field: f"{path!r} must be an absolute path without '..', e.g. /models."})
    if path.rstrip("/") in SYSTEM_PATHS:
        raise ValidationError({field: f"{path} is a system path; choose one such as /models."})


def _check_definition_path(path: str) -> None:
    """The model definition file path names a file inside the model folder (storage.fs rules):
    refused now, with the reason, rather than when a replica starts."""
    from storage import fs

    try:
        fs.split_path(path)
    except fs.FsError as exc:
        raise ValidationError(
            {
                "model_definition_path": (
                    f"{exc.message} Give a path inside the model folder, such as model-definition.yaml."
                )
            }
        ) from None


def _is_uuid(value: object) -> bool:
    import uuid

    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _normalize_resources(raw: Mapping[str, Any] | None) -> dict[str, float]:
    from serving.core.definitions import replica_mem_problem

    try:
        normalized = slots.normalize(raw or {})
    except slots.SlotError as exc:
        raise ValidationError({"resources": str(exc)}) from None
    too_little = replica_mem_problem(normalized.get("mem", 0.0))
    if too_little:
        raise ValidationError({"resources": f"mem: {too_little}."})
    return normalized


# Linux refuses to exec a process with one "KEY=value" string of MAX_ARG_STRLEN (128 KiB) or more
# ("argument list too long"), and arguments plus environment share a limit of a few MiB.
MAX_ENV_VARIABLE_BYTES = 128 * 1024
MAX_ENV_TOTAL_BYTES = 1024 * 1024


def _check_environ(environ: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in environ.items():
        if not isinstance(key, str) or not definitions.ENV_NAME.match(key):
            raise ValidationError(
                {
                    "environ": f"{key!r} is not a valid environment variable name; use "
                    f"{definitions.ENV_NAME_RULE} (e.g. MODEL_NAME)."
                }
            )
        if problem := definitions.loader_variable_problem(key):
            raise ValidationError({"environ": problem})
        if isinstance(value, (dict, list)) or value is None:
            raise ValidationError({"environ": f"{key}: the value must be a string."})
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if "\x00" in text:
            raise ValidationError({"environ": f"{key}: the value must not contain NUL bytes."})
        out[key] = text
    return _check_environ_size(out)


def _check_environ_size(environ: dict[str, str]) -> dict[str, str]:
    """The kernel's limits on what a process is started with (checked again once the folder's
    service-definition.toml defaults are merged in: they count too)."""
    for key, text in environ.items():
        size = len(f"{key}={text}".encode())
        if size >= MAX_ENV_VARIABLE_BYTES:
            raise ValidationError(
                {
                    "environ": f"{key}: the variable is {size:,} bytes; the kernel starts no process with one of "
                    f"{MAX_ENV_VARIABLE_BYTES // 1024} KiB or more. Put large data in a file in the model folder."
                }
            )
    total = sum(len(f"{key}={text}".encode()) + 1 for key, text in environ.items())
    if total > MAX_ENV_TOTAL_BYTES:
        raise ValidationError(
            {
                "environ": f"The environment variables add up to {total:,} bytes; at most "
                f"{MAX_ENV_TOTAL_BYTES // 1024} KiB fit. Put large data in a file in the model folder."
            }
        )
    return environ


def _check_cluster_mode(cluster_mode: str) -> None:
    """Cluster mode (S4.1, serving.core.cluster): a replica of cluster size N is N containers, one main
    and N-1 subs; multi-node puts each on its own node, single-node puts them all on one node."""
    if cluster_mode not in Endpoint.ClusterMode.values:
        raise ValidationError(
            {"cluster_mode": f"Unknown cluster mode {cluster_mode!r}; choose single-node or multi-node."}
        )


def _check_resource_group(group: str) -> None:
    """A group some node serves (or ``default``, which a fresh installation's first node joins):
    a replica of a group no node has ever served would wait for a node for ever."""
    if group == "default" or Node.objects.filter(resource_group=group).exists():
        return
    known = sorted({"default", *Node.objects.values_list("resource_group", flat=True)})
    raise ValidationError(
        {
            "resource_group": f"No node serves resource group {group!r}; the groups are: {', '.join(known)}. "
            f"A node joins a group with NODE_RESOURCE_GROUP={group}."
        }
    )


def _check_shared_definition(endpoint: Endpoint, field: str = "folder") -> None:
    """Private mounts only with a model folder the owner alone can write (Endpoint.shared_definition_problem).

    ``field`` is the one the error is reported on: the folder when the service is configured, the
    replicas (``desired_replicas``) when a service configured before the rule scales up: it runs
    on, but gets no replica that would only fail at start."""
    problem = endpoint.shared_definition_problem()
    if problem:
        raise ValidationError({field: problem})


def _check_forward_cookies(forward_cookies: bool) -> None:
    """Cookies reach a service only when it has a host name of its own: with path-based addresses
    (``SERVING_PROXY_URL/e/<slug>/``) every service shares one origin, so a cookie one service
    sets would be sent to every other tenant's service, and their pages could read it."""
    if forward_cookies and not settings.SERVING_DOMAIN:
        raise ValidationError(
            {
                "forward_cookies": "Forward cookies needs each service on its own host name: here every service "
                "shares the proxy's address, so another tenant's service would receive and read these cookies. "
                "Ask the operator to set SERVING_DOMAIN (services then answer at <slug>.<domain>), or leave "
                "this off."
            }
        )


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValidationError({"runtime": f"Unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}."})


# --- services ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    """A checked launcher configuration (shared by create and validate)."""

    name: str
    folder: Folder
    runtime: str
    replicas: int
    open_to_public: bool
    forward_cookies: bool
    image: str
    resources: dict[str, float]
    environ: dict[str, str]
    model_mount: str
    model_definition_path: str
    extra_mounts: list[dict[str, str]]
    cluster_mode: str
    cluster_size: int
    resource_group: str
    preset: ResourcePreset | None
    project: Project | None


def _by_field(exc: ValidationError) -> dict[str, list[str]]:
    """A ValidationError's messages by field (``detail`` for one about the whole request)."""
    return exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}


def field_problems(field: str, value: Any) -> list[str]:
    """What is wrong with one launcher field on its own; the API asks this of every field it was
    given, so that one answer lists them all (DRF reports field errors before any cross-field
    rule runs). The actions check them again, with the rules that span fields."""
    checks: dict[str, Callable[[Any], Any]] = {
        "environ": _check_environ,
        "resources": _normalize_resources,
        "model_mount": lambda path: _check_mount_path(path, "model_mount"),
        "model_definition_path": _check_definition_path,
        "forward_cookies": _check_forward_cookies,
    }
    check = checks.get(field)
    if check is None or value in (None, "", {}):
        return []
    try:
        check(value)
    except ValidationError as exc:
        return [message for messages in _by_field(exc).values() for message in messages]
    return []


def check_service_config(
    *,
    acting_user: User,
    name: str,
    folder: Folder,
    runtime: str = "custom",
    replicas: int = 1,
    open_to_public: bool = False,
    forward_cookies: bool = False,
    image: str = "",
    resources: Mapping[str, Any] | None = None,
    environ: Mapping[str, Any] | None = None,
    model_mount: str = "/models",
    model_definition_path: str = "model-definition.yaml",
    extra_mounts: list[dict[str, Any]] | None = None,
    cluster_mode: str = Endpoint.ClusterMode.SINGLE_NODE,
    cluster_size: int = 1,
    resource_group: str = "default",
    preset: ResourcePreset | None = None,
    project: Project | None = None,
) -> ServiceConfig:
    """Check a launcher configuration and fill what it leaves out.

    Image, resources and environment not given fall back to the folder's
    ``service-definition.toml`` section for the runtime (S3.2), then to the platform defaults.
    """
    from serving import folders

    # Every check runs and every problem is reported at once, each under its field: a launcher
    # that shows one error per submit makes the user fix them one round trip at a time.
    errors: dict[str, list[str]] = {}

    def attempt(check: Callable[..., Any], *args: Any, fallback: Any = None) -> Any:
        try:
            return check(*args)
        except ValidationError as exc:
            for field, messages in _by_field(exc).items():
                errors.setdefault(field, []).extend(messages)
            return fallback

    attempt(_check_runtime, runtime)
    attempt(_check_forward_cookies, forward_cookies)
    attempt(_check_model_folder, folder)
    attempt(_check_mount_path, model_mount, "model_mount")
    if model_definition_path:
        attempt(_check_definition_path, model_definition_path)
    visible = Folder.objects.visible_to(acting_user)
    mounts = attempt(_check_extra_mounts, list(extra_mounts or []), model_mount, visible, fallback=[])
    defaults = (
        folders.folder_defaults(folder, runtime if runtime in RUNTIMES else "custom")
        if folder is not None
        else folders.FolderDefaults()
    )
    if preset is not None:
        resource_slots = preset.slots()
    elif resources:
        resource_slots = attempt(_normalize_resources, resources, fallback={})
    else:
        resource_slots = dict(defaults.resources)
    merged_environ = {**defaults.environ, **attempt(_check_environ, dict(environ or {}), fallback={})}
    if "environ" not in errors:
        attempt(_check_environ_size, merged_environ)
    attempt(_check_cluster_mode, cluster_mode)
    attempt(_check_resource_group, resource_group or "default")
    config = ServiceConfig(
        name=name,
        folder=folder,
        runtime=runtime,
        replicas=replicas,
        open_to_public=open_to_public,
        forward_cookies=forward_cookies,
        image=image or defaults.image or settings.DEFAULT_IMAGE,
        resources=resource_slots,
        environ=merged_environ,
        model_mount=model_mount,
        model_definition_path=model_definition_path or "model-definition.yaml",
        extra_mounts=mounts,
        cluster_mode=cluster_mode,
        cluster_size=cluster_size,
        resource_group=resource_group or "default",
        preset=preset,
        project=project,
    )
    endpoint = _build(config, acting_user)
    attempt(_check_shared_definition, endpoint)
    attempt(
        lambda: endpoint.full_clean(
            exclude=["slug", "owner", "model_folder", "preset", "project"], validate_constraints=False
        )
    )
    if errors:
        raise ValidationError(errors)
    return config


def _build(config: ServiceConfig, owner: User) -> Endpoint:
    return Endpoint(
        name=config.name,
        owner=owner,
        project=config.project,
        model_folder=config.folder,
        runtime=config.runtime,
        model_mount=config.model_mount,
        model_definition_path=config.model_definition_path,
        extra_mounts=config.extra_mounts,
        desired_replicas=config.replicas,
        image=config.image,
        resources=config.resources,
        preset=config.preset,
        resource_group=config.resource_group,
        cluster_mode=config.cluster_mode,
        cluster_size=config.cluster_size,
        environ=config.environ,
        open_to_public=config.open_to_public,
        forward_cookies=config.forward_cookies,
    )


def _name_taken(owner: User, name: str) -> ValidationError:
    return ValidationError({"name": f"You already have a service named {name!r}; choose another name."})


@transaction.atomic
def do_create_service(*, acting_user: User, **fields: Any) -> Endpoint:
    """Create a model service (S4.1); its replicas are started by reconciliation after commit."""
    config = check_service_config(acting_user=acting_user, **fields)
    if Endpoint.objects.live().filter(owner=acting_user, name=config.name).exists():
        raise _name_taken(acting_user, config.name)
    endpoint = _build(config, acting_user)
    try:
        with transaction.atomic():
            endpoint.save()
    except IntegrityError:
        raise _name_taken(acting_user, config.name) from None
    record_event(
        endpoint,
        "created",
        f"Service {config.name!r} created with {config.replicas} replica(s) of runtime {config.runtime}.",
        actor=acting_user,
        data={"replicas": config.replicas, "runtime": config.runtime, "image": endpoint.image},
    )
    _kick(endpoint.pk)
    return endpoint


def do_validate_service(*, acting_user: User, timeout: float | None = None, **fields: Any) -> str:
    """Run the configuration once as a throwaway replica (S4.2); returns the validation id.

    Its events and log stream to the websocket ``/ws/validations/<id>/`` until ``finished``.
    """
    from serving.bus import dryrun as validation
    from serving.control import scheduler

    config = check_service_config(acting_user=acting_user, **fields)
    endpoint = _build(config, acting_user)
    with transaction.atomic():
        choice = scheduler.choose_node(endpoint, scheduler.replica_request(endpoint), timezone.now())
    if choice.node is None:
        raise ValidationError({"resources": choice.reason})
    validation_id = validation.new_id()
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
    }
    request = validation.ValidationRequest(
        id=validation_id,
        user_id=acting_user.pk,
        node=choice.node.name,
        config=payload,
        timeout=timeout or validation.DEFAULT_TIMEOUT,
    )
    validation.save_request(request)
    validation.publish(validation_id, "lifecycle", message=f"Validation queued on node {choice.node.name}.")
    dispatch.send_validation(validation_id, choice.node)
    return validation_id


@transaction.atomic
def do_modify_service(endpoint: Endpoint, *, acting_user: User, changes: Mapping[str, Any]) -> Endpoint:
    """Apply only the fields that changed (S4.5).

    A change of replicas scales; a change of image, definition, resources, mounts or environment
    bumps ``spec_version`` so that reconciliation replaces replicas one at a time, each new one
    healthy before an old one is drained.
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
            _check_model_folder(value)
        elif field == "runtime":
            _check_runtime(value)
        elif field == "resources":
            value = _normalize_resources(value)
        elif field == "environ":
            value = _check_environ(value)
        elif field == "model_mount":
            _check_mount_path(value, "model_mount")
        elif field == "model_definition_path" and value:
            _check_definition_path(value)
        elif field == "forward_cookies" and value and not endpoint.forward_cookies:
            _check_forward_cookies(value)
        elif field == "resource_group" and value != endpoint.resource_group:
            _check_resource_group(value or "default")
        elif field == "extra_mounts":
            value = _check_extra_mounts(list(value or []), changes.get("model_mount", endpoint.model_mount), visible)
        elif (
            field == "name"
            and value != endpoint.name
            and Endpoint.objects.live().filter(owner=endpoint.owner, name=value).exclude(pk=endpoint.pk).exists()
        ):
            raise ValidationError({"name": f"You already have a service named {value!r}; choose another name."})
        if getattr(endpoint, field) != value:
            applied[field] = value
            setattr(endpoint, field, value)
    _check_cluster_mode(endpoint.cluster_mode)
    if not applied:
        return endpoint
    # Every change that places new replicas is checked, not only a change of the folders: a service
    # configured before the rule would otherwise get replicas that all fail at start
    # (replicas.build_spec), until MAX_START_FAILURES.
    if REPLACING_FIELDS & applied.keys():
        _check_shared_definition(endpoint)
    elif applied.get("desired_replicas", 0) > old_replicas:
        _check_shared_definition(endpoint, "desired_replicas")
    endpoint.full_clean(exclude=["slug", "owner", "model_folder", "preset", "project"], validate_constraints=False)
    if REPLACING_FIELDS & applied.keys():
        endpoint.spec_version += 1
    endpoint.retries = 0
    endpoint.save()
    shown = {k: (str(v.pk) if hasattr(v, "pk") else v) for k, v in applied.items()}
    record_event(
        endpoint,
        "modified",
        f"Changed {', '.join(sorted(applied))}."
        + (" Replicas will be replaced one at a time." if REPLACING_FIELDS & applied.keys() else ""),
        actor=acting_user,
        data={"changes": shown, "spec_version": endpoint.spec_version},
    )
    _publish_routing(endpoint.pk)  # e.g. open_to_public, forward_cookies apply in the proxy at once
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
        _check_shared_definition(endpoint, "desired_replicas")
    changed = Endpoint.objects.filter(pk=endpoint.pk, lifecycle=Endpoint.Lifecycle.CREATED).update(
        desired_replicas=replicas, updated_at=timezone.now()
    )
    if not changed:
        return False
    endpoint.desired_replicas = replicas
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
        _publish_routing(endpoint.pk)
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


# --- tokens --------------------------------------------------------------------------------------


def _publish_routing(endpoint_id: Any) -> None:
    from serving.bus import routing

    transaction.on_commit(lambda: routing.publish_endpoint_safely(str(endpoint_id)))


@transaction.atomic
def do_issue_token(endpoint: Endpoint, *, acting_user: User, expires_at: datetime) -> tuple[EndpointToken, str]:
    """Generate a token for a private endpoint (S7.1); returns the row and the token (shown once)."""
    if endpoint.lifecycle != Endpoint.Lifecycle.CREATED:
        raise ValidationError({"detail": "A terminated service can not get new tokens."})
    if expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry date must be in the future."})
    minted = tokens.mint(tokens.ENDPOINT_TOKEN_KIND, settings.TOKEN_HMAC_KEY)
    token = EndpointToken.objects.create(
        endpoint=endpoint,
        created_by=acting_user,
        lookup=minted.lookup,
        digest=minted.digest,
        expires_at=expires_at,
    )
    record_event(
        endpoint,
        "token_issued",
        f"Token {token.prefix}… issued, expires {expires_at.isoformat()}.",
        actor=acting_user,
        data={"token_id": str(token.pk)},
    )
    _publish_routing(endpoint.pk)
    return token, minted.token


@transaction.atomic
def do_revoke_token(token: EndpointToken, *, acting_user: User | None) -> None:
    """Revoke a token; every proxy refuses it within a second (pub/sub)."""
    if EndpointToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        record_event(
            token.endpoint,
            "token_revoked",
            f"Token {token.prefix}… revoked.",
            actor=acting_user,
            data={"token_id": str(token.pk)},
        )
    _publish_routing(token.endpoint_id)


# --- autoscaling rules ---------------------------------------------------------------------------


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


def do_record_token_usage(used: Mapping[str, float]) -> int:
    """Move the proxies' batched last-use times onto the tokens (never a DB write per request).

    ``used`` maps a token's lookup to epoch seconds. A time only moves forward, so an old batch
    replayed late cannot hide a newer use. No audit event: this is bookkeeping, not a change anyone
    made. Returns how many tokens were updated."""
    if not used:
        return 0
    changed = []
    with transaction.atomic():
        for token in EndpointToken.objects.select_for_update().filter(lookup__in=list(used)):
            when = datetime.fromtimestamp(used[token.lookup], tz=timezone.get_current_timezone())
            if token.last_used_at is None or when > token.last_used_at:
                token.last_used_at = when
                changed.append(token)
        EndpointToken.objects.bulk_update(changed, ["last_used_at"])
    return len(changed)
