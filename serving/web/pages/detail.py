"""The service page (S4-S7): settings, routes (live over ``/ws/services/<id>/``), the endpoint with
ready-to-paste ``curl`` and ``openai`` snippets, clear errors and retry, tokens, autoscaling rules and
their decisions, the event log, per-route logs and metric charts.

Every change is a plain HTML form posted here: the view parses it with the REST API's serializer,
authorizes with ``serving.web.access`` (a stranger gets 404) and calls one action. What updates on its own
(routes, statuses, events, charts, logs) is read by ``static/js/detail.js`` from the websocket and the
JSON API.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
import zoneinfo
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import Resolver404, URLPattern, path, resolve, reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from rest_framework.exceptions import ValidationError as DRFValidationError

from serving.actions import revisions as revision_actions
from serving.actions import rules as rule_actions
from serving.actions import services
from serving.actions import tokens as token_actions
from serving.control import revisions as moves
from serving.control import usage
from serving.core import revisions as pure_revisions
from serving.core import slots
from serving.core.runtimes import RUNTIMES
from serving.models import (
    AutoScalingRule,
    Endpoint,
    EndpointStatus,
    EndpointToken,
    Revision,
    Route,
    RouteMember,
    served_model_names,
)
from serving.web.access import access_endpoint, can_write_endpoint
from serving.web.api.serializers import RouteSerializer, RuleSerializer, TokenCreateSerializer, revision_share
from serving.web.pages.services import MODEL_NAME_VARIABLES, field_errors, offers_chat
from storage.models import Folder

DEFAULT_TOKEN_DAYS = 30
EVENTS_SHOWN = 50
USAGE_KEYS_SHOWN = 5
RULE_FIELDS = AutoScalingRule.SETTINGS
NEW_RULE = {
    "direction": AutoScalingRule.Direction.OUT,
    "source": AutoScalingRule.Source.INFERENCE,
    "metric": "",
    "comparator": AutoScalingRule.Comparator.GREATER_THAN,
    "threshold": "",
    "step": "1",
    "min_replicas": "1",
    "max_replicas": "4",
    "cooldown": "300",
    "aggregation": AutoScalingRule.Aggregation.AVG,
    "window": "60",
    "enabled": True,
}


# --- what the page shows -------------------------------------------------------------------------


def model_name(endpoint: Endpoint) -> str:
    """The model an OpenAI client asks for: the server's MODEL_NAME, else the runtime's default name
    (vLLM serves "vllm-model" unless told otherwise), else the service name."""
    for name in MODEL_NAME_VARIABLES:
        if endpoint.environ.get(name):
            return str(endpoint.environ[name])
    variant = RUNTIMES.get(endpoint.runtime)
    if variant is not None and variant.openai_compatible:
        return variant.default_model_name
    return endpoint.name


def snippets(endpoint: Endpoint) -> dict[str, str]:
    """Ready-to-paste calls of the endpoint (S7.2-S7.3), with the header the service needs."""
    url = endpoint.url
    auth = "" if endpoint.open_to_public else '  -H "Authorization: BackendAI $API_TOKEN" \\\n'
    token_line = "" if endpoint.open_to_public else 'export API_TOKEN="<token>"\n'
    llm = offers_chat(endpoint.runtime, endpoint.environ)
    model = model_name(endpoint)
    if llm:
        quoted = json.dumps(model)
        body = f'{{"model": {quoted}, "messages": [{{"role": "user", "content": "Hello!"}}]}}'
        curl = (
            f"{token_line}curl -X POST \\\n"
            '  -H "Content-Type: application/json" \\\n'
            f"{auth}"
            f"  -d '{body}' \\\n"
            f"  {url}v1/chat/completions"
        )
    else:
        curl = f'{token_line}curl -X GET \\\n  -H "Content-Type: application/json" \\\n{auth}  {url}'
    key = '"unused"  # the service is open to public' if endpoint.open_to_public else 'os.environ["API_TOKEN"]'
    python = (
        "import os\n\n"
        "from openai import OpenAI  # pip install openai\n\n"
        f'client = OpenAI(base_url="{url}v1", api_key={key})\n'
        "stream = client.chat.completions.create(\n"
        f"    model={model!r},\n"
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        "    stream=True,\n"
        ")\n"
        "for chunk in stream:\n"
        '    print(chunk.choices[0].delta.content or "", end="", flush=True)\n'
    ).replace("'", '"')
    return {"curl": curl, "python": python}


def _settings_rows(endpoint: Endpoint) -> list[tuple[str, Any]]:
    variant = RUNTIMES.get(endpoint.runtime)
    mounts = []
    if endpoint.extra_mounts:
        names = dict(
            Folder.objects.filter(pk__in=[m.get("folder") for m in endpoint.extra_mounts]).values_list("pk", "name")
        )
        mounts = [
            f"{names.get(_uuid(m.get('folder')), m.get('folder'))} → {m.get('target', '')}"
            for m in endpoint.extra_mounts
        ]
    rows: list[tuple[str, Any]] = [
        (_("Runtime"), variant.label if variant else endpoint.runtime),
        (_("Model folder"), endpoint.model_folder.name if endpoint.model_folder else _("(deleted)")),
        (_("Model destination"), endpoint.model_mount),
    ]
    if variant is None or variant.needs_definition_file:
        rows.append((_("Model definition file"), endpoint.model_definition_path))
    rows += [
        (_("Additional mounts"), ", ".join(mounts) or _("none")),
        (_("Replicas (desired)"), endpoint.desired_replicas),
        (_("Image"), endpoint.image),
        (_("Resource group"), endpoint.resource_group),
        (_("Resources"), (f"{endpoint.preset.name}: " if endpoint.preset else "") + slots.describe(endpoint.resources)),
        (
            _("Cluster mode"),
            f"{endpoint.get_cluster_mode_display()}"
            + (_(", cluster size %(size)s") % {"size": endpoint.cluster_size} if endpoint.cluster_size > 1 else ""),
        ),
        (_("Open to public"), _("yes: no token needed") if endpoint.open_to_public else _("no: callers need a token")),
        (
            _("Forward cookies"),
            _("yes: callers' cookies reach the replicas (never this site's own)")
            if endpoint.forward_cookies
            else _("no: the proxy removes cookies both ways"),
        ),
        (
            _("Model names at the gateway"),
            ", ".join(served_model_names(endpoint))
            if endpoint.model_names
            else _("%(names)s (the default: MODEL_NAME, else the service's name)")
            % {"names": ", ".join(served_model_names(endpoint))},
        ),
        (_("Retry policy"), endpoint.get_retry_policy_display()),
        (
            _("Sleep when idle"),
            _("after %(seconds)s s without a request (a request wakes it)") % {"seconds": endpoint.idle_timeout}
            if endpoint.idle_timeout is not None
            else _("never"),
        ),
        (_("Owner"), endpoint.owner.username + (f" · {endpoint.project.name}" if endpoint.project else "")),
    ]
    return rows


def cluster_summary(endpoint: Endpoint) -> str:
    """What the header says of a cluster-mode service (S4.1), "" for a plain one (cluster of one)."""
    if endpoint.cluster_size <= 1:
        return ""
    if endpoint.cluster_mode == Endpoint.ClusterMode.MULTI_NODE:
        return _("Multi-node cluster: %(size)s containers per replica, each on its own node") % {
            "size": endpoint.cluster_size
        }
    return _("Single-node cluster: %(size)s containers per replica, on one node") % {"size": endpoint.cluster_size}


def route_members(route: Route) -> list[dict[str, Any]]:
    """The containers of a cluster-mode replica as the API shows them (main first), each with its
    status in words and a sub's error; empty for a replica of one container, whose row needs no list."""
    members = RouteSerializer().get_members(route)
    if len(members) < 2:
        return []
    route_labels = dict(Route.Status.choices)
    member_labels = dict(RouteMember.Status.choices)
    for member in members:
        labels = route_labels if member["role"] == "main" else member_labels
        member["status_label"] = str(labels.get(member["status"], member["status"]))
        if member["role"] == "main":
            member["error"] = ""  # the route's own error, in the row's Error cell already
    return members


def _uuid(value: Any) -> Any:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return value


def _rule_values(rule: AutoScalingRule | None = None, post: Any = None) -> dict[str, Any]:
    if post is not None:
        values: dict[str, Any] = {name: post.get(name, "").strip() for name in RULE_FIELDS}
        values["enabled"] = post.get("enabled") in {"on", "true", "1"}
        return values
    if rule is None:
        return dict(NEW_RULE)
    values = {name: getattr(rule, name) for name in RULE_FIELDS}
    values["threshold"] = f"{rule.threshold:g}"
    values["enabled"] = rule.enabled
    return values


def _rule_choices() -> dict[str, Any]:
    return {
        "directions": AutoScalingRule.Direction.choices,
        "sources": [c for c in AutoScalingRule.Source.choices],
        # "> (GREATER_THAN)": the sign reads at a glance, the name is what the API and admin use.
        "comparators": [(value, f"{label} ({value})") for value, label in AutoScalingRule.Comparator.choices],
        "aggregations": AutoScalingRule.Aggregation.choices,
    }


def _number(raw: Any) -> int | None:
    try:
        return int(str(raw))
    except ValueError:
        return None


def _shown(value: Any) -> str:
    """A configuration value as the diff shows it: text as is, the rest as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def revisions_panel(endpoint: Endpoint, routes: list[Route], query: Any) -> dict[str, Any]:
    """The Revisions panel (issue 16): every revision with its author, time, replicas (healthy of
    running) and traffic share, the share bar, the rollout in progress, the revision a rollback
    returns to, and the field-by-field diff of the two revisions ``?from=&to=`` names (by default
    the two newest)."""
    revisions = list(endpoint.revisions.select_related("created_by"))
    live_routes = [r for r in routes if r.status != Route.Status.TERMINATING]
    rows: list[dict[str, Any]] = []
    for index, revision in enumerate(revisions):
        mine = [r for r in live_routes if r.spec_version == revision.number]
        rows.append(
            {
                "revision": revision,
                "share": revision_share(endpoint, revision.number),
                "current": revision.number == endpoint.spec_version,
                "replicas": len(mine),
                "healthy": sum(1 for r in mine if r.status == Route.Status.HEALTHY),
                "colour": index % 6,
            }
        )
    bar: list[dict[str, Any]] = []
    offset = 0
    for row in rows:
        share = int(row["share"])
        if share > 0:
            bar.append({**row, "x": offset})
            offset += share
    rollout = dict(endpoint.rollout or {})
    if rollout:
        rollout["percent"] = revision_share(endpoint, int(rollout.get("revision") or 0))
    target: Revision | None = moves.previous(endpoint) if endpoint.lifecycle == Endpoint.Lifecycle.CREATED else None
    by_number = {r.number: r for r in revisions}
    numbers = sorted(by_number)
    first, second = _number(query.get("from", "")), _number(query.get("to", ""))
    if first not in by_number or second not in by_number:
        first, second = (numbers[-2], numbers[-1]) if len(numbers) > 1 else (None, None)
    compare: list[dict[str, str]] = []
    if first is not None and second is not None:
        compare = [
            {"field": d["field"], "old": _shown(d["old"]), "new": _shown(d["new"])}
            for d in pure_revisions.diff(by_number[first].config, by_number[second].config)
        ]
    return {
        "revision_rows": rows,
        "share_bar": bar,
        "rollout": rollout,
        "rollback_to": target,
        "compare_from": first,
        "compare_to": second,
        "compare": compare,
        "revision_numbers": numbers,
    }


def usage_panel(endpoint: Endpoint) -> dict[str, Any]:
    """The Usage panel: the service's gateway usage per UTC day over the last 14 days (summed over
    keys, each day's requests also as a bar scaled to the busiest day) and the keys that used it
    most; when nothing called it, how to call it through the gateway instead."""
    days = usage.service_days(endpoint)
    busiest = max((day["requests"] for day in days), default=0)
    for day in days:
        day["bar"] = round(100 * day["requests"] / busiest, 1) if busiest else 0
    keys = usage.service_keys(endpoint)
    return {
        "usage_days": days,
        "usage_keys": keys[:USAGE_KEYS_SHOWN],
        "usage_more_keys": max(0, len(keys) - USAGE_KEYS_SHOWN),
        "usage_total": {
            name: sum(day[name] for day in days)
            for name in ("requests", "prompt_tokens", "completion_tokens", "errors")
        },
        "usage_window": usage.DEFAULT_DAYS,
        "gateway_url": f"{settings.SERVING_PROXY_URL}/v1",
        "gateway_model": served_model_names(endpoint)[0],
    }


def metrics_api(endpoint: Endpoint) -> str:
    """The metrics API of the service, or "" while the platform has none (then nothing is fetched,
    rather than a 404 on every poll)."""
    url = f"/api/v1/services/{endpoint.pk}/metrics/"
    try:
        resolve(url)
    except Resolver404:
        return ""
    return url


def _render_detail(
    request: HttpRequest,
    endpoint: Endpoint,
    *,
    new_token: str = "",
    token_errors: dict[str, list[str]] | None = None,
    rule_forms: dict[str, dict[str, Any]] | None = None,
    status: int = 200,
) -> HttpResponse:
    user = request.user
    routes = list(
        endpoint.routes.select_related("node").prefetch_related(
            Prefetch("members", queryset=RouteMember.objects.select_related("node"))
        )
    )
    for route in routes:
        route.member_rows = route_members(route)  # type: ignore[attr-defined]
    service_status = endpoint.compute_status(routes)
    can_write = can_write_endpoint(user, endpoint)
    rules = list(endpoint.rules.all())
    forms = rule_forms or {}
    rule_rows = [
        {
            "rule": rule,
            "values": forms.get(str(rule.pk), {}).get("values") or _rule_values(rule),
            "errors": forms.get(str(rule.pk), {}).get("errors", {}),
        }
        for rule in rules
    ]
    new_rule = forms.get("new", {"values": _rule_values(), "errors": {}})
    tokens = list(endpoint.tokens.select_related("created_by")[:100])
    now = timezone.now()
    context = {
        "endpoint": endpoint,
        "routes": routes,
        "status": service_status,
        "status_label": EndpointStatus(service_status).label,
        "healthy": sum(1 for r in routes if r.status == Route.Status.HEALTHY),
        "has_errors": any(r.error or r.status in (Route.Status.FAILED_TO_START, Route.Status.UNHEALTHY) for r in routes)
        or endpoint.gave_up,
        "can_write": can_write,
        "live": endpoint.lifecycle == Endpoint.Lifecycle.CREATED,
        "settings_rows": _settings_rows(endpoint),
        "environ": sorted(endpoint.environ.items()),
        "caches": list(endpoint.caches.select_related("node")),
        "snippets": snippets(endpoint),
        "metrics_url": metrics_api(endpoint),
        "chat": offers_chat(endpoint.runtime, endpoint.environ),
        "tokens": [
            {
                "token": token,
                "state": "revoked" if token.revoked_at else ("expired" if token.expires_at <= now else "active"),
                "can_revoke": token.revoked_at is None and (token.created_by_id == user.pk or can_write),
            }
            for token in tokens
        ],
        "new_token": new_token,
        "token_errors": token_errors or {},
        "token_default_expiry": (timezone.localdate() + dt.timedelta(days=DEFAULT_TOKEN_DAYS)).isoformat(),
        "token_min_date": (timezone.localdate() + dt.timedelta(days=1)).isoformat(),
        "rule_rows": rule_rows,
        "new_rule": new_rule,
        "new_rule_open": bool(new_rule.get("errors")),
        "scaling_events": list(endpoint.scaling_events.select_related("rule")[:EVENTS_SHOWN]),
        "events": list(endpoint.events.select_related("actor")[:EVENTS_SHOWN]),
        "route_statuses": {value: str(label) for value, label in Route.Status.choices},
        "status_labels": {value: str(label) for value, label in EndpointStatus.choices},
        "member_statuses": {value: str(label) for value, label in RouteMember.Status.choices},
        "cluster_summary": cluster_summary(endpoint),
        **revisions_panel(endpoint, routes, request.GET),
        **usage_panel(endpoint),
        **_rule_choices(),
    }
    return render(request, "serving/detail.html", context, status=status)


# --- views ---------------------------------------------------------------------------------------


@login_required
@require_GET
def detail(request: HttpRequest, pk: str) -> HttpResponse:
    """The service page; a terminated service is shown read-only until it is gone."""
    endpoint = access_endpoint(request.user, pk, include_destroyed=True)
    return _render_detail(request, endpoint)


@login_required
@require_POST
def clear_errors(request: HttpRequest, pk: str) -> HttpResponse:
    """Clear errors and retry (S4.4)."""
    endpoint = access_endpoint(request.user, pk, write=True)
    cleared = services.do_clear_errors(endpoint, acting_user=request.user)  # type: ignore[arg-type]
    messages.success(
        request,
        _("Cleared the errors of %(count)s replica(s); the service starts them again.") % {"count": cleared},
    )
    return redirect("serving:detail", pk=endpoint.pk)


def expiry_of(request: HttpRequest) -> dt.datetime | None:
    """The end of the chosen day in the browser's time zone (sent by the page), else the server's."""
    raw = request.POST.get("expires_on", "").strip()
    if not raw:
        return None
    day = dt.date.fromisoformat(raw)
    try:
        zone: dt.tzinfo = zoneinfo.ZoneInfo(request.POST.get("tz", "") or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = timezone.get_current_timezone()
    return dt.datetime.combine(day, dt.time(23, 59, 59), tzinfo=zone)


@login_required
@require_POST
def token_create(request: HttpRequest, pk: str) -> HttpResponse:
    """Generate a token (S7.1); the page is answered directly (no redirect), the only time the
    token is shown in full, so that it is never stored anywhere but in the user's hands."""
    endpoint = access_endpoint(request.user, pk)
    try:
        expires_at = expiry_of(request)
    except ValueError:
        return _render_detail(
            request, endpoint, token_errors={"expires_on": [_("Enter a date such as 2030-12-31.")]}, status=400
        )
    serializer = TokenCreateSerializer(data={"expires_at": expires_at} if expires_at else {})
    try:
        serializer.is_valid(raise_exception=True)
        when = serializer.validated_data.get("expires_at") or timezone.now() + dt.timedelta(days=DEFAULT_TOKEN_DAYS)
        _token, secret = token_actions.do_issue_token(endpoint, acting_user=request.user, expires_at=when)  # type: ignore[arg-type]
    except (DRFValidationError, DjangoValidationError) as exc:
        errors = field_errors(exc)
        errors["expires_on"] = errors.pop("expires_at", []) + errors.pop("form", [])
        return _render_detail(request, endpoint, token_errors=errors, status=400)
    return _render_detail(request, endpoint, new_token=secret, status=201)


@login_required
@require_POST
def token_revoke(request: HttpRequest, pk: str, token_id: str) -> HttpResponse:
    """Revoke a token: by whoever issued it, or by someone who may change the service."""
    endpoint = access_endpoint(request.user, pk)
    token = get_object_or_404(EndpointToken, pk=token_id, endpoint=endpoint)
    if not (token.created_by_id == request.user.pk or can_write_endpoint(request.user, endpoint)):
        raise Http404("No such token.")
    token_actions.do_revoke_token(token, acting_user=request.user)  # type: ignore[arg-type]
    messages.success(
        request, _("Token %(prefix)s… revoked; it stops working within a second.") % {"prefix": token.prefix}
    )
    return redirect(reverse("serving:detail", kwargs={"pk": endpoint.pk}) + "#tokens")


def _save_rule(request: HttpRequest, endpoint: Endpoint, rule: AutoScalingRule, key: str) -> HttpResponse:
    values = _rule_values(post=request.POST)
    data = dict(values)
    serializer = RuleSerializer(None if rule._state.adding else rule, data=data, partial=not rule._state.adding)
    try:
        serializer.is_valid(raise_exception=True)
        rule_actions.do_save_rule(rule, acting_user=request.user, changes=serializer.validated_data)  # type: ignore[arg-type]
    except (DRFValidationError, DjangoValidationError) as exc:
        errors = field_errors(exc)
        # field_errors knows the launcher's fields; a rule's own fields are taken back out of "form".
        for text in list(errors.get("form", [])):
            name, _sep, message = text.partition(": ")
            if name in RULE_FIELDS:
                errors.setdefault(name, []).append(message)
                errors["form"].remove(text)
        if not errors.get("form"):
            errors.pop("form", None)
        return _render_detail(request, endpoint, rule_forms={key: {"values": values, "errors": errors}}, status=400)
    messages.success(request, _("Autoscaling rule saved: %(rule)s.") % {"rule": str(rule)})
    return redirect(reverse("serving:detail", kwargs={"pk": endpoint.pk}) + "#rules")


@login_required
@require_POST
def rule_create(request: HttpRequest, pk: str) -> HttpResponse:
    """Add an autoscaling rule (S6.1)."""
    endpoint = access_endpoint(request.user, pk, write=True)
    return _save_rule(request, endpoint, AutoScalingRule(endpoint=endpoint), "new")


@login_required
@require_POST
def rule_update(request: HttpRequest, pk: str, rule_id: int) -> HttpResponse:
    """Change an autoscaling rule."""
    endpoint = access_endpoint(request.user, pk, write=True)
    rule = get_object_or_404(AutoScalingRule, pk=rule_id, endpoint=endpoint)
    return _save_rule(request, endpoint, rule, str(rule.pk))


@login_required
@require_POST
def rule_toggle(request: HttpRequest, pk: str, rule_id: int) -> HttpResponse:
    """Enable or disable a rule (``enabled=1`` or ``0``)."""
    endpoint = access_endpoint(request.user, pk, write=True)
    rule = get_object_or_404(AutoScalingRule, pk=rule_id, endpoint=endpoint)
    enabled = request.POST.get("enabled") in {"on", "true", "1"}
    rule_actions.do_save_rule(rule, acting_user=request.user, changes={"enabled": enabled})  # type: ignore[arg-type]
    if enabled:
        messages.success(request, _("Autoscaling rule enabled: %(rule)s.") % {"rule": str(rule)})
    else:
        messages.success(request, _("Autoscaling rule disabled: %(rule)s.") % {"rule": str(rule)})
    return redirect(reverse("serving:detail", kwargs={"pk": endpoint.pk}) + "#rules")


@login_required
@require_POST
def rule_delete(request: HttpRequest, pk: str, rule_id: int) -> HttpResponse:
    """Delete a rule; its past decisions stay in the decision log."""
    endpoint = access_endpoint(request.user, pk, write=True)
    rule = get_object_or_404(AutoScalingRule, pk=rule_id, endpoint=endpoint)
    text = str(rule)
    rule_actions.do_delete_rule(rule, acting_user=request.user)  # type: ignore[arg-type]
    messages.success(request, _("Autoscaling rule deleted: %(rule)s.") % {"rule": text})
    return redirect(reverse("serving:detail", kwargs={"pk": endpoint.pk}) + "#rules")


@login_required
@require_GET
def revisions(request: HttpRequest, pk: str) -> HttpResponse:
    """The Revisions panel alone, for the page's script to follow the service live."""
    endpoint = access_endpoint(request.user, pk, include_destroyed=True)
    routes = list(endpoint.routes.all())
    context = {
        "endpoint": endpoint,
        "can_write": can_write_endpoint(request.user, endpoint),
        "live": endpoint.lifecycle == Endpoint.Lifecycle.CREATED,
        **revisions_panel(endpoint, routes, request.GET),
    }
    return render(request, "serving/_revisions.html", context)


def _revision_move(request: HttpRequest, endpoint: Endpoint, kind: str, revision: Revision | None) -> HttpResponse:
    """GET asks (the page without its script), POST calls the action; an action's refusal (no
    revision to roll back to) is said on the page."""
    back = reverse("serving:detail", kwargs={"pk": endpoint.pk}) + "#revisions"
    if request.method != "POST":
        if revision is None:
            messages.error(
                request,
                _("Revision %(number)s is the first revision: there is none to roll back to.")
                % {"number": endpoint.spec_version},
            )
            return redirect(back)
        context = {"endpoint": endpoint, "kind": kind, "revision": revision, "detail_url": back}
        return render(request, "serving/revision_confirm.html", context)
    try:
        if kind == "promote" and revision is not None:
            revision_actions.do_promote(endpoint, revision.number, acting_user=request.user)  # type: ignore[arg-type]
            messages.success(
                request,
                _("Revision %(number)s promoted: it gets all traffic once its replicas are healthy.")
                % {"number": revision.number},
            )
        else:
            left = endpoint.spec_version
            done = revision_actions.do_rollback(endpoint, acting_user=request.user)  # type: ignore[arg-type]
            messages.success(
                request,
                _("Rolled back from revision %(left)s to revision %(number)s.")
                % {"left": left, "number": done.spec_version},
            )
    except DjangoValidationError as exc:
        for text in field_errors(exc).values():
            for line in text:
                messages.error(request, line)
    return redirect(back)


@login_required
@require_http_methods(["GET", "POST"])
def revision_promote(request: HttpRequest, pk: str, number: int) -> HttpResponse:
    """Promote a revision, with confirmation: all traffic to it, the others drained."""
    endpoint = access_endpoint(request.user, pk, write=True)
    revision = get_object_or_404(Revision, endpoint=endpoint, number=number)
    return _revision_move(request, endpoint, "promote", revision)


@login_required
@require_http_methods(["GET", "POST"])
def revision_rollback(request: HttpRequest, pk: str) -> HttpResponse:
    """Roll back to the previous revision, with confirmation."""
    endpoint = access_endpoint(request.user, pk, write=True)
    return _revision_move(request, endpoint, "rollback", moves.previous(endpoint))


urlpatterns: list[URLPattern] = [
    path("<uuid:pk>/", detail, name="detail"),
    path("<uuid:pk>/clear-errors/", clear_errors, name="clear-errors"),
    path("<uuid:pk>/tokens/", token_create, name="token-create"),
    path("<uuid:pk>/tokens/<uuid:token_id>/revoke/", token_revoke, name="token-revoke"),
    path("<uuid:pk>/rules/", rule_create, name="rule-create"),
    path("<uuid:pk>/rules/<int:rule_id>/", rule_update, name="rule-update"),
    path("<uuid:pk>/rules/<int:rule_id>/toggle/", rule_toggle, name="rule-toggle"),
    path("<uuid:pk>/rules/<int:rule_id>/delete/", rule_delete, name="rule-delete"),
    path("<uuid:pk>/revisions/", revisions, name="revisions"),
    path("<uuid:pk>/revisions/rollback/", revision_rollback, name="revision-rollback"),
    path("<uuid:pk>/revisions/<int:number>/promote/", revision_promote, name="revision-promote"),
]
