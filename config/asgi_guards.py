"""ASGI guards in front of the whole application (config/asgi.py): who may open a websocket.

Channels' ``AllowedHostsOriginValidator`` compares only the host name of an Origin with
ALLOWED_HOSTS. The proxy serves replicas (code anyone with an account uploads) on the web app's host
name at another port, and a browser sends the web app's session cookie to every port of its host:
a replica's page could open a victim's ``/ws/services/<id>/`` and read the service's environment and
logs. Here an Origin must be exactly one of WEB_ORIGINS, scheme and port included.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.security.websocket import WebsocketDenier
from django.conf import settings

from config.env import origin_of

log = logging.getLogger(__name__)

Scope = dict[str, Any]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def allowed_origin(origin: str | None) -> bool:
    """Whether a page of ``origin`` (the Origin header as sent) may open the web app's websockets:
    only when it is one of WEB_ORIGINS exactly. No Origin at all is refused too: every browser sends
    one on a websocket, and a script that is not a browser can name the web app's own."""
    if not origin:
        return False
    try:
        normalized = origin_of(origin)
    except ValueError:
        return False  # "null" (a sandboxed frame, a file:// page) and anything that is not a site
    return normalized in settings.WEB_ORIGINS


class WebOriginValidator:
    """Refuses the handshake of a websocket whose Origin is not one of WEB_ORIGINS (HTTP 403)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            return await self.application(scope, receive, send)
        origin = _header(scope, b"origin")
        if allowed_origin(origin):
            return await self.application(scope, receive, send)
        # Said in the log, where an operator who forgot to set WEB_ORIGINS looks: the browser only
        # sees the refused handshake.
        log.warning(
            "websocket %s refused: origin %r is not one of WEB_ORIGINS (%s)",
            scope.get("path", "?"),
            origin,
            ", ".join(settings.WEB_ORIGINS),
        )
        return await WebsocketDenier()(scope, receive, send)
