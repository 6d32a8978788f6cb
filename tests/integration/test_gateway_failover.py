"""Gateway failover (issue 17's remainder): a gateway request whose chosen service failed it before a
byte of an answer goes on to another backend of its model name, within the same request. The real
proxy process, real llm-echo replicas stopped with SIGKILL so that connections are refused (before
any control plane could notice: there is none here), and real Redis; the routing table, keys and
aliases are written as serving/bus/routing.py writes them (test_gateway_proxy.py's helpers)."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serving.core import tokens
from tests.integration.test_gateway_proxy import call, chat, grant, publish_alias
from tests.integration.test_proxy import Backend, BlackHole, Proxy, backends, wait_for

__all__ = ["backends"]  # the fixture, imported for its use here


@pytest.fixture(scope="module")
def gw() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


def shared_model(
    proxy: Proxy, backends: Callable[..., Backend], first: list[dict[str, Any]], **first_extra: Any
) -> tuple[str, str, str, Backend, tokens.MintedToken]:
    """A model name served by two services of two projects (each project's name is its own, so the
    name is shared across them), the first published first (tried first while it looks healthy).
    Returns the model, the two slugs, the second's replica and a key of both projects."""
    tag = uuid.uuid4().hex[:6]
    model = f"shared-{tag}"
    second = backends(MODEL_NAME=model)
    slug_a, slug_b = f"fa-{tag}", f"fb-{tag}"
    key = publish_in_order(proxy, model, [(slug_a, first, first_extra), (slug_b, [second.route()], {})])
    return model, slug_a, slug_b, second, key


def publish_in_order(
    proxy: Proxy, model: str, services: list[tuple[str, list[dict[str, Any]], dict[str, Any]]]
) -> tokens.MintedToken:
    """Services of ``model`` (each in its own project ``p<slug>``), each seen in the proxy's table
    before the next is published, so they are tried in this order (the proxy's periodic full read
    of the table could otherwise bring a later one in first). Returns a key of all their projects."""
    for slug, routes, extra in services:
        proxy.publish(slug, routes, models=[model], project=f"p{slug}", owner="1", **extra)
        alone = grant(proxy, services=[f"id-{slug}"])
        wait_for(lambda: model in listed(proxy, alone), what=f"the entry of {slug}")  # noqa: B023 (called here)
    key = grant(proxy, projects=[f"p{slug}" for slug, _, _ in services])
    wait_for(lambda: model in listed(proxy, key), what="the key")
    return key


def listed(proxy: Proxy, key: tokens.MintedToken) -> list[str]:
    """The models ``key`` may call, as GET /v1/models lists them (none while the key is unknown)."""
    status, _, body = call(proxy, "/v1/models", key.token)
    return [m["id"] for m in body["data"]] if status == 200 else []


def failovers(proxy: Proxy, model: str) -> int:
    """The proxy's gateway_failovers counter for ``model`` on /metrics (0 when absent)."""
    line = re.escape(f'modelserve_proxy_gateway_failovers_total{{model="{model}"}} ')
    found = re.search(f"^{line}(\\d+)$", proxy.metrics(), re.M)
    return int(found.group(1)) if found else 0


def reported(proxy: Proxy, slug: str) -> int:
    """The failovers this proxy pushed to Redis for the service that failed them (per tick)."""
    return int(proxy.redis.hget(f"{proxy.prefix}:proxy:failovers", slug) or 0)


def usage_requests(proxy: Proxy, key: tokens.MintedToken) -> dict[str, int]:
    """The key's requests counted in Redis by service id (proxy/usage.py's hash fields)."""
    counts: dict[str, int] = {}
    for name in proxy.redis.scan_iter(f"{proxy.prefix}:gateway:usage:{key.lookup}:*"):
        for field, value in proxy.redis.hgetall(name).items():
            service, _, what = field.decode().rpartition(":")
            if what == "requests":
                counts[service] = counts.get(service, 0) + int(value)
    return counts


def test_a_shared_model_name_fails_over_to_the_service_with_live_replicas(
    gw: Proxy, backends: Callable[..., Backend]
) -> None:
    dead = [backends(), backends()]
    model, slug_a, slug_b, second, key = shared_model(gw, backends, [d.route() for d in dead])
    to_a = 0  # requests the first service answered, counted by the client

    def answered() -> bool:
        nonlocal to_a
        status, headers, _ = call(gw, "/v1/chat/completions", key.token, chat(model))
        if status == 200:
            assert headers["X-Modelserve-Service"] == slug_a  # the first service, while it lives
            to_a += 1
        return status == 200

    wait_for(answered, what="the entries")

    for d in dead:  # every replica of the first service stops: its connections are refused
        d.kill()
    served = second.served()
    for _ in range(5):
        status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(model))
        assert status == 200, body
        assert headers["X-Modelserve-Service"] == slug_b
        assert body["model"] == model and body["choices"][0]["message"]["content"]
    assert second.served() == served + 5
    # The first request found the first service dead and failed over; the later ones went to the
    # second service at once (the first's replicas are marked down here), so no more failovers.
    assert failovers(gw, model) >= 1
    wait_for(lambda: reported(gw, slug_a) == failovers(gw, model), what="the failover count in Redis")
    # Usage is counted for the service that answered, never for the one that failed (its count is
    # complete by then: pushed no later than the second's, whose requests came after).
    wait_for(lambda: usage_requests(gw, key).get(f"id-{slug_b}") == 5, what="the usage of the service that answered")
    assert usage_requests(gw, key).get(f"id-{slug_a}") == to_a


def test_an_alias_fails_over_mid_request_to_its_other_backend(gw: Proxy, backends: Callable[..., Backend]) -> None:
    tag = uuid.uuid4().hex[:6]
    project = f"p-{tag}"
    own, spill = backends(MODEL_NAME=f"own-{tag}"), backends(MODEL_NAME=f"spill-{tag}")
    slug_own, slug_spill = f"own-{tag}", f"spill-{tag}"
    gw.publish(slug_own, [own.route()], models=[f"own-{tag}"], project=project, owner="1")
    gw.publish(slug_spill, [spill.route()], models=[f"spillm-{tag}"], project=project, owner="1")
    name = f"llm-{tag}"
    publish_alias(gw, uuid.uuid4().hex, name, project, [(slug_own, 1000), (slug_spill, 1)])
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(name))[0] == 200, what="the alias")

    own.kill()  # its only replica: refused, while the alias still lists the backend as healthy
    before = failovers(gw, name)
    status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(name))
    assert status == 200, body
    assert headers["X-Modelserve-Service"] == slug_spill
    assert failovers(gw, name) == before + 1  # this very request failed over
    for _ in range(10):
        status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(name))
        assert status == 200 and headers["X-Modelserve-Service"] == slug_spill, body


def test_a_key_allowed_only_the_failing_service_gets_its_failure(gw: Proxy, backends: Callable[..., Backend]) -> None:
    dead = backends()
    model, slug_a, _, second, _ = shared_model(gw, backends, [dead.route()])
    only_a = grant(gw, services=[f"id-{slug_a}"])
    wait_for(lambda: call(gw, "/v1/chat/completions", only_a.token, chat(model))[0] == 200, what="the entries")

    dead.kill()
    served = second.served()
    status, headers, body = call(gw, "/v1/chat/completions", only_a.token, chat(model))
    assert status == 502 and body["error"]["code"] == "replica_unreachable", body
    assert "X-Modelserve-Service" not in headers
    assert second.served() == served  # the other service never saw it
    assert failovers(gw, model) == 0


def test_a_safe_post_fails_over_when_its_connection_was_refused(gw: Proxy, backends: Callable[..., Backend]) -> None:
    """``retry_policy=safe``: a refused connection sent nothing, so even a POST may go elsewhere."""
    refused = backends()
    model, _, slug_b, _, key = shared_model(gw, backends, [refused.route()], retry_policy="safe")
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(model))[0] == 200, what="the entries")
    refused.kill()
    status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(model))
    assert status == 200 and headers["X-Modelserve-Service"] == slug_b, body
    assert failovers(gw, model) == 1


@pytest.mark.parametrize(("policy", "fails_over"), [("safe", False), ("inference", True)])
def test_a_post_that_reached_a_replica_fails_over_only_as_its_retry_policy_allows(
    gw: Proxy, backends: Callable[..., Backend], policy: str, fails_over: bool
) -> None:
    """A replica that read the POST and closed may have processed it: under ``safe`` it is sent
    nowhere again (502); under ``inference`` (the default) it goes to the other service."""
    hole = BlackHole()
    try:
        model, _, slug_b, second, key = shared_model(gw, backends, [hole.route()], retry_policy=policy)
        served = second.served()
        status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(model))
        wait_for(lambda: len(hole.received) >= 1, what="the POST at the closing replica")
        if fails_over:
            assert status == 200 and headers["X-Modelserve-Service"] == slug_b, body
            assert second.served() == served + 1
            assert failovers(gw, model) == 1
        else:
            assert status == 502 and "Idempotency-Key" in body["error"]["message"], body
            assert len(hole.received) == 1  # sent once, to one replica of one service
            assert second.served() == served
            assert failovers(gw, model) == 0
    finally:
        hole.close()


class HalfAnswer:
    """A replica that reads a request, starts a stream (head and one event), and dies."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b'17\r\ndata: {"choices": []}\n\n\r\n'
                    )
                    self.answered += 1

    def route(self) -> dict[str, Any]:
        return {"id": f"half-{self.port}", "host": "127.0.0.1", "port": self.port, "weight": 1}

    def close(self) -> None:
        self.sock.close()


def test_a_stream_that_started_never_fails_over(gw: Proxy, backends: Callable[..., Backend]) -> None:
    half = HalfAnswer()
    try:
        model, slug_a, _, second, key = shared_model(gw, backends, [half.route()], retry_policy="all")
        served = second.served()
        body = json.dumps({**chat(model), "stream": True}).encode()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (key.token.encode(), len(body))
        )
        answer = gw.raw(head + body, until=lambda received: False, timeout=10)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
        assert b"X-Modelserve-Service: %b\r\n" % slug_a.encode() in answer
        assert b'data: {"choices": []}' in answer and not answer.endswith(b"0\r\n\r\n")  # cut short
        assert half.answered == 1 and second.served() == served
        assert failovers(gw, model) == 0
    finally:
        half.close()


def test_a_revision_pin_stays_with_its_service(gw: Proxy, backends: Callable[..., Backend]) -> None:
    """A pinned revision is the first service's: the other backend is chosen among all its replicas
    (its revisions are numbered apart; were the pin kept, it would have none and answer 503)."""
    dead = backends()
    route = {**dead.route(), "revision": 7}
    model, _, slug_b, _, key = shared_model(gw, backends, [route])
    pin = {"X-Modelserve-Revision": "7"}

    def pinned() -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gw.port}/v1/chat/completions",
            data=json.dumps(chat(model)).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key.token}", **pin},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    wait_for(lambda: pinned()[0] == 200, what="the entries")
    dead.kill()
    status, headers, body = pinned()
    assert status == 200 and headers["X-Modelserve-Service"] == slug_b, body


@pytest.mark.parametrize(("limit", "expect"), [(None, 200), ("2", 502)])
def test_at_most_proxy_gateway_backends_services_per_request(
    backends: Callable[..., Backend], limit: str | None, expect: int
) -> None:
    """Three services of one model name, the first two dead: the default (3) reaches the third;
    PROXY_GATEWAY_BACKENDS=2 stops after the second."""
    proxy = Proxy(**({"PROXY_GATEWAY_BACKENDS": limit} if limit else {}))
    try:
        tag = uuid.uuid4().hex[:6]
        model = f"three-{tag}"
        dead = [backends(), backends()]
        live = backends(MODEL_NAME=model)
        key = publish_in_order(
            proxy, model, [(f"s{i}-{tag}", [replica.route()], {}) for i, replica in enumerate([*dead, live])]
        )
        wait_for(lambda: call(proxy, "/v1/chat/completions", key.token, chat(model))[0] == 200, what="the entries")
        for replica in dead:
            replica.kill()
        status, headers, body = call(proxy, "/v1/chat/completions", key.token, chat(model))
        assert status == expect, body
        if expect == 200:
            assert headers["X-Modelserve-Service"] == f"s2-{tag}"
            assert failovers(proxy, model) == 2
        else:
            assert body["error"]["code"] == "replica_unreachable"
            assert failovers(proxy, model) == 1
    finally:
        proxy.close()
