"""The node side: what a node worker does for the routes placed on its node.

Commands (start, stop) arrive as Celery tasks on the queue ``node.<name>``. Besides them, the node
agent (a thread in the node worker, see ``serving.worker``) heartbeats, notices replicas that exited
on their own, stops orphan containers (ours by label, with no route), and probes health.
All state lives in the DB and in the engine's labels, never only in memory (docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.db.models import Q
from django.utils import timezone

from serving.bus import dryrun
from serving.core import architecture, devices, slots
from serving.models import STARTING_MARK, Node, Route, RouteMember
from serving.node import caches, members, prober, snapshots
from serving.node.engine import (
    get_engine,
    log_tail,
    node_name,
    report_unavailable,
    share_node_addresses,
    stop_quietly,
)
from serving.node.engines.base import (
    LABEL_ENDPOINT,
    LABEL_NODE,
    LABEL_ROUTE,
    LABEL_VALIDATION,
    Engine,
    EngineError,
    ReplicaInfo,
    ReplicaNotFound,
    ReplicaState,
)
from serving.node.listener import NodeListener
from serving.node.routes import recover_interrupted_starts
from serving.node.sampler import NodeSampler

log = logging.getLogger(__name__)

# --- registration and heartbeat ------------------------------------------------------------------


COLLECT_EVERY = 60.0  # seconds between two collections of unused snapshots


def nvidia_smi_devices() -> list[dict[str, object]]:
    """What ``nvidia-smi`` lists on this host, or nothing where it is missing or does not answer."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        result = subprocess.run(
            [binary, "--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi did not answer (%s); this node advertises no GPU", exc)
        return []
    return devices.parse_nvidia_smi(result.stdout) if result.returncode == 0 else []


# nvidia-smi is asked once per worker: the devices of a host do not change under a running worker.
_smi_devices: list[dict[str, object]] | None = None


def node_devices() -> list[dict[str, object]]:
    """The GPU devices this node advertises: ``NODE_ACCELERATORS``' ``cuda:N`` ids when it lists
    any (or ``cuda.shares=N``, read as N devices), else what its engine says when it knows (the
    Swarm engine: what its Swarm node advertises as generic resources; its tasks run there, not
    necessarily on this host), else what ``nvidia-smi`` lists."""
    global _smi_devices
    listed, _ = devices.parse_node_accelerators(settings.NODE_ACCELERATORS)
    if listed or settings.NODE_ACCELERATORS.strip():
        return [{"id": d} for d in listed]
    advertised = getattr(get_engine(), "advertised_devices", None)
    if advertised is not None:
        try:
            return list(advertised())
        except EngineError as exc:
            log.warning("the engine could not say which GPUs its node has (%s); advertising none", exc)
            return []
    if _smi_devices is None:
        _smi_devices = nvidia_smi_devices()
    return list(_smi_devices)


def node_capacity(inventory: list[dict[str, object]] | None = None) -> dict[str, float]:
    cpu = settings.NODE_CPU or float(os.cpu_count() or 1)
    if settings.NODE_MEM:
        mem = float(slots.normalize({"mem": settings.NODE_MEM})["mem"])
    else:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    capacity: dict[str, float] = {"cpu": cpu, "mem": mem}
    _, others = devices.parse_node_accelerators(settings.NODE_ACCELERATORS)
    capacity.update(slots.normalize(others))
    ids = devices.inventory_ids(node_devices() if inventory is None else inventory)
    if ids:
        # The slot total the scheduler's sums see; which device a share lands on is Node.devices'.
        capacity[devices.SHARES] = float(len(ids))
    return capacity


def node_architecture() -> str:
    """This host's CPU architecture, spelt as images name theirs (serving.core.architecture)."""
    return architecture.normalize(platform.machine())


def heartbeat(now: datetime | None = None) -> Node:
    """Register this node (first call) or refresh its heartbeat; a lost node comes back."""
    now = now or timezone.now()
    engine = get_engine()
    inventory = node_devices()
    node, created = Node.objects.get_or_create(
        name=node_name(),
        defaults={
            "address": settings.NODE_ADDRESS,
            "engine": engine.name,
            "resource_group": settings.NODE_RESOURCE_GROUP,
            "architecture": node_architecture(),
            "capacity": node_capacity(inventory),
            "devices": inventory,
            "heartbeat_at": now,
        },
    )
    if not created:
        Node.objects.filter(pk=node.pk).update(
            heartbeat_at=now,
            lost_at=None,
            address=settings.NODE_ADDRESS,
            engine=engine.name,
            capacity=node_capacity(inventory),
            devices=inventory,
            resource_group=settings.NODE_RESOURCE_GROUP,
            architecture=node_architecture(),
        )
    # The engine's word on whether the node takes replicas now (a drained Swarm node does not).
    report_unavailable(engine, now)
    node.refresh_from_db()
    share_node_addresses(engine)
    return node


# --- sync: exits and orphans ---------------------------------------------------------------------


def _our_replicas(engine: Engine) -> Iterator[ReplicaInfo]:
    for info in engine.list({LABEL_NODE: node_name()}):
        # A validation's replica is no route's (the Docker engine still gives it a route label, its
        # container name): the validation sweep below ends it once its run is over, never earlier.
        if LABEL_ROUTE in info.labels and LABEL_VALIDATION not in info.labels:
            yield info


def sync(now: datetime | None = None) -> dict[str, int]:
    """Reconcile the engine's view with the DB for this node; returns counts for logs and tests."""
    now = now or timezone.now()
    engine = get_engine()
    counts = {"exited": 0, "orphans": 0, "vanished": 0}
    by_container: dict[str, ReplicaInfo] = {info.replica_id: info for info in _our_replicas(engine)}
    routes = list(
        Route.objects.filter(node__name=node_name())
        .exclude(status__in=[Route.Status.FAILED_TO_START, Route.Status.TERMINATING])
        .exclude(container_id__in=["", STARTING_MARK])
        .select_related("endpoint")
    )
    known = set()
    for route in routes:
        known.add(route.container_id)
        info = by_container.get(route.container_id)
        if info is None:
            try:
                info = engine.inspect(route.container_id)
            except ReplicaNotFound:
                info = None
        if info is None or info.state in (ReplicaState.EXITED, ReplicaState.GONE):
            tail = log_tail(engine, route.container_id) if info is not None else ""
            prober.record_exit(route, info, tail, now)
            counts["exited" if info is not None else "vanished"] += 1
    counts["exited"] += members.sync_members(engine, now)
    # Orphans: our label, this node, but no route (or not the route's current container), nor a
    # cluster member of one.
    live_ids = set(
        Route.objects.filter(node__name=node_name()).exclude(container_id="").values_list("container_id", flat=True)
    ) | set(
        RouteMember.objects.filter(node__name=node_name())
        .exclude(container_id="")
        .values_list("container_id", flat=True)
    )
    for info in engine.list({LABEL_NODE: node_name()}):
        run_id = info.labels.get(LABEL_VALIDATION)
        if run_id and dryrun.finish_if_abandoned(run_id):
            log.warning("stopping the replica of finished validation %s", run_id)
            stop_quietly(engine, info.replica_id)
            counts["orphans"] += 1
    for replica_id, info in by_container.items():
        if replica_id not in live_ids:
            # Started moments ago by a start task that has not written its row yet? The claim mark
            # tells: leave replicas of routes still marked as starting alone, and look at the row
            # again now: the start may have recorded this very replica since live_ids was read (it
            # replaces the mark with the replica's id in one update, so one of the two holds).
            # Once the route failed or went, the replica of a start that crashed half-way is an
            # orphan like any other.
            route_id = info.labels.get(LABEL_ROUTE, "")
            if _is_uuid(route_id) and (
                Route.objects.filter(pk=route_id)
                .filter(Q(container_id=replica_id) | Q(container_id=STARTING_MARK, status=Route.Status.PROVISIONING))
                .exists()
                or RouteMember.objects.filter(route_id=route_id)
                .filter(Q(container_id=replica_id) | Q(status=RouteMember.Status.STARTING))
                .exists()
            ):
                continue
            log.warning(
                "stopping orphan replica %s (route %s, endpoint %s)",
                replica_id,
                route_id,
                info.labels.get(LABEL_ENDPOINT),
            )
            stop_quietly(engine, replica_id)
            counts["orphans"] += 1
    return counts


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- the agent thread ----------------------------------------------------------------------------


class NodeAgent(threading.Thread):
    """Heartbeat + sync every NODE_HEARTBEAT_INTERVAL, and the health prober, until stopped."""

    def __init__(self, worker_started: datetime | None = None) -> None:
        super().__init__(name=f"node-agent-{node_name()}", daemon=True)
        # Starts claimed before this are a dead worker's (see recover_interrupted_starts).
        self.worker_started = worker_started
        self.stopping = threading.Event()
        self.prober: Any = None
        self.listener: Any = None

    def run(self) -> None:
        self.prober = prober.Prober(node_name())
        self.prober.start()
        # Log requests from the web and the proxies' failure reports (serving.node.listener).
        self.listener = NodeListener(node_name(), self.prober)
        self.listener.start()
        # Kernel and inference metrics of this node's replicas, every METRICS_INTERVAL (serving.node.sampler).
        sampler = NodeSampler(node_name())
        sampler.start()
        if self.worker_started is not None:
            try:
                recover_interrupted_starts(self.worker_started)
            except Exception:
                log.exception("recovering interrupted starts failed; the start timeout will fail them")
        collected_at = 0.0
        while not self.stopping.is_set():
            try:
                close_old_connections()
                heartbeat()
                sync()
                # The services' caches on this node: sizes for the quota, removal once destroyed.
                caches.sweep()
                if time.monotonic() - collected_at >= COLLECT_EVERY:
                    collected_at = time.monotonic()
                    snapshots.collect_unused()  # the model folders' copies no route uses any more
            except Exception:
                log.exception("node agent tick failed; retrying")
            self.stopping.wait(settings.NODE_HEARTBEAT_INTERVAL)
        sampler.stop()
        self.listener.stop()
        self.prober.stop()

    def stop(self) -> None:
        self.stopping.set()
