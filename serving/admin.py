"""The operators' console (S9): every serving model, with actions that go through serving.actions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from serving.actions import rules as rule_actions
from serving.actions import services, validators
from serving.actions import tokens as token_actions
from serving.bus import processes as process_beats
from serving.core import devices, slots
from serving.models import (
    AutoScalingRule,
    Endpoint,
    EndpointToken,
    Node,
    ResourcePreset,
    Revision,
    Route,
    ScalingEvent,
    ServiceEvent,
)


class ReadOnlyInline(admin.TabularInline):  # type: ignore[type-arg]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class RouteInline(ReadOnlyInline):
    model = Route
    fields = ("id", "status", "node", "host", "port", "traffic_ratio", "spec_version", "error_message", "last_probe_at")
    readonly_fields = fields


class RevisionInline(ReadOnlyInline):
    """The service's revisions (issue 16): number, author, time and what changed."""

    model = Revision
    fields = ("number", "created_by", "created_at", "summary")
    readonly_fields = fields
    show_change_link = False


class RuleInline(admin.TabularInline):  # type: ignore[type-arg]
    model = AutoScalingRule
    extra = 0
    fields = (*AutoScalingRule.SETTINGS, "enabled")


class ServiceEventInline(ReadOnlyInline):
    model = ServiceEvent
    fields = ("created_at", "kind", "level", "message", "actor", "request_id")
    readonly_fields = fields
    ordering = ("-created_at",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ServiceEvent]:
        return super().get_queryset(request).order_by("-created_at")


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "name",
        "owner",
        "project",
        "runtime",
        "desired_replicas",
        "status",
        "lifecycle",
        "open_to_public",
        "created_at",
    )
    list_filter = ("lifecycle", "runtime", "open_to_public", "resource_group", "cluster_mode")
    search_fields = ("name", "slug", "owner__username", "id")
    readonly_fields = (
        "id",
        "slug",
        "url",
        "status",
        "lifecycle",
        "spec_version",
        "retries",
        "created_at",
        "updated_at",
        "destroyed_at",
    )
    fields = (
        ("name", "slug"),
        ("owner", "project"),
        "url",
        ("status", "lifecycle"),
        "model_folder",
        "runtime",
        ("model_mount", "model_definition_path"),
        "extra_mounts",
        "desired_replicas",
        "image",
        "resources",
        ("preset", "resource_group"),
        ("cluster_mode", "cluster_size"),
        "environ",
        ("open_to_public", "forward_cookies"),
        ("retry_policy", "idle_timeout", "slept_at"),
        ("spec_version", "retries"),
        ("created_at", "updated_at", "destroyed_at"),
    )
    autocomplete_fields = ("owner",)
    inlines = [RouteInline, RevisionInline, RuleInline, ServiceEventInline]
    actions = ["terminate", "clear_errors"]

    @admin.display(description=_("status"))
    def status(self, obj: Endpoint) -> str:
        return obj.compute_status()

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A service is created through the launcher or the API, which check folders and definitions.
        return False

    def save_model(self, request: HttpRequest, obj: Endpoint, form: Any, change: bool) -> None:
        """Edits go through do_modify_service: only changed fields apply, replicas roll if needed."""
        changed = {name: form.cleaned_data[name] for name in form.changed_data if name in validators.MODIFIABLE_FIELDS}
        original = Endpoint.objects.get(pk=obj.pk)
        try:
            services.do_modify_service(original, acting_user=request.user, changes=changed)  # type: ignore[arg-type]
        except ValidationError as exc:
            request._modify_refused = True  # type: ignore[attr-defined]
            self.message_user(request, _("Not saved: %(why)s") % {"why": "; ".join(exc.messages)}, level=messages.ERROR)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        # Nothing of a refused edit is saved: not its autoscaling rules (inline) either.
        if not getattr(request, "_modify_refused", False):
            super().save_related(request, form, formsets, change)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if getattr(request, "_modify_refused", False):
            return None  # no "Changed ..." history entry for an edit that was refused
        return super().log_change(request, obj, message)

    def response_change(self, request: HttpRequest, obj: Endpoint) -> HttpResponse:
        # A refused edit is not "changed successfully": back to the form, with the reason only.
        if getattr(request, "_modify_refused", False):
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # terminate instead: it stops the replicas

    @admin.action(description=_("Terminate selected services"))
    def terminate(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        for endpoint in queryset:
            services.do_terminate_service(endpoint, acting_user=request.user)  # type: ignore[arg-type]
        count = queryset.count()
        message = ngettext("Terminating %(count)d service.", "Terminating %(count)d services.", count)
        self.message_user(request, message % {"count": count})

    @admin.action(description=_("Clear errors and retry"))
    def clear_errors(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        cleared = 0
        for endpoint in queryset:
            cleared += services.do_clear_errors(endpoint, acting_user=request.user)  # type: ignore[arg-type]
        message = ngettext("Cleared %(count)d failed replica.", "Cleared %(count)d failed replicas.", cleared)
        self.message_user(request, message % {"count": cleared})


@admin.register(Route)
class RouteAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "__str__",
        "endpoint",
        "status",
        "node",
        "host",
        "port",
        "traffic_ratio",
        "spec_version",
        "gpu_devices",
        "error_message",
        "updated_at",
    )
    list_filter = ("status", "node")

    @admin.display(description=_("Capacity"), ordering="capacity")
    def capacity_text(self, obj: Node) -> str:
        """``cpu 2, mem 23.5 GiB``: the slots as the scheduler's messages write them, not raw JSON bytes."""
        return slots.describe(obj.capacity or {})

    @admin.display(description=_("GPU devices"))
    def gpu_devices(self, obj: Route) -> str:
        return ", ".join(f"{d} {share:g}" for d, share in (obj.devices or {}).items()) or "-"

    search_fields = ("id", "endpoint__name", "container_id")
    readonly_fields = [f.name for f in Route._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(EndpointToken)
class EndpointTokenAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("prefix", "endpoint", "created_by", "created_at", "expires_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("lookup", "endpoint__name", "created_by__username")
    readonly_fields = (
        "id",
        "endpoint",
        "created_by",
        "lookup",
        "digest",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # shown once: generate tokens on the service page or through the API

    @admin.action(description=_("Revoke selected tokens"))
    def revoke(self, request: HttpRequest, queryset: QuerySet[EndpointToken]) -> None:
        for token in queryset.select_related("endpoint"):
            token_actions.do_revoke_token(token, acting_user=request.user)  # type: ignore[arg-type]
        self.message_user(request, _("Revoked; proxies refuse these tokens within a second."))


@admin.register(AutoScalingRule)
class AutoScalingRuleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("endpoint", *AutoScalingRule.SETTINGS, "enabled", "last_triggered_at", "last_decision")
    list_filter = ("direction", "source", "enabled")
    search_fields = ("endpoint__name", "metric")
    readonly_fields = ("last_triggered_at", "last_decision", "created_at")

    def save_model(self, request: HttpRequest, obj: AutoScalingRule, form: Any, change: bool) -> None:
        rule_actions.do_save_rule(obj, acting_user=request.user)  # type: ignore[arg-type]

    def delete_model(self, request: HttpRequest, obj: AutoScalingRule) -> None:
        rule_actions.do_delete_rule(obj, acting_user=request.user)  # type: ignore[arg-type]


@admin.register(ScalingEvent)
class ScalingEventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("created_at", "endpoint", "metric", "observed", "old_replicas", "new_replicas", "acted", "reason")
    list_filter = ("acted",)
    search_fields = ("endpoint__name", "metric", "reason")
    readonly_fields = [f.name for f in ScalingEvent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ServiceEvent)
class ServiceEventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("created_at", "endpoint", "kind", "level", "message", "actor")
    list_filter = ("level", "kind")
    search_fields = ("endpoint__name", "message", "kind")
    readonly_fields = [f.name for f in ServiceEvent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # an audit log is append-only


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "name",
        "address",
        "engine",
        "resource_group",
        "capacity_text",
        "device_ids",
        "schedulable",
        "engine_says",
        "heartbeat_at",
        "alive",
    )
    list_filter = ("schedulable", "resource_group", "engine")
    search_fields = ("name", "address")
    # The engine writes these with every heartbeat; the operator's own switch is schedulable.
    readonly_fields = (
        "heartbeat_at",
        "lost_at",
        "created_at",
        "engine",
        "capacity",
        "devices",
        "unavailable",
        "unavailable_since",
    )
    actions = ["cordon", "uncordon"]

    @admin.display(description=_("Capacity"), ordering="capacity")
    def capacity_text(self, obj: Node) -> str:
        """``cpu 2, mem 23.5 GiB``: the slots as the scheduler's messages write them, not raw JSON bytes."""
        return slots.describe(obj.capacity or {})

    @admin.display(description=_("GPU devices"))
    def device_ids(self, obj: Node) -> str:
        return ", ".join(devices.inventory_ids(obj.devices or [])) or "-"

    @admin.display(description=_("Unavailable (engine)"))
    def engine_says(self, obj: Node) -> str:
        """Why the node's engine says it takes no new replica now (a drained Swarm node), and since
        when; "-" when it takes them. Clears by itself, unlike the cordon (schedulable)."""
        if not obj.unavailable:
            return "-"
        since = obj.unavailable_since
        return _("%(reason)s (since %(since)s)") % {
            "reason": obj.unavailable,
            "since": since.strftime("%Y-%m-%d %H:%M:%S UTC") if since else "?",
        }

    @admin.display(boolean=True)
    def alive(self, obj: Node) -> bool:
        return obj.is_alive()

    change_list_template = "admin/serving/node/change_list.html"  # adds a link to the Processes page

    def get_urls(self) -> list[URLPattern]:
        extra = [path("processes/", self.admin_site.admin_view(self.processes_view), name="serving_node_processes")]
        return extra + super().get_urls()

    def processes_view(self, request: HttpRequest) -> HttpResponse:
        """Which processes of which node answered last, and when (their heartbeats in Redis)."""
        error = ""
        try:
            rows = process_beats.running()
        except Exception as exc:  # Redis away: say so instead of a server error
            rows, error = [], f"{exc.__class__.__name__}: {exc}"
        for row in rows:
            started = float(row.get("started") or 0)
            row["last_seen"] = datetime.fromtimestamp(float(row.get("t") or 0), UTC)
            row["started_at"] = datetime.fromtimestamp(started, UTC) if started else None
        context = {
            **self.admin_site.each_context(request),
            "title": _("Processes"),
            "rows": rows,
            "error": error,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/serving/processes.html", context)

    @admin.action(description=_("Cordon: place no new replicas"))
    def cordon(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        queryset.update(schedulable=False)

    @admin.action(description=_("Uncordon: allow new replicas"))
    def uncordon(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        queryset.update(schedulable=True)


@admin.register(ResourcePreset)
class ResourcePresetAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "cpu", "mem", "accelerators", "resource_group")
    search_fields = ("name",)
