"""Run a service's dry run on this node (S4.2): one throwaway replica, its lifecycle and log published
live (``serving.bus.dryrun``), health-checked as the prober would, then removed. Bounded by a timeout;
nothing is written to the services tables.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

from serving import failpoints
from serving.bus.dryrun import MAX_LOG_LINES, ValidationRequest, load_request, mark_started, publish
from serving.core import slots
from serving.core.health import ProbeState as State
from serving.core.health import apply_probe, next_probe_at
from serving.models import Endpoint, Node, Route
from serving.node import replicas
from serving.node.engine import get_engine, share_node_addresses, stop_quietly
from serving.node.engines.base import LABEL_ROUTE, LABEL_VALIDATION, EngineError, ReplicaState
from storage.models import Folder

log = logging.getLogger(__name__)


def _transient_route(request: ValidationRequest) -> Route:
    """An unsaved endpoint + route built from the request, for replicas.build_spec."""
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
    route.resources = slots.replica_request(endpoint.resources)
    # The devices the scheduler picked when it chose the node (not held: a validation is brief).
    route.devices = dict(request.config.get("devices") or {})
    return route


def run(validation_id: str) -> str:
    """Run one validation on this node; returns the outcome ("healthy" or "failed")."""
    request = load_request(validation_id)
    if request is None:
        return "failed"
    deadline = time.monotonic() + request.timeout
    mark_started(validation_id)

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
        stop_quietly(engine, info.replica_id)
        pump.join(timeout=2)
        publish(validation_id, "lifecycle", message="Replica removed.")
    return finish(outcome, message)
