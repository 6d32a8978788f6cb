"""Following a replica's log live (serving.bus.logfollow): a real replica on the local engine, a node
listener in this process (so its follow threads can be counted), the real ASGI application for the
websocket and Django's async client for ``?follow=1``. Lines the replica writes after the follow
started arrive; the node's follow thread ends once the reader has gone; a stranger gets 4404."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import AsyncClient, Client
from django.utils import timezone

from serving.models import Node, Route, RouteMember
from serving.node import engine as node_engine
from serving.node.engines.base import Mount, ReplicaInfo, ReplicaSpec
from serving.node.engines.local.engine import LocalEngine
from serving.node.listener import NodeListener
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.integration.conftest import _engine_ready
from tests.live import deadline_for, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(_engine_ready() is not None, reason=str(_engine_ready())),
]

NODE = "follow-node"


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
    body = {"name": "svc-follow", "folder": str(folder.pk), "replicas": 0, "project": folder.project_id}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return str(response.json()["id"])


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[LocalEngine]:
    local = LocalEngine(tmp_path / "engine", netns_prefix="mf")
    node_engine.set_engine(local)
    try:
        yield local
    finally:
        node_engine.set_engine(None)
        for info in local.list():
            local.stop(info.replica_id, grace=0)


@pytest.fixture
def replica(engine: LocalEngine, tmp_path: Path) -> ReplicaInfo:
    """Python's http.server: it logs every request it answers, so a test can make it write a line."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "index.html").write_text("hello")
    spec = ReplicaSpec(
        name="ms-follow",
        image="unused",
        command=("python3", "-u", "-m", "http.server", "8000", "--directory", "/models"),
        port=8000,
        mounts=(Mount(str(model), "/models"),),
        mem_bytes=256 << 20,
        labels={"serving.route": "follow"},
    )
    info = engine.start(spec)
    wait_for(lambda: request(info, "/ready"), timeout=15, what="the replica to answer")
    return info


@pytest.fixture
def listener(engine: LocalEngine) -> Iterator[NodeListener]:
    running = NodeListener(NODE)
    running.start()
    try:
        assert running.subscribed.wait(10), "the listener did not subscribe"
        yield running
    finally:
        running.stop()
        running.join(timeout=5)
        running.follows.stop_all(wait=5)


def request(info: ReplicaInfo, path: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{info.host}:{info.port}{path}", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # answered (a 404 is logged like any request)
    except OSError:
        return False
    return True


def make_route(service_id: str, container_id: str, node: str = NODE) -> Route:
    row, _ = Node.objects.get_or_create(
        name=node, defaults={"capacity": {"cpu": 4.0, "mem": 2.0**32}, "heartbeat_at": timezone.now()}
    )
    return Route.objects.create(
        endpoint_id=service_id, node=row, container_id=container_id, status=Route.Status.HEALTHY
    )


def cookie_of(user: Any) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


def run(coro: Any) -> Any:
    # A loop of its own in a thread, as the websocket security tests do.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def socket_for(path: str, cookie: bytes) -> WebsocketCommunicator:
    from config.asgi import application

    return WebsocketCommunicator(
        application, path, headers=[(b"origin", settings.WEB_ORIGINS[0].encode()), (b"cookie", cookie)]
    )


async def receive_until(socket: WebsocketCommunicator, wanted: Any, timeout: float = 15) -> list[dict[str, Any]]:
    """Messages until one satisfies ``wanted`` (it included)."""
    got: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + deadline_for(timeout)
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"timed out; got {got!r}"
        message = await socket.receive_json_from(timeout=left)
        got.append(message)
        if wanted(message):
            return got


def lines_of(messages: list[dict[str, Any]]) -> list[str]:
    return [line for m in messages if m["type"] == "lines" for line in m["lines"]]


def test_new_lines_arrive_and_the_follow_ends_when_the_socket_closes(
    personas: dict[str, Any], service_id: str, replica: ReplicaInfo, listener: NodeListener
) -> None:
    route = make_route(service_id, replica.replica_id)
    marker = f"/written-after-{uuid.uuid4().hex}"
    cookie = cookie_of(personas["teammate"])
    path = f"/ws/services/{service_id}/routes/{route.pk}/logs/?tail=50"

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        socket = socket_for(path, cookie)
        connected, _ = await socket.connect(timeout=deadline_for(5))
        assert connected
        before = await receive_until(socket, lambda m: m["type"] == "following")
        assert listener.follows.active(), "the node follows the log"
        await asyncio.to_thread(request, replica, marker)
        after = await receive_until(socket, lambda m: m["type"] == "lines" and any(marker in x for x in m["lines"]))
        await socket.disconnect()
        return before, after

    before, after = run(scenario())
    assert before[-1] == {"type": "following", "node": NODE}
    # The tail came first: the replica's start and the readiness probe it answered.
    assert any("/ready" in line for line in lines_of(before + after))
    assert any(marker in line and "404" in line for line in lines_of(after))
    # The reader left: its lease is gone, so the node ends the follow thread and the engine stream.
    wait_for(lambda: listener.follows.active() == [], timeout=5, what="the node's follow thread to end")


def test_a_strangers_socket_is_refused_as_not_found(
    personas: dict[str, Any], service_id: str, replica: ReplicaInfo, listener: NodeListener
) -> None:
    route = make_route(service_id, replica.replica_id)
    cookie = cookie_of(personas["stranger"])

    async def attempt() -> tuple[bool, Any]:
        socket = socket_for(f"/ws/services/{service_id}/routes/{route.pk}/logs/", cookie)
        result = await socket.connect(timeout=deadline_for(5))
        if result[0]:
            await socket.disconnect()
        return result

    assert run(attempt()) == (False, 4404)
    assert listener.follows.active() == [], "a refused socket asks no node for anything"


def test_the_end_of_the_replica_is_the_last_message(
    personas: dict[str, Any], service_id: str, engine: LocalEngine, replica: ReplicaInfo, listener: NodeListener
) -> None:
    route = make_route(service_id, replica.replica_id)
    cookie = cookie_of(personas["owner"])

    async def scenario() -> list[dict[str, Any]]:
        socket = socket_for(f"/ws/services/{service_id}/routes/{route.pk}/logs/", cookie)
        assert (await socket.connect(timeout=deadline_for(5)))[0]
        await receive_until(socket, lambda m: m["type"] == "following")
        await asyncio.to_thread(engine.stop, replica.replica_id, 1)
        got = await receive_until(socket, lambda m: m["type"] == "end")
        closed = await socket.receive_output(timeout=deadline_for(5))
        assert closed["type"] == "websocket.close"
        return got

    end = run(scenario())[-1]
    assert end["reason"] in ("ended", "gone")
    assert "no more lines will come" in end["message"]
    wait_for(lambda: listener.follows.active() == [], timeout=5, what="the follow thread to end")


def test_a_cluster_sub_members_log_is_followed_and_a_bad_member_is_said_so(
    personas: dict[str, Any], service_id: str, replica: ReplicaInfo, listener: NodeListener
) -> None:
    """``member=sub1`` follows the sub's own container (here the real replica) on its own node, while
    the route's main container sits on a node that does not answer."""
    route = make_route(service_id, "c-main", node="nobody-listens")
    RouteMember.objects.create(
        route=route,
        idx=1,
        node=Node.objects.get_or_create(name=NODE)[0],
        status="running",
        container_id=replica.replica_id,
    )
    cookie = cookie_of(personas["teammate"])
    base = f"/ws/services/{service_id}/routes/{route.pk}/logs/"

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        sub = socket_for(base + "?member=sub1&tail=20", cookie)
        assert (await sub.connect(timeout=deadline_for(5)))[0]
        followed = await receive_until(sub, lambda m: m["type"] == "following")
        marker = f"/sub-{uuid.uuid4().hex}"
        await asyncio.to_thread(request, replica, marker)
        followed += await receive_until(sub, lambda m: m["type"] == "lines" and any(marker in x for x in m["lines"]))
        await sub.disconnect()
        bad = socket_for(base + "?member=sub7", cookie)
        assert (await bad.connect(timeout=deadline_for(5)))[0]
        missing = await receive_until(bad, lambda m: m["type"] == "end")
        main = socket_for(base + "?member=main1", cookie)
        assert (await main.connect(timeout=deadline_for(5)))[0]
        ended = await receive_until(main, lambda m: m["type"] == "end")
        return followed, missing, ended

    followed, missing, ended = run(scenario())
    assert {"type": "following", "node": NODE} in followed
    assert missing == [
        {
            "type": "end",
            "reason": "bad-request",
            "message": "This replica has no member sub7; its members are main1, sub1.",
        }
    ]
    assert ended[-1]["reason"] == "node" and "Node nobody-listens is not answering" in ended[-1]["message"]
    wait_for(lambda: listener.follows.active() == [], timeout=5, what="the follow thread to end")


def test_a_node_that_does_not_answer_is_said_so(personas: dict[str, Any], service_id: str) -> None:
    route = make_route(service_id, "c-1", node="nobody-listens")
    cookie = cookie_of(personas["owner"])

    async def scenario() -> list[dict[str, Any]]:
        socket = socket_for(f"/ws/services/{service_id}/routes/{route.pk}/logs/", cookie)
        assert (await socket.connect(timeout=deadline_for(5)))[0]
        return await receive_until(socket, lambda m: m["type"] == "end")

    [end] = run(scenario())
    assert end["reason"] == "node"
    assert "Node nobody-listens is not answering" in end["message"]


def test_http_follow_streams_text_until_the_client_leaves(
    personas: dict[str, Any], api: Any, service_id: str, replica: ReplicaInfo, listener: NodeListener
) -> None:
    route = make_route(service_id, replica.replica_id)
    url = f"/api/v1/services/{service_id}/routes/{route.pk}/logs/"
    marker = f"/streamed-{uuid.uuid4().hex}"

    async def scenario() -> bytes:
        client = AsyncClient()
        await client.aforce_login(personas["owner"])
        response = await client.get(url, {"follow": "1", "tail": "5"})
        assert response.status_code == 200
        assert response["Content-Type"] == "text/plain; charset=utf-8"
        received = b""
        seen = asyncio.Event()

        async def read() -> None:
            nonlocal received
            async for chunk in response.streaming_content:
                received += chunk
                if marker.encode() in received:
                    seen.set()

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)
        await asyncio.to_thread(wait_for, listener.follows.active, 5, 0.05, "the node to follow")
        await asyncio.to_thread(request, replica, marker)
        await asyncio.wait_for(seen.wait(), timeout=15)
        reader.cancel()  # what Django's ASGI handler does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await reader
        return received

    body = run(scenario()).decode()
    assert marker in body
    wait_for(lambda: listener.follows.active() == [], timeout=5, what="the node's follow thread to end")
    # A node nobody listens for is a 503 at once, as for the tail.
    dead = make_route(service_id, "c-1", node="nobody-listens")
    response = api("owner").get(f"/api/v1/services/{service_id}/routes/{dead.pk}/logs/?follow=1")
    assert response.status_code == 503 and "Node nobody-listens is not answering" in response.json()["detail"]


def test_http_follow_through_daphne_ends_when_the_client_hangs_up(
    personas: dict[str, Any], service_id: str, replica: ReplicaInfo, listener: NodeListener, tmp_path: Path
) -> None:
    """``curl -N .../logs/?follow=1`` against the real web process: lines stream as they are written,
    and hanging up ends the node's follow (Django cancels the response, the lease goes)."""
    import http.client

    from accounts.actions import do_issue_api_key
    from tests.live import LiveSystem

    route = make_route(service_id, replica.replica_id)
    _, secret = do_issue_api_key(personas["owner"], name="follow-script")
    system = LiveSystem(tmp_path)
    try:
        base = system.start_web()
        host, port = base.removeprefix("http://").rstrip("/").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=15)
        connection.request(
            "GET",
            f"/api/v1/services/{service_id}/routes/{route.pk}/logs/?follow=1&tail=3",
            headers={"Authorization": f"Token {secret}"},
        )
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/plain; charset=utf-8"
        wait_for(listener.follows.active, timeout=10, what="the node to follow")
        marker = f"/curl-{uuid.uuid4().hex}"
        request(replica, marker)
        received = b""
        while marker.encode() not in received:
            chunk = response.read1(65536)
            assert chunk, f"the stream ended early: {received!r}"
            received += chunk
        connection.close()  # the script hangs up
        wait_for(lambda: listener.follows.active() == [], timeout=10, what="the node's follow to end")
    finally:
        system.stop_all()


# --- open streams end when access is lost (issue 13, attack 8) --------------------------------------

LOSSES = ["removed from the project", "service terminated"]


def lose_access(loss: str, personas: dict[str, Any], service_id: str) -> None:
    """What takes the teammate's right to read the service's logs away."""
    from rest_framework.test import APIClient

    from accounts.models import Membership

    if loss == "removed from the project":
        assert Membership.objects.filter(user=personas["teammate"], project=personas["project"]).delete()[0] == 1
    else:
        owner = APIClient()
        owner.force_authenticate(personas["owner"])
        assert owner.delete(f"/api/v1/services/{service_id}/").status_code in (200, 202, 204)


@pytest.mark.parametrize("loss", LOSSES)
def test_a_log_socket_stops_streaming_when_access_is_lost(
    personas: dict[str, Any], service_id: str, replica: ReplicaInfo, listener: NodeListener, loss: str
) -> None:
    """A teammate follows a replica's log; they are removed from the project (or the service is
    terminated): within a few seconds the socket says why and closes, and no line written after
    reaches it."""
    route = make_route(service_id, replica.replica_id)
    cookie = cookie_of(personas["teammate"])

    async def scenario() -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
        socket = socket_for(f"/ws/services/{service_id}/routes/{route.pk}/logs/", cookie)
        assert (await socket.connect(timeout=deadline_for(5)))[0]
        await receive_until(socket, lambda m: m["type"] == "following")
        await asyncio.to_thread(lose_access, loss, personas, service_id)
        lost_at = asyncio.get_running_loop().time()
        got = await receive_until(socket, lambda m: m["type"] == "end", timeout=10)
        took = asyncio.get_running_loop().time() - lost_at
        closed = await socket.receive_output(timeout=deadline_for(5))
        return got, took, closed

    got, took, closed = run(scenario())
    assert got[-1]["reason"] == "revoked", got
    expected = "can no longer read this service" if loss.startswith("removed") else "service was terminated"
    assert expected in got[-1]["message"]
    assert took < 5, f"the socket streamed {took:.1f} s after access was lost"
    assert closed == {"type": "websocket.close", "code": 4404}
    wait_for(lambda: listener.follows.active() == [], timeout=5, what="the node's follow thread to end")


@pytest.mark.parametrize("loss", LOSSES)
def test_an_http_log_follow_stops_streaming_when_access_is_lost(
    personas: dict[str, Any], service_id: str, replica: ReplicaInfo, listener: NodeListener, loss: str
) -> None:
    """``curl -N .../logs/?follow=1`` as a teammate: removed from the project (or the service
    terminated), the stream's last line says why within a few seconds, and the response ends."""
    route = make_route(service_id, replica.replica_id)
    url = f"/api/v1/services/{service_id}/routes/{route.pk}/logs/"

    async def scenario() -> tuple[str, float]:
        client = AsyncClient()
        await client.aforce_login(personas["teammate"])
        response = await client.get(url, {"follow": "1", "tail": "5"})
        assert response.status_code == 200
        received = b""

        async def read_to_the_end() -> None:
            nonlocal received
            async for chunk in response.streaming_content:
                received += chunk

        reader = asyncio.create_task(read_to_the_end())
        await asyncio.sleep(0)
        await asyncio.to_thread(wait_for, listener.follows.active, 5, 0.05, "the node to follow")
        await asyncio.to_thread(lose_access, loss, personas, service_id)
        lost_at = asyncio.get_running_loop().time()
        await asyncio.wait_for(reader, timeout=10)
        return received.decode(), asyncio.get_running_loop().time() - lost_at

    body, took = run(scenario())
    expected = "can no longer read this service" if loss.startswith("removed") else "service was terminated"
    assert body.splitlines()[-1].startswith("-- ") and expected in body.splitlines()[-1], body[-400:]
    assert took < 5, f"the stream went on {took:.1f} s after access was lost"
    wait_for(lambda: listener.follows.active() == [], timeout=5, what="the node's follow thread to end")
