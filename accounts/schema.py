"""How the API's authentication shows in the OpenAPI schema (/api/schema/, /api/docs/)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """``Authorization: Token msk_...`` (or ``Bearer``): a personal API key (accounts.ApiKey)."""

    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": (
                "A personal API key: 'Token msk_...' (or 'Bearer msk_...'). Create one on the "
                "API keys endpoint or with 'python manage.py issue_api_key USERNAME'."
            ),
        }
