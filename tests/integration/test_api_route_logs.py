"""``GET /api/v1/services/{id}/routes/{route_id}/logs/``: the contract, access, and the node round trip
through Redis (serving.bus.nodebus) with an in-process node listener and a fake engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from serving.models import Node, Route, RouteMember
from serving.node import engine as node_engine
from serving.node.engines.base import ReplicaNotFound
from serving.node.listener import NodeListener
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db(transaction=True)


class FakeEngine:
    name = "fake"

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def logs(self, replica_id: str, tail: int = 200, follow: bool = False) -> Iterator[str]:
        if replica_id != "c-1":
            raise ReplicaNotFound(replica_id)
        return iter(self.lines[-tail:])


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )


@pytest.fixture
def service_id(api: Any, folder: Folder) -> str:
    body = {"name": "svc-logs", "folder": str(folder.pk), "replicas": 0, "project": folder.project_id}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return str(response.json()["id"])


def make_route(service_id: str, node_name: str | None, container_id: str = "c-1", **extra: Any) -> Route:
    node = None
    if node_name is not None:
        node, _ = Node.objects.get_or_create(
            name=node_name, defaults={"capacity": {"cpu": 4.0, "mem": 2.0**32}, "heartbeat_at": timezone.now()}
        )
    return Route.objects.create(
        endpoint_id=service_id, node=node, container_id=container_id, status=Route.Status.HEALTHY, **extra
    )


@pytest.fixture
def listening_node() -> Iterator[FakeEngine]:
    engine = FakeEngine([f"line {i}" for i in range(1, 501)])
    node_engine.set_engine(engine)  # type: ignore[arg-type]
    listener = NodeListener("logs-node")
    listener.start()
    try:
        assert listener.subscribed.wait(10), "the listener did not subscribe"
        yield engine
    finally:
        listener.stop()
        listener.join(timeout=5)
        node_engine.set_engine(None)


def url(service_id: str, route: Route, query: str = "") -> str:
    return f"/api/v1/services/{service_id}/routes/{route.pk}/logs/{query}"


def test_tail_from_the_node(api: Any, service_id: str, listening_node: FakeEngine) -> None:
    route = make_route(service_id, "logs-node")
    body = api("owner").get(url(service_id, route, "?tail=3")).json()
    assert body == {
        "route": str(route.pk),
        "member": "main1",
        "node": "logs-node",
        "lines": ["line 498", "line 499", "line 500"],
        "truncated": True,
    }
    body = api("teammate").get(url(service_id, route)).json()  # default tail 200
    assert len(body["lines"]) == 200 and body["lines"][-1] == "line 500" and body["truncated"] is True
    body = api("owner").get(url(service_id, route, "?tail=5000")).json()
    assert len(body["lines"]) == 500 and body["truncated"] is False


def test_a_removed_container_answers_with_the_log_its_error_kept(
    api: Any, service_id: str, listening_node: FakeEngine
) -> None:
    route = make_route(service_id, "logs-node", container_id="c-gone", error={"log_tail": "boom\nTraceback"})
    body = api("owner").get(url(service_id, route)).json()
    assert body["lines"] == ["boom", "Traceback"] and body["truncated"] is False


def test_route_never_placed_or_started_needs_no_node(api: Any, service_id: str) -> None:
    route = Route.objects.create(
        endpoint_id=service_id,
        status=Route.Status.FAILED_TO_START,
        error={"kind": "resources", "message": "Not enough resources"},
    )
    body = api("owner").get(url(service_id, route)).json()
    assert body == {"route": str(route.pk), "member": "main1", "node": None, "lines": [], "truncated": False}


def test_node_not_answering_is_a_503_that_says_so(api: Any, service_id: str) -> None:
    route = make_route(service_id, "nobody-listens")
    response = api("owner").get(url(service_id, route))
    assert response.status_code == 503
    assert "Node nobody-listens is not answering" in response.json()["detail"]


def test_access_and_bad_tail(api: Any, service_id: str) -> None:
    route = make_route(service_id, "nobody-listens")
    assert api("stranger").get(url(service_id, route)).status_code == 404
    assert api(None).get(url(service_id, route)).status_code in (401, 403)
    for bad in ("0", "5001", "abc"):
        response = api("owner").get(url(service_id, route, f"?tail={bad}"))
        assert response.status_code == 400 and "tail" in response.json()
    # A route of another service is not found through this one.
    assert api("owner").get(f"/api/v1/services/{service_id}/routes/{route.pk}x/logs/").status_code == 404


def test_a_cluster_members_log_comes_from_its_own_container(
    api: Any, service_id: str, listening_node: FakeEngine
) -> None:
    """``member=sub1`` reads the sub's container on the sub's node; main1 (the default) the route's."""
    route = make_route(service_id, "nobody-listens", container_id="c-main")
    node = Node.objects.create(name="logs-node", heartbeat_at=timezone.now())
    RouteMember.objects.create(route=route, idx=1, node=node, status="running", container_id="c-1")
    RouteMember.objects.create(route=route, idx=2, status="failed", error={"log_tail": "sub2 said\nbye"})
    body = api("teammate").get(url(service_id, route, "?member=sub1&tail=2")).json()
    assert body == {
        "route": str(route.pk),
        "member": "sub1",
        "node": "logs-node",
        "lines": ["line 499", "line 500"],
        "truncated": True,
    }
    assert api("owner").get(url(service_id, route, "?member=sub2")).json()["lines"] == ["sub2 said", "bye"]
    # main1 is the route itself: its node does not answer here, and the 503 says so.
    assert api("owner").get(url(service_id, route, "?member=main1")).status_code == 503
    missing = api("owner").get(url(service_id, route, "?member=sub3"))
    assert missing.status_code == 404
    assert missing.json()["detail"] == "This replica has no member sub3; its members are main1, sub1, sub2."
    bad = api("owner").get(url(service_id, route, "?member=worker"))
    assert bad.status_code == 400 and "main1, or sub1, sub2" in bad.json()["member"]
    assert api("stranger").get(url(service_id, route, "?member=sub1")).status_code == 404
