"""The Content-Security-Policy header (Django 5.2 has no setting for it; 6.0 will).

Pages load scripts and styles only from the site itself: no inline script, no inline event handler,
no inline style attribute (tests/security/test_web_app.py renders every page and checks). The policy
comes from ``settings.CONTENT_SECURITY_POLICY``; ``CONTENT_SECURITY_POLICY_BY_VIEW`` overrides it
for the few third-party pages (the API docs load Swagger UI from its CDN with an inline bootstrap).
A response that already carries the header keeps its own.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

HEADER = "Content-Security-Policy"


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if HEADER in response:
            return response
        policy: str = settings.CONTENT_SECURITY_POLICY
        match = getattr(request, "resolver_match", None)
        if match is not None:
            policy = settings.CONTENT_SECURITY_POLICY_BY_VIEW.get(match.view_name, policy)
        if policy:
            response[HEADER] = policy
        return response
