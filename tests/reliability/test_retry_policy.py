"""No request lost to a dying replica (issue 16): a service's retry policy under a SIGKILL.

Two services of examples/llm-echo with two replicas each, on the local engine, under a steady load of
POST /v1/chat/completions through the real proxy; one replica of each is killed. The default policy,
``inference``, sends the requests that reached the dead replica (no response byte back) to the other
one: none is lost, and the event log says how many were re-sent. ``safe`` keeps the old rule: those
POSTs may have been processed, so they get 502 and are not run twice.

A request must be in flight at the victim when it dies, or neither rule is exercised. Killing right
after ``wait_requests`` returned did not make sure of that: the load's clients run in step (every
POST takes the same 0.2 s, then the same pause), ``wait_requests`` returns just after responses came
back, and the proxy's counters read at that instant showed, in one run, no request in flight at
either victim; the POSTs that run still lost were ones the proxy sent in the few ms before it saw
the dead replica's connection close. Whether a run lost any was a race of a few ms (the full suite's
runs lost it). So the victim is first frozen (SIGSTOP): it answers nothing from then on, so once
the proxy counts a request in flight there, that request is still there when the SIGKILL lands.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from serving.models import Route, ServiceEvent
from tests.live import wait_for
from tests.reliability.conftest import (
    FAST_ECHO_DEFINITION,
    create_service,
    echo_folder,
    healthy_routes,
    replica_init_pid,
    replica_pids,
    report_line,
)
from tests.reliability.load import Load

# Ten words: each completion takes 10 x ECHO_TOKEN_DELAY (0.02 s) = 0.2 s at its replica.
CHAT = json.dumps(
    {"model": "llm-echo", "messages": [{"role": "user", "content": "one two three four five six seven eight nine ten"}]}
).encode()


def kill_with_a_post_in_flight(system: Any, slug: str, victim: Route) -> int:
    """SIGKILL the victim replica while the proxy has a request in flight there; returns how many.

    Frozen first (SIGSTOP: it reads and answers nothing), so a request the proxy has sent it stays
    unanswered until the SIGKILL: what the proxy counts in flight there is in flight at the kill."""
    for pid in replica_pids(victim.container_id):
        os.kill(pid, signal.SIGSTOP)
    in_flight = wait_for(
        lambda: system.proxy_route_in_flight(slug, str(victim.pk)),
        timeout=5,
        interval=0.01,
        what=f"a request in flight at the frozen replica {victim.pk}",
    )
    os.kill(replica_init_pid(victim.container_id), signal.SIGKILL)
    return int(in_flight)


def test_sigkill_under_post_load_loses_nothing_with_inference_and_502s_with_safe(
    live: Any, api: Any, personas: dict[str, Any]
) -> None:
    system = live(SLEEP_INTERVAL="0.5", proxy_env={"PROXY_STATS_INTERVAL": "0.5"})
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    inference = create_service(api, folder, name="echo-inference")  # the default policy
    safe = create_service(api, folder, name="echo-safe", retry_policy="safe")
    assert inference["retry_policy"] == "inference" and safe["retry_policy"] == "safe"
    routes = {}
    for service in (inference, safe):
        routes[service["id"]] = wait_for(
            lambda s=service: healthy_routes(api, s["id"], 2), timeout=60, what="2 healthy replicas"
        )
        wanted = {r["id"] for r in routes[service["id"]]}
        wait_for(lambda s=service, w=wanted: system.proxy_routes(s["slug"]) == w, timeout=5, what="both routed")

    headers = {"Content-Type": "application/json"}
    loads = {
        s["id"]: Load(s["url"] + "v1/chat/completions", method="POST", body=CHAT, headers=headers, concurrency=4)
        for s in (inference, safe)
    }
    for load in loads.values():
        load.start()
    killed_with = {}
    try:
        for load in loads.values():
            load.wait_requests(20)
        for service in (inference, safe):
            victim = Route.objects.get(pk=routes[service["id"]][0]["id"])
            killed_with[service["id"]] = kill_with_a_post_in_flight(system, service["slug"], victim)
        for load in loads.values():  # the other replica (and the replacement) serve on
            load.wait_requests(40)
    finally:
        reports = {sid: load.stop() for sid, load in loads.items()}

    kept, lost = reports[inference["id"]], reports[safe["id"]]
    for name, service, report in (("inference", inference, kept), ("safe", safe, lost)):
        report_line(
            f"retry policy {name}: SIGKILL 1 of 2 replicas under POST load",
            report,
            extra=f"({killed_with[service['id']]} in flight at the victim when it was killed)",
        )
    # inference: the POSTs in flight at the dead replica were sent to the other one; none is lost.
    assert not kept.failures, kept.summary()
    # safe: they may have been processed, so they are answered 502, never sent again.
    assert lost.failures, lost.summary()
    assert {o.status for o in lost.failures} == {502}, lost.summary()

    # The event log says how many were re-sent (one event per service and tick, not per request).
    resent = wait_for(
        lambda: list(ServiceEvent.objects.filter(endpoint_id=inference["id"], kind="requests_resent")),
        timeout=10,
        what="the re-sent requests in the event log",
    )
    assert sum(e.data["count"] for e in resent) >= 1
    assert "retry policy inference" in resent[0].message
    assert not ServiceEvent.objects.filter(endpoint_id=safe["id"], kind="requests_resent").exists()
