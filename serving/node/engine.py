"""This node's engine, and the few things every part of the node side does with it.

One engine per process (a node worker's parent and each forked child has its own), made on first
use from ``SERVING_ENGINE``: Docker when a daemon answers, else the local bubblewrap engine; Swarm
services through a swarm manager when asked for (``swarm``).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from serving.bus import events
from serving.models import Node, Route, ServiceEvent
from serving.node.engines.base import Engine, EngineError, ReplicaInfo

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_lock = threading.Lock()


def node_name() -> str:
    return str(settings.NODE_NAME)


def get_engine() -> Engine:
    """The engine of this node: Docker when a daemon answers (SERVING_ENGINE=auto), else local."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _make_engine(settings.SERVING_ENGINE)
        return _engine


def set_engine(engine: Engine | None) -> None:
    """For tests and tools that bring their own engine instance."""
    global _engine
    with _engine_lock:
        _engine = engine


def _make_engine(choice: str) -> Engine:
    # The engines are imported when first needed: a web process or a tool that never drives an
    # engine does not load docker-py, and a node without it still runs the local engine.
    from serving.node.engines.local.engine import LocalEngine

    state_dir = settings.ENGINE_STATE_DIR
    if choice == "swarm":
        return _make_swarm_engine(state_dir)
    if choice in ("docker", "auto"):
        try:
            from serving.node.engines.docker.engine import DockerEngine
        except ImportError:
            DockerEngine = None  # type: ignore[assignment,misc]
        docker_engine = (
            DockerEngine(
                state_dir=state_dir / "docker",
                installation=settings.REDIS_PREFIX,
                publish_host=settings.NODE_ADDRESS,
                egress=settings.SERVING_REPLICA_EGRESS,
                uid=settings.DOCKER_REPLICA_UID,
                gid=settings.DOCKER_REPLICA_GID,
                image_pull=settings.SERVING_IMAGE_PULL,
                registries=settings.SERVING_REGISTRIES,
            )
            if DockerEngine is not None
            else None
        )
        if docker_engine is not None and docker_engine.available():
            return docker_engine
        if choice == "docker":
            raise EngineError("SERVING_ENGINE=docker but no Docker daemon answers; start dockerd or use local.")
    if not ipaddress.ip_address(settings.NODE_ADDRESS).is_loopback:
        log.warning(
            "NODE_ADDRESS=%s: the local engine's replicas are reachable from this machine only (each in a "
            "network namespace of its own); a proxy on another host can not reach them. Use Docker for nodes "
            "on several hosts, or run the proxy on this host.",
            settings.NODE_ADDRESS,
        )
    return LocalEngine(
        state_dir=state_dir / f"local-{node_name()}",
        uid=settings.LOCAL_ENGINE_UID,
        gid=settings.LOCAL_ENGINE_GID,
        egress=settings.SERVING_REPLICA_EGRESS,
    )


def _make_swarm_engine(state_dir: Path) -> Engine:
    # Imported when chosen: see _make_engine.
    from serving.node.engines.swarm.engine import SwarmEngine

    engine = SwarmEngine(
        state_dir=state_dir / "swarm",
        installation=settings.REDIS_PREFIX,
        publish_mode=settings.SWARM_PUBLISH_MODE,
        placement_node=settings.SWARM_NODE,
        ingress_host=settings.NODE_ADDRESS,
        uid=settings.DOCKER_REPLICA_UID,
        gid=settings.DOCKER_REPLICA_GID,
        stop_grace=settings.REPLICA_STOP_GRACE,
        egress=settings.SERVING_REPLICA_EGRESS,
        gpu_resource=settings.SWARM_GPU_RESOURCE,
        image_pull=settings.SERVING_IMAGE_PULL,
        registries=settings.SERVING_REGISTRIES,
    )
    problem = engine.not_a_manager()
    if problem:
        raise EngineError(problem)
    return engine


def share_node_addresses(engine: Engine) -> None:
    """Hand the engine every node's address (the Docker engine keeps replicas off all of them, so
    a replica here can not call a replica published on another node past the proxy's tokens).

    Called at every heartbeat (in the node agent's thread of the parent worker) and before every
    start (in whichever forked worker runs it: each process has its own engine, which knows only
    what it was told): the engine re-asserts every rule each time, and drops those of addresses
    no longer in the table."""
    set_addresses = getattr(engine, "set_node_addresses", None)
    if set_addresses is None:
        return
    addresses = Node.objects.exclude(address="").values_list("address", flat=True)
    try:
        set_addresses(list(addresses))
    except EngineError:
        log.exception("could not update the firewall rules for the nodes' addresses; retrying at the next heartbeat")


def report_unavailable(engine: Engine, now: datetime | None = None) -> str:
    """Ask the engine whether this node can take new replicas (``Engine.unavailable``) and write its
    answer on the node's row: the sentence, and since when (kept while it stays unavailable, for
    whatever reason), or "" and no time once it can again. Returns the sentence.

    Called with every heartbeat, and before every start: a start placed before the heartbeat saw the
    node go fails at once (``routes.start_route``) instead of waiting for a task Swarm never runs."""
    now = now or timezone.now()
    try:
        reason = engine.unavailable()
    except Exception:
        # An engine's own check must not stop the heartbeat (the node would read as lost): the
        # row keeps what it said last, and the next heartbeat asks again.
        log.exception("could not ask the engine whether this node takes replicas; asking again at the next heartbeat")
        return str(Node.objects.filter(name=node_name()).values_list("unavailable", flat=True).first() or "")
    rows = Node.objects.filter(name=node_name())
    if not reason:
        if rows.exclude(unavailable="").update(unavailable="", unavailable_since=None):
            log.warning("node %s takes replicas again", node_name())
        return ""
    rows.filter(unavailable_since__isnull=True).update(unavailable_since=now)
    if rows.exclude(unavailable=reason).update(unavailable=reason):
        log.warning("node %s can take no new replicas: %s", node_name(), reason)
    return reason


def stop_quietly(engine: Engine, replica_id: str) -> None:
    try:
        engine.stop(replica_id, grace=settings.REPLICA_STOP_GRACE)
    except EngineError as exc:
        log.warning("stopping replica %s failed: %s", replica_id, exc)


def log_tail(engine: Engine, replica_id: str, lines: int = 20) -> str:
    try:
        return "\n".join(list(engine.logs(replica_id, tail=lines))[-lines:])
    except EngineError:
        return ""


def record_start_warnings(
    route: Route,
    info: ReplicaInfo,
    who: str,
    definition_warnings: Iterable[str] = (),
    environ_warnings: Iterable[str] = (),
) -> None:
    """What the engine noticed at start but did not stop for (a read-write mount the replica's
    user can not write): a warning on the service's log, as well as a line in the replica's.
    Once per service and spec version: every replica of a version meets the same folder, and a
    service restarting its replicas would otherwise repeat it at each start. ``definition_warnings``:
    the model definition's unknown keys (``ReplicaSpec.definition_warnings``), said the same way so a
    typo such as ``inital_delay`` is seen by whoever watches the service start. ``environ_warnings``:
    its cache variables that point under the read-only model folder (``ReplicaSpec.environ_warnings``)."""
    for warning in [
        *info.warnings,
        *(f"model definition: {w}" for w in definition_warnings),
        *(f"environment: {w}" for w in environ_warnings),
    ]:
        seen = ServiceEvent.objects.filter(
            endpoint_id=route.endpoint_id,
            kind="replica_warning",
            data__spec_version=route.spec_version,
            data__warning=warning,
        )
        if seen.exists():
            continue
        events.record_event(
            route.endpoint,
            "replica_warning",
            f"{who}: {warning}",
            level=ServiceEvent.Level.WARNING,
            route_id=route.pk,
            data={"spec_version": route.spec_version, "warning": warning},
        )
