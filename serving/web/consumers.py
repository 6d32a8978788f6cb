"""Channels consumers: live service status, a replica's live log (and, with validation, its log).

Consumers authenticate on connect, join one group per object, and refuse strangers with the same
answer as a missing object (close code 4404), so a websocket leaks nothing a REST 404 would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404
from django.urls import path

from accounts.models import Membership
from serving.bus import dryrun, logfollow
from serving.bus.events import LIST_OPERATORS_GROUP, endpoint_group, list_owner_group, list_project_group
from serving.models import Endpoint, Route
from serving.web.access import ReadGrant, access_endpoint, can_write_endpoint
from serving.web.api.serializers import ServiceSerializer, with_routes

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
# What the services' _snapshot answers once its reader's user or session is gone: the page says
# "log in again" (close code 4401), not that the service is gone (4404).
LOGGED_OUT: dict[str, Any] = {}


class ServiceStatusConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/services/<id>/``: the service as the REST API shows it, re-sent on every change."""

    endpoint_id: str

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.endpoint_id = str(self.scope["url_route"]["kwargs"]["service_id"])
        # Join before reading: a change committed between the read and the join would otherwise
        # never reach this page (a replica that turns healthy in that gap left it "PROVISIONING").
        await self.channel_layer.group_add(endpoint_group(self.endpoint_id), self.channel_name)
        snapshot = await self._snapshot()
        if snapshot is None or snapshot is LOGGED_OUT:
            await self.channel_layer.group_discard(endpoint_group(self.endpoint_id), self.channel_name)
            await self.close(code=CLOSE_UNAUTHENTICATED if snapshot is LOGGED_OUT else CLOSE_NOT_FOUND)
            return
        await self.accept()
        await self.send_json({"type": "service", "service": snapshot})

    async def disconnect(self, code: int) -> None:
        if getattr(self, "endpoint_id", None):
            await self.channel_layer.group_discard(endpoint_group(self.endpoint_id), self.channel_name)

    async def service_changed(self, event: dict[str, Any]) -> None:
        snapshot = await self._snapshot()
        if snapshot is LOGGED_OUT:  # logged out, or the password changed: not "gone"
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if snapshot is None:
            await self.send_json({"type": "gone"})
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send_json({"type": "service", "service": snapshot})

    @database_sync_to_async
    def _snapshot(self) -> dict[str, Any] | None:
        # The user and their session as they are now: the socket may have been open for hours, and
        # its reader logged out or changed their password since (the environment holds secrets).
        user, _ = ReadGrant.of_scope(self.scope, self.endpoint_id).reader()
        if user is None:
            return LOGGED_OUT
        try:
            endpoint = access_endpoint(user, self.endpoint_id, include_destroyed=True)
        except Http404:
            return None
        return dict(ServiceSerializer(with_routes(Endpoint.objects.all()).get(pk=endpoint.pk)).data)


class ValidationConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/validations/<id>/``: every event of a validation run, from its first line (S4.2).

    Joins the live group first, then replays the stored history, then forwards live events whose
    sequence number is newer than what was replayed: nothing is lost, nothing is shown twice.
    """

    validation_id: str
    last_seq: int = 0
    checked_at: float = 0.0

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.validation_id = str(self.scope["url_route"]["kwargs"]["validation_id"])
        if not await self._may_read():
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.checked_at = asyncio.get_running_loop().time()
        await self.channel_layer.group_add(dryrun.group_name(self.validation_id), self.channel_name)
        await self.accept()
        for event in await database_sync_to_async(dryrun.history)(self.validation_id):
            await self._forward(event)

    async def disconnect(self, code: int) -> None:
        if getattr(self, "validation_id", None):
            await self.channel_layer.group_discard(dryrun.group_name(self.validation_id), self.channel_name)

    async def validation_event(self, message: dict[str, Any]) -> None:
        # Re-checked while the run streams (at most every ACCESS_CHECK s, not per line): a user
        # disabled, or an operator demoted, stops reading another user's run.
        now = asyncio.get_running_loop().time()
        if now - self.checked_at >= logfollow.ACCESS_CHECK:
            self.checked_at = now
            if not await self._may_read():
                # In the run's own vocabulary (events have a kind), so the launcher shows it as a line.
                why = "You can no longer read this validation, so its log ended."
                await self.send_json({"kind": logfollow.REVOKED, "at": time.time(), "message": why})
                await self.close(code=CLOSE_NOT_FOUND)
                return
        await self._forward(message["event"])

    @database_sync_to_async
    def _may_read(self) -> bool:
        """Its owner, or an operator; the user and their session as they are now (logged out, or a
        password changed since, ends it)."""
        user, _ = ReadGrant.of_scope(self.scope, "").reader()
        owner = dryrun.owner_of(self.validation_id)
        return user is not None and owner is not None and (owner == user.pk or user.is_superuser)

    async def _forward(self, event: dict[str, Any]) -> None:
        seq = int(event.get("seq", 0))
        if seq and seq <= self.last_seq:
            return
        self.last_seq = max(self.last_seq, seq)
        await self.send_json(event)


class ServiceListConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/services/``: the services list, live. Each change of a service the user may see is sent
    as that service (as the REST API shows it), or ``gone`` once it is terminated or out of sight.

    It joins the groups of the user (their own services), of each of their projects and, for
    operators, of every service; every message is checked against ``access_endpoint`` again before
    it is sent, so a stranger never receives another user's service.
    """

    groups_joined: list[str]

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.groups_joined = await self._groups(user)
        for group in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def services_changed(self, event: dict[str, Any]) -> None:
        endpoint_id = str(event["id"])
        snapshot = await self._snapshot(endpoint_id)
        if snapshot is LOGGED_OUT:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if snapshot is None or snapshot.get("lifecycle") == "destroyed":
            await self.send_json({"type": "gone", "id": endpoint_id})
        else:
            await self.send_json({"type": "service", "service": snapshot})

    @database_sync_to_async
    def _groups(self, user: Any) -> list[str]:
        groups = [list_owner_group(user.pk)]
        groups += [
            list_project_group(pid) for pid in Membership.objects.filter(user=user).values_list("project_id", flat=True)
        ]
        if user.is_superuser:
            groups.append(LIST_OPERATORS_GROUP)
        return groups

    @database_sync_to_async
    def _snapshot(self, endpoint_id: str) -> dict[str, Any] | None:
        # The user and their session as they are now, not as they were at connect.
        user, _ = ReadGrant.of_scope(self.scope, endpoint_id).reader()
        if user is None:
            return LOGGED_OUT
        try:
            endpoint = access_endpoint(user, endpoint_id, include_destroyed=True)
        except Http404:
            return None
        data = dict(ServiceSerializer(with_routes(Endpoint.objects.all()).get(pk=endpoint.pk)).data)
        data["can_write"] = can_write_endpoint(user, endpoint)
        return data


class RouteLogConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/services/<id>/routes/<route_id>/logs/?tail=N&member=sub1``: a replica's log, live
    (``serving.bus.logfollow``); ``member`` picks a cluster-mode replica's container (default main1).

    Sends ``{"type": "lines", "lines": [...]}`` (first the last ``tail`` lines, default 200, then every
    new line), ``{"type": "following", "node": ...}`` once the node streams, and last
    ``{"type": "end", "reason": ..., "message": ...}`` when the replica is gone or the node stops
    answering; then it closes. Whoever may read the service may read its replicas' logs.
    """

    pump: asyncio.Task[None] | None = None
    grant: Any = None  # serving.web.access.ReadGrant, re-checked while the log streams

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        kwargs = self.scope["url_route"]["kwargs"]
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        route = await self._route(
            str(kwargs["service_id"]), str(kwargs["route_id"]), (query.get("member") or [None])[0]
        )
        if route is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.accept()
        try:
            if isinstance(route, str):
                raise ValueError(route)
            tail = logfollow.parse_tail((query.get("tail") or [None])[0])
        except ValueError as exc:
            await self.send_json({"type": "end", "reason": "bad-request", "message": str(exc)})
            await self.close()
            return
        self.pump = asyncio.create_task(self._pump(route, tail))

    async def disconnect(self, code: int) -> None:
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pump  # its cleanup deletes the lease: the node stops following now

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The client has nothing to say; whatever it sends is ignored."""

    async def _pump(self, route: Any, tail: int) -> None:
        events = logfollow.follow(route, tail, access_lost=database_sync_to_async(self.grant.lost))
        try:
            async for event in events:
                if isinstance(event, logfollow.Lines):
                    await self.send_json({"type": "lines", "lines": event.lines})
                elif isinstance(event, logfollow.Following):
                    await self.send_json({"type": "following", "node": event.node})
                else:
                    await self.send_json({"type": "end", "reason": event.reason, "message": event.message})
                    # Lost access closes like a stranger's connect is refused (4404).
                    await self.close(code=CLOSE_NOT_FOUND if event.reason == logfollow.REVOKED else None)
        finally:
            await events.aclose()

    @database_sync_to_async
    def _route(self, service_id: str, route_id: str, member: str | None) -> Any:
        """The log's RouteRef; None for a stranger or an unknown route; a str saying what is wrong
        with ``member`` (said once the socket is open: the route is the reader's to see)."""
        try:
            endpoint = access_endpoint(self.scope["user"], service_id)
        except Http404:
            return None
        self.grant = ReadGrant.of_scope(self.scope, str(endpoint.pk))
        route = Route.objects.select_related("node").filter(pk=route_id, endpoint=endpoint).first()
        if route is None:
            return None
        try:
            return logfollow.RouteRef.of(logfollow.log_source(route, member))
        except (ValueError, LookupError) as exc:
            return str(exc)


websocket_urlpatterns = [
    path("ws/services/", ServiceListConsumer.as_asgi()),
    path("ws/services/<uuid:service_id>/", ServiceStatusConsumer.as_asgi()),
    path("ws/services/<uuid:service_id>/routes/<uuid:route_id>/logs/", RouteLogConsumer.as_asgi()),
    path("ws/validations/<str:validation_id>/", ValidationConsumer.as_asgi()),
]
