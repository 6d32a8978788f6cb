"""Fixtures of the fault tests: a live system (real Celery workers, beat, the proxy, replicas on the
local engine) that a test can take apart, and helpers to find a replica's processes and the proxy's
view of an endpoint."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from tests.live import ROOT, LiveSystem, free_port, wait_for

ECHO = ROOT / "examples" / "llm-echo"

# llm-echo with a fast health check: a replica that stops answering leaves traffic within
# interval x (max_retries + 1) = 0.4 x 3 = 1.2 s (S5.2).
FAST_ECHO_DEFINITION = """\
models:
  - name: "llm-echo"
    model_path: "/models"
    service:
      start_command: ["python3", "{model_path}/server.py", "--host", "0.0.0.0", "--port", "8000"]
      port: 8000
      health_check:
        path: /health
        interval: 0.4
        max_retries: 2
        max_wait_time: 0.4
        expected_status_code: 200
        initial_delay: 0.0
"""


def engine_ready() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if os.geteuid() != 0 and shutil.which("pasta") is None:
        return "the local engine needs root (network namespaces) or pasta (apt-get install passt)"
    return None


class Live(LiveSystem):
    """LiveSystem plus the proxy's admin address and restartable parts."""

    proxy_url = ""
    proxy_admin = ""

    def start_proxy(self, **env: str) -> str:
        port, admin = free_port(), free_port()
        self._spawn("proxy", [sys.executable, "-m", "proxy"], PROXY_PORT=str(port), PROXY_ADMIN_PORT=str(admin), **env)
        self.proxy_url = f"http://127.0.0.1:{port}"
        self.proxy_admin = f"http://127.0.0.1:{admin}"
        wait_for(lambda: _answers(f"{self.proxy_admin}/healthz"), timeout=30, what="the proxy to answer")
        return self.proxy_url

    def start_web(self) -> str:
        """The web app (daphne, config.asgi) on a free loopback port; returns its base URL."""
        port = free_port()
        daphne = str(Path(sys.executable).parent / "daphne")
        self._spawn("web", [daphne, "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{url}/api/v1/"), timeout=30, what="the web app to answer")
        return url

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def kill(self, name: str) -> None:
        """SIGKILL a part and everything in its process group (a prefork pool, a thread pool)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def proxy_metrics(self) -> str:
        with urllib.request.urlopen(f"{self.proxy_admin}/metrics", timeout=5) as answer:
            return answer.read().decode()

    def proxy_routes(self, slug: str) -> set[str]:
        """The route ids the proxy now has for an endpoint (from its /metrics)."""
        pattern = re.compile(r'modelserve_proxy_route_in_flight\{endpoint="([^"]*)",route="([^"]*)"\}')
        return {m.group(2) for m in pattern.finditer(self.proxy_metrics()) if m.group(1) == slug}

    def proxy_route_in_flight(self, slug: str, route_id: str) -> int:
        """Requests the proxy has sent to a route and not yet seen answered (from its /metrics)."""
        pattern = re.compile(r'modelserve_proxy_route_in_flight\{endpoint="([^"]*)",route="([^"]*)"\} (\d+)')
        return sum(
            int(m.group(3))
            for m in pattern.finditer(self.proxy_metrics())
            if (m.group(1), m.group(2)) == (slug, route_id)
        )

    def proxy_route_served(self, slug: str, route_id: str) -> int:
        pattern = re.compile(
            r'modelserve_proxy_route_requests_total\{endpoint="([^"]*)",route="([^"]*)",code="2xx"\} (\d+)'
        )
        return sum(
            int(m.group(3))
            for m in pattern.finditer(self.proxy_metrics())
            if (m.group(1), m.group(2)) == (slug, route_id)
        )

    def proxy_rss_kib(self) -> int:
        return _rss_kib(self.pid("proxy"))


def _answers(url: str) -> bool:
    import urllib.error

    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stop_every_replica() -> None:
    from serving.node.engines.local.engine import LocalEngine

    for state_dir in Path(django_settings.ENGINE_STATE_DIR).glob("local-*"):
        engine = LocalEngine(state_dir=state_dir)
        for info in engine.list():
            engine.stop(info.replica_id, grace=1)


@pytest.fixture
def live(
    transactional_db: None, tmp_path: Path, request: pytest.FixtureRequest, settings: Any
) -> Iterator[Callable[..., Live]]:
    """``live(proxy_env={...}, **overrides)``: control worker, node worker ``local``, beat and the proxy,
    as real processes against the test database; every replica is stopped afterwards."""
    reason = engine_ready()
    if reason:
        pytest.skip(reason)
    from serving.models import Node

    systems: list[Live] = []

    def start(proxy_env: dict[str, str] | None = None, **overrides: str) -> Live:
        system = Live(tmp_path, **overrides)
        systems.append(system)
        system.start_control()
        system.start_node("local")
        system.start_beat()
        settings.SERVING_PROXY_URL = system.start_proxy(**(proxy_env or {}))  # services' url point at it
        wait_for(
            lambda: Node.objects.filter(name="local", heartbeat_at__isnull=False).exists(),
            timeout=30,
            what="node 'local' to register",
        )
        return system

    try:
        yield start
    finally:
        for system in systems:
            system.stop_all()
        stop_every_replica()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for system in systems:
                print(system.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


# --- services --------------------------------------------------------------------------------------


def echo_folder(owner: Any, name: str = "llm-echo", definition: str | None = None) -> Any:
    from tests.factories import FolderFactory

    files = {p.name: p.read_text() for p in ECHO.iterdir() if p.is_file()}
    if definition is not None:
        files["model-definition.yaml"] = definition
    return FolderFactory(owner=owner, name=name, files=files)


def create_service(api: Any, folder: Any, **fields: Any) -> dict[str, Any]:
    body = {"name": "echo-svc", "folder": str(folder.pk), "replicas": 2, "open_to_public": True, **fields}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def get_service(api: Any, service_id: str) -> dict[str, Any]:
    return api("owner").get(f"/api/v1/services/{service_id}/").json()


def healthy_routes(api: Any, service_id: str, count: int) -> list[dict[str, Any]] | None:
    routes = get_service(api, service_id)["routes"]
    healthy = [r for r in routes if r["status"] == "healthy"]
    return healthy if len(healthy) == count and len(routes) == count else None


def local_engine() -> Any:
    from serving.node.engines.local.engine import LocalEngine

    return LocalEngine(state_dir=Path(django_settings.ENGINE_STATE_DIR) / "local-local")


def replica_pids(container_id: str) -> list[int]:
    """Every process of a replica's sandbox (its PID namespace), init first."""
    engine = local_engine()
    replica_dir = Path(engine.state_dir) / container_id
    members = engine._sandbox_members(replica_dir, engine._meta(container_id))
    assert members, f"replica {container_id} has no running process"
    return members


def replica_init_pid(container_id: str) -> int:
    engine = local_engine()
    pid = engine._sandbox_pid(Path(engine.state_dir) / container_id)
    assert pid is not None, f"replica {container_id} is not running"
    return int(pid)


def engine_replicas(endpoint_id: str) -> set[str]:
    """Replica ids the engine really runs for an endpoint (not what the DB believes)."""
    from serving.node.engines.base import ReplicaState

    return {
        info.replica_id
        for info in local_engine().list()
        if info.labels.get("serving.endpoint") == endpoint_id
        and info.state not in (ReplicaState.EXITED, ReplicaState.GONE)
    }


def converged(api: Any, service_id: str, count: int) -> bool:
    """Exactly ``count`` routes, all healthy, and the engine runs exactly their replicas. (Rows of
    replicas that failed to start hold no replica; they stay listed with their error, S4.4.)"""
    from serving.models import Route

    routes = [r for r in get_service(api, service_id)["routes"] if r["status"] != "failed_to_start"]
    if len(routes) != count or any(r["status"] != "healthy" for r in routes):
        return False
    containers = set(
        Route.objects.filter(endpoint_id=service_id)
        .exclude(status="failed_to_start")
        .values_list("container_id", flat=True)
    )
    return engine_replicas(service_id) == containers


def wait_converged(api: Any, service_id: str, count: int, timeout: float, what: str) -> None:
    """wait_for(converged), failing with the routes and the engine's replicas when it does not come."""
    from serving.models import Route

    try:
        wait_for(lambda: converged(api, service_id, count), timeout=timeout, what=what)
    except AssertionError as exc:
        routes = list(Route.objects.filter(endpoint_id=service_id).values("id", "status", "container_id", "error"))
        raise AssertionError(f"{exc}; routes: {routes}; engine runs: {engine_replicas(service_id)}") from None


def report_line(fault: str, report: Any, recovered: float | None = None, extra: str = "") -> None:
    """The figure each fault test prints (collected in the issue's closing note)."""
    recovery = f", recovered in {recovered:.2f} s" if recovered is not None else ""
    print(f"\n[{fault}] {report.summary()}{recovery}{(' ' + extra) if extra else ''}")


def monotonic() -> float:
    return time.monotonic()
