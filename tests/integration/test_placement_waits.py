"""With no node alive in its group, a service's replicas wait for one instead of failing (S4.3/S4.4).

The case that matters: the whole product restarted (``make run`` after Ctrl-C). The control worker
and beat are up seconds before the node worker's first heartbeat; failing every placement meanwhile
filled the service page with failed replicas and counted towards MAX_START_FAILURES, so a slow node
start could make the service give up for good.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from serving.control import lifecycle
from serving.models import Endpoint, Node, Route, ServiceEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def endpoint(personas: dict[str, Any]) -> Endpoint:
    return Endpoint.objects.create(
        name="waits", owner=personas["owner"], project=personas["project"], desired_replicas=2
    )


def waiting_events(endpoint: Endpoint) -> list[str]:
    return list(
        ServiceEvent.objects.filter(endpoint=endpoint, kind="waiting_for_node").values_list("message", flat=True)
    )


@pytest.mark.parametrize("cluster_size", [1, 2])
def test_no_node_alive_places_nothing_fails_nothing_and_says_so_once(endpoint: Endpoint, cluster_size: int) -> None:
    Endpoint.objects.filter(pk=endpoint.pk).update(cluster_size=cluster_size)
    now = timezone.now()
    # The node of before the restart: its last heartbeat is older than NODE_LOST_AFTER.
    Node.objects.create(name="local", capacity={"cpu": 4.0, "mem": 2.0**33}, heartbeat_at=now - timedelta(minutes=5))
    for tick in range(4):
        lifecycle.reconcile(str(endpoint.pk), now=now + timedelta(seconds=5 * tick))
    endpoint.refresh_from_db()
    assert not Route.objects.filter(endpoint=endpoint).exists()
    assert endpoint.retries == 0 and not endpoint.gave_up
    [said] = waiting_events(endpoint)
    assert "No node is available in resource group 'default'" in said
    assert said.endswith("Its replicas are placed as soon as a node reports in.")

    # The node reports in: the next tick places both replicas on it.
    Node.objects.filter(name="local").update(heartbeat_at=now + timedelta(seconds=20))
    lifecycle.reconcile(str(endpoint.pk), now=now + timedelta(seconds=21))
    routes = Route.objects.filter(endpoint=endpoint)
    assert [r.status for r in routes] == [Route.Status.PROVISIONING] * 2
    assert {r.node.name for r in routes if r.node} == {"local"}


def test_a_node_that_is_alive_but_full_still_fails_the_replica_with_what_is_free(endpoint: Endpoint) -> None:
    """Waiting is for "no node at all"; a request no alive node can hold is an error to show (S4.4)."""
    now = timezone.now()
    Node.objects.create(name="small", capacity={"cpu": 0.5, "mem": 2.0**33}, heartbeat_at=now)
    lifecycle.reconcile(str(endpoint.pk), now=now)
    failed = Route.objects.filter(endpoint=endpoint, status=Route.Status.FAILED_TO_START)
    assert failed.count() == 2
    message = failed[0].error["message"]
    assert "Not enough resources" in message and "no node has that much free (free now: node small: cpu 0.5" in message
    assert not waiting_events(endpoint)
