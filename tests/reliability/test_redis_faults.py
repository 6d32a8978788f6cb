"""Fault 5 of "Reliability" (issue 9): Redis restarts under load.

The whole live system (workers, beat, proxy, and this test process's routing writes) uses a private
``redis-server`` on a free port, started here: the machine's shared Redis on 6379 is never touched.
The proxy must keep its last routing table and serve through the outage; once Redis is back, a route
change must reach the proxy again within 1 s (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from serving.bus import routing
from serving.models import Route
from tests.live import free_port, wait_for
from tests.reliability.conftest import (
    FAST_ECHO_DEFINITION,
    converged,
    create_service,
    echo_folder,
    monotonic,
    replica_init_pid,
    report_line,
)
from tests.reliability.load import Load


class PrivateRedis:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(shutil.which("redis-server")),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--dbfilename",
                "dump.rdb",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self.answers, timeout=10, what="the private redis-server")

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self, keep_data: bool) -> None:
        """Shut down, saving the data first (a restart) or not (Redis lost everything)."""
        assert self.proc is not None
        with contextlib.suppress(redis.ConnectionError):  # the usual answer to SHUTDOWN: a closed connection
            redis.Redis.from_url(self.url, socket_timeout=5).shutdown(save=keep_data, nosave=not keep_data)
        self.proc.wait(timeout=10)
        if not keep_data:
            (self.directory / "dump.rdb").unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path, settings: Any) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    server.start()
    # This process's routing writes (the API's on-commit publishes) go there too.
    settings.REDIS_URL = server.url
    routing._client = None
    try:
        yield server
    finally:
        routing._client = None
        server.kill()


def proxy_gauge(system: Any, name: str) -> float:
    for line in system.proxy_metrics().splitlines():
        if line.startswith(f"modelserve_proxy_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"the proxy reports no {name}")


def removal_propagates(system: Any, slug: str, victim: Route) -> float:
    """Kill a replica; seconds from its route leaving "healthy" in the DB to leaving the proxy's table."""
    os.kill(replica_init_pid(victim.container_id), signal.SIGKILL)
    wait_for(
        lambda: not Route.objects.filter(pk=victim.pk, status="healthy").exists(),
        timeout=30,
        interval=0.01,
        what="the killed replica's route to change",
    )
    changed_at = monotonic()
    wait_for(lambda: str(victim.pk) not in system.proxy_routes(slug), timeout=10, interval=0.01, what="the proxy")
    return monotonic() - changed_at


@pytest.mark.parametrize("keep_data", [True, False], ids=["restart", "restart-empty"])
def test_fault5_redis_restart_under_load(
    live: Any, api: Any, personas: dict[str, Any], private_redis: PrivateRedis, keep_data: bool
) -> None:
    # With the default reconcile period (5 s) the control plane rewrites the routing table long after
    # the proxy is back on Redis: an empty Redis must not empty the proxy's table meanwhile.
    system = live(REDIS_URL=private_redis.url, RECONCILE_INTERVAL="0.5" if keep_data else "5")
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    created = create_service(api, folder, replicas=2)
    sid, slug = created["id"], created["slug"]
    wait_for(lambda: converged(api, sid, 2), timeout=60, what="2 healthy replicas")
    routes = list(Route.objects.filter(endpoint_id=sid))
    wait_for(lambda: system.proxy_routes(slug) == {str(r.pk) for r in routes}, timeout=5, what="the proxy")

    with Load(created["url"] + "v1/models", concurrency=4) as load:
        load.wait_requests(200)
        down_at = monotonic()
        private_redis.stop(keep_data=keep_data)
        wait_for(lambda: proxy_gauge(system, "redis_connected") == 0, timeout=15, what="the proxy to notice")
        load.wait_requests(300)  # served from the last table
        outage = monotonic() - down_at
        private_redis.start()
        back_at = monotonic()
        # At once, a route change: a replica dies; the node marks its route, the proxy must follow.
        propagation = removal_propagates(system, slug, routes[0])
        # ... and the control plane (its Celery workers and beat back on Redis) replaces it.
        wait_for(lambda: converged(api, sid, 2), timeout=60, what="a replacement after Redis returned")
        wait_for(lambda: len(system.proxy_routes(slug)) == 2, timeout=5, what="the proxy to route to both")
        recovered = monotonic() - back_at
        load.wait_requests(200)
    report = load.report
    report_line(
        f"fault 5: Redis {'restarted' if keep_data else 'restarted empty'}",
        report,
        recovered,
        f"(down {outage:.1f} s; once back, a route change reached the proxy in {propagation:.2f} s)",
    )
    assert not report.failures, report.summary()
    assert propagation <= 1.0, f"a route change took {propagation:.2f} s to reach the proxy after Redis returned"
