"""Faults 1 and 2 of "Reliability" (issue 9): a replica dies, a replica hangs, under a steady load.

Real control plane, node worker, beat and proxy processes; replicas of examples/llm-echo on the
local engine; the load goes through the proxy on 127.0.0.1 and every request is counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest

from serving.models import Route, ServiceEvent
from tests.live import ROOT, wait_for
from tests.reliability.conftest import (
    FAST_ECHO_DEFINITION,
    create_service,
    echo_folder,
    engine_replicas,
    healthy_routes,
    monotonic,
    replica_init_pid,
    replica_pids,
    report_line,
)
from tests.reliability.load import Load

# FAST_ECHO_DEFINITION's health check: interval 0.4 s, max_retries 2.
INTERVAL, MAX_RETRIES, MAX_WAIT = 0.4, 2, 0.4


def start_two_replicas(system: Any, api: Any, personas: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    created = create_service(api, folder, replicas=2)
    routes = wait_for(lambda: healthy_routes(api, created["id"], 2), timeout=60, what="2 healthy replicas")
    wanted = {r["id"] for r in routes}
    wait_for(lambda: system.proxy_routes(created["slug"]) == wanted, timeout=5, what="the proxy to route to both")
    return created, routes


def test_fault1_sigkill_a_replica_under_load_loses_no_request(live: Any, api: Any, personas: dict[str, Any]) -> None:
    system = live()
    created, routes = start_two_replicas(system, api, personas)
    sid, slug = created["id"], created["slug"]
    victim = Route.objects.get(pk=routes[0]["id"])
    survivor = routes[1]["id"]

    with Load(created["url"] + "v1/models", concurrency=4) as load:
        load.wait_requests(200)
        killed_at = monotonic()
        os.kill(replica_init_pid(victim.container_id), signal.SIGKILL)
        # Replaced: two healthy routes again, the victim's gone, the engine runs exactly those two.
        replaced = wait_for(
            lambda: (r := healthy_routes(api, sid, 2)) and str(victim.pk) not in {x["id"] for x in r} and r,
            timeout=60,
            what="a replacement replica",
        )
        newcomer = next(r["id"] for r in replaced if r["id"] != survivor)
        wait_for(
            lambda: system.proxy_routes(slug) == {survivor, newcomer}, timeout=5, what="the proxy to use the new route"
        )
        try:
            wait_for(
                lambda: system.proxy_route_served(slug, newcomer) > 0, timeout=10, what="traffic on the new replica"
            )
        except AssertionError:
            print("DEBUG", load.count(), load.report.summary(), system.proxy_metrics())
            raise
        recovered = monotonic() - killed_at
        load.wait_requests(200)
    report = load.report
    report_line("fault 1: SIGKILL one of 2 replicas", report, recovered)
    assert not report.failures, report.summary()
    assert ServiceEvent.objects.filter(endpoint_id=sid, kind="route_exited").exists()
    assert len(engine_replicas(sid)) == 2


def test_fault2_hung_replica_only_its_share_fails_until_health_checks_remove_it(
    live: Any, api: Any, personas: dict[str, Any]
) -> None:
    # A request sent into the hung replica is cut by the proxy after 1 s of silence (else 300 s).
    system = live(proxy_env={"PROXY_IDLE_TIMEOUT": "1"})
    created, routes = start_two_replicas(system, api, personas)
    sid, slug = created["id"], created["slug"]
    victim = Route.objects.get(pk=routes[0]["id"])
    # S5.2 (after being healthy): interval x (max_retries + 1) from the last success, plus the last
    # check's own timeout (a hang is known only when a check gives up waiting).
    budget = INTERVAL * (MAX_RETRIES + 1) + MAX_WAIT

    with Load(created["url"] + "v1/models", concurrency=4, timeout=15) as load:
        load.wait_requests(200)
        hung_at = monotonic()
        for pid in replica_pids(victim.container_id):  # frozen, but its listening socket stays open
            os.kill(pid, signal.SIGSTOP)
        wait_for(
            lambda: str(victim.pk) not in system.proxy_routes(slug),
            timeout=30,
            interval=0.02,
            what="the hung replica to leave the proxy's table",
        )
        removed_at = monotonic()
        status = Route.objects.filter(pk=victim.pk).values_list("status", flat=True).first()
        wait_for(
            lambda: (
                healthy_routes(api, sid, 2)
                and str(victim.pk) not in {r["id"] for r in healthy_routes(api, sid, 2) or []}
            ),
            timeout=60,
            what="a replacement replica",
        )
        recovered = monotonic() - hung_at
        load.wait_requests(300)
    report = load.report
    removal = removed_at - hung_at
    during = report.between(hung_at, removed_at)
    failed = [o for o in report.failures]
    report_line(
        "fault 2: a replica hangs (SIGSTOP)",
        report,
        recovered,
        f"removed from traffic after {removal:.2f} s (budget {budget:.2f} s); "
        f"{len([o for o in during if not o.ok])}/{len(during)} failed while it hung",
    )
    assert status in (None, "unhealthy", "terminating"), status
    # (+ 0.5 s to write the status, publish the table and scrape the proxy's metrics)
    assert removal <= budget + 0.5, f"the hung replica served for {removal:.2f} s, S5.2 allows {budget:.2f} s"
    # Only its share failed: the other replica answered throughout, and failures are the proxy's
    # timeouts of requests sent into the hung replica before it left the table; none after.
    assert any(o.ok for o in during), "the healthy replica stopped serving too"
    assert all(o.status == 504 for o in failed), report.summary()
    assert all(o.started < removed_at for o in failed), "a request failed after the hung replica left the table"
    assert len(failed) <= max(4, len(during) // 2), report.summary()


@pytest.mark.docker
def test_fault1_docker_kill_a_replica_under_load_loses_no_request(
    live: Any, api: Any, personas: dict[str, Any], settings: Any
) -> None:
    """Fault 1 on the Docker engine: ``docker kill`` one of 2 replicas' containers under load."""
    engine = docker_engine_or_skip(settings)
    system = live(SERVING_ENGINE="docker")
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    created = create_service(api, folder, replicas=2)
    sid, slug = created["id"], created["slug"]

    def containers() -> set[str]:
        return {i.replica_id for i in engine.list({"serving.endpoint": sid}) if i.state.value == "running"}

    try:
        routes = wait_for(lambda: healthy_routes(api, sid, 2), timeout=90, what="2 healthy replicas")
        wait_for(lambda: system.proxy_routes(slug) == {r["id"] for r in routes}, timeout=5, what="the proxy")
        victim = Route.objects.get(pk=routes[0]["id"])
        survivor = routes[1]["id"]
        with Load(created["url"] + "v1/models", concurrency=4) as load:
            load.wait_requests(200)
            killed_at = monotonic()
            subprocess.run(["docker", "kill", victim.container_id], check=True, capture_output=True)
            replaced = wait_for(
                lambda: (r := healthy_routes(api, sid, 2)) and str(victim.pk) not in {x["id"] for x in r} and r,
                timeout=90,
                what="a replacement replica",
            )
            newcomer = next(r["id"] for r in replaced if r["id"] != survivor)
            wait_for(lambda: system.proxy_routes(slug) == {survivor, newcomer}, timeout=5, what="the new route")
            recovered = monotonic() - killed_at
            load.wait_requests(200)
        report = load.report
        report_line("fault 1: docker kill one of 2 replicas", report, recovered)
        assert not report.failures, report.summary()
        wait_for(lambda: len(containers()) == 2, timeout=30, what="exactly 2 containers running")
    finally:
        system.stop_all()
        for info in engine.list({"serving.endpoint": sid}):
            engine.stop(info.replica_id, grace=1)


def docker_engine_or_skip(settings: Any) -> Any:
    from pathlib import Path

    from serving.node.engines.docker.engine import DockerEngine

    engine = DockerEngine(state_dir=Path(settings.ENGINE_STATE_DIR) / "docker")
    if not engine.available():
        pytest.skip("no Docker engine answers (start one with scripts/docker-up.sh as root)")
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), settings.DEFAULT_IMAGE], capture_output=True, text=True, check=False
    )
    if built.returncode != 0:
        pytest.skip(f"the image {settings.DEFAULT_IMAGE} could not be built: {built.stderr.strip()}")
    return engine
