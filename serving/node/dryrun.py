"""Validate a service configuration before creating it (S4.2).

The configuration runs once as a throwaway replica on a node: lifecycle events and the container's
log are streamed live to a Channels group (and kept in a Redis list, so a browser that connects a
moment later still sees everything from the first line), then ``Finished`` with the outcome, then the
replica is removed. Bounded by a timeout. Nothing is written to the services tables.
"""

from __future__ import annotations

import dataclasses
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

from serving import failpoints
from serving.bus import routing
from serving.models import Endpoint, Node, Route
from serving.node.engines.base import LABEL_ROUTE, LABEL_VALIDATION, EngineError, ReplicaState
from storage.models import Folder

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


# --- on the node ---------------------------------------------------------------------------------


def _transient_route(request: ValidationRequest) -> Route:
    """An unsaved endpoint + route built from the request, for replicas.build_spec."""
    from serving.control import scheduler

    config = request.config
    endpoint = Endpoint(
        id=uuid.UUID(request.id),
        name=config["name"],
        owner_id=request.user_id,  # (whose private mounts these are: Endpoint.shared_definition_problem)
        runtime=config["runtime"],
        model_folder=Folder.objects.filter(pk=config["folder"]).first(),
        model_mount=config["model_mount"],
        model_definition_path=config["model_definition_path"],
        extra_mounts=config["extra_mounts"],
        image=config["image"],
        resources=config["resources"],
        environ=config["environ"],
        desired_replicas=1,
    )
    route = Route(id=uuid.uuid4(), endpoint=endpoint, node=Node.objects.filter(name=request.node).first())
    route.resources = scheduler.replica_request(endpoint)
    return route


def run(validation_id: str) -> str:
    """Run one validation on this node; returns the outcome ("healthy" or "failed")."""
    from serving.node import replicas
    from serving.node.agent import _stop_quietly, get_engine, share_node_addresses
    from serving.node.prober import ProbeState as State
    from serving.node.prober import apply_probe, next_probe_at

    request = load_request(validation_id)
    if request is None:
        return "failed"
    deadline = time.monotonic() + request.timeout
    # When this run began on the node (not when it was queued): the sweep's clock for abandoned runs.
    routing.get_redis().set(_key(validation_id, "started"), time.time(), ex=HISTORY_TTL)

    def finish(outcome: str, message: str) -> str:
        publish(validation_id, "finished", outcome=outcome, message=message)
        return outcome

    publish(validation_id, "lifecycle", message=f"Validation started on node {request.node}.")
    try:
        route = _transient_route(request)
        spec, health = replicas.build_spec(route)
    except replicas.SpecError as exc:
        publish(validation_id, "lifecycle", message=f"Configuration error: {exc}")
        return finish("failed", str(exc))
    # Not a route: labelled as a validation, which the node's sweep removes once the run is over.
    labels = {k: v for k, v in spec.labels.items() if k != LABEL_ROUTE}
    spec = dataclasses.replace(spec, labels={**labels, LABEL_VALIDATION: validation_id})
    publish(validation_id, "lifecycle", message=f"Starting a replica of image {spec.image} (port {spec.port}).")
    engine = get_engine()
    share_node_addresses(engine)  # this may be a forked worker, whose engine knows no other node yet
    try:
        info = engine.start(spec)
    except EngineError as exc:
        return finish("failed", str(exc))
    failpoints.crash_point("validation.started")
    publish(
        validation_id, "lifecycle", message=f"Replica started at {info.host}:{info.port}; waiting for it to be healthy."
    )

    stop_logs = threading.Event()

    def pump_logs() -> None:
        count = 0
        try:
            for line in engine.logs(info.replica_id, tail=MAX_LOG_LINES, follow=True):
                publish(validation_id, "log", line=line)
                count += 1
                if stop_logs.is_set() or count >= MAX_LOG_LINES:
                    break
        except EngineError:
            pass

    pump = threading.Thread(target=pump_logs, daemon=True)
    pump.start()
    outcome, message = "failed", f"The replica did not become healthy within {request.timeout:g} s."
    try:
        import urllib.error
        import urllib.request

        state = State(started_at=time.time())
        # Validation does not wait out a long initial_delay: it checks from the start.
        while time.monotonic() < deadline:
            current = engine.inspect(info.replica_id)
            if current.state in (ReplicaState.EXITED, ReplicaState.GONE):
                outcome = "failed"
                message = current.error or f"The replica exited with code {current.exit_code}."
                break
            ok = False
            try:
                if health.path is None:
                    import socket

                    socket.create_connection((info.host, info.port), timeout=health.max_wait_time).close()
                    ok = True
                else:
                    req = urllib.request.Request(
                        f"http://{info.host}:{info.port}{health.path}", headers=dict(health.headers)
                    )
                    with urllib.request.urlopen(req, timeout=min(health.max_wait_time, 5.0)) as response:  # noqa: S310
                        ok = response.status == health.expected_status_code
            except urllib.error.HTTPError as exc:
                ok = exc.code == health.expected_status_code
            except OSError:
                ok = False
            state = apply_probe(health, state, ok, time.time())
            if ok:
                outcome, message = "healthy", f"The replica answered its health check at {health.path or 'its port'}."
                break
            time.sleep(min(1.0, max(0.2, next_probe_at(health, state) - time.time())))
    except EngineError as exc:
        message = str(exc)
    finally:
        time.sleep(0.3)  # let the last log lines through
        stop_logs.set()
        _stop_quietly(engine, info.replica_id)
        pump.join(timeout=2)
        publish(validation_id, "lifecycle", message="Replica removed.")
    return finish(outcome, message)
