"""The node's side of ``serving.bus.nodebus``: a thread that answers the web's log requests, runs the
live log follows (``serving.node.follows``) and checks at once the routes the proxies report failing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from django.conf import settings

from serving.bus.nodebus import (
    DEDUPE_WINDOW,
    MAX_LINE,
    MAX_PENDING_LOG_REQUESTS,
    MAX_TAIL,
    RATE,
    REPLY_TTL,
    failures_channel,
    redis_client,
    requests_channel,
)
from serving.node.engine import get_engine
from serving.node.engines.base import EngineError, ReplicaNotFound
from serving.node.follows import Follows

log = logging.getLogger(__name__)


def read_logs(container_id: str, tail: int) -> dict[str, Any]:
    """This node's answer to a log request (runs on the node)."""
    tail = max(1, min(int(tail), MAX_TAIL))
    try:
        # One line more than asked says whether there was more before.
        lines = list(get_engine().logs(container_id, tail=tail + 1))
    except ReplicaNotFound:
        return {"gone": True}
    except EngineError as exc:
        return {"error": str(exc)}
    return {
        "lines": [line[:MAX_LINE] for line in lines[-tail:]],
        "truncated": len(lines) > tail,
    }


class NodeListener(threading.Thread):
    """Subscribes to this node's request channel and the proxies' failure reports until stopped."""

    def __init__(self, node: str, prober: Any = None, clock: Any = time.monotonic) -> None:
        super().__init__(name=f"node-listener-{node}", daemon=True)
        self.node = node
        self.prober = prober
        self.clock = clock
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"node-requests-{node}")
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._last_check: dict[str, float] = {}
        self._allowance = RATE
        self._allowance_at = clock()
        self.checks_requested = 0  # for tests and logs
        self.reports_dropped = 0
        # Live log follows (serving.bus.logfollow): started here, ended when their lease is gone.
        self.follows = Follows(node)

    def stop(self) -> None:
        self.stopping.set()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.follows.stop_all()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._listen()
            except Exception as exc:
                self.subscribed.clear()
                log.warning("node listener lost Redis (%s); reconnecting", exc.__class__.__name__)
                self.stopping.wait(1.0)

    def _listen(self) -> None:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, health_check_interval=10)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(requests_channel(self.node), failures_channel())
            self.subscribed.set()
            while not self.stopping.is_set():
                message = pubsub.get_message(timeout=0.5)
                if message is not None and message.get("type") == "message":
                    self.dispatch(message["channel"], message["data"])
                self.follows.check_leases()  # at most every LEASE_CHECK seconds
        finally:
            self.subscribed.clear()
            pubsub.close()
            client.close()

    def dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if not isinstance(payload, dict):
            return
        if channel == failures_channel():
            self.route_failed(
                str(payload.get("route") or ""), str(payload.get("error") or ""), str(payload.get("request_id") or "")
            )
        elif channel == requests_channel(self.node):
            if payload.get("op") == "follow":
                self.follows.start(payload)  # a thread of its own; quick to start
            else:
                self._submit(payload)

    # Log requests run on a small pool, so a slow engine call never blocks the failure reports.
    def _submit(self, request: dict[str, Any]) -> None:
        with self._pending_lock:
            if self._pending >= MAX_PENDING_LOG_REQUESTS:
                log.warning("dropping a log request: %d already waiting", self._pending)
                return
            self._pending += 1
        try:
            self._workers.submit(self._serve, request)
        except RuntimeError:  # shutting down
            with self._pending_lock:
                self._pending -= 1

    def _serve(self, request: dict[str, Any]) -> None:
        try:
            reply_key = str(request.get("reply") or "")
            if request.get("op") != "logs" or not reply_key.startswith(f"{settings.REDIS_PREFIX}:node-reply:"):
                return
            answer = read_logs(str(request.get("container_id") or ""), int(request.get("tail") or 200))
            client = redis_client(read_timeout=5)
            try:
                pipe = client.pipeline()
                pipe.rpush(reply_key, json.dumps(answer))
                pipe.expire(reply_key, REPLY_TTL)
                pipe.execute()
            finally:
                client.close()
        except Exception:
            log.exception("answering a node request failed")
        finally:
            with self._pending_lock:
                self._pending -= 1

    def route_failed(self, route_id: str, error: str, request_id: str = "") -> bool:
        """A proxy could not connect to a route: check it now if it is ours. True if a check started."""
        if not route_id or self.prober is None or not self.prober.tracks(route_id):
            return False
        now = self.clock()
        if now - self._last_check.get(route_id, float("-inf")) < DEDUPE_WINDOW:
            return False  # a burst of reports (every request of a busy proxy) is one check
        self._allowance = min(RATE, self._allowance + (now - self._allowance_at) * RATE)
        self._allowance_at = now
        if self._allowance < 1.0:
            self.reports_dropped += 1
            return False
        self._allowance -= 1.0
        self._last_check[route_id] = now
        if len(self._last_check) > 10_000:
            self._last_check = {k: v for k, v in self._last_check.items() if now - v < DEDUPE_WINDOW}
        if not self.prober.check_now(route_id, error, request_id):
            return False
        self.checks_requested += 1
        log.info(
            "route %s reported failing by a proxy (%s): checking it now",
            route_id,
            error,
            extra={"route": route_id, "request_id": request_id},
        )
        return True
