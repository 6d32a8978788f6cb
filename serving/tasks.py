"""Thin Celery tasks (DESIGN.md §3): take ids, re-fetch, tolerate deleted rows, call the logic.

Control-plane tasks run on the ``control`` queue; engine work runs on ``node.<name>``, consumed only
by that node's worker.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from serving.models import Endpoint, Node, Route, RouteMember

log = logging.getLogger(__name__)


# --- control plane -------------------------------------------------------------------------------


def enqueue_reconcile(endpoint_id: str) -> None:
    """Reconcile soon; a broker outage only delays it to the next beat tick."""
    try:
        reconcile_endpoint.apply_async(args=[endpoint_id], queue="control", retry=False)
    except Exception as exc:
        log.warning("could not enqueue reconcile of %s (the next tick will do it): %s", endpoint_id, exc)


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def reconcile_endpoint(endpoint_id: str) -> None:
    from serving import lifecycle

    lifecycle.reconcile(endpoint_id)


@shared_task(ignore_result=True, soft_time_limit=120, time_limit=150)
def reconcile_all() -> None:
    """The beat tick: every live endpoint, then a full routing-table publish (heals lost messages)."""
    from serving import lifecycle, routing

    lifecycle.reconcile_many(lifecycle.active_endpoint_ids())
    try:
        routing.publish_all()
    except Exception as exc:
        log.warning("routing table publish failed: %s", exc)


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def detect_lost_nodes() -> None:
    """Nodes silent for NODE_LOST_AFTER are lost: their routes are replaced elsewhere (S4.3)."""
    from serving import actions

    cutoff = timezone.now() - timedelta(seconds=settings.NODE_LOST_AFTER)
    for node in Node.objects.filter(lost_at__isnull=True, heartbeat_at__lt=cutoff):
        if Node.objects.filter(pk=node.pk, lost_at__isnull=True).update(lost_at=timezone.now()):
            endpoint_ids = set(Route.objects.filter(node=node).values_list("endpoint_id", flat=True))
            log.warning("node %s lost (no heartbeat since %s)", node.name, node.heartbeat_at)
            for endpoint in Endpoint.objects.filter(pk__in=endpoint_ids):
                actions.record_event(
                    endpoint,
                    "node_lost",
                    f"Node {node.name} stopped sending heartbeats; its replicas are replaced on other nodes.",
                    level="warning",
                )
                enqueue_reconcile(str(endpoint.pk))


@shared_task(ignore_result=True, soft_time_limit=30, time_limit=60)
def record_token_usage() -> None:
    """Batch the proxies' token last-use times into the DB (S7: listed with "last used")."""
    from serving import actions, routing

    actions.do_record_token_usage(routing.take_token_usage())


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def autoscale() -> None:
    """The autoscaling tick (S6): evaluate every service's rules, scale by compare-and-set."""
    from serving import autoscaling

    autoscaling.tick()


@shared_task(ignore_result=True, soft_time_limit=30, time_limit=60)
def collect_proxy_metrics() -> None:
    """The proxies' per-endpoint stats into the metrics time series (serving.metrics)."""
    from serving import metrics

    metrics.collect_proxy()


def after_routes_changed(endpoint_id: str) -> None:
    """Push the new state to the proxies (routing table) and to open pages (websocket)."""
    from serving import routing
    from serving.consumers import notify_endpoint_changed

    routing.publish_endpoint_safely(endpoint_id)
    notify_endpoint_changed(endpoint_id)


# --- node side -----------------------------------------------------------------------------------


def send_start(route: Route) -> None:
    assert route.node is not None
    start_route.apply_async(args=[str(route.pk)], queue=route.node.queue, retry=False)


def send_stop(route: Route, countdown: float = 0.0) -> None:
    """Have the route's node stop it, after ``countdown`` seconds (draining a serving replica)."""
    if route.node is None:
        Route.objects.filter(pk=route.pk).delete()  # never placed: nothing runs anywhere
        return
    stop_route.apply_async(args=[str(route.pk)], queue=route.node.queue, retry=False, countdown=countdown or None)


def send_member_start(member: RouteMember) -> None:
    """Have a cluster route's sub member started by its node (serving.cluster)."""
    if member.node is None:
        return
    start_member.apply_async(args=[str(member.pk)], queue=member.node.queue, retry=False)


def send_member_stop(member: RouteMember) -> None:
    """Have a sub member's node stop its container (it may outlive its row: ids, not the row)."""
    if member.node is None or not member.container_id:
        return
    send_container_stop(member.node, str(member.route_id), member.container_id)


def send_container_stop(node: Node, route_id: str, container_id: str) -> None:
    try:
        stop_member.apply_async(args=[route_id, container_id], queue=node.queue, retry=False)
    except Exception as exc:
        # The node's orphan sweep stops it once no row names it.
        log.warning("could not send the stop of %s to node %s: %s", container_id, node.name, exc)


@shared_task(ignore_result=True, soft_time_limit=300, time_limit=330, acks_late=True)
def start_member(member_id: str) -> None:
    from serving import node

    node.start_member(member_id)


@shared_task(ignore_result=True, soft_time_limit=120, time_limit=150, acks_late=True)
def stop_member(route_id: str, container_id: str) -> None:
    from serving import node

    node.stop_member(route_id, container_id)


@shared_task(ignore_result=True, soft_time_limit=300, time_limit=330, acks_late=True)
def start_route(route_id: str) -> None:
    from serving import node

    node.start_route(route_id)


@shared_task(ignore_result=True, soft_time_limit=120, time_limit=150, acks_late=True)
def stop_route(route_id: str) -> None:
    from serving import node

    node.stop_route(route_id)


@shared_task(ignore_result=True, soft_time_limit=600, time_limit=630)
def validate_service(validation_id: str) -> None:
    from serving import validation

    validation.run(validation_id)
