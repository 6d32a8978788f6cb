"""ASGI guards in front of the whole application (config/asgi.py): who may open a websocket, and
which address a request comes from.

Origins
-------

Channels' ``AllowedHostsOriginValidator`` compares only the host name of an Origin with
ALLOWED_HOSTS. The proxy serves replicas (code anyone with an account uploads) on the web app's host
name at another port, and a browser sends the web app's session cookie to every port of its host:
a replica's page could open a victim's ``/ws/services/<id>/`` and read the service's environment and
logs. Here an Origin must be exactly one of WEB_ORIGINS, scheme and port included.

Client addresses
----------------
The failed-login and failed-API-key limits count per client address (accounts/ratelimit.py).
``daphne --proxy-headers`` took the left-most X-Forwarded-For of any peer as that address, so a
client changed "its" address at every attempt and was never limited. Here X-Forwarded-For is read
only from a peer in WEB_TRUSTED_PROXIES (the TLS terminators in front of daphne), right to left,
skipping the trusted hops: the first address no trusted proxy vouches for is the client. From any
other peer the header is dropped, so nothing behind this can mistake it for a fact.
"""

from __future__ import annotations

import ipaddress
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


def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a unix socket path, or no address at all
    return any(ip in network for network in settings.WEB_TRUSTED_PROXIES)


def client_from_forwarded(peer: str, forwarded_for: list[str]) -> str:
    """The client's address for a request ``peer`` passed on with these X-Forwarded-For headers.

    Only a trusted peer's header is read, and only as far back as trusted proxies vouch: each hop
    appends the address it saw, so the right-most entries are facts and the left-most is whatever the
    client wrote. A malformed entry ends the walk at the hop that passed it on."""
    if not forwarded_for or not _trusted(peer):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            address = str(ipaddress.ip_address(_without_port(hop)))
        except ValueError:
            return client
        client = address
        if not _trusted(address):
            return address
    return client


def _without_port(hop: str) -> str:
    """``[2001:db8::1]:443`` and ``192.0.2.1:443`` (some proxies add the port) as bare addresses."""
    if hop.startswith("["):
        return hop[1:].split("]", maxsplit=1)[0]
    if hop.count(":") == 1:
        return hop.split(":", maxsplit=1)[0]
    return hop


class TrustedProxyHeaders:
    """Sets ``scope["client"]`` (Django's REMOTE_ADDR) from X-Forwarded-For of trusted proxies only,
    for HTTP and websockets; drops the header from any other peer (see the module docstring)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> Any:
        if scope["type"] not in ("http", "websocket"):
            return await self.application(scope, receive, send)
        headers = list(scope.get("headers") or ())
        forwarded = [bytes(v).decode("latin-1") for k, v in headers if k.lower() == b"x-forwarded-for"]
        if not forwarded:
            return await self.application(scope, receive, send)
        peer = scope.get("client") or (None, 0)
        peer_host = str(peer[0] or "")
        scope = dict(scope)
        if _trusted(peer_host):
            scope["client"] = (client_from_forwarded(peer_host, forwarded), 0)
        else:
            scope["headers"] = [(k, v) for k, v in headers if k.lower() != b"x-forwarded-for"]
        return await self.application(scope, receive, send)
