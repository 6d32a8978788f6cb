"""What a node hears over Redis besides its Celery queue: log requests and the proxies' failure reports.

Two things need an answer from a node *now*, not after whatever its Celery queue holds:

* **Per-route logs** (``GET /api/v1/services/{id}/routes/{route_id}/logs/``). The logs live on the
  route's node (the local engine's state directory, or that host's Docker daemon). The web process
  publishes a request on ``<prefix>:node:<name>:requests`` and waits on a reply list for a few
  seconds; the node's listener reads the engine's log tail and pushes the answer. ``PUBLISH``
  returns how many listeners got the request, so a node whose worker is down is known at once
  (no listener) and a clear 503 goes back without waiting. There is no Celery result backend, and a
  log request must not wait behind a queue of replica starts, which is why this is not a task.
* **Following a route's log live** (``op: follow``, ``serving.bus.logfollow``): the listener hands the
  request to ``serving.node.follows.Follows``, which streams the lines into Redis from a thread of its own until
  the web's lease on the follow lapses; the listener's loop checks those leases every second.
* **Route failures reported by the proxies** on ``<prefix>:proxy:route-failures`` (proxy/report.py):
  every node hears every report and acts only on the routes its prober tracks: it checks the route
  at once (has the process exited? then one HTTP probe), instead of at the next interval. Bursts are
  deduplicated per route and the rate of checks is bounded, so a proxy under load can not make a
  node hammer its replicas or the database.

This module is the protocol and the web's side of it. The node's side is ``serving.node.listener``, a
thread of the node agent that reconnects by itself when Redis goes away and comes back.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import redis
from django.conf import settings

from serving.models import STARTING_MARK

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


def redis_client(read_timeout: float | None) -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=read_timeout)


# --- the web's side --------------------------------------------------------------------------------


def route_logs(route: Any, tail: int, timeout: float = LOGS_TIMEOUT) -> dict[str, Any]:
    """The last ``tail`` lines of a route's replica, fetched from its node.

    A route that never got a container (failed before or while starting) answers with the log tail
    its error kept, without asking the node. Raises NodeUnavailable when the node does not answer.
    """
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
    client = redis_client(read_timeout=timeout + 2)
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
