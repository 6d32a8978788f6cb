"""Following one replica's log live: the last lines, then every new line as it is written.

The log lives on the route's node, so the web asks the node, as for the tail (serving.nodebus):

1. The web makes a follow id, sets a **lease** key ``<prefix>:log-follow:<id>:lease`` that expires
   after LEASE_TTL seconds, and publishes ``{"op": "follow", ...}`` on the node's request channel.
   ``PUBLISH`` says at once whether a node listener heard it.
2. The node (``Follows``, run by its NodeListener) starts one thread for the follow, which calls the
   engine's follow iterator and pushes each line (cut to MAX_LINE) onto a capped list
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
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from django.conf import settings

from serving.node.engines.base import EngineError, ReplicaNotFound

log = logging.getLogger(__name__)

LEASE_TTL = 10.0  # seconds a follow lives after the last refresh of its lease
LEASE_REFRESH = 3.0  # how often the reader refreshes it
LEASE_CHECK = 1.0  # how often a node looks at the leases of its follows
START_TIMEOUT = 3.0  # how long the web waits for the node to take a follow on
# How often the web re-checks that the reader may still read the service (serving.access.ReadGrant):
# a reader removed from the project, or a terminated service, stops getting lines within this long.
ACCESS_CHECK = 2.0
MAX_FOLLOWS = 32  # per node: each is a thread and an engine log stream
MAX_LINE = 8192  # longer lines are cut
STREAM_CAP = 5000  # entries a follow's list keeps when its reader falls behind
STREAM_TTL = 30  # seconds a follow's list outlives its last push
BATCH = 500  # lines per message to the reader
MAX_TAIL = 5000
DEFAULT_TAIL = 200
_FOLLOW_ID = re.compile(r"^[0-9a-f]{32}$")

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


@dataclass
class _Follow:
    id: str
    container_id: str
    tail: int
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Follows:
    """The log follows running on one node: at most ``limit``, each ended once its lease is gone."""

    def __init__(
        self,
        node: str,
        engine: Callable[[], Any] | None = None,
        limit: int = MAX_FOLLOWS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self._engine = engine
        self.limit = limit
        self.clock = clock
        self._active: dict[str, _Follow] = {}
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        # One client (a thread-safe connection pool; it connects on first use) for every follow of
        # this node. Made here, not lazily: two threads making one each would leave one to be
        # garbage-collected, which closes the connections the other thread is still using.
        self._redis = _client()

    def client(self) -> redis.Redis:
        return self._redis

    def engine(self) -> Any:
        if self._engine is not None:
            return self._engine()
        from serving.node.agent import get_engine

        return get_engine()

    def active(self) -> list[str]:
        """Ids of the follows whose thread still runs."""
        with self._lock:
            return list(self._active)

    def start(self, request: dict[str, Any]) -> bool:
        """Take a follow request from the web on; False when it was refused (answered with why)."""
        follow_id = str(request.get("id") or "")
        if not _FOLLOW_ID.match(follow_id):
            return False
        try:
            tail = max(1, min(int(request.get("tail") or DEFAULT_TAIL), MAX_TAIL))
        except (TypeError, ValueError):
            tail = DEFAULT_TAIL
        follow = _Follow(follow_id, str(request.get("container_id") or ""), tail)
        with self._lock:
            if follow_id in self._active:
                return False
            refused = len(self._active) >= self.limit
            if not refused:
                follow.thread = threading.Thread(
                    target=self._run, args=(follow,), name=f"log-follow-{follow_id[:8]}", daemon=True
                )
                self._active[follow_id] = follow
        if refused:
            log.warning("refusing a log follow: %d already run on node %s", self.limit, self.node)
            self._push_quietly(
                follow_id,
                {
                    "end": BUSY,
                    "message": f"Node {self.node} is already following {self.limit} logs, its limit; "
                    "close other log windows and try again.",
                },
            )
            return False
        assert follow.thread is not None
        follow.thread.start()
        return True

    def check_leases(self, force: bool = False) -> list[str]:
        """Stop the follows nobody reads any more (lease gone); at most every LEASE_CHECK seconds
        unless ``force``. Returns the ids told to stop."""
        now = self.clock()
        if not force and now - self._checked_at < LEASE_CHECK:
            return []
        self._checked_at = now
        with self._lock:
            follows = [f for f in self._active.values() if not f.stop.is_set()]
        if not follows:
            return []
        try:
            pipe = self.client().pipeline(transaction=False)
            for follow in follows:
                pipe.exists(lease_key(follow.id))
            alive = pipe.execute()
        except redis.RedisError as exc:
            # Redis is away: the follows' own pushes fail too and end them.
            log.debug("lease check failed: %s", exc)
            return []
        stopped = []
        for follow, exists in zip(follows, alive, strict=True):
            if not exists:
                follow.stop.set()
                stopped.append(follow.id)
        return stopped

    def stop_all(self, wait: float = 0.0) -> None:
        with self._lock:
            follows = list(self._active.values())
        for follow in follows:
            follow.stop.set()
        deadline = time.monotonic() + wait
        for follow in follows:
            if follow.thread is not None and wait > 0:
                follow.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not self.active():
            self._redis.connection_pool.disconnect()  # reconnects by itself if used again

    def _run(self, follow: _Follow) -> None:
        client = self.client()
        try:
            self._push(client, follow, {"started": True})
            try:
                lines = self.engine().logs(follow.container_id, tail=follow.tail, follow=True, stop=follow.stop)
                for line in lines:
                    if follow.stop.is_set():
                        break
                    self._push(client, follow, {"line": line[:MAX_LINE]})
            except ReplicaNotFound:
                end = {"end": GONE, "message": "The replica is gone (stopped or removed); no more lines will come."}
            except EngineError as exc:
                end = {"end": ERROR, "message": f"Node {self.node} could not read the replica's log: {exc}"}
            else:
                end = {"end": ENDED, "message": "The replica has stopped; no more lines will come."}
            if follow.stop.is_set():
                # Nobody reads any more: drop what was not read instead of leaving it for STREAM_TTL.
                client.delete(stream_key(follow.id))
            else:
                self._push(client, follow, end)
        except redis.RedisError as exc:
            log.warning("log follow %s ended: Redis is not reachable (%s)", follow.id, exc)
        except Exception:
            log.exception("log follow %s failed", follow.id)
        finally:
            follow.stop.set()  # ends the engine's stream if an error left it open
            with self._lock:
                self._active.pop(follow.id, None)

    @staticmethod
    def _push(client: redis.Redis, follow: _Follow, message: dict[str, Any]) -> None:
        key = stream_key(follow.id)
        pipe = client.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(message))
        pipe.ltrim(key, -STREAM_CAP, -1)
        pipe.expire(key, STREAM_TTL)
        pipe.execute()

    def _push_quietly(self, follow_id: str, message: dict[str, Any]) -> None:
        try:
            self._push(self.client(), _Follow(follow_id, "", 0), message)
        except redis.RedisError as exc:
            log.debug("could not answer follow %s: %s", follow_id, exc)


def _client() -> redis.Redis:
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
        """From a Route or one of its RouteMembers (serving.logfollow.log_source)."""
        kept = str((source.error or {}).get("log_tail") or "").splitlines()
        route_id = str(getattr(source, "route_id", None) or source.pk)
        return cls(route_id, source.node.name if source.node else None, source.container_id or "", tuple(kept))


def log_source(route: Any, member: str | None) -> Any:
    """Whose log is asked for: the route itself (its main member, the default) or one of a
    cluster-mode route's sub members (``sub1``, ...), each a container of its own, maybe on
    another node. Raises ValueError for a name that is not a member's host name and LookupError
    when the route has no such member; both say what the route has."""
    from serving.core.cluster import MAIN, parse_member

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
    from serving.node.nodebus import requests_channel

    client = _client()
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
    from serving.node.agent import STARTING_MARK

    tail = max(1, min(tail, MAX_TAIL))
    if route.node is None or route.container_id in ("", STARTING_MARK):
        if route.kept:
            yield Lines(list(route.kept[-tail:]))
        yield End(
            NOT_RUNNING,
            "This replica is not running (it never started, or failed to start); there is no live log to follow.",
        )
        return
    from serving.node.nodebus import requests_channel

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
