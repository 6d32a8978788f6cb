"""The checks of a launcher configuration, shared by the actions that write it (docs/architecture.md).

Everything here validates and writes nothing: the fields a change may touch (``MODIFIABLE_FIELDS``)
and which of them replace replicas (``REPLACING_FIELDS``), the per-field ``check_*`` helpers that
raise ``ValidationError`` under the field at fault, ``field_problems`` (one field on its own, for
the API), and ``check_service_config``, which checks a whole configuration at once and fills what
it leaves out into a ``ServiceConfig``. The actions in ``serving.actions.services`` call them before
they write; the pages and the API call them to report problems early.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from accounts.models import Project, User
from serving import folders
from serving.core import architecture, definitions, devices, slots
from serving.core.definitions import replica_mem_problem, writes
from serving.core.runtimes import RUNTIMES
from serving.models import Endpoint, ModelAlias, Node, ResourcePreset, RetryPolicy, served_model_names
from storage import fs
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
    "retry_policy",
    "idle_timeout",
    "model_names",
}


# --- validation shared by create and modify ------------------------------------------------------


def check_model_folder(folder: Folder | None) -> None:
    if folder is None:
        raise ValidationError({"folder": "Choose the model folder to mount."})
    if folder.usage_mode != Folder.UsageMode.MODEL:
        raise ValidationError(
            {
                "folder": f"Folder {folder.name!r} is a {folder.usage_mode} folder; a service mounts a "
                "model folder. Change its usage mode to 'model' or choose another folder."
            }
        )


def check_extra_mounts(extra_mounts: list[dict[str, Any]], model_mount: str, visible: Any) -> list[dict[str, str]]:
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
        check_mount_path(target, field + ".target")
        if target.rstrip("/") in targets:
            raise ValidationError({field + ".target": f"{target} is already used by another mount."})
        targets.add(target.rstrip("/"))
        cleaned.append({"folder": str(folder.pk), "target": target})
    return cleaned


def check_mount_path(path: str, field: str) -> None:
    if not path.startswith("/") or "\x00" in path or ".." in path.split("/") or len(path) > 255:
        raise ValidationError({field: f"{path!r} must be an absolute path without '..', e.g. /models."})
    if path.rstrip("/") in SYSTEM_PATHS:
        raise ValidationError({field: f"{path} is a system path; choose one such as /models."})


def check_definition_path(path: str) -> None:
    """The model definition file path names a file inside the model folder (storage.fs rules):
    refused now, with the reason, rather than when a replica starts."""
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
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def normalize_resources(raw: Mapping[str, Any] | None) -> dict[str, float]:
    try:
        normalized = slots.normalize(raw or {})
    except slots.SlotError as exc:
        raise ValidationError({"resources": str(exc)}) from None
    too_little = replica_mem_problem(normalized.get("mem", 0.0))
    if too_little:
        raise ValidationError({"resources": f"mem: {too_little}."})
    try:
        devices.check_request(normalized.get(devices.SHARES, 0.0))
    except devices.DeviceError as exc:
        raise ValidationError({"resources": str(exc)}) from None
    return normalized


# Linux refuses to exec a process with one "KEY=value" string of MAX_ARG_STRLEN (128 KiB) or more
# ("argument list too long"), and arguments plus environment share a limit of a few MiB.
MAX_ENV_VARIABLE_BYTES = 128 * 1024
MAX_ENV_TOTAL_BYTES = 1024 * 1024


def check_environ(environ: Mapping[str, Any]) -> dict[str, str]:
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


def check_cluster_mode(cluster_mode: str) -> None:
    """Cluster mode (S4.1, serving.cluster): a replica of cluster size N is N containers, one main
    and N-1 subs; multi-node puts each on its own node, single-node puts them all on one node."""
    if cluster_mode not in Endpoint.ClusterMode.values:
        raise ValidationError(
            {"cluster_mode": f"Unknown cluster mode {cluster_mode!r}; choose single-node or multi-node."}
        )


def check_resource_group(group: str) -> None:
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


def check_shared_definition(endpoint: Endpoint, field: str = "folder") -> None:
    """Private mounts only with a model folder the owner alone can write (Endpoint.shared_definition_problem).

    ``field`` is the one the error is reported on: the folder when the service is configured, the
    replicas (``desired_replicas``) when a service configured before the rule scales up: it runs
    on, but gets no replica that would only fail at start."""
    problem = endpoint.shared_definition_problem()
    if problem:
        raise ValidationError({field: problem})


def check_forward_cookies(forward_cookies: bool) -> None:
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


MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


def check_model_names(names: Any, endpoint: Endpoint) -> list[str]:
    """A service's declared model names (issue 17): a list of distinct names, none served by another
    live service of its project (or, without a project, of its owner)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValidationError({"model_names": 'Give model_names as a list of strings, e.g. ["llama-3-8b"].'})
    if len(names) > 32 or len(set(names)) != len(names):
        raise ValidationError({"model_names": "Give at most 32 model names, each once."})
    for name in names:
        if not MODEL_NAME_RE.match(name):
            raise ValidationError(
                {
                    "model_names": f"{name!r} is not a model name: use up to 128 letters, digits and . _ : / @ + -, "
                    "starting with a letter or digit."
                }
            )
    # A default name (MODEL_NAME, else the service's name) is not held to the services' rule: two
    # services made from one folder (staging and production) share a default, and the gateway sends
    # that name to whichever of them has a healthy replica. Declared names are a promise: unique.
    wanted = names or served_model_names(endpoint)
    peers = Endpoint.objects.live().exclude(pk=endpoint.pk) if names else Endpoint.objects.none()
    peers = (
        peers.filter(project=endpoint.project)
        if endpoint.project_id
        else peers.filter(owner=endpoint.owner_id, project__isnull=True)
    )
    # (A service of the same owner and name is the name rule's to report, in its own words.)
    for peer in peers.exclude(owner=endpoint.owner_id, name=endpoint.name).only("name", "environ", "model_names"):
        taken = set(served_model_names(peer)) & set(wanted)
        if taken:
            raise ValidationError(
                {
                    "model_names": f"Service {peer.name!r} already serves {sorted(taken)[0]!r}: model names are "
                    "unique per project; choose another name (or an alias for several services)."
                }
            )
    aliases = (
        ModelAlias.objects.filter(project=endpoint.project)
        if endpoint.project_id
        else ModelAlias.objects.filter(owner=endpoint.owner_id, project__isnull=True)
    )
    clash = aliases.filter(name__in=wanted).values_list("name", flat=True).first()
    if clash is not None:
        raise ValidationError(
            {
                "model_names": f"The alias {clash!r} already answers to that name: model names are unique per "
                "project; choose another name, or add this service to the alias as a backend."
            }
        )
    return list(names)


def check_retry_policy(policy: str) -> None:
    if policy not in RetryPolicy.values:
        raise ValidationError(
            {
                "retry_policy": f"Unknown retry policy {policy!r}; choose safe (only idempotent requests are "
                "re-sent to another replica), inference (also POSTs to inference paths such as "
                "/v1/chat/completions, the default) or all."
            }
        )


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValidationError({"runtime": f"Unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}."})


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
    retry_policy: str
    idle_timeout: int | None
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
    architecture: str = ""
    model_names: tuple[str, ...] = ()
    # What is valid but will fail at run time (a cache variable under the read-only model folder).
    warnings: tuple[str, ...] = ()


def _by_field(exc: ValidationError) -> dict[str, list[str]]:
    """A ValidationError's messages by field (``detail`` for one about the whole request)."""
    return exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}


def field_problems(field: str, value: Any) -> list[str]:
    """What is wrong with one launcher field on its own; the API asks this of every field it was
    given, so that one answer lists them all (DRF reports field errors before any cross-field
    rule runs). The actions check them again, with the rules that span fields."""
    checks: dict[str, Callable[[Any], Any]] = {
        "environ": check_environ,
        "resources": normalize_resources,
        "model_mount": lambda path: check_mount_path(path, "model_mount"),
        "model_definition_path": check_definition_path,
        "forward_cookies": check_forward_cookies,
        "retry_policy": check_retry_policy,
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
    retry_policy: str = RetryPolicy.INFERENCE,
    idle_timeout: int | None = None,
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
    model_names: list[str] | None = None,
) -> ServiceConfig:
    """Check a launcher configuration and fill what it leaves out.

    Image, resources and environment not given fall back to the folder's
    ``service-definition.toml`` section for the runtime (S3.2), then to the platform defaults.
    """
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

    attempt(check_runtime, runtime)
    attempt(check_forward_cookies, forward_cookies)
    attempt(check_retry_policy, retry_policy)
    attempt(check_model_folder, folder)
    attempt(check_mount_path, model_mount, "model_mount")
    if model_definition_path:
        attempt(check_definition_path, model_definition_path)
    visible = Folder.objects.visible_to(acting_user)
    mounts = attempt(check_extra_mounts, list(extra_mounts or []), model_mount, visible, fallback=[])
    defaults = (
        folders.folder_defaults(folder, runtime if runtime in RUNTIMES else "custom")
        if folder is not None
        else folders.FolderDefaults()
    )
    if preset is not None:
        resource_slots = preset.slots()
    elif resources:
        resource_slots = attempt(normalize_resources, resources, fallback={})
    else:
        resource_slots = dict(defaults.resources)
    shmem = defaults.resource_opts.get("shmem")
    if shmem and isinstance(resource_slots, dict) and "shm" not in resource_slots:
        # [runtime.resource_opts] shmem (Backend.AI's spelling) is the replica's /dev/shm size.
        resource_slots["shm"] = float(shmem)
    merged_environ = {**defaults.environ, **attempt(check_environ, dict(environ or {}), fallback={})}
    if "environ" not in errors:
        attempt(_check_environ_size, merged_environ)
    attempt(check_cluster_mode, cluster_mode)
    attempt(check_resource_group, resource_group or "default")
    config = ServiceConfig(
        name=name,
        folder=folder,
        runtime=runtime,
        replicas=replicas,
        open_to_public=open_to_public,
        forward_cookies=forward_cookies,
        retry_policy=retry_policy,
        idle_timeout=idle_timeout,
        image=image or defaults.image or settings.DEFAULT_IMAGE,
        # The folder's image comes with the architecture it is built for; an image given here, not.
        architecture="" if image else architecture.normalize(defaults.architecture),
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
        model_names=tuple(model_names or ()),
        # The folder's [runtime.environ] and the launcher's variables, merged as the replica gets them.
        warnings=tuple(writes.environ_warnings(merged_environ, model_mount)),
    )
    endpoint = build(config, acting_user)
    attempt(check_model_names, list(config.model_names), endpoint)
    attempt(check_shared_definition, endpoint)
    attempt(
        lambda: endpoint.full_clean(
            exclude=["slug", "owner", "model_folder", "preset", "project"], validate_constraints=False
        )
    )
    if errors:
        raise ValidationError(errors)
    return config


def build(config: ServiceConfig, owner: User) -> Endpoint:
    return Endpoint(
        architecture=config.architecture,
        name=config.name,
        owner=owner,
        project=config.project,
        model_names=list(config.model_names),
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
        retry_policy=config.retry_policy,
        idle_timeout=config.idle_timeout,
    )
