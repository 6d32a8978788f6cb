"""Faults 3 and 4 of "Reliability" (issue 9): the control plane dies under load; a worker dies in the
middle of a reconcile, a replica start, a termination and a validation.

The crashes of fault 4 are injected with ``MODELSERVE_CRASH_AT`` (serving/failpoints.py): the process
``os._exit``s at the named step, right after a commit, leaving the most half-done work behind. It is
then started again without the variable, and the platform must finish the work on its own.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from accounts.actions import do_issue_api_key
from serving.models import Endpoint, Route
from tests.live import wait_for
from tests.reliability.conftest import (
    FAST_ECHO_DEFINITION,
    converged,
    create_service,
    echo_folder,
    engine_replicas,
    local_engine,
    monotonic,
    report_line,
    wait_converged,
)
from tests.reliability.load import Load

CONTROL_PLANE = ("web", "control", "node-local", "beat")


def start_with_crash(system: Any, part: str, step: str) -> None:
    """(Re)start one part with a crash injected at ``step``."""
    system.env["MODELSERVE_CRASH_AT"] = step
    try:
        restart(system, part)
    finally:
        del system.env["MODELSERVE_CRASH_AT"]


def restart(system: Any, part: str) -> None:
    if part in system.procs:
        system.kill(part)
    starters = {
        "web": system.start_web,
        "control": system.start_control,
        "node-local": system.start_node,
        "beat": system.start_beat,
    }
    starters[part]()


def crashed(system: Any, part: str, timeout: float = 60) -> None:
    proc = system.procs[part]
    wait_for(lambda: proc.poll() is not None, timeout=timeout, what=f"{part} to crash at the injected step")
    assert "[faults] crashing at" in system.log(part), system.log(part)[-3000:]
    system.procs.pop(part)


def stays_converged(api: Any, service_id: str, count: int, seconds: float = 2.0) -> None:
    """Converged, and still so a few reconcile ticks later (nothing duplicated behind our back)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert converged(api, service_id, count), (
            list(Route.objects.filter(endpoint_id=service_id).values("id", "status", "container_id")),
            engine_replicas(service_id),
        )
        time.sleep(0.25)


def test_fault3_control_plane_killed_under_load_proxy_serves_then_converges(
    live: Any, api: Any, personas: dict[str, Any]
) -> None:
    # The node worker is part of what is killed; for a few seconds it is a restart, not a lost node
    # (fault 6, tests/integration/test_runtime_nodes.py): the default 30 s, not the suite's 5 s.
    system = live(NODE_LOST_AFTER="30")
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    created = create_service(api, folder, replicas=2)
    sid = created["id"]
    wait_for(lambda: converged(api, sid, 2), timeout=60, what="2 healthy replicas")
    wait_for(lambda: len(system.proxy_routes(created["slug"])) == 2, timeout=5, what="the proxy to route to both")

    web = system.start_web()
    key = do_issue_api_key(personas["owner"], name="fault3")[1]

    with Load(created["url"] + "v1/models", concurrency=4) as load:
        load.wait_requests(200)
        # The user scales to 3 through the real web app, and at once everything is SIGKILLed: the
        # reconcile may be half done (rows written, tasks not sent, a start under way).
        scale_up(web, key, sid, 3)
        down_at = monotonic()
        for part in CONTROL_PLANE:  # SIGKILL: no shutdown handler runs, tasks stay unacknowledged
            system.kill(part)
        # The data plane alone: replicas (detached from the node worker) and the proxy keep serving.
        load.wait_requests(500)
        outage = monotonic() - down_at
        back_at = monotonic()
        for part in CONTROL_PLANE:
            restart(system, part)
        wait_converged(api, sid, 3, timeout=60, what="3 healthy replicas after the restart")
        recovered = monotonic() - back_at
        stays_converged(api, sid, 3)
        wait_for(lambda: len(system.proxy_routes(created["slug"])) == 3, timeout=5, what="the proxy to use all 3")
        load.wait_requests(200)
    report = load.report
    report_line(
        "fault 3: control plane killed", report, recovered, f"(control plane down for {outage:.1f} s, then restarted)"
    )
    assert not report.failures, report.summary()
    assert get_status(api, sid) == "HEALTHY"


def scale_up(web: str, key: str, sid: str, replicas: int) -> None:
    request = urllib.request.Request(
        f"{web}/api/v1/services/{sid}/",
        data=json.dumps({"replicas": replicas}).encode(),
        method="PATCH",
        headers={"Authorization": f"Token {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def get_status(api: Any, sid: str) -> str:
    return str(api("owner").get(f"/api/v1/services/{sid}/").json()["status"])


# --- fault 4: a worker killed at a step ----------------------------------------------------------


def test_fault4_reconcile_crash_after_commit_converges(live: Any, api: Any, personas: dict[str, Any]) -> None:
    """The control worker dies after writing new routes and before sending their start: nobody will
    ever start them unless the next reconcile notices (resent after START_RESEND_AFTER, 10 s)."""
    system = live()
    start_with_crash(system, "control", "reconcile.committed")
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    started = monotonic()
    sid = create_service(api, folder, replicas=2)["id"]
    crashed(system, "control")
    assert set(Route.objects.filter(endpoint_id=sid).values_list("status", "container_id")) == {("provisioning", "")}
    restart(system, "control")
    wait_converged(api, sid, 2, timeout=60, what="2 healthy replicas after the restart")
    stays_converged(api, sid, 2)
    print(f"\n[fault 4: reconcile crash] converged {monotonic() - started:.1f} s after the create")
    assert not Route.objects.filter(endpoint_id=sid).exclude(status="healthy").exists()


def test_fault4_start_crash_after_the_replica_runs_converges_without_orphans(
    live: Any, api: Any, personas: dict[str, Any]
) -> None:
    """The node worker dies after starting a replica and before recording it: the restarted worker
    finds the start it never finished (claimed before it began), stops the half-started replica and
    starts the route again (serving.node.routes.recover_interrupted_starts)."""
    system = live()
    start_with_crash(system, "node-local", "node.started")
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    started = monotonic()
    sid = create_service(api, folder, replicas=1)["id"]
    crashed(system, "node-local")
    orphan = wait_for(lambda: engine_replicas(sid), timeout=5, what="the half-started replica")
    restart(system, "node-local")
    wait_converged(api, sid, 1, timeout=30, what="1 healthy replica and no orphan")
    stays_converged(api, sid, 1)
    assert not engine_replicas(sid) & orphan
    print(f"\n[fault 4: start crash] converged {monotonic() - started:.1f} s after the create")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("part", "step"), [("node-local", "node.stopped"), ("control", "reconcile.committed")], ids=["node", "reconcile"]
)
def test_fault4_termination_crash_converges_nothing_stuck_terminating(
    live: Any, api: Any, personas: dict[str, Any], part: str, step: str
) -> None:
    """Terminate; the worker dies after stopping a replica (node) or after marking the routes
    terminating (control): after the restart the stop is re-sent (STOP_RESEND_AFTER, 30 s), the
    service ends destroyed, no route is left terminating and no replica runs."""
    system = live()
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    sid = create_service(api, folder, replicas=2)["id"]
    wait_for(lambda: converged(api, sid, 2), timeout=60, what="2 healthy replicas")
    start_with_crash(system, part, step)
    if part == "node-local":
        wait_for(node_alive, timeout=30, what="the node worker back")
    started = monotonic()
    assert api("owner").delete(f"/api/v1/services/{sid}/").status_code == 202
    crashed(system, part)
    restart(system, part)
    wait_for(lambda: Endpoint.objects.get(pk=sid).lifecycle == "destroyed", timeout=90, what="the service destroyed")
    assert not Route.objects.filter(endpoint_id=sid).exists()
    wait_for(lambda: not engine_replicas(sid), timeout=10, what="no replica left in the engine")
    print(f"\n[fault 4: termination crash at {step}] destroyed {monotonic() - started:.1f} s after the terminate")


def node_alive() -> bool:
    from serving.models import Node

    node = Node.objects.filter(name="local").first()
    return node is not None and node.is_alive()


def test_fault4_validation_crash_finishes_and_removes_its_replica(
    live: Any, api: Any, personas: dict[str, Any]
) -> None:
    """The node worker dies while a validation's replica runs: the run is finished as failed (the
    browser's dialog ends) and its replica removed, after its timeout + ABANDONED_AFTER."""
    from serving.actions import services
    from serving.bus import dryrun as validation
    from serving.node.engines.base import LABEL_VALIDATION

    system = live()
    start_with_crash(system, "node-local", "validation.started")
    wait_for(node_alive, timeout=30, what="the node worker")
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    started = monotonic()
    run_id = services.do_validate_service(acting_user=personas["owner"], timeout=3, name="validate-me", folder=folder)
    crashed(system, "node-local")

    def replicas() -> list[Any]:
        return [i for i in local_engine().list() if i.labels.get(LABEL_VALIDATION) == run_id]

    assert replicas(), "the validation's replica should be running when its worker died"
    restart(system, "node-local")
    wait_for(lambda: validation.is_finished(run_id), timeout=60, what="the validation to be finished")
    finished = validation.history(run_id)[-1]
    assert finished["outcome"] == "failed" and "interrupted" in finished["message"]
    wait_for(lambda: not replicas(), timeout=15, what="the validation's replica removed")
    print(f"\n[fault 4: validation crash] finished and cleaned {monotonic() - started:.1f} s after the start")
