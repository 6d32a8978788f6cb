"""Thin Celery tasks (docs/architecture.md): take ids, re-fetch, tolerate deleted rows, call the logic.

Control-plane tasks run on the ``control`` queue; engine work runs on ``node.<name>``, consumed only
by that node's worker. Nothing imports this module: work is sent by task name (``serving.bus.dispatch``)
and the beat names its ticks (config/celery.py), so these wrappers may import the logic they run.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from serving.actions import tokens as token_actions
from serving.bus import dispatch, events, metrics, routing
from serving.control import autoscaling, canary, lifecycle, sleep, usage
from serving.models import Endpoint, Node, Route
from serving.node import dryrun, members, routes

log = logging.getLogger(__name__)


# --- control plane -------------------------------------------------------------------------------


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def reconcile_endpoint(endpoint_id: str) -> None:
    lifecycle.reconcile(endpoint_id)


@shared_task(ignore_result=True, soft_time_limit=120, time_limit=150)
def reconcile_all() -> None:
    """The beat tick: every live endpoint, then a full routing-table publish (heals lost messages)."""
    lifecycle.reconcile_many(lifecycle.active_endpoint_ids())
    try:
        routing.publish_all()
    except Exception as exc:
        log.warning("routing table publish failed: %s", exc)


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def detect_lost_nodes() -> None:
    """Nodes silent for NODE_LOST_AFTER are lost: their routes are replaced elsewhere (S4.3)."""
    cutoff = timezone.now() - timedelta(seconds=settings.NODE_LOST_AFTER)
    for silent in Node.objects.filter(lost_at__isnull=True, heartbeat_at__lt=cutoff):
        if Node.objects.filter(pk=silent.pk, lost_at__isnull=True).update(lost_at=timezone.now()):
            endpoint_ids = set(Route.objects.filter(node=silent).values_list("endpoint_id", flat=True))
            log.warning("node %s lost (no heartbeat since %s)", silent.name, silent.heartbeat_at)
            for endpoint in Endpoint.objects.filter(pk__in=endpoint_ids):
                events.record_event(
                    endpoint,
                    "node_lost",
                    f"Node {silent.name} stopped sending heartbeats; its replicas are replaced on other nodes.",
                    level="warning",
                )
                dispatch.enqueue_reconcile(str(endpoint.pk))


@shared_task(ignore_result=True, soft_time_limit=30, time_limit=60)
def record_token_usage() -> None:
    """Batch the proxies' token last-use times into the DB (S7: listed with "last used")."""
    token_actions.do_record_token_usage(routing.take_token_usage())


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def fold_gateway_usage() -> None:
    """The proxies' gateway usage counters into GatewayUsage rows (issue 17)."""
    usage.fold()


@shared_task(ignore_result=True, soft_time_limit=60, time_limit=90)
def autoscale() -> None:
    """The autoscaling tick (S6): evaluate every service's rules, scale by compare-and-set."""
    autoscaling.tick()


@shared_task(ignore_result=True, soft_time_limit=30, time_limit=60)
def collect_proxy_metrics() -> None:
    """The proxies' per-endpoint stats into the metrics time series (serving.bus.metrics), and the
    canaries whose 5xx rate is too high rolled back (serving.control.canary)."""
    metrics.collect_proxy()
    canary.check()


@shared_task(ignore_result=True, soft_time_limit=30, time_limit=60)
def sleep_tick() -> None:
    """Scale to zero: idle services sleep, missed wakes, cold starts; the proxies' re-sent counts."""
    sleep.tick()


# --- node side -----------------------------------------------------------------------------------


@shared_task(ignore_result=True, soft_time_limit=300, time_limit=330, acks_late=True)
def start_member(member_id: str) -> None:
    members.start_member(member_id)


@shared_task(ignore_result=True, soft_time_limit=120, time_limit=150, acks_late=True)
def stop_member(route_id: str, container_id: str) -> None:
    members.stop_member(route_id, container_id)


@shared_task(ignore_result=True, soft_time_limit=300, time_limit=330, acks_late=True)
def start_route(route_id: str) -> None:
    routes.start_route(route_id)


@shared_task(ignore_result=True, soft_time_limit=120, time_limit=150, acks_late=True)
def stop_route(route_id: str) -> None:
    routes.stop_route(route_id)


@shared_task(ignore_result=True, soft_time_limit=600, time_limit=630)
def validate_service(validation_id: str) -> None:
    dryrun.run(validation_id)
