"""The operators' console: every model is there, and its actions go through the actions layer."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.urls import reverse

from serving.models import Endpoint, EndpointToken
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def service(api: Any, personas: dict[str, Any]) -> Endpoint:
    folder = FolderFactory(owner=personas["owner"], name="m", files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = api("owner").post("/api/v1/services/", {"name": "admin-svc", "folder": str(folder.pk)}, format="json").json()
    api("owner").post(f"/api/v1/services/{body['id']}/tokens/", {}, format="json")
    return Endpoint.objects.get(pk=body["id"])


def test_every_model_has_a_working_changelist_and_change_page(
    client: Any, personas: dict[str, Any], service: Endpoint
) -> None:
    client.force_login(personas["admin"])
    for model in admin.site._registry:
        meta = model._meta
        url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        assert client.get(url).status_code == 200, url
        assert client.get(url, {"q": "x"}).status_code == 200, url
        first = model._default_manager.first()
        if first is not None:
            change = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[first.pk])
            assert client.get(change).status_code == 200, change


def test_non_operators_are_kept_out(client: Any, personas: dict[str, Any]) -> None:
    client.force_login(personas["owner"])
    response = client.get(reverse("admin:serving_endpoint_changelist"))
    assert response.status_code == 302


def test_admin_actions_go_through_the_actions_layer(client: Any, personas: dict[str, Any], service: Endpoint) -> None:
    client.force_login(personas["admin"])
    url = reverse("admin:serving_endpointtoken_changelist")
    token = EndpointToken.objects.get(endpoint=service)
    client.post(url, {"action": "revoke", "_selected_action": [str(token.pk)]})
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert service.events.filter(kind="token_revoked", actor=personas["admin"]).exists()
    client.post(
        reverse("admin:serving_endpoint_changelist"), {"action": "terminate", "_selected_action": [str(service.pk)]}
    )
    service.refresh_from_db()
    assert service.lifecycle == Endpoint.Lifecycle.DESTROYING
    assert service.events.filter(kind="terminating", actor=personas["admin"]).exists()


def test_a_refused_edit_is_not_reported_as_saved(rf: Any, personas: dict[str, Any], service: Endpoint) -> None:
    from django.contrib.messages.storage.fallback import FallbackStorage

    model_admin = admin.site._registry[Endpoint]
    url = reverse("admin:serving_endpoint_change", args=[service.pk])
    request = rf.post(url)
    request.user = personas["admin"]
    request.session = {}
    request._messages = FallbackStorage(request)
    form = type("Form", (), {"changed_data": ["resources"], "cleaned_data": {"resources": {"cpu": "lots"}}})()
    model_admin.save_model(request, service, form, change=True)
    response = model_admin.response_change(request, service)
    texts = [str(m) for m in request._messages]
    assert (response.status_code, response.url) == (302, url)  # back to the form, not the list
    assert any("Not saved" in t and "lots" in t for t in texts), texts
    assert not any("successfully" in t for t in texts), texts
    service.refresh_from_db()
    assert service.resources.get("cpu") != "lots"
    # The same form's inline rows (autoscaling rules) and the history entry are not saved either.
    saved: list[str] = []
    formset = type("Formset", (), {"save": lambda self: saved.append("rules")})()
    model_admin.save_related(request, form, [formset], change=True)
    assert saved == [] and model_admin.log_change(request, service, "Changed resources.") is None


def test_an_operator_sets_forward_cookies_and_a_users_storage_limit(
    rf: Any, personas: dict[str, Any], service: Endpoint, settings: Any
) -> None:
    from django.contrib.messages.storage.fallback import FallbackStorage

    settings.SERVING_DOMAIN = "models.example.net"  # forward_cookies needs a host name per service
    from accounts.models import User

    request = rf.post("/")
    request.user = personas["admin"]
    request.session = {}
    request._messages = FallbackStorage(request)
    form = type("Form", (), {"changed_data": ["forward_cookies"], "cleaned_data": {"forward_cookies": True}})()
    admin.site._registry[Endpoint].save_model(request, service, form, change=True)
    service.refresh_from_db()
    assert service.forward_cookies is True
    assert service.events.filter(kind="modified", actor=personas["admin"]).exists()
    # The admin forms show both fields.
    assert "forward_cookies" in str(admin.site._registry[Endpoint].fields)
    user_admin = admin.site._registry[User]
    assert any("storage_limit" in options["fields"] for _, options in user_admin.fieldsets)


def test_an_operator_can_not_turn_forward_cookies_on_without_serving_domain(
    rf: Any, personas: dict[str, Any], service: Endpoint, settings: Any
) -> None:
    from django.contrib.messages import get_messages
    from django.contrib.messages.storage.fallback import FallbackStorage

    settings.SERVING_DOMAIN = ""
    request = rf.post("/")
    request.user = personas["admin"]
    request.session = {}
    request._messages = FallbackStorage(request)
    form = type("Form", (), {"changed_data": ["forward_cookies"], "cleaned_data": {"forward_cookies": True}})()
    admin.site._registry[Endpoint].save_model(request, service, form, change=True)
    service.refresh_from_db()
    assert service.forward_cookies is False
    assert any("SERVING_DOMAIN" in str(m) for m in get_messages(request))
