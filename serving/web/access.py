"""One authorization helper per object kind (docs/architecture.md): a stranger gets 404, never a hint.

Read: the owner, members of the service's project, operators (superusers).
Write (modify, scale, terminate, rules): the owner, the project's managers, operators.
Tokens may be issued by anyone who can read the service: teammates call it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Q
from django.http import Http404
from django.utils.crypto import constant_time_compare

from accounts.models import ApiKey, Membership, User
from serving.models import Endpoint, GatewayKey


def can_write_endpoint(user: Any, endpoint: Endpoint) -> bool:
    if user.is_superuser or endpoint.owner_id == user.pk:
        return True
    if endpoint.project_id is None:
        return False
    return Membership.objects.filter(user=user, project_id=endpoint.project_id, role=Membership.Role.MANAGER).exists()


def access_endpoint(user: Any, endpoint_id: Any, *, write: bool = False, include_destroyed: bool = False) -> Endpoint:
    """The endpoint if ``user`` may see it (404 otherwise) and, with ``write``, change it (403)."""
    queryset = Endpoint.objects.visible_to(user).select_related("owner", "project", "model_folder", "preset")
    if not include_destroyed:
        queryset = queryset.live()
    try:
        endpoint = queryset.get(pk=endpoint_id)
    except (Endpoint.DoesNotExist, ValueError, TypeError, ValidationError):
        raise Http404("No such service.") from None
    if write and not can_write_endpoint(user, endpoint):
        raise PermissionDenied("Only the owner, a project manager or an operator can change this service.")
    return endpoint


def current_user(user_id: Any) -> Any:
    """The user as the database has them now, or None when deleted or disabled: a long-lived
    connection must not keep deciding with the user it loaded at connect (an operator since
    demoted would still see every service)."""
    return User.objects.filter(pk=user_id, is_active=True).first()


@dataclass(frozen=True)
class ReadGrant:
    """What let someone open a long-lived stream of a service (a replica's live log): who, through
    which credential, for which service. Streams re-check it while they run (``lost``): being allowed
    when the stream opened is not being allowed an hour later."""

    user_id: Any
    endpoint_id: str
    api_key_id: Any = None  # when the stream was opened with an API key
    session_key: str | None = None  # when it was opened with a login session

    @classmethod
    def of_request(cls, request: Any, endpoint: Endpoint) -> ReadGrant:
        """From a DRF request (its API key, else its session when the session logged the user in)."""
        api_key = request.auth if isinstance(request.auth, ApiKey) else None
        session = getattr(request._request, "session", None)
        session_key = None
        if api_key is None and session is not None and str(session.get("_auth_user_id")) == str(request.user.pk):
            session_key = session.session_key
        return cls(request.user.pk, str(endpoint.pk), getattr(api_key, "pk", None), session_key)

    @classmethod
    def of_scope(cls, scope: dict[str, Any], endpoint_id: str) -> ReadGrant:
        """From a websocket's scope (Channels' AuthMiddlewareStack: the login session)."""
        session = scope.get("session")
        return cls(scope["user"].pk, str(endpoint_id), None, getattr(session, "session_key", None))

    def reader(self) -> tuple[Any, str | None]:
        """(the user as they are now, None) while the user and the credential hold, whatever the
        service; else (None, the sentence to end the stream with). The service sockets ask only
        this (they go on showing a terminated service, and re-check access to it themselves)."""
        user = current_user(self.user_id)
        if user is None:
            return None, READ_GONE
        if self.api_key_id is not None and not ApiKey.objects.active().filter(pk=self.api_key_id).exists():
            return None, "The API key this stream was opened with was revoked or expired, so the live log ended."
        if self.session_key is not None and not _session_holds(self.session_key, user):
            return None, "You were logged out (or your password changed), so the live log ended."
        return user, None

    def lost(self) -> str | None:
        """None while the grant holds; else the sentence to end the stream with. Gone are: the user
        (deleted or disabled), the API key (revoked or expired), the session (logged out, or no
        longer valid since a password change), the right to read the service (removed from its
        project, no longer an operator), the service itself (terminated). A reader who lost the
        right learns nothing more about the service."""
        user, why = self.reader()
        if user is None:
            return why
        try:
            endpoint = access_endpoint(user, self.endpoint_id, include_destroyed=True)
        except Http404:
            return READ_GONE
        if endpoint.lifecycle != Endpoint.Lifecycle.CREATED:
            return "The service was terminated, so its live log ended."
        return None


READ_GONE = "You can no longer read this service, so its live log ended."


def _session_holds(session_key: str, user: Any) -> bool:
    """The session still logs ``user`` in: it exists (not logged out) and its auth hash is the
    user's current one (a password change invalidates every other session: Django's get_user
    flushes such a session on its next request, but a socket makes none). Read only: unlike
    get_user, nothing is flushed or cycled here."""
    if settings.SESSION_ENGINE.endswith("signed_cookies"):
        return True  # nothing kept on the server to end: such a session can not be revoked
    store = import_module(settings.SESSION_ENGINE).SessionStore
    data = store(session_key).load()  # {} when logged out or expired
    if str(data.get(SESSION_KEY)) != str(user.pk):
        return False
    session_hash = data.get(HASH_SESSION_KEY)
    if not session_hash:
        return False
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    return any(constant_time_compare(session_hash, known) for known in hashes)


def gateway_keys_of(user: Any) -> Any:
    """The gateway keys a user may see and revoke: their own, and their managed projects'; operators
    all (the API and the keys page; another's key is a 404)."""
    keys = GatewayKey.objects.select_related("owner", "project")
    if getattr(user, "is_superuser", False):
        return keys
    return keys.filter(Q(owner=user) | Q(project_id__in=user.managed_project_ids()))
