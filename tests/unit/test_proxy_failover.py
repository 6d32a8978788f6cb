"""Gateway failover in memory (proxy/app.py ``Proxy.failover``): what the real-process tests
(tests/integration/test_gateway_failover.py) can not arrange exactly: no cookie at the gateway, before or
after a failover, and a body too big to keep for a re-send."""

from __future__ import annotations

import time
from typing import Any

from proxy.app import Proxy
from proxy.config import Config
from proxy.downstream import Downstream
from proxy.exchange import Exchange
from proxy.upstream import Upstream
from serving.core import tokens
from tests.unit.test_proxy_protocol import FakeLoop, FakeTransport


class Gateway:
    """A proxy whose table has two services of the model ``m`` (``a`` first) and a key for both."""

    def __init__(self, config: Config | None = None, **first: Any) -> None:
        self.proxy = Proxy(config or Config(token_key="k"))
        table = self.proxy.table
        self.key = tokens.mint(tokens.GATEWAY_KEY_KIND, "k")
        table.apply_key(self.key.lookup, {"digest": self.key.digest, "expires": time.time() + 60, "projects": ["p"]})
        for slug, port, extra in (("a", 8001, first), ("b", 8002, {})):
            table.apply(
                slug,
                {
                    "id": f"id-{slug}",
                    "slug": slug,
                    "status": "HEALTHY",
                    "routes": [{"id": f"r{slug}", "host": "10.0.0.1", "port": port, "weight": 1}],
                    "models": ["m"],
                    "project": "p",
                    **extra,
                },
            )
        table.loaded = True
        self.loop = FakeLoop()
        self.proxy.loop = self.loop  # type: ignore[assignment]
        self.client = Downstream(self.proxy)
        self.client.connection_made(FakeTransport())  # type: ignore[arg-type]

    def send(self, body: bytes, headers: str = "", length: int | None = None) -> None:
        """The request's head and ``body`` (the start of one of ``length`` bytes, if given)."""
        self.client.data_received(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n%b"
            b"Authorization: Bearer %b\r\n\r\n%b"
            % (len(body) if length is None else length, headers.encode(), self.key.token.encode(), body)
        )

    def pending(self) -> tuple[Any, Exchange]:
        """The connection the proxy is opening now: its route and request (the task not run)."""
        coro = self.loop.tasks.pop(0)
        route, ex = coro.cr_frame.f_locals["route"], coro.cr_frame.f_locals["ex"]
        coro.close()
        return route, ex

    def refuse(self) -> None:
        route, ex = self.pending()
        self.proxy._connect_failed(route, ex, ConnectionRefusedError(111, "Connection refused"))

    def accept(self) -> Upstream:
        route, ex = self.pending()
        conn = Upstream(self.proxy, route)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        ex.attach(conn)
        return conn

    @property
    def to_client(self) -> bytes:
        return self.client.transport.sent  # type: ignore[attr-defined, no-any-return]


BODY = b'{"model": "m", "messages": []}'


def test_the_gateway_forwards_no_cookie_before_or_after_a_failover() -> None:
    """The gateway's /v1/ is the proxy's own origin, shared by every service (as /e/<slug>/ is):
    a cookie sent there is no one service's, even for a service that forwards cookies on its host."""
    g = Gateway(forward_cookies=True)
    g.send(BODY, "Cookie: app=1; sessionid=s\r\n")
    route, ex = g.pending()
    assert route.endpoint_slug == "a" and b"ookie" not in ex.head
    g.proxy._connect_failed(route, ex, ConnectionRefusedError())
    conn = g.accept()
    sent = conn.transport.sent  # type: ignore[attr-defined]
    assert conn.route.endpoint_slug == "b"
    assert b"ookie" not in sent and sent.endswith(b"\r\n\r\n" + BODY)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert g.to_client.startswith(b"HTTP/1.1 200 OK\r\nX-Modelserve-Service: b\r\n")
    a, b = g.proxy.table.endpoints["a"], g.proxy.table.endpoints["b"]
    assert (a.in_flight, b.in_flight, a.stats.count, b.stats.count) == (0, 0, 0, 1)
    assert a.stats.failovers == 1 and g.proxy.failovers == {"m": 1}


def test_a_body_too_big_to_keep_fails_over_until_part_of_it_was_sent() -> None:
    """The body the gateway held to find the model is kept whole; past that, one bigger than
    PROXY_REPLAY_LIMIT streams through once (its pieces wait for the connection)."""
    start, rest = b'{"model": "m", "pad": "', b"x" * 200 + b'"}'
    # Refused: nothing of the body went anywhere, so all of it goes to the next service.
    g = Gateway(Config(token_key="k", replay_limit=64))
    g.send(start, length=len(start) + len(rest))
    g.client.data_received(rest)
    g.refuse()
    conn = g.accept()
    assert conn.route.endpoint_slug == "b"
    assert conn.transport.sent.endswith(b"\r\n\r\n" + start + rest)  # type: ignore[attr-defined]

    # Sent to a replica that closed unanswered: what went can not be sent again, so no failover.
    g = Gateway(Config(token_key="k", replay_limit=64), retry_policy="all")
    g.send(start, length=len(start) + len(rest))
    g.client.data_received(rest)
    first = g.accept()
    assert first.route.endpoint_slug == "a" and first.transport.sent.endswith(rest)  # type: ignore[attr-defined]
    first.connection_lost(ConnectionResetError())
    assert g.to_client.startswith(b"HTTP/1.1 502 ") and not g.loop.tasks
    assert g.proxy.failovers == {}

    # The same with the body whole in the gateway's hands: sent again, to the next service.
    g = Gateway(Config(token_key="k", replay_limit=64), retry_policy="all")
    g.send(start + rest)
    first = g.accept()
    first.connection_lost(ConnectionResetError())
    second = g.accept()
    assert second.route.endpoint_slug == "b" and second.transport.sent.endswith(start + rest)  # type: ignore[attr-defined]
