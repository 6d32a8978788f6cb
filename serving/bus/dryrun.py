"""A service's dry run (S4.2, "validate before create"): its request and its live history.

The configuration runs once as a throwaway replica on a node (``serving.node.dryrun``): lifecycle
events and the container's log are streamed live to a Channels group (and kept in a Redis list, so a
browser that connects a moment later still sees everything from the first line), then ``Finished``
with the outcome, then the replica is removed. Bounded by a timeout. Nothing is written to the
services tables. The actions save the request, the node publishes what happens, and the web replays
the history to the browser.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from serving.bus import routing

log = logging.getLogger(__name__)

HISTORY_TTL = 3600
_publish_lock = threading.Lock()
DEFAULT_TIMEOUT = 120.0
# A run whose worker died never says Finished; this long past its timeout, the node's sweep ends it.
ABANDONED_AFTER = 10.0
MAX_LOG_LINES = 5000


def group_name(validation_id: str) -> str:
    return f"validation.{validation_id}"


def _key(validation_id: str, part: str) -> str:
    return f"{settings.REDIS_PREFIX}:validation:{validation_id}:{part}"


@dataclass(frozen=True)
class ValidationRequest:
    id: str
    user_id: int
    node: str
    config: dict[str, Any]  # the create fields, with ids instead of objects
    timeout: float = DEFAULT_TIMEOUT


def save_request(request: ValidationRequest) -> None:
    client = routing.get_redis()
    client.set(_key(request.id, "request"), json.dumps(asdict(request)), ex=HISTORY_TTL)


def is_finished(validation_id: str) -> bool:
    """True when the run ended (or its record expired): its replica, if any, may be removed."""
    events = routing.get_redis().lrange(_key(validation_id, "events"), -1, -1)
    return not events or json.loads(events[0]).get("kind") == "finished"


def finish_if_abandoned(validation_id: str) -> bool:
    """True when the run is over. A run still unfinished well past its timeout lost its worker
    (killed mid-run): it is finished now, as failed, so the browser's dialog ends and its replica
    can go."""
    if is_finished(validation_id):
        return True
    request = load_request(validation_id)
    started = float(routing.get_redis().get(_key(validation_id, "started")) or 0.0)
    timeout = request.timeout if request is not None else DEFAULT_TIMEOUT
    if time.time() < started + timeout + ABANDONED_AFTER:
        return False
    publish(validation_id, "lifecycle", message="The worker running this validation stopped; its replica is removed.")
    publish(validation_id, "finished", outcome="failed", message="The validation was interrupted; run it again.")
    return True


def mark_started(validation_id: str) -> None:
    """When the run began on the node (not when it was queued): the sweep's clock for abandoned runs."""
    routing.get_redis().set(_key(validation_id, "started"), time.time(), ex=HISTORY_TTL)


def load_request(validation_id: str) -> ValidationRequest | None:
    raw = routing.get_redis().get(_key(validation_id, "request"))
    if raw is None:
        return None
    return ValidationRequest(**json.loads(raw))


def owner_of(validation_id: str) -> int | None:
    request = load_request(validation_id)
    return request.user_id if request else None


def history(validation_id: str) -> list[dict[str, Any]]:
    raw = routing.get_redis().lrange(_key(validation_id, "events"), 0, -1)
    return [json.loads(item) for item in raw]


def publish(validation_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    """Append an event to the history and send it to the live group; returns it (with its seq)."""
    client = routing.get_redis()
    # One run publishes from two threads (lifecycle and log pump): the lock keeps the history's
    # order equal to the sequence numbers the websocket de-duplicates by.
    with _publish_lock:
        seq = int(client.incr(_key(validation_id, "seq")))
        event = {"kind": kind, "at": time.time(), "seq": seq, **fields}
        pipe = client.pipeline()
        pipe.rpush(_key(validation_id, "events"), json.dumps(event))
        pipe.expire(_key(validation_id, "events"), HISTORY_TTL)
        pipe.expire(_key(validation_id, "seq"), HISTORY_TTL)
        pipe.execute()
    layer = get_channel_layer()
    if layer is not None:
        try:
            async_to_sync(layer.group_send)(group_name(validation_id), {"type": "validation.event", "event": event})
        except Exception as exc:
            log.debug("validation %s: live send failed (%s); history keeps it", validation_id, exc)
    return event


def new_id() -> str:
    return uuid.uuid4().hex
