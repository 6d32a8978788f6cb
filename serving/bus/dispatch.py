"""Work sent to the Celery workers by task name: reconciles to the control queue, engine work to a
node's own queue (``node.<name>``), as the beat schedule names its ticks (config/celery.py).

A leaf of the serving layers: sending by name means no caller imports ``serving.tasks`` (which
imports the logic it runs), so the actions, the control plane and the node side can all hand work
on without importing each other.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery import current_app

from serving.models import Node, Route, RouteMember

log = logging.getLogger(__name__)

RECONCILE_ENDPOINT = "serving.tasks.reconcile_endpoint"
START_ROUTE = "serving.tasks.start_route"
STOP_ROUTE = "serving.tasks.stop_route"
START_MEMBER = "serving.tasks.start_member"
STOP_MEMBER = "serving.tasks.stop_member"
VALIDATE_SERVICE = "serving.tasks.validate_service"


def send(name: str, args: list[Any], queue: str, countdown: float | None = None) -> None:
    """Send the task ``name`` to ``queue``, without retrying a broker that does not answer (callers
    decide what a lost send means). Under CELERY_TASK_ALWAYS_EAGER it runs here, as ``apply_async``
    would."""
    app = current_app
    if app.conf.task_always_eager:
        # Only a worker imports the tasks module (autodiscovery); here it is looked up by name, so
        # nothing imports it statically (the import contract in pyproject.toml).
        importlib.import_module(name.rpartition(".")[0])
        app.tasks[name].apply(args=args)
        return
    app.send_task(name, args=args, queue=queue, retry=False, countdown=countdown)


# --- control plane -------------------------------------------------------------------------------


def enqueue_reconcile(endpoint_id: str) -> None:
    """Reconcile soon; a broker outage only delays it to the next beat tick."""
    try:
        send(RECONCILE_ENDPOINT, [endpoint_id], "control")
    except Exception as exc:
        log.warning("could not enqueue reconcile of %s (the next tick will do it): %s", endpoint_id, exc)


# --- node side -----------------------------------------------------------------------------------


def send_start(route: Route) -> None:
    assert route.node is not None
    send(START_ROUTE, [str(route.pk)], route.node.queue)


def send_stop(route: Route, countdown: float = 0.0) -> None:
    """Have the route's node stop it, after ``countdown`` seconds (draining a serving replica)."""
    if route.node is None:
        Route.objects.filter(pk=route.pk).delete()  # never placed: nothing runs anywhere
        return
    send(STOP_ROUTE, [str(route.pk)], route.node.queue, countdown=countdown or None)


def send_member_start(member: RouteMember) -> None:
    """Have a cluster route's sub member started by its node (serving.core.cluster)."""
    if member.node is None:
        return
    send(START_MEMBER, [str(member.pk)], member.node.queue)


def send_member_stop(member: RouteMember) -> None:
    """Have a sub member's node stop its container (it may outlive its row: ids, not the row)."""
    if member.node is None or not member.container_id:
        return
    send_container_stop(member.node, str(member.route_id), member.container_id)


def send_container_stop(node: Node, route_id: str, container_id: str) -> None:
    try:
        send(STOP_MEMBER, [route_id, container_id], node.queue)
    except Exception as exc:
        # The node's orphan sweep stops it once no row names it.
        log.warning("could not send the stop of %s to node %s: %s", container_id, node.name, exc)


def send_validation(validation_id: str, node: Node) -> None:
    """Run a validation (S4.2) on the node chosen for it."""
    send(VALIDATE_SERVICE, [validation_id], node.queue)
