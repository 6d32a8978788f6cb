"""LLM Chat Test (S8): a chat page for a service's OpenAI-compatible API, streamed token by token.

Why a relay: the page is on the web origin and the service's endpoint is on the proxy's (another port,
or another host), and the data plane sends no CORS headers, nor should it (a browser on any site
could then spend a user's tokens). So the page calls ``/services/<id>/chat/v1/...`` on its own
origin, and this module forwards exactly three calls (``GET models``, ``POST chat/completions``,
``POST completions``) to the service's own endpoint address, streaming the answer back chunk by
chunk. The relay:

* only ever calls that service's endpoint (``Endpoint.url``), never an address the browser names,
  so it is no open proxy (no SSRF);
* needs the session of someone who may see the service (a stranger gets 404) and, for POST, the
  CSRF token;
* goes through the proxy like any client, with the token the page sends, never the session cookie:
  the chat tests the real path (routing, health, tokens), and a 401 or a 503 is the proxy's own.

Tokens: only digests are stored, so the page can not offer the user's existing tokens. The user pastes
one, or presses "Generate a chat token": an ordinary token of the service, issued through
``serving.actions.tokens.do_issue_token`` (audited, listed on the service page, revocable), that
expires after an hour and lives only in the page's memory.

"Another OpenAI-compatible server" (S8.2: baseURL and token by hand) is called by the browser
directly: relaying to an address a user types would make the web server an open proxy; such servers
(OpenAI's among them) answer browsers with CORS headers, and when one does not, the page says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping

import aiohttp
from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from serving.actions import tokens as token_actions
from serving.models import Endpoint
from serving.web.access import access_endpoint
from serving.web.pages.detail import model_name
from serving.web.pages.services import offers_chat

CHAT_TOKEN_LIFETIME = dt.timedelta(hours=1)
# (method, path under /v1/) the relay forwards; anything else is 404.
RELAYED = {("GET", "models"), ("POST", "chat/completions"), ("POST", "completions")}
MAX_BODY = 4 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# The longest pause between two chunks of an answer (a big model may think for a while).
READ_TIMEOUT = 300.0


@login_required
@require_GET
def chat(request: HttpRequest, pk: str) -> HttpResponse:
    """The chat page, with this service's endpoint and model selected (S8.1)."""
    endpoint = access_endpoint(request.user, pk)
    return render(
        request,
        "serving/chat.html",
        {
            "endpoint": endpoint,
            "relay_base": reverse("serving:chat", kwargs={"pk": endpoint.pk}) + "v1",
            "model": model_name(endpoint),
            "llm": offers_chat(endpoint.runtime, endpoint.environ),
            "token_minutes": int(CHAT_TOKEN_LIFETIME.total_seconds() // 60),
        },
    )


@login_required
@require_POST
def chat_token(request: HttpRequest, pk: str) -> JsonResponse:
    """Issue a short-lived token of the service for the chat page (JSON; shown only to the page)."""
    endpoint = access_endpoint(request.user, pk)
    try:
        token, secret = token_actions.do_issue_token(
            endpoint,
            acting_user=request.user,  # type: ignore[arg-type]
            expires_at=timezone.now() + CHAT_TOKEN_LIFETIME,
        )
    except DjangoValidationError as exc:
        return JsonResponse({"error": {"code": "not_issued", "message": " ".join(exc.messages)}}, status=409)
    return JsonResponse({"token": secret, "prefix": token.prefix, "expires_at": token.expires_at.isoformat()})


def _error(status: int, code: str, message: str) -> JsonResponse:
    """An error in the OpenAI shape, as the proxy and OpenAI-compatible servers answer."""
    return JsonResponse({"error": {"code": code, "message": message, "type": "relay_error"}}, status=status)


async def relay(request: HttpRequest, pk: str, api_path: str) -> HttpResponseBase:
    """Forward one OpenAI API call of the chat page to the service's endpoint, streaming the answer."""
    user = await request.auser()
    if not user.is_authenticated:
        return _error(401, "not_logged_in", _("Your session has ended; log in again."))
    try:
        endpoint: Endpoint = await sync_to_async(access_endpoint)(user, pk)
    except Http404:
        return _error(404, "unknown_service", _("No such service."))
    method = request.method or "GET"
    if (method, api_path) not in RELAYED:
        return _error(404, "not_relayed", _("The chat relay only forwards GET models and POST chat/completions."))
    body = request.body if method == "POST" else None
    if body is not None and len(body) > MAX_BODY:
        return _error(413, "too_large", _("The conversation is too long to send; clear it and start again."))
    headers = {"Accept": request.headers.get("Accept", "application/json")}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if request.headers.get("Authorization"):
        # The token the page holds; the session cookie is never forwarded.
        headers["Authorization"] = request.headers["Authorization"]
    url = f"{endpoint.url}v1/{api_path}"
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
        auto_decompress=False,
    )
    try:
        upstream = await session.request(method, url, data=body, headers=headers, allow_redirects=False)
    except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
        await session.close()
        reason = str(exc) or exc.__class__.__name__
        return _error(
            502,
            "proxy_unreachable",
            _("The service's endpoint %(url)s did not answer (%(reason)s). Is the serving proxy running?")
            % {"url": endpoint.url, "reason": reason},
        )
    response = StreamingHttpResponse(
        _stream(session, upstream), status=upstream.status, content_type=_relayed_type(upstream.headers)
    )
    # The answer is written by the replica, not by us, yet served from the web app's origin: a browser
    # must never run it as a page or a script (the relayed types above are data; this is the backstop).
    response["Content-Security-Policy"] = "default-src 'none'; sandbox; frame-ancestors 'none'"
    for name in ("Content-Encoding", "Retry-After", "X-Request-ID"):
        if name in upstream.headers:
            response[name] = upstream.headers[name]
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a buffering front server would hold the stream back
    return response


# What the chat page reads. Anything else a replica sends (text/html, JavaScript, SVG…) is passed on
# as text/plain, so a hostile replica can not plant a page or a script on the web app's origin.
RELAYED_TYPES = {"application/json", "text/event-stream", "text/plain"}


def _relayed_type(headers: Mapping[str, str]) -> str:
    value = headers.get("Content-Type", "application/json")
    if value.split(";", 1)[0].strip().lower() in RELAYED_TYPES:
        return str(value)
    return "text/plain; charset=utf-8"


async def _stream(session: aiohttp.ClientSession, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The answer's bytes as they arrive; when the browser goes away (Stop), Django cancels this and
    the connection to the proxy is closed, which stops the replica's work too."""
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except (aiohttp.ClientError, TimeoutError):
        return  # the page sees the stream end early and says so
    finally:
        upstream.close()
        await session.close()


urlpatterns: list[URLPattern] = [
    path("<uuid:pk>/chat/", chat, name="chat"),
    path("<uuid:pk>/chat/token/", chat_token, name="chat-token"),
    path("<uuid:pk>/chat/v1/<path:api_path>", relay, name="chat-relay"),
]
