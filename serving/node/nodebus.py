"""What a node hears over Redis besides its Celery queue: log requests and the proxies' failure reports.

Two things need an answer from a node *now*, not after whatever its Celery queue holds:

* **Per-route logs** (``GET /api/v1/services/{id}/routes/{route_id}/logs/``). The logs live on the
  route's node (the local engine's state directory, or that host's Docker daemon). The web process
  publishes a request on ``<prefix>:node:<name>:requests`` and waits on a reply list for a few
  seconds; the node's listener reads the engine's log tail and pushes the answer. ``PUBLISH``
  returns how many listeners got the request, so a node whose worker is down is known at once
  (no listener) and a clear 503 goes back without waiting. There is no Celery result backend, and a
  log request must not wait behind a queue of replica starts, which is why this is not a task.
* **Following a route's log live** (``op: follow``): the listener hands the request to
  ``serving.web.logfollow.Follows``, which streams the lines into Redis from a thread of its own until
  the web's lease on the follow lapses; the listener's loop checks those leases every second.
* **Route failures reported by the proxies** on ``<prefix>:proxy:route-failures`` (proxy/report.py):
  every node hears every report and acts only on the routes its prober tracks: it checks the route
  at once (has the process exited? then one HTTP probe), instead of at the next interval. Bursts are
  deduplicated per route and the rate of checks is bounded, so a proxy under load can not make a
  node hammer its replicas or the database.

The listener is a thread of the node agent (``serving.node.agent.NodeAgent``); it reconnects by itself
when Redis goes away and comes back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from django.conf import settings

from serving.node.engines.base import EngineError, ReplicaNotFound

log = logging.getLogger(__name__)

LOGS_TIMEOUT = 3.0  # how long the web process waits for a node's answer
MAX_TAIL = 5000
MAX_LINE = 8192  # longer lines are cut: a replica printing a huge blob must not fill the answer
REPLY_TTL = 10  # seconds a reply nobody collected stays in Redis
# Failure reports: one check per route per window, at most RATE checks per second per node.
DEDUPE_WINDOW = 1.0
RATE = 20.0
MAX_PENDING_LOG_REQUESTS = 16


class NodeUnavailable(Exception):
    """The route's node can not answer right now; ``str()`` is a sentence for the user."""


def requests_channel(node: str) -> str:
    return f"{settings.REDIS_PREFIX}:node:{node}:requests"


def failures_channel() -> str:
    return f"{settings.REDIS_PREFIX}:proxy:route-failures"


def _client(read_timeout: float | None) -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=read_timeout)


# --- the web side --------------------------------------------------------------------------------


def route_logs(route: Any, tail: int, timeout: float = LOGS_TIMEOUT) -> dict[str, Any]:
    """The last ``tail`` lines of a route's replica, fetched from its node.

    A route that never got a container (failed before or while starting) answers with the log tail
    its error kept, without asking the node. Raises NodeUnavailable when the node does not answer.
    """
    from serving.node.agent import STARTING_MARK

    tail = max(1, min(int(tail), MAX_TAIL))
    node = route.node
    answer: dict[str, Any] = {
        "route": str(route.pk),
        "node": node.name if node else None,
        "lines": [],
        "truncated": False,
    }
    kept = [line for line in str((route.error or {}).get("log_tail") or "").splitlines()]
    if node is None or route.container_id in ("", STARTING_MARK):
        answer["lines"] = kept[-tail:]
        answer["truncated"] = len(kept) > tail
        return answer
    reply = _ask_node(node.name, {"op": "logs", "container_id": route.container_id, "tail": tail}, timeout)
    if reply.get("gone"):
        # The container was removed (e.g. a replica that failed to start): what its error kept.
        answer["lines"] = kept[-tail:]
        answer["truncated"] = len(kept) > tail
        return answer
    if reply.get("error"):
        raise NodeUnavailable(f"Node {node.name} could not read the replica's logs: {reply['error']}")
    answer["lines"] = [str(line) for line in reply.get("lines") or []]
    answer["truncated"] = bool(reply.get("truncated"))
    return answer


def _ask_node(node: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    request_id = uuid.uuid4().hex
    reply_key = f"{settings.REDIS_PREFIX}:node-reply:{request_id}"
    client = _client(read_timeout=timeout + 2)
    try:
        listeners = client.publish(
            requests_channel(node), json.dumps({**request, "id": request_id, "reply": reply_key})
        )
        if not listeners:
            raise NodeUnavailable(
                f"Node {node} is not answering (its worker is not running or not connected to Redis); "
                "its replicas' logs can not be read now. Try again when the node is back."
            )
        popped = client.blpop([reply_key], timeout=max(1, round(timeout)))
    except redis.RedisError as exc:
        raise NodeUnavailable(f"Redis is not reachable, so node {node} can not be asked for logs ({exc}).") from None
    finally:
        client.close()
    if popped is None:
        raise NodeUnavailable(
            f"Node {node} did not answer within {timeout:g} s; it may be overloaded. Try again in a moment."
        )
    result: dict[str, Any] = json.loads(popped[1])
    return result


# --- the node side -------------------------------------------------------------------------------


def read_logs(container_id: str, tail: int) -> dict[str, Any]:
    """This node's answer to a log request (runs on the node)."""
    from serving.node.agent import get_engine

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
        from serving.web.logfollow import Follows

        # Live log follows (serving.logfollow): started here, ended when their lease is gone.
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
            self.route_failed(str(payload.get("route") or ""), str(payload.get("error") or ""))
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
            client = _client(read_timeout=5)
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

    def route_failed(self, route_id: str, error: str) -> bool:
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
        if not self.prober.check_now(route_id, error):
            return False
        self.checks_requested += 1
        log.info("route %s reported failing by a proxy (%s): checking it now", route_id, error)
        return True
