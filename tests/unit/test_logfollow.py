"""The node side of a live log follow (serving.node.follows.Follows): a follow runs while its lease
lives and stops (thread and engine stream gone) once it lapses; follows per node and line lengths are
bounded. Real Redis (the session's own key prefix), a fake engine that honours ``stop`` as the real
ones do, and an injected clock for the lease-check interval."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from serving.bus import logfollow
from serving.bus.logfollow import lease_key, stream_key
from serving.node.engines.base import ReplicaNotFound
from serving.node.follows import Follows
from tests import live


class QuietEngine:
    """Yields one line, then whatever a test puts, and blocks (politely) in between, like a replica
    that prints nothing for a while; ``None`` ends it as a replica that exits."""

    name = "quiet"

    def __init__(self) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.open_streams = 0
        self._lock = threading.Lock()

    def logs(
        self, replica_id: str, tail: int = 200, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        if replica_id == "gone":
            raise ReplicaNotFound(replica_id)
        assert follow and stop is not None

        def stream() -> Iterator[str]:
            with self._lock:
                self.open_streams += 1
            try:
                yield f"tail of {tail}"
                while not stop.is_set():
                    try:
                        item = self.lines.get(timeout=0.02)
                    except queue.Empty:
                        continue
                    if item is None:
                        return
                    yield item
            finally:
                with self._lock:
                    self.open_streams -= 1

        return stream()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(settings.REDIS_URL)
    yield connection
    connection.close()


@pytest.fixture
def engine() -> QuietEngine:
    return QuietEngine()


@pytest.fixture
def follows(engine: QuietEngine) -> Iterator[Follows]:
    running = Follows("unit-node", engine=lambda: engine, limit=2, clock=Clock())
    yield running
    running.stop_all(wait=5)


def wait_for(condition: Any, what: str, timeout: float = 5.0) -> Any:
    return live.wait_for(condition, timeout=timeout, interval=0.01, what=what)


def start(follows: Follows, client: redis.Redis, container: str = "c-1", lease: bool = True) -> str:
    follow_id = uuid.uuid4().hex
    if lease:
        client.set(lease_key(follow_id), "1", ex=30)
    assert follows.start({"op": "follow", "id": follow_id, "container_id": container, "tail": 7}) or not lease
    return follow_id


def messages(client: redis.Redis, follow_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(stream_key(follow_id), 0, -1)]


def test_a_follow_streams_until_its_lease_is_gone_then_stops_its_thread_and_stream(
    follows: Follows, engine: QuietEngine, client: redis.Redis
) -> None:
    follow_id = start(follows, client)
    wait_for(lambda: len(messages(client, follow_id)) == 2, "the start and the tail")
    engine.lines.put("written later")
    wait_for(lambda: {"line": "written later"} in messages(client, follow_id), "the new line")
    assert messages(client, follow_id)[:2] == [{"started": True}, {"line": "tail of 7"}]

    # The lease lives: nothing stops, however often the node looks.
    assert follows.check_leases(force=True) == []
    assert follows.active() == [follow_id] and engine.open_streams == 1

    # The reader left (its lease deleted, or expired): the next check stops it.
    client.delete(lease_key(follow_id))
    assert follows.check_leases(force=True) == [follow_id]
    wait_for(lambda: follows.active() == [], "the follow thread to end")
    assert engine.open_streams == 0
    assert not any(t.name == f"log-follow-{follow_id[:8]}" for t in threading.enumerate())
    assert not client.exists(stream_key(follow_id)), "what nobody reads is dropped, not kept"


def test_leases_are_checked_at_most_every_interval(follows: Follows, client: redis.Redis) -> None:
    clock = follows.clock
    assert isinstance(clock, Clock)
    first = start(follows, client)
    assert follows.check_leases() == []  # the first check
    client.delete(lease_key(first))
    assert follows.check_leases() == []  # too soon: no Redis round trip per listener tick
    clock.now += logfollow.LEASE_CHECK
    assert follows.check_leases() == [first]


def test_a_lease_that_expires_by_itself_ends_the_follow(follows: Follows, client: redis.Redis) -> None:
    follow_id = uuid.uuid4().hex
    client.set(lease_key(follow_id), "1", px=200)  # the web died: nobody refreshes it
    assert follows.start({"op": "follow", "id": follow_id, "container_id": "c-1", "tail": 1})
    assert follows.check_leases(force=True) == []
    wait_for(lambda: not client.exists(lease_key(follow_id)), "the lease to expire")
    assert follows.check_leases(force=True) == [follow_id]
    wait_for(lambda: follows.active() == [], "the follow thread to end")


def test_follows_per_node_are_bounded(follows: Follows, client: redis.Redis) -> None:
    running = [start(follows, client), start(follows, client)]
    refused = uuid.uuid4().hex
    assert not follows.start({"op": "follow", "id": refused, "container_id": "c-1"})
    assert sorted(follows.active()) == sorted(running)
    [answer] = messages(client, refused)
    assert answer["end"] == logfollow.BUSY
    assert "already following 2 logs" in answer["message"] and "close other log windows" in answer["message"]


def test_long_lines_are_cut_and_the_end_of_the_replica_is_said(
    follows: Follows, engine: QuietEngine, client: redis.Redis
) -> None:
    follow_id = start(follows, client)
    engine.lines.put("x" * (logfollow.MAX_LINE * 3))
    engine.lines.put(None)  # the replica exits
    wait_for(lambda: follows.active() == [], "the follow to end with the replica")
    got = messages(client, follow_id)
    assert got[2] == {"line": "x" * logfollow.MAX_LINE}
    assert got[-1] == {"end": logfollow.ENDED, "message": "The replica has stopped; no more lines will come."}


def test_a_replica_that_is_gone_is_said_so(follows: Follows, client: redis.Redis) -> None:
    follow_id = start(follows, client, container="gone")
    wait_for(lambda: follows.active() == [], "the follow to end")
    assert messages(client, follow_id)[-1]["end"] == logfollow.GONE


def test_bad_requests_start_nothing(follows: Follows) -> None:
    assert not follows.start({"op": "follow", "id": "../../etc", "container_id": "c-1"})
    assert not follows.start({"op": "follow", "container_id": "c-1"})
    assert follows.active() == []


@pytest.mark.parametrize(("raw", "tail"), [(None, 200), ("", 200), ("1", 1), ("5000", 5000)])
def test_tail_parameter(raw: str | None, tail: int) -> None:
    assert logfollow.parse_tail(raw) == tail


@pytest.mark.parametrize("raw", ["0", "5001", "abc", "-3"])
def test_bad_tail_is_a_sentence(raw: str) -> None:
    with pytest.raises(ValueError, match="tail must be a whole number from 1 to 5000"):
        logfollow.parse_tail(raw)
