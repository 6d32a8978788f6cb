"""``Authorization: Token <api key>`` for the REST API (docs/architecture.md)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from accounts.models import ApiKey
from accounts.ratelimit import FailureLimiter, client_address
from serving.core import tokens

# last_used_at is a hint for people, not an audit log: write it at most once a minute per key.
_LAST_USED_GRANULARITY = timedelta(minutes=1)


def api_key_limiter() -> FailureLimiter:
    return FailureLimiter("api-key", settings.API_KEY_FAILURE_LIMIT, settings.API_KEY_FAILURE_WINDOW)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = request.headers.get("Authorization")
        if not header or not header.lower().startswith(("token ", "bearer ")):
            return None  # not ours: let the next authenticator try (the session)
        limiter, address = api_key_limiter(), client_address(request.META)
        if limiter.blocked(address):
            raise exceptions.Throttled(
                wait=limiter.window, detail="Too many failed API key attempts from this address."
            )
        try:
            return self._authenticate(header)
        except exceptions.AuthenticationFailed:
            limiter.record_failure(address)
            raise

    def _authenticate(self, header: str) -> tuple[Any, ApiKey]:
        credential = tokens.from_authorization(header, schemes=("token", "bearer"))
        parsed = tokens.parse(credential or "")
        if parsed is None or parsed.kind != tokens.API_KEY_KIND:
            raise exceptions.AuthenticationFailed(
                "Malformed API key. Send 'Authorization: Token msk_…' with a key from "
                "'python manage.py issue_api_key USERNAME'."
            )
        key = ApiKey.objects.active().select_related("user").filter(lookup=parsed.lookup).first()
        if key is None or not tokens.verify(parsed.token, key.digest, settings.TOKEN_HMAC_KEY):
            raise exceptions.AuthenticationFailed("Unknown, expired or revoked API key.")
        if not key.user.is_active:
            raise exceptions.AuthenticationFailed("This user account is disabled.")
        now = timezone.now()
        if key.last_used_at is None or now - key.last_used_at > _LAST_USED_GRANULARITY:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword
