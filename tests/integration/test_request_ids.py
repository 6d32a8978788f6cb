"""The request id in the service's event log: a client that got an error with ``X-Request-ID: abc``
finds the event it caused with ``?request_id=abc`` (and on the service page).

Real parts: the proxy, the node worker with its local engine and a real replica, Redis and the
database; the API through Django's whole middleware stack (its request id middleware included).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from serving.bus.events import record_event
from serving.control import sleep
from serving.models import Endpoint, Route, ServiceEvent
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.integration.test_runtime_nodes import SLOW_PROBE_DEFINITION, healthy_routes, in_routing_table, kill_replica
from tests.live import LiveSystem, wait_for


def call(url: str, request_id: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"X-Request-ID": request_id})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_replica_the_proxy_found_down_is_found_by_the_client_s_request_id(
    live_factory: Any, api: Any, personas: dict[str, Any]
) -> None:
    # The node's own sync runs every 5 s and its probes every 1.5 s: the exit is recorded by the
    # check the proxy's report asks for, with the id of the request that found the replica down.
    system: LiveSystem = live_factory(NODE_HEARTBEAT_INTERVAL="5", NODE_LOST_AFTER="30")
    proxy = system.start_proxy()
    folder = FolderFactory(owner=personas["owner"], name="rid", files={"model-definition.yaml": SLOW_PROBE_DEFINITION})
    response = api("owner").post(
        "/api/v1/services/",
        {"name": "svc-rid", "folder": str(folder.pk), "replicas": 1, "open_to_public": True},
        format="json",
    )
    assert response.status_code == 201, response.json()
    sid, slug = response.json()["id"], response.json()["slug"]
    [route] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=40, what="a healthy route")
    wait_for(lambda: len(in_routing_table(slug)) == 1, timeout=5, what="the route in the routing table")
    assert call(f"{proxy}/e/{slug}/", "warm-up")[0] == 200

    kill_replica("local", Route.objects.get(pk=route["id"]).container_id)
    status, headers, body = call(f"{proxy}/e/{slug}/", "client-abc-1")
    # The proxy's own error answer names the request: what the client has to look for.
    assert status == 502, body
    assert headers["X-Request-ID"] == "client-abc-1"
    assert json.loads(body)["error"]["code"] == "replica_unreachable"

    event = wait_for(
        lambda: ServiceEvent.objects.filter(endpoint_id=sid, request_id="client-abc-1").first(),
        timeout=10,
        what="the event of the replica the request found down",
    )
    assert event.kind == "route_exited" and str(event.route_id) == route["id"]
    assert "reported failing by a proxy" in system.log("node-local")

    # The API finds it by the id, and only it; the page shows the id.
    found = api("owner").get(f"/api/v1/services/{sid}/events/?request_id=client-abc-1")
    assert found.status_code == 200
    assert [(e["kind"], e["request_id"]) for e in found.json()] == [("route_exited", "client-abc-1")]
    assert api("owner").get(f"/api/v1/services/{sid}/events/?request_id=warm-up").json() == []
    page = Client()
    page.force_login(personas["owner"])
    assert "client-abc-1" in page.get(f"/services/{sid}/").content.decode()


@pytest.mark.django_db
def test_an_api_call_s_events_carry_its_request_id_and_the_filter_answers_each_persona(
    api: Any, personas: dict[str, Any]
) -> None:
    project = personas["project"]
    folder = FolderFactory(
        owner=personas["owner"], project=project, name="rid-api", files={"model-definition.yaml": SIMPLE_DEFINITION}
    )
    created = api("owner").post(
        "/api/v1/services/",
        {"name": "svc-rid-api", "folder": str(folder.pk), "replicas": 1, "project": str(project.pk)},
        format="json",
        HTTP_X_REQUEST_ID="api-create-7",
    )
    assert created.status_code == 201, created.json()
    assert created["X-Request-ID"] == "api-create-7"  # the web app's middleware answers with it
    sid = created.json()["id"]
    cleared = api("owner").post(f"/api/v1/services/{sid}/clear-errors/", HTTP_X_REQUEST_ID="api-clear-8")
    assert cleared.status_code == 202
    kinds = dict(ServiceEvent.objects.filter(endpoint_id=sid).values_list("request_id", "kind"))
    assert kinds["api-create-7"] == "created"
    assert "api-clear-8" in kinds
    # Without a client's id the web app makes one, and the event has that one.
    api("owner").post(f"/api/v1/services/{sid}/clear-errors/")
    assert all(ServiceEvent.objects.filter(endpoint_id=sid).values_list("request_id", flat=True))

    url = f"/api/v1/services/{sid}/events/?request_id=api-create-7"
    for name in ("owner", "teammate", "admin"):  # the teammate reads the project's services
        answer = api(name).get(url)
        assert answer.status_code == 200
        assert [e["kind"] for e in answer.json()] == ["created"]
        assert answer.json()[0]["request_id"] == "api-create-7"
    assert api("stranger").get(url).status_code == 404
    assert api(None).get(url).status_code in (401, 403)
    # No filter: every event; a filter that matches nothing: none.
    assert len(api("owner").get(f"/api/v1/services/{sid}/events/").json()) >= 3
    assert api("owner").get(f"/api/v1/services/{sid}/events/?request_id=nothing-like-it").json() == []
    bad = api("owner").get(f"/api/v1/services/{sid}/events/", {"request_id": "two words"})
    assert bad.status_code == 400
    assert "X-Request-ID" in bad.json()["request_id"][0]


@pytest.mark.django_db
def test_a_wake_request_s_held_request_id_reaches_the_woken_event(
    personas: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    kicked: list[str] = []
    monkeypatch.setattr("serving.bus.dispatch.enqueue_reconcile", kicked.append)
    endpoint = Endpoint.objects.create(
        name="sleepy-rid",
        owner=personas["owner"],
        desired_replicas=0,
        wake_replicas=1,
        idle_timeout=30,
        slept_at=timezone.now() - timedelta(seconds=60),
    )
    listener = sleep.WakeListener()
    message = {"endpoint": endpoint.slug, "endpoint_id": str(endpoint.pk), "proxy": "p:1:2", "request_id": "held-9"}
    listener.handle(json.dumps(message).encode())
    woken = ServiceEvent.objects.get(endpoint=endpoint, kind="woken")
    assert woken.request_id == "held-9"
    # The listener's thread acts on one message after another: the id is not left behind for the next.
    assert record_event(endpoint, "after", "after the wake").request_id == ""
