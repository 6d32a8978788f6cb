"""Following one replica's log live: the last lines, then every new line as it is written.

The log lives on the route's node, so the web asks the node, as for the tail (``serving.bus.nodebus``).
This module is the protocol and the web's side of it; the node's side is ``serving.node.follows``:

1. The web makes a follow id, sets a **lease** key ``<prefix>:log-follow:<id>:lease`` that expires
   after LEASE_TTL seconds, and publishes ``{"op": "follow", ...}`` on the node's request channel.
   ``PUBLISH`` says at once whether a node listener heard it.
2. The node (``serving.node.follows.Follows``, run by its NodeListener) starts one thread for the
   follow, which calls the engine's follow iterator and pushes each line (cut to MAX_LINE) onto a capped list
   ``<prefix>:log-follow:<id>:lines``: first ``{"started": true}``, then ``{"line": ...}``, and last
   ``{"end": <why>, "message": <sentence>}`` when the replica ends.
3. The web pops that list, sends the lines on (websocket or streaming HTTP) and refreshes the lease
   every LEASE_REFRESH seconds while someone reads. When the reader leaves it deletes the lease; when
   the web process dies the lease expires. Either way the node's lease check (every LEASE_CHECK s)
   sets the follow's stop event, the engine's iterator ends, and the thread and the engine's log
   stream are gone: a closed browser tab never leaves a thread behind.

A list, not pub/sub: lines written between the request and the web's first read are kept, and a
reader that falls behind loses the oldest lines (the list is capped) instead of blocking the node.
At most MAX_FOLLOWS follows run on a node; one more is refused with a sentence saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from django.conf import settings

from serving.bus.nodebus import requests_channel
from serving.core.cluster import MAIN, parse_member
from serving.models import STARTING_MARK

log = logging.getLogger(__name__)

LEASE_TTL = 10.0  # seconds a follow lives after the last refresh of its lease
LEASE_REFRESH = 3.0  # how often the reader refreshes it
LEASE_CHECK = 1.0  # how often a node looks at the leases of its follows
START_TIMEOUT = 3.0  # how long the web waits for the node to take a follow on
# How often the web re-checks that the reader may still read the service (serving.web.access.ReadGrant):
# a reader removed from the project, or a terminated service, stops getting lines within this long.
ACCESS_CHECK = 2.0
MAX_FOLLOWS = 32  # per node: each is a thread and an engine log stream
MAX_LINE = 8192  # longer lines are cut
STREAM_CAP = 5000  # entries a follow's list keeps when its reader falls behind
STREAM_TTL = 30  # seconds a follow's list outlives its last push
BATCH = 500  # lines per message to the reader
MAX_TAIL = 5000
DEFAULT_TAIL = 200
FOLLOW_ID = re.compile(r"^[0-9a-f]{32}$")

# Why a follow ended (the ``end`` of the last message) and the sentence a user reads.
ENDED = "ended"
GONE = "gone"
NOT_RUNNING = "not-running"
NODE = "node"
BUSY = "busy"
ERROR = "error"
REVOKED = "revoked"  # the reader may no longer read the service (or it was terminated)


def lease_key(follow_id: str) -> str:
    return f"{settings.REDIS_PREFIX}:log-follow:{follow_id}:lease"


def stream_key(follow_id: str) -> str:
    return f"{settings.REDIS_PREFIX}:log-follow:{follow_id}:lines"


def parse_tail(raw: str | None) -> int:
    """The ``tail`` query parameter; ValueError with a sentence when it is not 1..MAX_TAIL."""
    if raw in (None, ""):
        return DEFAULT_TAIL
    try:
        tail = int(str(raw))
    except ValueError:
        tail = 0
    if not 1 <= tail <= MAX_TAIL:
        raise ValueError(f"tail must be a whole number from 1 to {MAX_TAIL}, not {raw!r}.")
    return tail


# --- the node side -------------------------------------------------------------------------------


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=5)


# --- the web side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteRef:
    """What the web needs to follow a route's log, read from the DB before the stream starts."""

    route_id: str
    node: str | None
    container_id: str
    kept: tuple[str, ...]  # the log tail the route's error kept (a replica that failed to start)

    @classmethod
    def of(cls, source: Any) -> RouteRef:
        """From a Route or one of its RouteMembers (``log_source``)."""
        kept = str((source.error or {}).get("log_tail") or "").splitlines()
        route_id = str(getattr(source, "route_id", None) or source.pk)
        return cls(route_id, source.node.name if source.node else None, source.container_id or "", tuple(kept))


def log_source(route: Any, member: str | None) -> Any:
    """Whose log is asked for: the route itself (its main member, the default) or one of a
    cluster-mode route's sub members (``sub1``, ...), each a container of its own, maybe on
    another node. Raises ValueError for a name that is not a member's host name and LookupError
    when the route has no such member; both say what the route has."""
    name = parse_member(member)
    if name.role == MAIN:
        return route
    found = route.members.select_related("node").filter(idx=name.idx).first()
    if found is None:
        have = ", ".join(["main1", *(f"sub{idx}" for idx in route.members.values_list("idx", flat=True))])
        raise LookupError(f"This replica has no member {name.host}; its members are {have}.")
    return found


@dataclass(frozen=True)
class Lines:
    lines: list[str]


@dataclass(frozen=True)
class Following:
    """The node took the follow on: what comes from now on is live."""

    node: str


@dataclass(frozen=True)
class End:
    reason: str
    message: str


Event = Lines | Following | End


def node_listens(node: str) -> bool:
    """Whether a listener of ``node`` is subscribed right now (sync; for a quick 503 before a stream)."""
    client = redis_client()
    try:
        return bool(client.pubsub_numsub(requests_channel(node))[0][1])
    except redis.RedisError:
        return False
    finally:
        client.close()


async def follow(
    route: RouteRef,
    tail: int,
    start_timeout: float = START_TIMEOUT,
    *,
    access_lost: Callable[[], Awaitable[str | None]] | None = None,
) -> AsyncGenerator[Event, None]:
    """The last ``tail`` lines of the route's replica, then each new line, then one End.

    ``access_lost`` is asked every ACCESS_CHECK seconds whether the reader may still read; a
    sentence ends the follow with ``End(REVOKED, sentence)`` before another line is passed on.

    Cancel it (or close it) to stop: the lease is deleted at once, so the node stops its thread at
    its next lease check rather than after LEASE_TTL.
    """
    tail = max(1, min(tail, MAX_TAIL))
    if route.node is None or route.container_id in ("", STARTING_MARK):
        if route.kept:
            yield Lines(list(route.kept[-tail:]))
        yield End(
            NOT_RUNNING,
            "This replica is not running (it never started, or failed to start); there is no live log to follow.",
        )
        return
    node = route.node
    follow_id = uuid.uuid4().hex
    channel = requests_channel(node)
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2)
    try:
        try:
            await client.set(lease_key(follow_id), "1", px=int(LEASE_TTL * 1000))
            listeners = await client.publish(
                channel,
                json.dumps({"op": "follow", "id": follow_id, "container_id": route.container_id, "tail": tail}),
            )
        except redis.RedisError as exc:
            yield End(NODE, f"Redis is not reachable, so node {node} can not be asked for the log ({exc}).")
            return
        if not listeners:
            yield End(
                NODE,
                f"Node {node} is not answering (its worker is not running or not connected to Redis); "
                "the replica's log can not be followed now. Try again when the node is back.",
            )
            return
        loop = asyncio.get_running_loop()
        started = False
        deadline = loop.time() + start_timeout
        refresh_at = loop.time() + LEASE_REFRESH
        access_at = loop.time() + ACCESS_CHECK
        while True:
            if access_lost is not None and loop.time() >= access_at:
                access_at = loop.time() + ACCESS_CHECK
                why = await access_lost()
                if why:
                    yield End(REVOKED, why)
                    return
            try:
                popped = await client.blpop([stream_key(follow_id)], timeout=0.5)
                if loop.time() >= refresh_at:
                    refresh_at = loop.time() + LEASE_REFRESH
                    await client.pexpire(lease_key(follow_id), int(LEASE_TTL * 1000))
                    if not (await client.pubsub_numsub(channel))[0][1]:
                        yield End(
                            NODE, f"Node {node} stopped answering, so the live log ended. Reopen it when it is back."
                        )
                        return
                more = await client.lpop(stream_key(follow_id), BATCH) if popped is not None else None
            except redis.RedisError as exc:
                yield End(NODE, f"Redis is not reachable, so the live log of node {node} ended ({exc}).")
                return
            if popped is None:
                if not started and loop.time() >= deadline:
                    yield End(
                        NODE,
                        f"Node {node} did not answer within {start_timeout:g} s; it may be overloaded. "
                        "Try again in a moment.",
                    )
                    return
                continue
            lines: list[str] = []
            for raw in [popped[1], *(more or [])]:
                message = json.loads(raw)
                if "line" in message:
                    lines.append(str(message["line"]))
                elif message.get("started"):
                    started = True
                    yield Following(node)
                elif "end" in message:
                    if lines:
                        yield Lines(lines)
                        lines = []
                    if message["end"] == GONE and route.kept:
                        yield Lines(list(route.kept[-tail:]))
                    yield End(str(message["end"]), str(message.get("message") or ""))
                    return
            if lines:
                yield Lines(lines)
    finally:
        # Whoever stops reading ends the follow: the node sees the lease gone at its next check.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.delete(lease_key(follow_id), stream_key(follow_id)), timeout=2)
        with contextlib.suppress(Exception):
            await client.aclose()
