"""The services list, the service launcher (create, S4.1), its modify mode (S4.5), terminate (S4.6)
and the launcher's Validate call (S4.2).

The launcher is a plain HTML form. Its fields are turned into the REST API's body (one function,
``form_to_api``) and go through the API's own serializers and the same actions as the API, so the
rules live in one place: this module only maps their errors back onto the fields.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods, require_POST
from rest_framework.exceptions import ValidationError as DRFValidationError

from accounts.models import Project
from serving.actions import services
from serving.core import slots
from serving.core.runtimes import RUNTIMES
from serving.models import (
    Endpoint,
    EndpointStatus,
    Node,
    ResourcePreset,
    RetryPolicy,
    Route,
    endpoint_name_validator,
)
from serving.web.access import access_endpoint, can_write_endpoint
from serving.web.api.serializers import ServiceCreateSerializer, ServiceModifySerializer
from storage import modelstore
from storage.models import Folder

# Accelerator slots offered in the launcher (any "<vendor>.<unit>" is accepted by the API).
ACCELERATORS = ("cuda.shares", "cuda.device")
# Environment variables that say a server answers the OpenAI API with a named model (S8).
MODEL_NAME_VARIABLES = ("MODEL_NAME", "BACKEND_MODEL_NAME")
FORM_FIELDS = (
    "name",
    "open_to_public",
    "forward_cookies",
    "retry_policy",
    "idle_timeout",
    "project",
    "folder",
    "runtime",
    "model_mount",
    "model_definition_path",
    "extra_mounts",
    "replicas",
    "image",
    "resource_group",
    "preset",
    "resources",
    "cluster_mode",
    "cluster_size",
    "environ",
)


# --- helpers shared by the pages -----------------------------------------------------------------


def detail_url(endpoint_id: Any) -> str:
    """The service page (made in serving/web/pages/detail.py); the list until it exists."""
    try:
        return reverse("serving:detail", kwargs={"pk": endpoint_id})
    except NoReverseMatch:
        return reverse("serving:list")


def chat_url(endpoint_id: Any) -> str:
    try:
        return reverse("serving:chat", kwargs={"pk": endpoint_id})
    except NoReverseMatch:
        return f"{reverse('serving:list')}{endpoint_id}/chat/"


def offers_chat(runtime: str, environ: dict[str, Any]) -> bool:
    """An LLM service (S8): an OpenAI-compatible runtime, or a custom server that names its model."""
    variant = RUNTIMES.get(runtime)
    if variant is not None and variant.openai_compatible:
        return True
    return any(environ.get(name) for name in MODEL_NAME_VARIABLES)


def _healthy(routes: list[Route]) -> int:
    return sum(1 for route in routes if route.status == Route.Status.HEALTHY)


# --- services list -------------------------------------------------------------------------------

# The list's sortable columns (?sort=<key>, or -<key> for the other way); static/js/services.js sorts
# the rendered rows the same way without a reload. Statuses sort in the order a user acts on them.
SORT_KEYS = ("name", "status", "replicas", "created")
STATUS_ORDER = {
    status: index
    for index, status in enumerate(
        ("UNHEALTHY", "DEGRADED", "PROVISIONING", "READY", "SLEEPING", "HEALTHY", "TERMINATING")
    )
}
DEFAULT_SORT = "-created"


def _sort_value(row: dict[str, Any], key: str) -> Any:
    endpoint = row["endpoint"]
    if key == "name":
        return (endpoint.name.casefold(), endpoint.created_at)
    if key == "status":
        return (STATUS_ORDER.get(row["status"], len(STATUS_ORDER)), endpoint.name.casefold())
    if key == "replicas":
        return (row["healthy"], endpoint.desired_replicas, endpoint.name.casefold())
    return endpoint.created_at


def sort_and_search(rows: list[dict[str, Any]], sort: str, query: str) -> tuple[list[dict[str, Any]], str]:
    """The rows whose name, runtime or status contains ``query`` (any case), sorted by ``sort``;
    an unknown sort key falls back to newest first, which is returned with the rows."""
    words = query.casefold().split()
    if words:
        rows = [
            row
            for row in rows
            if all(
                word
                in " ".join(
                    (row["endpoint"].name, row["endpoint"].runtime, row["status"], row["status_label"])
                ).casefold()
                for word in words
            )
        ]
    if sort.lstrip("-") not in SORT_KEYS:
        sort = DEFAULT_SORT
    key = sort.lstrip("-")
    return sorted(rows, key=lambda row: _sort_value(row, key), reverse=sort.startswith("-")), sort


@login_required
def services_list(request: HttpRequest) -> HttpResponse:
    """Every service the user can see, with filters by status and by owner / project; live."""
    user = request.user
    status_filter = request.GET.get("status", "")
    scope = request.GET.get("scope", "")
    query = request.GET.get("q", "").strip()[:200]
    projects = list(Project.objects.of(user).order_by("name"))
    queryset = (
        Endpoint.objects.visible_to(user)
        .live()
        .select_related("owner", "project", "model_folder")
        .prefetch_related(Prefetch("routes", queryset=Route.objects.all()))
    )
    if scope == "mine":
        queryset = queryset.filter(owner_id=user.pk)
    elif scope.startswith("project:") and scope[8:].isdigit():
        queryset = queryset.filter(project_id=int(scope[8:]))
    else:
        scope = ""
    statuses = [(value, label) for value, label in EndpointStatus.choices if value != EndpointStatus.DESTROYED]
    if status_filter not in {value for value, _label in statuses}:
        status_filter = ""
    rows = []
    for endpoint in queryset:
        routes = list(endpoint.routes.all())
        status = endpoint.compute_status(routes)
        if status_filter and status != status_filter:
            continue
        rows.append(
            {
                "endpoint": endpoint,
                "status": status,
                "status_label": str(EndpointStatus(status).label),
                "healthy": _healthy(routes),
                "can_write": can_write_endpoint(user, endpoint),
                "chat": offers_chat(endpoint.runtime, endpoint.environ),
                "detail_url": detail_url(endpoint.pk),
                "chat_url": chat_url(endpoint.pk),
            }
        )
    rows, sort = sort_and_search(rows, request.GET.get("sort", ""), query)
    columns = [("name", _("Name")), ("status", _("Status")), ("replicas", _("Replicas")), ("created", _("Created"))]
    return render(
        request,
        "serving/services_list.html",
        {
            "rows": rows,
            "sort": sort,
            "query": query,
            "sort_links": {key: _sort_link(request, key, sort) for key, _label in columns},
            "statuses": statuses,
            "status_labels": {value: str(label) for value, label in EndpointStatus.choices},
            "status_filter": status_filter,
            "scope": scope,
            "scope_choices": [("mine", _("Mine"))]
            + [(f"project:{p.pk}", _("Project %(name)s") % {"name": p.name}) for p in projects],
            "filtered": bool(status_filter or scope or query),
            "url_templates": {
                "detail": detail_url("00000000-0000-0000-0000-000000000000"),
                "chat": chat_url("00000000-0000-0000-0000-000000000000"),
                "modify": reverse("serving:modify", kwargs={"pk": "00000000-0000-0000-0000-000000000000"}),
                "terminate": reverse("serving:terminate", kwargs={"pk": "00000000-0000-0000-0000-000000000000"}),
            },
            "chat_runtimes": [name for name, variant in RUNTIMES.items() if variant.openai_compatible],
            "model_name_variables": list(MODEL_NAME_VARIABLES),
        },
    )


def _sort_link(request: HttpRequest, key: str, current: str) -> dict[str, str]:
    """A column header's link (the other direction when it is the current sort) and its aria-sort."""
    params = request.GET.copy()
    ascending = current == key
    params["sort"] = f"-{key}" if ascending else key
    aria = "ascending" if current == key else "descending" if current == f"-{key}" else "none"
    return {"href": "?" + params.urlencode(), "aria": aria}


@login_required
@require_http_methods(["GET", "POST"])
def terminate(request: HttpRequest, pk: str) -> HttpResponse:
    """Terminate with confirmation (S4.6): GET asks, POST stops every replica."""
    endpoint = access_endpoint(request.user, pk, write=True)
    if request.method == "POST":
        services.do_terminate_service(endpoint, acting_user=request.user)  # type: ignore[arg-type]
        messages.success(
            request,
            _("Service %(name)s is being terminated: its replicas are stopping.") % {"name": endpoint.name},
        )
        return redirect("serving:list")
    return render(request, "serving/terminate.html", {"endpoint": endpoint, "detail_url": detail_url(endpoint.pk)})


# --- the launcher: form <-> API body -------------------------------------------------------------


def _rows(post: Any, *names: str) -> list[tuple[str, ...]]:
    columns = [post.getlist(name) for name in names]
    length = max((len(c) for c in columns), default=0)
    return [tuple((c[i] if i < len(c) else "").strip() for c in columns) for i in range(length)]


def form_to_api(post: Any) -> dict[str, Any]:
    """The launcher's fields as the body of ``POST /api/v1/services/`` (docs/architecture.md)."""
    data: dict[str, Any] = {
        "name": post.get("name", "").strip(),
        "open_to_public": post.get("open_to_public") in {"on", "true", "1"},
        "forward_cookies": post.get("forward_cookies") in {"on", "true", "1"},
        "retry_policy": post.get("retry_policy", "").strip() or RetryPolicy.INFERENCE,
        "idle_timeout": post.get("idle_timeout", "").strip() or None,
        "folder": post.get("folder", ""),
        "runtime": post.get("runtime", "custom"),
        "model_mount": post.get("model_mount", "").strip() or "/models",
        "model_definition_path": post.get("model_definition_path", "").strip() or "model-definition.yaml",
        "replicas": post.get("replicas", "").strip() or "1",
        "image": post.get("image", "").strip(),
        "resource_group": post.get("resource_group", "").strip() or "default",
        "cluster_mode": post.get("cluster_mode", Endpoint.ClusterMode.SINGLE_NODE),
        "cluster_size": post.get("cluster_size", "").strip() or "1",
        "project": post.get("project") or None,
        "environ": {key: value for key, value in _rows(post, "env_key", "env_value") if key or value},
        "extra_mounts": [
            {"folder": folder, "target": target}
            for folder, target in _rows(post, "mount_folder", "mount_target")
            if folder or target
        ],
    }
    if post.get("resource_mode") == "preset" and post.get("preset"):
        data["preset"] = post.get("preset")
    else:
        resources: dict[str, str] = {}
        for key in ("cpu", "mem"):
            if post.get(key, "").strip():
                resources[key] = post.get(key).strip()
        kind, amount = post.get("accelerator", "").strip(), post.get("accelerator_amount", "").strip()
        if kind and amount and amount not in {"0", "0.0"}:
            resources[kind] = amount
        data["resources"] = resources
    return data


def _first_text(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [f"{key}: {text}" for key, inner in value.items() for text in _first_text(inner)]
    if isinstance(value, list):
        return [text for item in value for text in _first_text(item)]
    return [str(value)]


_FIELD_OF = {
    "desired_replicas": "replicas",
    "model_folder": "folder",
    "non_field_errors": "form",
    "__all__": "form",
    "detail": "form",
    "slug": "name",
}


def field_errors(exc: Exception) -> dict[str, list[str]]:
    """The API's errors (serializer or action), keyed by launcher field; "form" for the rest."""
    raw: Any
    if isinstance(exc, DRFValidationError):
        raw = exc.detail
    elif isinstance(exc, DjangoValidationError):
        raw = exc.message_dict if hasattr(exc, "error_dict") else {"form": exc.messages}
    else:
        raw = {"form": [str(exc)]}
    if not isinstance(raw, dict):
        raw = {"form": raw}
    errors: dict[str, list[str]] = {}
    for key, value in raw.items():
        name = _FIELD_OF.get(str(key), str(key))
        base = name.split("[", 1)[0].split(".", 1)[0]
        texts = _first_text(value)
        if base == "extra_mounts" and name != base:
            row = name[len("extra_mounts[") :].split("]", 1)[0]
            texts = (
                [_("Mount %(row)s: %(error)s") % {"row": int(row) + 1, "error": t} for t in texts]
                if row.isdigit()
                else texts
            )
        if base == "extra_mounts" and isinstance(value, dict):
            texts = [
                _("Mount %(row)s: %(error)s") % {"row": int(k) + 1, "error": t}
                for k, inner in value.items()
                for t in _first_text(inner)
            ]
        if base not in FORM_FIELDS:
            texts = [f"{key}: {t}" for t in texts] if base != "form" else texts
            base = "form"
        errors.setdefault(base, []).extend(texts)
    return errors


def _mem_text(value: float) -> str:
    """Bytes as the shortest exact size a user would type: 256m, 1g, 1536m."""
    number = int(value)
    for suffix, size in (("t", 1024**4), ("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if number and number % size == 0:
            return f"{number // size}{suffix}"
    return str(number)


def _number_text(value: float) -> str:
    return f"{value:g}"


@dataclass
class LauncherValues:
    """What the launcher form shows (strings, as the user typed or as the defaults say)."""

    name: str = ""
    open_to_public: bool = False
    forward_cookies: bool = False
    retry_policy: str = RetryPolicy.INFERENCE
    idle_timeout: str = ""
    project: str = ""
    folder: str = ""
    runtime: str = "custom"
    model_mount: str = "/models"
    model_definition_path: str = "model-definition.yaml"
    extra_mounts: list[dict[str, str]] = field(default_factory=list)
    replicas: str = "1"
    image: str = ""
    resource_group: str = "default"
    resource_mode: str = "custom"
    preset: str = ""
    cpu: str = ""
    mem: str = ""
    accelerator: str = ACCELERATORS[0]
    accelerator_amount: str = ""
    cluster_mode: str = Endpoint.ClusterMode.SINGLE_NODE
    cluster_size: str = "1"
    environ: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_post(cls, post: Any) -> LauncherValues:
        return cls(
            name=post.get("name", ""),
            open_to_public=post.get("open_to_public") in {"on", "true", "1"},
            forward_cookies=post.get("forward_cookies") in {"on", "true", "1"},
            retry_policy=post.get("retry_policy", "") or RetryPolicy.INFERENCE,
            idle_timeout=post.get("idle_timeout", ""),
            project=post.get("project", ""),
            folder=post.get("folder", ""),
            runtime=post.get("runtime", "custom"),
            model_mount=post.get("model_mount", ""),
            model_definition_path=post.get("model_definition_path", ""),
            extra_mounts=[{"folder": f, "target": t} for f, t in _rows(post, "mount_folder", "mount_target") if f or t],
            replicas=post.get("replicas", ""),
            image=post.get("image", ""),
            resource_group=post.get("resource_group", ""),
            resource_mode="preset" if post.get("resource_mode") == "preset" else "custom",
            preset=post.get("preset", ""),
            cpu=post.get("cpu", ""),
            mem=post.get("mem", ""),
            accelerator=post.get("accelerator", "") or ACCELERATORS[0],
            accelerator_amount=post.get("accelerator_amount", ""),
            cluster_mode=post.get("cluster_mode", Endpoint.ClusterMode.SINGLE_NODE),
            cluster_size=post.get("cluster_size", "1"),
            environ=[(k, v) for k, v in _rows(post, "env_key", "env_value") if k or v],
        )

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint) -> LauncherValues:
        values = cls(
            name=endpoint.name,
            open_to_public=endpoint.open_to_public,
            forward_cookies=endpoint.forward_cookies,
            retry_policy=endpoint.retry_policy,
            idle_timeout="" if endpoint.idle_timeout is None else str(endpoint.idle_timeout),
            project=str(endpoint.project_id or ""),
            folder=str(endpoint.model_folder_id or ""),
            runtime=endpoint.runtime,
            model_mount=endpoint.model_mount,
            model_definition_path=endpoint.model_definition_path,
            extra_mounts=[dict(m) for m in endpoint.extra_mounts],
            replicas=str(endpoint.desired_replicas),
            image=endpoint.image,
            resource_group=endpoint.resource_group,
            resource_mode="preset" if endpoint.preset_id else "custom",
            preset=endpoint.preset.name if endpoint.preset else "",
            cluster_mode=endpoint.cluster_mode,
            cluster_size=str(endpoint.cluster_size),
            environ=sorted(endpoint.environ.items()),
        )
        values.set_resources(endpoint.resources)
        return values

    def set_resources(self, resources: dict[str, float]) -> None:
        self.cpu = _number_text(resources["cpu"]) if "cpu" in resources else ""
        self.mem = _mem_text(resources["mem"]) if "mem" in resources else ""
        accelerators = [(k, v) for k, v in resources.items() if k not in slots.BASE_KEYS and v]
        if accelerators:
            self.accelerator, amount = accelerators[0]
            self.accelerator_amount = _number_text(amount)

    def apply_folder_defaults(self, folder: Folder, runtime: str | None = None) -> list[dict[str, Any]]:
        """Fill runtime (when ``runtime`` is None: the one the folder describes), image, resources,
        environment and definition path from the folder (S3.2); returns the problems found in its
        definition files, then its warnings (unknown keys; the message starts with "warning:")."""
        defaults = modelstore.launcher_values(folder, runtime)
        self.runtime = defaults["runtime"]
        self.image = defaults["image"]
        self.set_resources(defaults["resources"])
        self.environ = sorted(defaults["environ"].items())
        if RUNTIMES.get(self.runtime) is not None and RUNTIMES[self.runtime].needs_definition_file:
            self.model_definition_path = defaults["model_definition_path"]
        warnings = [{**w, "message": f"warning: {w['message']}"} for w in defaults["warnings"]]
        return [*defaults["problems"], *warnings]


def _choices(request: HttpRequest, values: LauncherValues) -> dict[str, Any]:
    user = request.user
    visible = Folder.objects.visible_to(user).select_related("owner").order_by("name")
    groups = {"default", values.resource_group or "default"}
    groups |= set(Node.objects.values_list("resource_group", flat=True))
    presets = list(ResourcePreset.objects.all())
    return {
        "model_folders": [f for f in visible if f.usage_mode == Folder.UsageMode.MODEL],
        "mount_folders": [f for f in visible if f.usage_mode != Folder.UsageMode.MODEL],
        "runtimes": [
            {
                "name": name,
                "label": variant.label,
                "needs_definition_file": variant.needs_definition_file,
                "env_vars": sorted(variant.env_vars.items()),
            }
            for name, variant in RUNTIMES.items()
        ],
        "projects": Project.objects.of(user).order_by("name"),
        "resource_groups": sorted(g for g in groups if g),
        "presets": [{"preset": p, "text": slots.describe(p.slots())} for p in presets],
        "accelerators": sorted({*ACCELERATORS, values.accelerator}),
        "cluster_modes": Endpoint.ClusterMode.choices,
        "name_pattern": getattr(endpoint_name_validator.regex, "pattern", str(endpoint_name_validator.regex)),
    }


def _render_launcher(
    request: HttpRequest,
    values: LauncherValues,
    *,
    endpoint: Endpoint | None = None,
    errors: dict[str, list[str]] | None = None,
    problems: list[dict[str, Any]] | None = None,
    status: int = 200,
) -> HttpResponse:
    context = {
        "values": values,
        "endpoint": endpoint,
        "errors": errors or {},
        "problems": problems or [],
        "mount_rows": [*values.extra_mounts, {"folder": "", "target": ""}],
        "env_rows": [*values.environ, ("", "")],
        "validate_url": reverse("serving:validate"),
        "cancel_url": detail_url(endpoint.pk) if endpoint else reverse("serving:list"),
        # Forward cookies needs services on host names of their own (validators.check_forward_cookies):
        # the help says so, and says when this installation has none.
        "serving_domain": settings.SERVING_DOMAIN,
        "retry_policies": RetryPolicy.choices,
        **_choices(request, values),
    }
    return render(request, "serving/launcher.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def launcher(request: HttpRequest) -> HttpResponse:
    """The service launcher (S4.1); ``?folder=<id>&runtime=<r>`` pre-fills it ("Run this model", S1.3)."""
    if request.method == "POST":
        values = LauncherValues.from_post(request.POST)
        serializer = ServiceCreateSerializer(data=form_to_api(request.POST), context={"request": request})
        try:
            serializer.is_valid(raise_exception=True)
            endpoint = services.do_create_service(acting_user=request.user, **serializer.validated_data)  # type: ignore[arg-type]
        except (DRFValidationError, DjangoValidationError) as exc:
            return _render_launcher(request, values, errors=field_errors(exc))
        messages.success(request, _("Service %(name)s created; its replicas are starting.") % {"name": endpoint.name})
        for warning in getattr(endpoint, "warnings", []):
            messages.warning(request, warning)
        return redirect(detail_url(endpoint.pk))
    # No runtime asked for: "Run this model" opens with the runtime the folder describes.
    asked = request.GET.get("runtime") or None
    values = LauncherValues(runtime=asked or "custom")
    if values.runtime not in RUNTIMES:
        values.runtime = asked = "custom"
    problems: list[dict[str, Any]] = []
    folder_id = request.GET.get("folder", "")
    folder = None
    if folder_id:
        try:
            folder = (
                Folder.objects.visible_to(request.user).filter(pk=folder_id, usage_mode=Folder.UsageMode.MODEL).first()
            )
        except DjangoValidationError:
            folder = None
    if folder is None:
        folder = (
            Folder.objects.visible_to(request.user).filter(usage_mode=Folder.UsageMode.MODEL).order_by("name").first()
        )
    if folder is not None:
        values.folder = str(folder.pk)
        problems = values.apply_folder_defaults(folder, asked)
    return _render_launcher(request, values, problems=problems)


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    """The API body with resources normalized, so that "1g" and 1073741824 compare equal."""
    out = dict(data)
    with contextlib.suppress(slots.SlotError):
        out["resources"] = slots.normalize(out.get("resources") or {})
    out["replicas"] = str(out.get("replicas"))
    out["cluster_size"] = str(out.get("cluster_size"))
    out["project"] = str(out.get("project") or "")
    return out


@login_required
@require_http_methods(["GET", "POST"])
def modify(request: HttpRequest, pk: str) -> HttpResponse:
    """Modify (S4.5): the launcher pre-filled from the service; only the fields changed are applied."""
    endpoint = access_endpoint(request.user, pk, write=True)
    if request.method == "GET":
        return _render_launcher(request, LauncherValues.from_endpoint(endpoint), endpoint=endpoint)
    values = LauncherValues.from_post(request.POST)
    submitted = form_to_api(request.POST)
    current = _comparable(_values_as_post(LauncherValues.from_endpoint(endpoint)))
    proposed = _comparable(submitted)
    changed = {
        key: submitted[key]
        for key in submitted
        if key not in {"project", "preset", "resources"} and proposed.get(key) != current.get(key)
    }
    # Resources: a preset chosen (or another one) sets the preset and its slots; custom values
    # replace a preset, or change when they differ.
    if submitted.get("preset"):
        if submitted["preset"] != current.get("preset"):
            preset = ResourcePreset.objects.filter(name=submitted["preset"]).first()
            changed["preset"] = submitted["preset"]
            if preset is not None:
                changed["resources"] = preset.slots()
    elif current.get("preset") or proposed.get("resources") != current.get("resources"):
        changed["resources"] = submitted.get("resources") or {}
        if current.get("preset"):
            changed["preset"] = None
    if str(submitted.get("project") or "") != str(endpoint.project_id or ""):
        return _render_launcher(
            request,
            values,
            endpoint=endpoint,
            errors={"project": [_("A service can not move to another project.")]},
        )
    if not changed:
        messages.info(request, _("Nothing changed."))
        return redirect(detail_url(endpoint.pk))
    serializer = ServiceModifySerializer(data=changed, context={"request": request})
    try:
        serializer.is_valid(raise_exception=True)
        services.do_modify_service(endpoint, acting_user=request.user, changes=serializer.changes())  # type: ignore[arg-type]
    except (DRFValidationError, DjangoValidationError) as exc:
        return _render_launcher(request, values, endpoint=endpoint, errors=field_errors(exc))
    messages.success(
        request,
        _("Service %(name)s changed: %(fields)s.") % {"name": endpoint.name, "fields": ", ".join(sorted(changed))},
    )
    return redirect(detail_url(endpoint.pk))


class _FakePost(dict[str, Any]):
    """A QueryDict look-alike so that an endpoint's values go through ``form_to_api`` like a form."""

    def getlist(self, key: str) -> list[str]:
        value = self.get(key, [])
        return value if isinstance(value, list) else [value]


def _values_as_post(values: LauncherValues) -> dict[str, Any]:
    post = _FakePost(
        name=values.name,
        open_to_public="on" if values.open_to_public else "",
        forward_cookies="on" if values.forward_cookies else "",
        retry_policy=values.retry_policy,
        idle_timeout=values.idle_timeout,
        project=values.project,
        folder=values.folder,
        runtime=values.runtime,
        model_mount=values.model_mount,
        model_definition_path=values.model_definition_path,
        replicas=values.replicas,
        image=values.image,
        resource_group=values.resource_group,
        resource_mode=values.resource_mode,
        preset=values.preset,
        cpu=values.cpu,
        mem=values.mem,
        accelerator=values.accelerator,
        accelerator_amount=values.accelerator_amount,
        cluster_mode=values.cluster_mode,
        cluster_size=values.cluster_size,
        env_key=[k for k, _v in values.environ],
        env_value=[v for _k, v in values.environ],
        mount_folder=[m.get("folder", "") for m in values.extra_mounts],
        mount_target=[m.get("target", "") for m in values.extra_mounts],
    )
    return form_to_api(post)


@login_required
@require_POST
def validate(request: HttpRequest) -> JsonResponse:
    """Validate (S4.2) from the launcher: the form as the API body, through the API's serializer and
    action; answers the websocket path of the live log, or the errors by field."""
    serializer = ServiceCreateSerializer(data=form_to_api(request.POST), context={"request": request})
    try:
        serializer.is_valid(raise_exception=True)
        validation_id = services.do_validate_service(acting_user=request.user, **serializer.validated_data)  # type: ignore[arg-type]
    except (DRFValidationError, DjangoValidationError) as exc:
        # 200, not 400: the page shows the errors by the field; a 4xx would be a console error too.
        return JsonResponse({"errors": field_errors(exc)})
    return JsonResponse({"id": validation_id, "websocket": f"/ws/validations/{validation_id}/"}, status=202)


@login_required
def folder_defaults(request: HttpRequest) -> JsonResponse:
    """The launcher values of a model folder for a runtime (as the folder API gives them), shaped
    for the form: what the page fills in when the folder or the runtime changes (S3.2)."""
    folder = get_object_or_404(
        Folder.objects.visible_to(request.user), pk=request.GET.get("folder", ""), usage_mode=Folder.UsageMode.MODEL
    )
    values = LauncherValues(runtime=request.GET.get("runtime", "custom"))
    if values.runtime not in RUNTIMES:
        return JsonResponse({"errors": {"runtime": [_("Unknown runtime.")]}}, status=400)
    problems = values.apply_folder_defaults(folder, values.runtime)
    return JsonResponse(
        {
            "image": values.image,
            "cpu": values.cpu,
            "mem": values.mem,
            "accelerator": values.accelerator,
            "accelerator_amount": values.accelerator_amount,
            "environ": values.environ,
            "model_definition_path": values.model_definition_path,
            "problems": problems,
        }
    )


urlpatterns: list[URLPattern] = [
    path("", services_list, name="list"),
    path("new/", launcher, name="new"),
    path("new/validate/", validate, name="validate"),
    path("new/defaults/", folder_defaults, name="launcher-defaults"),
    path("<uuid:pk>/modify/", modify, name="modify"),
    path("<uuid:pk>/terminate/", terminate, name="terminate"),
]
