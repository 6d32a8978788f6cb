"""What an open stream re-checks while it runs (serving.web.access.ReadGrant, issue 13 attack 8): every way
of losing the right to read a service ends it, with a sentence that says which, and leaks nothing
else. The live streams themselves are tested in tests/integration/test_route_log_follow.py."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from accounts.actions import do_issue_api_key, do_revoke_api_key
from accounts.authentication import ApiKeyAuthentication
from accounts.models import Membership
from serving.actions import services
from serving.web.access import ReadGrant
from tests.security.world import World

pytestmark = pytest.mark.django_db


def _session_grant(user: Any, world: World) -> ReadGrant:
    client = Client()
    client.force_login(user)
    return ReadGrant(user.pk, str(world.service.pk), None, client.cookies["sessionid"].value)


def test_a_grant_holds_until_its_reader_loses_the_service(personas: dict[str, Any], world: World) -> None:
    teammate = personas["teammate"]
    grant = _session_grant(teammate, world)
    assert grant.lost() is None
    Membership.objects.filter(user=teammate, project=personas["project"]).delete()
    assert grant.lost() == "You can no longer read this service, so its live log ended."


def test_a_terminated_service_ends_its_streams(personas: dict[str, Any], world: World) -> None:
    grant = _session_grant(personas["owner"], world)
    services.do_terminate_service(world.service, acting_user=personas["owner"])
    assert grant.lost() == "The service was terminated, so its live log ended."


@pytest.mark.parametrize("how", ["disabled", "logged out", "password changed", "demoted operator"])
def test_losing_the_account_session_or_role_ends_a_stream(personas: dict[str, Any], world: World, how: str) -> None:
    user = personas["admin"] if how == "demoted operator" else personas["teammate"]
    grant = _session_grant(user, world)
    assert grant.lost() is None
    if how == "disabled":
        user.is_active = False
        user.save(update_fields=["is_active"])
    elif how == "logged out":
        Session.objects.filter(session_key=grant.session_key).delete()
    elif how == "password changed":  # every other session ends; its row stays until next used
        user.set_password("changed elsewhere")
        user.save(update_fields=["password"])
        assert Session.objects.filter(session_key=grant.session_key).exists()
    else:
        user.is_superuser = False
        user.save(update_fields=["is_superuser"])
    expected = "You were logged out" if how in ("logged out", "password changed") else "You can no longer read"
    assert (grant.lost() or "").startswith(expected)


def test_a_stream_opened_with_an_api_key_ends_when_the_key_is_revoked(personas: dict[str, Any], world: World) -> None:
    key, secret = do_issue_api_key(personas["teammate"], name="follow")
    request = APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Token {secret}")
    drf = Request(request, authenticators=[ApiKeyAuthentication()])
    grant = ReadGrant.of_request(drf, world.service)
    assert (grant.api_key_id, grant.session_key) == (key.pk, None) and grant.lost() is None
    do_revoke_api_key(key)
    assert grant.lost() == "The API key this stream was opened with was revoked or expired, so the live log ended."
    key.revoked_at, key.expires_at = None, timezone.now()
    key.save(update_fields=["revoked_at", "expires_at"])
    assert grant.lost() is not None  # expired counts the same
