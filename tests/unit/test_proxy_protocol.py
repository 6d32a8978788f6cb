"""The proxy's HTTP handling in memory: client and replica connections on fake transports.

Edge cases of framing that the integration tests (tests/integration/test_proxy.py) do not reach
with real replicas: close-framed bodies, interim answers, hop-by-hop response headers, a replica
that answers twice, a pooled connection that dies unanswered, a client that leaves.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
from typing import Any

import pytest

from proxy.app import Proxy
from proxy.config import Config
from proxy.downstream import Downstream
from proxy.upstream import Upstream
from serving.core import tokens


class FakeTransport:
    def __init__(self) -> None:
        self.sent = b""
        self.closed = False
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else None

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class FakeLoop:
    """Records the connections the proxy opens (see World.connect) instead of opening them."""

    def __init__(self) -> None:
        self.tasks: list[Any] = []

    def create_task(self, coro: Any) -> None:
        self.tasks.append(coro)

    def call_later(self, delay: float, callback: Any, *args: Any) -> Any:
        return None


class World:
    def __init__(self, replicas: int = 1, config: Config | None = None, **entry: Any) -> None:
        self.proxy = Proxy(config or Config(token_key="k"))
        self.token = tokens.mint("mst", "k")
        self.proxy.table.apply(
            "s",
            {
                "id": "1",
                "slug": "s",
                "public": False,
                "status": "HEALTHY",
                "routes": [{"id": "r1", "host": "10.0.0.1", "port": 8000, "weight": 1}],
                "tokens": {self.token.lookup: {"digest": self.token.digest, "expires": time.time() + 60}},
                **entry,
            },
        )
        self.proxy.table.loaded = True
        self.route = self.proxy.table.endpoints["s"].routes[0]
        self.replicas: list[Upstream] = []
        for _ in range(replicas):
            conn = Upstream(self.proxy, self.route)
            conn.connection_made(FakeTransport())  # type: ignore[arg-type]
            conn.idle_since = time.monotonic()  # pooled just now
            self.route.idle.insert(0, conn)
            self.replicas.append(conn)
        self.loop = FakeLoop()
        self.proxy.loop = self.loop  # type: ignore[assignment]
        self.client = Downstream(self.proxy)
        self.client.connection_made(FakeTransport())  # type: ignore[arg-type]

    def connect(self) -> Upstream:
        """Complete the one connection the proxy is opening: a new replica connection."""
        coro = self.loop.tasks.pop(0)
        route, ex = coro.cr_frame.f_locals["route"], coro.cr_frame.f_locals["ex"]
        coro.close()
        conn = Upstream(self.proxy, route)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        self.replicas.append(conn)
        ex.attach(conn)
        return conn

    def request(self, text: str = "GET /e/s/x HTTP/1.1\r\nHost: p\r\n", auth: bool = True) -> None:
        head = text + (f"Authorization: Bearer {self.token.token}\r\n" if auth else "") + "\r\n"
        self.client.data_received(head.encode())

    @property
    def to_client(self) -> bytes:
        return self.client.transport.sent  # type: ignore[attr-defined, no-any-return]

    def to_replica(self, i: int = 0) -> bytes:
        return self.replicas[i].transport.sent  # type: ignore[attr-defined, no-any-return]


def test_the_common_answer_is_relayed_byte_for_byte_and_the_connection_pooled() -> None:
    w = World()
    w.request()
    assert w.to_replica().startswith(b"GET /x HTTP/1.1\r\nHost: 10.0.0.1:8000\r\n")
    assert b"Authorization" not in w.to_replica() and b"X-Forwarded-For: 192.0.2.7\r\n" in w.to_replica()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Model: m\r\n\r\nok"
    w.replicas[0].data_received(answer)
    assert w.to_client == answer
    assert w.route.idle == [w.replicas[0]] and w.route.in_flight == 0
    assert w.proxy.table.endpoints["s"].in_flight == 0


def test_hop_by_hop_headers_of_the_answer_are_removed() -> None:
    w = World()
    w.request()
    w.replicas[0].data_received(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"
    )
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert w.route.idle == [] and w.replicas[0].transport.closed  # the replica said close


def test_a_close_framed_body_is_chunked_for_the_client() -> None:
    w = World()
    w.request()
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst")
    w.replicas[0].data_received(b"second")
    w.replicas[0].connection_lost(None)
    assert w.to_client == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"
    )
    assert not w.client.transport.closed  # the client keeps its connection


def test_interim_answers_are_not_forwarded() -> None:
    w = World()
    w.request()
    w.replicas[0].data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
    assert w.to_client == b""
    w.replicas[0].data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert w.to_client == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert w.route.idle == [w.replicas[0]]


def test_head_answers_end_with_the_head() -> None:
    w = World()
    w.request("HEAD /e/s/x HTTP/1.1\r\nHost: p\r\n")
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    assert w.client.current is None  # done: the next request may come


def test_a_second_answer_from_the_replica_is_not_relayed() -> None:
    w = World()
    w.request()
    w.replicas[0].data_received(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged"
    )
    assert b"forged" not in w.to_client
    assert w.replicas[0].transport.closed


@pytest.mark.parametrize(
    ("method", "extra", "retried"),
    [
        ("GET", "", True),
        ("PUT", "", True),  # idempotent (RFC 9110 9.2.2)
        ("POST", "", False),  # may have been processed: never sent twice
        ("PATCH", "", False),
        ("POST", "Idempotency-Key: k1\r\n", True),  # the client says sending it twice is harmless
    ],
)
def test_a_request_that_reached_a_replica_is_sent_again_only_when_safe(method: str, extra: str, retried: bool) -> None:
    w = World(replicas=2)
    w.client.data_received(
        f"{method} /e/s/v1/chat HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\n{extra}".encode()
        + b"Authorization: Bearer "
        + w.token.token.encode()
        + b"\r\n\r\nbody"
    )
    dead = next(r for r in w.replicas if r.transport.sent)  # type: ignore[attr-defined]
    dead.served = 3  # a reused connection the replica closed (its keep-alive timer, or it died)
    dead.connection_lost(ConnectionResetError())
    other = next(r for r in w.replicas if r is not dead)
    if retried:
        assert other.transport.sent.endswith(b"\r\n\r\nbody")  # type: ignore[attr-defined]
        other.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert w.to_client.endswith(b"ok") and w.proxy.counters["retries_total"] == 1
    else:
        assert other.transport.sent == b""  # type: ignore[attr-defined]
        assert w.to_client.startswith(b"HTTP/1.1 502 ")
        assert b"Idempotency-Key" in w.to_client and w.proxy.counters["retries_total"] == 0
    assert w.route.in_flight == 0 and w.proxy.table.endpoints["s"].in_flight == 0


def test_an_installation_may_declare_every_request_safe_to_resend() -> None:
    """PROXY_RETRY_UNSAFE: inference without side effects; a replica dying under a POST costs nothing."""
    w = World(replicas=2, config=Config(token_key="k", retry_unsafe=True))
    w.client.data_received(
        b"POST /e/s/v1/chat HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nAuthorization: Bearer "
        + w.token.token.encode()
        + b"\r\n\r\nbody"
    )
    dead = next(r for r in w.replicas if r.transport.sent)  # type: ignore[attr-defined]
    dead.served = 3
    dead.connection_lost(ConnectionResetError())
    other = next(r for r in w.replicas if r is not dead)
    assert other.transport.sent.endswith(b"\r\n\r\nbody")  # type: ignore[attr-defined]


def test_a_request_that_cannot_be_retried_avoids_a_long_idle_pooled_connection() -> None:
    w = World(replicas=1)
    w.replicas[0].idle_since = time.monotonic() - 2  # the replica's keep-alive timer may be closing it
    auth = b"Authorization: Bearer " + w.token.token.encode() + b"\r\n"
    w.client.data_received(b"POST /e/s/v1/chat HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n" + auth + b"\r\nhi")
    assert w.to_replica(0) == b"" and w.replicas[0].closed and w.route.idle == []
    fresh = w.connect()
    assert fresh.transport.sent.startswith(b"POST /v1/chat ")  # type: ignore[attr-defined]
    # A GET may use such a connection: if it fails unanswered, it is sent again.
    w = World(replicas=1)
    w.replicas[0].idle_since = time.monotonic() - 2
    w.request()
    assert w.to_replica(0).startswith(b"GET /x ") and w.loop.tasks == []


def test_a_client_leaving_cuts_the_replica_off() -> None:
    w = World()
    w.request("GET /e/s/v1/stream HTTP/1.1\r\nHost: p\r\n")
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    w.client.connection_lost(None)
    assert w.replicas[0].transport.aborted  # type: ignore[attr-defined]
    assert w.proxy.table.endpoints["s"].in_flight == 0 and w.route.in_flight == 0
    assert w.proxy.table.endpoints["s"].stats.codes[4] == 1  # counted as 499


@pytest.mark.parametrize(
    ("request_text", "status"),
    [
        ("GET /e/s/x HTTP/1.1\r\nHost: p\r\n\r\n", 401),
        ("GET /other HTTP/1.1\r\nHost: p\r\n\r\n", 404),
        ("GET /e/nope/x HTTP/1.1\r\nHost: p\r\n\r\n", 404),
        ("BROKEN\r\n\r\n", 400),
    ],
)
def test_local_answers(request_text: str, status: int) -> None:
    w = World()
    w.client.data_received(request_text.encode())
    assert w.to_client.startswith(b"HTTP/1.1 %d " % status)
    assert b'{"error": {"code": "' in w.to_client
    assert w.to_replica() == b""


def test_pipelined_requests_are_answered_in_order() -> None:
    w = World(replicas=1)
    auth = b"Authorization: Bearer " + w.token.token.encode() + b"\r\n"
    w.client.data_received(
        b"GET /e/s/one HTTP/1.1\r\nHost: p\r\n" + auth + b"\r\nGET /e/s/two HTTP/1.1\r\nHost: p\r\n" + auth + b"\r\n"
    )
    assert w.to_replica().startswith(b"GET /one ") and b"GET /two" not in w.to_replica()
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert w.to_replica().count(b"GET /two ") == 1  # sent once the first answer is complete
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert w.to_client.endswith(b"\r\n\r\n1HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")


def test_backpressure_both_ways() -> None:
    w = World()
    w.request()
    replica = w.replicas[0]
    w.client.pause_writing()  # a slow client: stop reading the replica
    assert replica.transport.paused  # type: ignore[attr-defined]
    w.client.resume_writing()
    assert not replica.transport.paused  # type: ignore[attr-defined]
    replica.pause_writing()  # a slow replica: stop reading the client
    assert w.client.transport.paused  # type: ignore[attr-defined]
    replica.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert not w.client.transport.paused  # type: ignore[attr-defined]  # done: the client reads again


# --- HTTP/1.1 to the letter: framing a replica could read otherwise is refused -----------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400),
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n", 400),
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nContent-Length: 3\r\n", 400),
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3, 3\r\n", 400),
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nContent-Length: -1\r\n", 400),
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked, gzip\r\n", 400),
        ("POST /e/s/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: identity\r\n", 400),
        ("GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-Folded: one\r\n two\r\n", 400),  # obs-fold
        ("GET /e/s/x HTTP/1.1\nHost: p\n", 400),  # bare LF
        ("GET /e/s/x HTTP/1.1\r\nHost: p\rX-A: b\r\n", 400),  # bare CR
        ("GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-A: a\x00b\r\n", 400),
        # An HTTP/1.0 request with Transfer-Encoding has faulty framing (RFC 9112 6.1).
        ("POST /e/s/x HTTP/1.0\r\nHost: p\r\nTransfer-Encoding: chunked\r\n", 400),
        ("GET /e/s/x HTTP/2.0\r\nHost: p\r\n", 505),  # llhttp parses it; we do not speak it
        ("CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\n", 405),
    ],
)
def test_ambiguous_or_unsupported_framing_is_refused_and_the_connection_closed(head: str, status: int) -> None:
    w = World()
    w.request(head)
    w.client.data_received(b"3\r\nabc\r\n0\r\n\r\nGET /e/s/smuggled HTTP/1.1\r\nHost: p\r\n\r\n")
    assert w.to_client.startswith(b"HTTP/1.1 %d " % status), w.to_client
    assert w.to_client.count(b"Content-Type: application/json") == 1 and b"Connection: close\r\n" in w.to_client
    assert w.to_replica() == b"" and w.client.transport.closed  # type: ignore[attr-defined]
    assert w.proxy.table.endpoints["s"].in_flight == 0 and w.route.in_flight == 0


def test_a_long_target_gets_414_and_a_long_head_431_in_one_packet_or_trickled() -> None:
    w = World()
    w.client.data_received(b"GET /e/s/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: p\r\n\r\n")
    assert w.to_client.startswith(b"HTTP/1.1 414 ") and w.client.transport.closed  # type: ignore[attr-defined]
    w = World()
    w.client.data_received(b"GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
    assert w.to_client.startswith(b"HTTP/1.1 431 ") and w.client.transport.closed  # type: ignore[attr-defined]
    # A slow client sending one endless header: refused once 64 KiB are held, not at the end.
    w = World()
    w.client.data_received(b"GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-Big: ")
    sent = 0
    while not w.client.transport.closed and sent < 1_000_000:  # type: ignore[attr-defined]
        w.client.data_received(b"c" * 4096)
        sent += 4096
    assert w.to_client.startswith(b"HTTP/1.1 431 ") and sent <= 70_000
    # Many small headers count too.
    w = World()
    w.client.data_received(b"GET /e/s/x HTTP/1.1\r\nHost: p\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n")
    assert w.to_client.startswith(b"HTTP/1.1 431 ") and w.to_replica() == b""
    # A head just under the bound, arriving in pieces, is fine.
    w = World()
    head = b"GET /e/s/x HTTP/1.1\r\nHost: p\r\n" + b"X-A: " + b"d" * 30_000 + b"\r\n"
    head += b"Authorization: Bearer " + w.token.token.encode() + b"\r\n\r\n"
    for i in range(0, len(head), 1000):
        w.client.data_received(head[i : i + 1000])
    assert w.to_replica().startswith(b"GET /x ") and w.to_client == b""


def test_trailers_are_not_forwarded_and_endless_ones_are_cut() -> None:
    w = World()
    auth = b"Authorization: Bearer " + w.token.token.encode() + b"\r\n"
    w.client.data_received(
        b"POST /e/s/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n"
        b"3\r\nabc\r\n0\r\nAuthorization: Bearer other\r\nX-Trailer: t\r\n\r\n"
    )
    assert w.to_replica().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert b"other" not in w.to_replica() and b"X-Trailer" not in w.to_replica()
    # A trailer (or chunk extension) that never ends: the request is refused, the replica cut off.
    w = World()
    auth = b"Authorization: Bearer " + w.token.token.encode() + b"\r\n"
    w.client.data_received(
        b"POST /e/s/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n3\r\nabc\r\n0\r\nX-T: "
    )
    sent = 0
    while not w.client.transport.closed and sent < 1_000_000:  # type: ignore[attr-defined]
        w.client.data_received(b"t" * 4096)
        sent += 4096
    assert sent <= 140_000 and w.to_client.startswith(b"HTTP/1.1 400 ")
    assert w.replicas[0].transport.closed and w.proxy.table.endpoints["s"].in_flight == 0  # type: ignore[attr-defined]


def test_headers_named_in_connection_are_hop_by_hop_both_ways() -> None:
    w = World()
    w.request(
        "GET /e/s/x HTTP/1.1\r\nHost: p\r\nConnection: keep-alive, X-Secret, X-Forwarded-For\r\n"
        "X-Secret: s\r\nX-Forwarded-For: 6.6.6.6\r\nX-Kept: k\r\n"
    )
    sent = w.to_replica()
    assert b"X-Secret" not in sent and b"6.6.6.6" not in sent and b"Connection" not in sent
    assert b"X-Kept: k\r\n" in sent and b"X-Forwarded-For: 192.0.2.7\r\n" in sent
    w.replicas[0].data_received(
        b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: internal\r\nX-End: e\r\nContent-Length: 2\r\n\r\nok"
    )
    assert w.to_client == b"HTTP/1.1 200 OK\r\nX-End: e\r\nContent-Length: 2\r\n\r\nok"


def test_a_refused_websocket_upgrade_answers_and_closes() -> None:
    w = World()
    w.request("GET /e/s/ws HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n")
    replica = w.connect()
    assert b"Upgrade: websocket\r\n" in replica.transport.sent  # type: ignore[attr-defined]
    replica.data_received(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    # The client's connection was switching protocols: it must learn it is over, not hang.
    # (An error answer carries the request's id: the proxy made one, the client sent none.)
    assert re.fullmatch(
        rb"HTTP/1.1 404 Not Found\r\nX-Request-ID: [0-9a-f]{16}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        w.to_client,
    )
    assert w.client.transport.closed  # type: ignore[attr-defined]


def test_a_replica_s_error_answer_carries_the_request_id_unless_it_has_its_own() -> None:
    w = World()
    w.request("GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-Request-ID: abc-1\r\n")
    w.replicas[0].data_received(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\nno")
    assert w.to_client == b"HTTP/1.1 500 Internal Server Error\r\nX-Request-ID: abc-1\r\nContent-Length: 2\r\n\r\nno"
    w = World()
    w.request("GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-Request-ID: abc-2\r\n")
    own = b"HTTP/1.1 503 Service Unavailable\r\nx-request-id: the-replica-s\r\nContent-Length: 2\r\n\r\nno"
    w.replicas[0].data_received(own)
    assert w.to_client == own  # relayed as it came
    w = World()
    w.request("GET /e/s/x HTTP/1.1\r\nHost: p\r\nX-Request-ID: abc-3\r\n")
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"  # a success is not touched


def test_101_to_a_request_that_asked_for_no_upgrade_is_not_relayed() -> None:
    w = World()
    w.request()
    w.replicas[0].data_received(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
    assert w.client.tunnel is None and w.replicas[0].transport.closed  # type: ignore[attr-defined]
    assert b"101" not in w.to_client


def test_100_continue_goes_to_http11_clients_only_and_codings_are_kept() -> None:
    w = World()
    w.request("POST /e/s/x HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\nExpect: 100-continue\r\n")
    assert w.to_client == b"HTTP/1.1 100 Continue\r\n\r\n" and b"Expect" not in w.to_replica()
    w = World()
    w.request("POST /e/s/x HTTP/1.0\r\nHost: p\r\nContent-Length: 2\r\nExpect: 100-continue\r\n")
    assert w.to_client == b""  # RFC 9110 10.1.1: never to an HTTP/1.0 client
    # A body coded before it was chunked keeps its coding (only the chunking is the proxy's).
    w = World()
    w.request("POST /e/s/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n")
    assert b"Transfer-Encoding: gzip, chunked\r\n" in w.to_replica()


def test_an_absolute_target_is_routed_by_its_path() -> None:
    w = World()
    w.request("GET http://proxy.example:8080/e/s/x?q=1 HTTP/1.1\r\nHost: ignored\r\n")
    assert w.to_replica().startswith(b"GET /x?q=1 HTTP/1.1\r\n")
    assert b"X-Forwarded-Host: proxy.example:8080\r\n" in w.to_replica()


def test_a_bad_pipelined_request_lets_the_ones_before_it_finish() -> None:
    w = World()
    auth = b"Authorization: Bearer " + w.token.token.encode() + b"\r\n"
    w.client.data_received(b"GET /e/s/one HTTP/1.1\r\nHost: p\r\n" + auth + b"\r\nGET /e/s/two HTTP/1.1\nHost: p\n\n")
    assert not w.client.transport.closed  # type: ignore[attr-defined]
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n1"
    assert w.client.transport.closed and b"/two" not in w.to_replica()  # type: ignore[attr-defined]


def test_a_big_body_waiting_for_a_connection_holds_the_client() -> None:
    w = World(replicas=1)
    w.proxy.replay_limit = 8
    auth = b"Authorization: Bearer " + w.token.token.encode() + b"\r\n"
    w.client.data_received(
        b"GET /e/s/one HTTP/1.1\r\nHost: p\r\n" + auth + b"\r\n"
        b"POST /e/s/two HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n" + auth + b"\r\n" + b"x" * 100
    )
    # (The replica closes this connection: the POST needs a new one.)
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n1")
    w.client.data_received(b"y" * 1000)  # read before the client could be held again
    assert w.client.transport.paused  # type: ignore[attr-defined]  # ... and now it is
    fresh = w.connect()
    assert fresh.transport.sent.endswith(b"x" * 100 + b"y" * 1000)  # type: ignore[attr-defined]
    assert not w.client.transport.paused  # type: ignore[attr-defined]


SPOOFED = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: bank.example\r\n"


def test_a_clients_own_forwarded_headers_are_replaced_by_what_the_proxy_saw() -> None:
    w = World()  # the peer 192.0.2.7 is not a trusted proxy (default: loopback only)
    w.request("GET /e/s/x HTTP/1.1\r\nHost: p\r\n" + SPOOFED)
    sent = w.to_replica()
    assert b"X-Forwarded-For: 192.0.2.7\r\n" in sent and b"6.6.6.6" not in sent
    assert b"X-Forwarded-Proto: http\r\n" in sent and b"X-Forwarded-Host: p\r\n" in sent
    assert b"bank.example" not in sent and b"https" not in sent


@pytest.mark.parametrize("trusted", ["192.0.2.0/24", "192.0.2.7", "*", "10.0.0.0/8,192.0.2.7"])
def test_a_trusted_proxy_in_front_passes_on_client_scheme_host_and_address(trusted: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("PROXY_TRUSTED_PROXIES", trusted)
    w = World(config=dataclasses.replace(Config.from_env(), token_key="k"))
    w.request("GET /e/s/x HTTP/1.1\r\nHost: p\r\n" + SPOOFED)
    sent = w.to_replica()
    assert b"X-Forwarded-For: 6.6.6.6, 192.0.2.7\r\n" in sent
    assert b"X-Forwarded-Proto: https\r\n" in sent and b"X-Forwarded-Host: bank.example\r\n" in sent


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "1.2.3.4,,nope"])
def test_a_bad_trusted_proxies_setting_stops_the_proxy_with_its_name(bad: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("PROXY_TRUSTED_PROXIES", bad)
    with pytest.raises(SystemExit, match="PROXY_TRUSTED_PROXIES"):
        Config.from_env()


def test_trust_is_by_address_including_ipv4_mapped_ipv6() -> None:
    config = Config(trusted_proxies=(ipaddress.ip_network("10.1.0.0/16"),))
    assert config.trusts("10.1.2.3") and config.trusts("::ffff:10.1.2.3")
    assert not config.trusts("10.2.0.1") and not config.trusts("") and not config.trusts("/run/proxy.sock")
    assert not Config(trusted_proxies=()).trusts("127.0.0.1") and Config(trusted_proxies=None).trusts("8.8.8.8")


# --- cookies (issue 13): the web app's session never reaches a replica -------------------------------

BROWSER = "Cookie: sessionid=S; csrftoken=C\r\nCookie: app=1; SessionID=S2;django_language=ja\r\n"
SETS = b"Set-Cookie: sessionid=evil; Path=/\r\nset-cookie: app=2\r\nSet-Cookie:  csrftoken=x\r\n"


def test_cookies_are_removed_both_ways_by_default() -> None:
    w = World()
    w.request("GET /e/s/x HTTP/1.1\r\nHost: p\r\n" + BROWSER)
    assert b"ookie" not in w.to_replica()
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\n" + SETS + b"Content-Length: 2\r\n\r\nok")
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert w.route.idle == [w.replicas[0]]  # the slow path still pools the connection


# A service that forwards cookies does so on its own host name only (SERVING_DOMAIN).
DOMAIN_CONFIG = Config(token_key="k", domain="models.example")
OWN_HOST = "GET /x HTTP/1.1\r\nHost: s.models.example\r\n"


def test_forward_cookies_keeps_the_apps_cookies_only() -> None:
    w = World(config=DOMAIN_CONFIG, forward_cookies=True, platform_cookies=["ms_session"])
    w.request(OWN_HOST + BROWSER + "Cookie: ms_session=M; theme=dark\r\n")
    assert b"Cookie: app=1; theme=dark\r\n" in w.to_replica()
    assert b"=S" not in w.to_replica() and b"=C" not in w.to_replica() and b"=M" not in w.to_replica()
    w.replicas[0].data_received(
        b"HTTP/1.1 200 OK\r\n" + SETS + b"Set-Cookie: MS_SESSION=x\r\nContent-Length: 2\r\n\r\nok"
    )
    assert w.to_client == b"HTTP/1.1 200 OK\r\nset-cookie: app=2\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    "set_cookie",
    [
        b"=sessionid=attacker",  # a nameless cookie: the browser sends back "sessionid=attacker"
        b" = sessionid=attacker; Path=/",
        b"=MS_SESSION=attacker",
        b"sessionid",  # no "=": nameless too (RFC 6265bis), its value sent back alone
        b"app=sessionid=attacker",  # a value that reads as the platform's cookie to a loose parser
        b"=theme=dark",  # nameless, whatever it holds
    ],
)
def test_forward_cookies_drops_nameless_and_platform_looking_set_cookies(set_cookie: bytes) -> None:
    w = World(config=DOMAIN_CONFIG, forward_cookies=True, platform_cookies=["ms_session"])
    w.request(OWN_HOST)
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nSet-Cookie: " + set_cookie + b"\r\nContent-Length: 2\r\n\r\nok")
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_forward_cookies_removes_the_domain_attribute() -> None:
    # Under SERVING_DOMAIN a Domain attribute would set the cookie for every sibling service's host.
    w = World(config=DOMAIN_CONFIG, forward_cookies=True)
    w.request(OWN_HOST)
    w.replicas[0].data_received(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: app=1; Domain=models.example; Path=/; HttpOnly\r\n"
        b"set-cookie: b=2;domain=.models.example\r\nSet-Cookie: c=3; Path=/domain\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    assert w.to_client == (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: app=1; Path=/; HttpOnly\r\nSet-Cookie: b=2\r\n"
        b"Set-Cookie: c=3; Path=/domain\r\nContent-Length: 2\r\n\r\nok"
    )


def test_forward_cookies_passes_nothing_at_the_shared_path_address() -> None:
    # /e/<slug>/ on the proxy's own address: every service shares that origin, so no cookie passes.
    w = World(config=DOMAIN_CONFIG, forward_cookies=True)
    w.request("GET /e/s/x HTTP/1.1\r\nHost: models.example\r\nCookie: app=1\r\n")
    assert b"ookie" not in w.to_replica()
    w.replicas[0].data_received(b"HTTP/1.1 200 OK\r\nSet-Cookie: app=2\r\nContent-Length: 2\r\n\r\nok")
    assert w.to_client == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_a_cookie_header_named_in_connection_is_dropped_even_when_forwarded() -> None:
    w = World(config=DOMAIN_CONFIG, forward_cookies=True)
    w.request(OWN_HOST + "Connection: Cookie\r\nCookie: app=1\r\n")
    assert b"ookie" not in w.to_replica()
