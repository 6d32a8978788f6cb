"""The gateway keys page (issue 17): a user's keys for the proxy's OpenAI-compatible root, a form to
create one (its secret shown once, in the answer to the form) for the user or for one of their
projects, revoke with confirmation, and a key's usage per day and service.

Like the REST API (``/api/v1/gateway-keys/``): the key's owner, the managers of its project and
operators see and revoke it; anyone else gets 404. A project's key may be made by any member of
the project (and by operators), as through the API. The views parse with the API's serializer,
authorize with ``serving.web.access`` and call one action.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from rest_framework.exceptions import ValidationError as DRFValidationError

from accounts.models import Project
from serving.actions import gateway as gateway_actions
from serving.control import usage
from serving.models import Endpoint
from serving.web.access import gateway_keys_of
from serving.web.api.serializers import GatewayKeyCreateSerializer
from serving.web.pages.detail import expiry_of
from serving.web.pages.services import field_errors

DEFAULT_KEY_DAYS = 90
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_concurrency")
KEY_FIELDS = ("name", "project", "services", "expires_at", *LIMITS)


def _render_keys(
    request: HttpRequest,
    *,
    values: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
    new_key: str = "",
    status: int = 200,
) -> HttpResponse:
    keys = gateway_keys_of(request.user).prefetch_related("services").order_by("-created_at")[:200]
    now = timezone.now()
    services = list(Endpoint.objects.visible_to(request.user).live().select_related("project").order_by("name"))
    context = {
        "rows": [
            {
                "key": key,
                "services": [endpoint.name for endpoint in key.services.all()],
                "state": "revoked" if key.revoked_at else ("expired" if key.expires_at <= now else "active"),
            }
            for key in keys
        ],
        "service_groups": _service_groups(services),
        # Who may own a key: the user, or a project they are a member of (the API's rule,
        # GatewayKeyCreateSerializer.validate_project; operators: every project).
        "projects": list(Project.objects.of(request.user).order_by("name")),
        "values": values or {"expires_on": (timezone.localdate() + dt.timedelta(days=DEFAULT_KEY_DAYS)).isoformat()},
        "errors": errors or {},
        "new_key": new_key,
        "min_date": (timezone.localdate() + dt.timedelta(days=1)).isoformat(),
    }
    return render(request, "serving/gateway_keys.html", context, status=status)


def _service_groups(services: list[Endpoint]) -> list[tuple[str, list[Endpoint]]]:
    """The services offered, grouped by project (those in no project first): a project's key may
    call only its project's services, so the groups show which ones fit the owner chosen."""
    groups: dict[str, list[Endpoint]] = {}
    for endpoint in services:
        groups.setdefault(endpoint.project.name if endpoint.project else "", []).append(endpoint)
    return [
        (_("Project %(name)s") % {"name": name} if name else _("Not in a project"), groups[name])
        for name in sorted(groups)
    ]


def _form_errors(exc: Exception) -> dict[str, list[str]]:
    """The API's sentences (serializer or action) next to this form's fields: field_errors knows the
    launcher's fields and puts the others in "form" as "<field>: <sentence>"; ours are taken back."""
    errors = field_errors(exc)
    for text in list(errors.get("form", [])):
        name, _sep, message = text.partition(": ")
        if name in KEY_FIELDS:
            errors.setdefault(name, []).append(message)
            errors["form"].remove(text)
    if not errors.get("form"):
        errors.pop("form", None)
    errors["expires_on"] = errors.pop("expires_at", [])
    return errors


def _form_values(request: HttpRequest) -> dict[str, Any]:
    """The form as typed, to show it again with its errors."""
    post = request.POST
    return {
        "name": post.get("name", "").strip(),
        "project": post.get("project", "").strip(),
        "services": post.getlist("services"),
        "expires_on": post.get("expires_on", "").strip(),
        **{limit: post.get(limit, "").strip() for limit in LIMITS},
    }


@login_required
@require_http_methods(["GET", "POST"])
def gateway_keys(request: HttpRequest) -> HttpResponse:
    """GET: the keys and the form. POST: create a key; the page is answered directly (no redirect),
    the only time its secret is shown, so that it is kept nowhere but in the user's hands."""
    if request.method != "POST":
        return _render_keys(request)
    values = _form_values(request)
    try:
        expires_at = expiry_of(request)
    except ValueError:
        errors = {"expires_on": [_("Enter a date such as 2030-12-31.")]}
        return _render_keys(request, values=values, errors=errors, status=400)
    data: dict[str, Any] = {
        "name": values["name"],
        "services": values["services"],
        "project": values["project"] or None,
    }
    data.update({limit: values[limit] or None for limit in LIMITS})
    if expires_at is not None:
        data["expires_at"] = expires_at
    serializer = GatewayKeyCreateSerializer(data=data, context={"request": request})
    try:
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        fields["expires_at"] = fields.get("expires_at") or timezone.now() + dt.timedelta(days=DEFAULT_KEY_DAYS)
        key, secret = gateway_actions.do_create_gateway_key(acting_user=request.user, **fields)  # type: ignore[arg-type]
    except (DRFValidationError, DjangoValidationError) as exc:
        return _render_keys(request, values=values, errors=_form_errors(exc), status=400)
    if key.project is not None:
        messages.success(
            request,
            _("Gateway key %(name)s created for project %(project)s.")
            % {"name": key.name, "project": key.project.name},
        )
    else:
        messages.success(request, _("Gateway key %(name)s created.") % {"name": key.name})
    return _render_keys(request, new_key=secret, status=201)


@login_required
@require_GET
def gateway_key(request: HttpRequest, gateway_key_id: str) -> HttpResponse:
    """A key's settings and its usage per UTC day and service, newest first, with the CSV's link."""
    key = get_object_or_404(gateway_keys_of(request.user).prefetch_related("services"), pk=gateway_key_id)
    context = {
        "key": key,
        "services": [endpoint.name for endpoint in key.services.all()],
        "rows": usage.rows_of(key),
    }
    return render(request, "serving/gateway_key.html", context)


@login_required
@require_POST
def gateway_key_revoke(request: HttpRequest, gateway_key_id: str) -> HttpResponse:
    """Revoke a key (confirmed on the page): every proxy refuses it within a second."""
    key = get_object_or_404(gateway_keys_of(request.user), pk=gateway_key_id)
    gateway_actions.do_revoke_gateway_key(key)
    messages.success(
        request, _("Gateway key %(prefix)s… revoked; it stops working within a second.") % {"prefix": key.prefix}
    )
    return redirect("serving:gateway-keys")


urlpatterns: list[URLPattern] = [
    path("gateway-keys/", gateway_keys, name="gateway-keys"),
    path("gateway-keys/<uuid:gateway_key_id>/", gateway_key, name="gateway-key"),
    path("gateway-keys/<uuid:gateway_key_id>/revoke/", gateway_key_revoke, name="gateway-key-revoke"),
]
