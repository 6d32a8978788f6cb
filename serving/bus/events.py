"""What happened to a service, told to whoever needs it: the audit/lifecycle log, open pages, and the
proxies' routing table.

A leaf of the serving layers: the actions, the control-plane loops and the node side all record
events and announce changes, so this module imports none of them (only the models and the routing
table), and none of them needs to import another layer to say that something changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from accounts.models import User
from serving.bus import routing
from serving.core import logs
from serving.models import Endpoint, ServiceEvent

log = logging.getLogger(__name__)


# --- the audit/lifecycle log ---------------------------------------------------------------------


def record_event(
    endpoint: Endpoint | None,
    kind: str,
    message: str,
    *,
    actor: User | None = None,
    level: str = ServiceEvent.Level.INFO,
    route_id: Any = None,
    data: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> ServiceEvent:
    """Append one line to a service's audit/lifecycle log.

    ``request_id``: the request the event stems from; by default the one in the log context, which
    the edges bind: the web app's middleware for an API call or a page's form (config/requestid.py),
    the node's check of a route a proxy reported failing, the wake listener (the held request's id).
    A tick or a scheduled probe has none, and its events none either."""
    event = new_event(
        endpoint, kind, message, actor=actor, level=level, route_id=route_id, data=data, request_id=request_id
    )
    event.save(force_insert=True)
    return event


def new_event(
    endpoint: Endpoint | None,
    kind: str,
    message: str,
    *,
    actor: User | None = None,
    level: str = ServiceEvent.Level.INFO,
    route_id: Any = None,
    data: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> ServiceEvent:
    """The line ``record_event`` appends, not yet saved: loops that log many lines in one
    transaction (the reconcile and autoscaling ticks) write them with one ``bulk_create``."""
    if request_id is None:
        request_id = logs.current().get("request_id", "")
    return ServiceEvent(
        endpoint=endpoint,
        kind=kind,
        message=message,
        actor=actor if actor is not None and actor.is_authenticated else None,
        level=level,
        route_id=route_id,
        data=dict(data or {}),
        request_id=request_id[:128],
    )


# --- open pages (Channels groups; the consumers join them) ---------------------------------------


def endpoint_group(endpoint_id: str) -> str:
    return f"endpoint.{endpoint_id}"


# The services list listens per principal: a user's own services, each of their projects', and (for
# operators) everyone's. A change is sent to the groups of the service's owner and project only.
LIST_OPERATORS_GROUP = "services.operators"


def list_owner_group(user_id: object) -> str:
    return f"services.owner.{user_id}"


def list_project_group(project_id: object) -> str:
    return f"services.project.{project_id}"


def notify_endpoint_changed(endpoint_id: str) -> None:
    """Tell every open service page and services list that the service or its routes changed (best effort)."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(endpoint_group(endpoint_id), {"type": "service.changed"})
        _notify_lists(layer, endpoint_id)
    except Exception as exc:  # the channel layer is Redis: a page update is not worth failing for
        log.debug("live update for endpoint %s not sent: %s", endpoint_id, exc)


def _notify_lists(layer: Any, endpoint_id: str) -> None:
    row = Endpoint.objects.filter(pk=endpoint_id).values_list("owner_id", "project_id").first()
    if row is None:
        return
    owner_id, project_id = row
    groups = [list_owner_group(owner_id), LIST_OPERATORS_GROUP]
    if project_id is not None:
        groups.append(list_project_group(project_id))
    message = {"type": "services.changed", "id": str(endpoint_id)}
    for group in groups:
        async_to_sync(layer.group_send)(group, message)


# --- the proxies and the pages together ----------------------------------------------------------


def after_routes_changed(endpoint_id: str) -> None:
    """Push the new state to the proxies (routing table) and to open pages (websocket)."""
    routing.publish_endpoint_safely(endpoint_id)
    notify_endpoint_changed(endpoint_id)
