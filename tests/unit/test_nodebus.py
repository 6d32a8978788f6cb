"""The node listener's handling of proxy failure reports: only its own routes, bursts deduplicated,
checks rate-bounded (serving.bus.nodebus)."""

from __future__ import annotations

import json

from serving.bus.nodebus import DEDUPE_WINDOW, RATE, failures_channel
from serving.node.listener import NodeListener


class FakeProber:
    def __init__(self, routes: set[str]) -> None:
        self.routes = routes
        self.checked: list[str] = []
        self.request_ids: list[str] = []

    def tracks(self, route_id: str) -> bool:
        return route_id in self.routes

    def check_now(self, route_id: str, reason: str = "", request_id: str = "") -> bool:
        self.checked.append(route_id)
        self.request_ids.append(request_id)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(route: str, request_id: str = "") -> bytes:
    message = {"route": route, "endpoint": "e", "endpoint_id": "x", "error": "refused", "t": 0}
    if request_id:
        message["request_id"] = request_id
    return json.dumps(message).encode()


def test_only_routes_of_this_node_are_checked() -> None:
    prober = FakeProber({"mine"})
    listener = NodeListener("a", prober, clock=Clock())
    listener.dispatch(failures_channel().encode(), report("someone-elses"))
    listener.dispatch(failures_channel().encode(), report("mine", request_id="abc"))
    assert prober.checked == ["mine"]
    assert prober.request_ids == ["abc"]  # the check's events carry the id of the request that failed


def test_a_burst_of_reports_is_one_check_per_window() -> None:
    clock = Clock()
    prober = FakeProber({"r1"})
    listener = NodeListener("a", prober, clock=clock)
    for _ in range(100):  # a busy proxy reports every request that hit the dead replica
        listener.dispatch(failures_channel(), report("r1"))
    assert prober.checked == ["r1"]
    clock.now += DEDUPE_WINDOW
    listener.dispatch(failures_channel(), report("r1"))
    assert prober.checked == ["r1", "r1"]


def test_checks_are_rate_bounded_across_routes() -> None:
    clock = Clock()
    routes = {f"r{i}" for i in range(200)}
    prober = FakeProber(routes)
    listener = NodeListener("a", prober, clock=clock)
    for route in sorted(routes):
        listener.route_failed(route, "refused")
    assert len(prober.checked) == int(RATE)
    assert listener.reports_dropped == 200 - int(RATE)
    clock.now += 1.0  # the allowance refills
    for route in sorted(routes - set(prober.checked))[:5]:
        listener.route_failed(route, "refused")
    assert len(prober.checked) == int(RATE) + 5


def test_garbage_is_ignored() -> None:
    prober = FakeProber({"r1"})
    listener = NodeListener("a", prober, clock=Clock())
    listener.dispatch(failures_channel(), b"not json")
    listener.dispatch(failures_channel(), b"[1, 2]")
    listener.dispatch(failures_channel(), json.dumps({"route": None}).encode())
    assert prober.checked == []
