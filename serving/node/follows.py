"""The node's side of following a replica's log live (the protocol is ``serving.bus.logfollow``).

One thread per follow reads the engine's follow iterator and pushes each line onto the follow's capped
Redis list; the node's listener checks the follows' leases every second and stops those whose reader
left, so a closed browser tab never leaves a thread or an engine log stream behind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from serving.bus.logfollow import (
    BUSY,
    DEFAULT_TAIL,
    ENDED,
    ERROR,
    FOLLOW_ID,
    GONE,
    LEASE_CHECK,
    MAX_FOLLOWS,
    MAX_LINE,
    MAX_TAIL,
    STREAM_CAP,
    STREAM_TTL,
    lease_key,
    redis_client,
    stream_key,
)
from serving.node.engine import get_engine
from serving.node.engines.base import EngineError, ReplicaNotFound

log = logging.getLogger(__name__)


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
        self._redis = redis_client()

    def client(self) -> redis.Redis:
        return self._redis

    def engine(self) -> Any:
        if self._engine is not None:
            return self._engine()
        return get_engine()

    def active(self) -> list[str]:
        """Ids of the follows whose thread still runs."""
        with self._lock:
            return list(self._active)

    def start(self, request: dict[str, Any]) -> bool:
        """Take a follow request from the web on; False when it was refused (answered with why)."""
        follow_id = str(request.get("id") or "")
        if not FOLLOW_ID.match(follow_id):
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
