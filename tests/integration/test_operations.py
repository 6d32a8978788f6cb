"""Operating it (issue 20): JSON log lines (LOG_FORMAT=json) with the request id, service, route and
node; the proxy's request id at the replica and in its route-failure reports; readiness (/readyz)
against the real database and Redis; process heartbeats and the admin's Processes page.

Real parts throughout: the proxy and the Celery worker and beat run as processes, Redis is the real one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.utils import timezone

from serving.core import logs, processes
from tests.integration.test_proxy import Backend, Proxy, free_port, new_slug, stop
from tests.live import LiveSystem, wait_for


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a log, each of which must be one JSON object."""
    lines = []
    for line in text.splitlines():
        if line.strip():
            value = json.loads(line)  # a line that is not JSON fails the test here
            assert isinstance(value, dict), line
            lines.append(value)
    return lines


@pytest.fixture
def aux() -> Iterator[Backend]:
    backend = Backend(aux=True)
    yield backend
    stop(backend.proc)


# --- the proxy -------------------------------------------------------------------------------------


def test_proxy_logs_json_and_its_request_id_reaches_the_replica_and_the_failure_report(aux: Backend) -> None:
    proxy = Proxy(LOG_FORMAT="json", PROXY_ACCESS_LOG="true", PROXY_LOG_LEVEL="INFO")
    try:
        slug = new_slug()
        proxy.publish(slug, [aux.route()], public=True)
        wait_for(lambda: proxy.call(slug, "headers")[0] == 200, what="the entry")

        # No id from the client: the proxy makes one and sends it to the replica; a client's id is kept.
        status, _, body = proxy.call(slug, "headers")
        assert status == 200
        rid = {k.lower(): v for k, v in json.loads(body)["headers"].items()}["x-request-id"]
        assert len(rid) == 16
        _, _, body = proxy.call(slug, "headers", headers={"X-Request-ID": "the-client-s-id"})
        assert json.loads(body)["headers"]["X-Request-ID"] == "the-client-s-id"

        # A replica's own error answer gets the request's id too (the fast path relays its head as it
        # came, the slow one rebuilds it), unless the replica sent one itself: then only its own.
        status, headers, _ = proxy.call(slug, "no-such-path", headers={"X-Request-ID": "rid-of-a-404"})
        assert status == 404 and headers["X-Request-ID"] == "rid-of-a-404"
        status, headers, _ = proxy.call(slug, "fail?status=503&close=1", headers={"X-Request-ID": "rid-of-a-503"})
        assert status == 503 and headers["X-Request-ID"] == "rid-of-a-503"
        status, headers, _ = proxy.call(slug, "headers", headers={"X-Request-ID": "rid-of-a-200"})
        assert status == 200 and "X-Request-ID" not in headers  # a success is relayed as it came
        head = proxy.raw(
            f"GET /e/{slug}/fail?echo=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: rid-echoed\r\n\r\n".encode(),
            until=lambda got: b"\r\n\r\n" in got,
        ).split(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 500") and head.lower().count(b"x-request-id:") == 1
        assert b"X-Request-ID: the-replica-s-own" in head

        def access_line() -> dict[str, Any] | None:
            return next((e for e in json_lines(proxy.log_text()) if e.get("request_id") == rid), None)

        line = wait_for(access_line, what="the access log line of the request")
        assert line["logger"] == "proxy.access"
        assert line["process"] == "proxy"
        assert line["service"] == slug
        assert line["route"] == aux.route()["id"]
        assert line["status"] == 200 and line["level"] == "INFO"

        # A replica that refuses connections: the report to the control plane names the request.
        listener = proxy.redis.pubsub()
        listener.subscribe(f"{proxy.prefix}:proxy:route-failures")
        closed = {"id": "route-closed", "host": "127.0.0.1", "port": free_port(), "weight": 1000.0}
        broken = new_slug()
        proxy.publish(broken, [closed, aux.route(0.001)], public=True)
        wait_for(lambda: proxy.call(broken, "headers")[0] in (200, 502), what="the second entry")

        def report() -> dict[str, Any] | None:
            message = listener.get_message(timeout=0.2)
            if message and message["type"] == "message":
                return dict(json.loads(message["data"]))
            proxy.call(broken, "headers", headers={"X-Request-ID": "rid-of-the-failure"})
            return None

        failure = wait_for(report, what="a route failure report")
        assert failure["route"] == "route-closed"
        assert failure["request_id"]  # the id of the request that found the route down
        listener.close()
        refused = wait_for(
            lambda: next((e for e in json_lines(proxy.log_text()) if "refused a connection" in e["message"]), None),
            what="the route failure log line",
        )
        assert refused["route"] == "route-closed" and refused["service"] == broken
        assert refused["request_id"] == failure["request_id"]

        # Its heartbeat is in Redis while it runs, and gone once it stopped cleanly.
        key = processes.key(proxy.prefix, "proxy", socket.gethostname(), proxy.proc.pid)
        beat = wait_for(lambda: processes.parse(proxy.redis.get(key)), what="the proxy's heartbeat")
        assert beat["kind"] == "proxy" and beat["pid"] == proxy.proc.pid
        assert 0 < proxy.redis.ttl(key) <= processes.TTL
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(timeout=15)
        assert proxy.redis.get(key) is None
    finally:
        proxy.close()


def test_a_bad_log_format_stops_the_proxy_with_a_sentence() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy"],
        check=False,
        env={**os.environ, "LOG_FORMAT": "yaml", "TOKEN_HMAC_KEY": "k"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "LOG_FORMAT='yaml' is not a log format: use json, or text" in done.stderr


# --- the web app -----------------------------------------------------------------------------------


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    old = logging.getLogger("modelserve.access").level
    logging.getLogger("modelserve.access").setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    logging.getLogger("modelserve.access").setLevel(old)


@pytest.mark.django_db
def test_a_web_request_logs_json_with_its_request_id(client: Client, captured: Capture) -> None:
    response = client.get("/healthz", HTTP_X_REQUEST_ID="from-the-proxy-42")
    assert response.status_code == 200
    assert response["X-Request-ID"] == "from-the-proxy-42"
    line = next(e for e in captured.lines if e["logger"] == "modelserve.access")
    assert line["request_id"] == "from-the-proxy-42"
    assert line["message"] == "GET /healthz 200" and line["status"] == 200
    assert logs.current() == {}  # nothing leaks into what runs next

    # Not an id (spaces, or too long): a new one is made rather than logging what a client chose.
    for bad in ("two words", "x" * 129):
        response = client.get("/healthz", HTTP_X_REQUEST_ID=bad)
        assert response["X-Request-ID"] != bad and len(response["X-Request-ID"]) == 32


@pytest.mark.django_db
def test_a_page_of_a_service_logs_its_id(client: Client, captured: Capture) -> None:
    service = "6f1c1e0e-9a51-4a53-8f3c-1c0de0000001"
    client.get(f"/services/{service}/", HTTP_X_REQUEST_ID="rid-1")
    line = next(e for e in captured.lines if e["logger"] == "modelserve.access")
    assert line["request_id"] == "rid-1" and line["service"] == service


@pytest.mark.django_db
def test_readiness_checks_the_database_and_redis(client: Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": ["database", "redis"]}
    # Liveness stays cheap and does not look at Redis.
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert list(body["failed"]) == ["redis"] and "Connection" in body["failed"]["redis"]


# --- the workers, and the admin's Processes page ----------------------------------------------------


def test_workers_log_json_with_the_task_and_beat_in_redis(transactional_db: None, tmp_path: Path) -> None:
    from django.conf import settings

    from serving.models import Node

    Node.objects.create(name="silent-node", heartbeat_at=timezone.now() - timedelta(hours=1))
    system = LiveSystem(tmp_path, LOG_FORMAT="json")
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        system.start_control()
        system.start_beat()

        def lost_line() -> dict[str, Any] | None:
            lines = [e for e in _json_only(system.log("control")) if "silent-node lost" in e.get("message", "")]
            return lines[0] if lines else None

        line = wait_for(lost_line, timeout=60, what="the control worker's log line about the lost node")
        assert line["task"] == "serving.tasks.detect_lost_nodes"
        assert line["process"] == "control" and line["level"] == "WARNING"

        def kinds() -> set[str]:
            found = set()
            for key in client.scan_iter(match=processes.pattern(settings.REDIS_PREFIX)):
                beat = processes.parse(client.get(key))
                if beat:
                    found.add(beat["kind"])
            return found

        wait_for(lambda: {"control", "beat"} <= kinds(), timeout=30, what="heartbeats of the worker and beat")

        # The orchestrator's health check (compose.yaml): exit 0 while the process beats.
        took = {}
        for role, how in (("control", "module"), ("beat", "module"), ("control", "manage.py")):
            started, cpu = time.monotonic(), children_cpu()
            check = worker_health(system, "--role", role, how=how)
            took[how] = f"{time.monotonic() - started:.2f} s ({children_cpu() - cpu:.2f} s CPU)"
            assert check.returncode == 0, check.stderr
            assert f"The {role}" in check.stdout and "beat" in check.stdout
        # Celery's own alternative, for the figures: a broadcast through the broker (the beat answers none).
        started, cpu = time.monotonic(), children_cpu()
        ping = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "config", "inspect", "ping", "-d", "control@test"],
            env=system.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        pinged = f"{time.monotonic() - started:.2f} s ({children_cpu() - cpu:.2f} s CPU)"
        print(f"\n[health] -m serving.management.health {took['module']}; manage.py worker_health {took['manage.py']}")
        print(f"[health] celery inspect ping {pinged}")
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    finally:
        system.stop_all()
        client.close()
    # Celery's own lines (its banner aside, printed before logging is set up) are JSON too.
    assert len(_json_only(system.log("control"))) > 3
    # Stopped cleanly, its heartbeat is gone: the check fails with a sentence, exit 1.
    for how in ("module", "manage.py"):
        check = worker_health(system, "--role", "control", how=how)
        assert check.returncode == 1
        assert "No heartbeat of a control worker on host" in check.stderr


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def worker_health(system: LiveSystem, *args: str, how: str) -> subprocess.CompletedProcess[str]:
    """The check as compose.yaml runs it (``module``), or as a person does (``manage.py``)."""
    command = ["-m", "serving.management.health"] if how == "module" else ["manage.py", "worker_health"]
    return subprocess.run(
        [sys.executable, *command, *args],
        cwd=Path(__file__).resolve().parents[2],
        env=system.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_health_against_a_fresh_a_stale_and_a_missing_heartbeat(settings: Any) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    now = time.time()
    host = "hc-host"
    fresh = processes.key(settings.REDIS_PREFIX, "node", host, 101)
    stale = processes.key(settings.REDIS_PREFIX, "beat", host, 102)
    other = processes.key(settings.REDIS_PREFIX, "control", "another-host", 103)
    client.set(fresh, processes.beat("node", host, 101, now - 60, node="gpu-1", now=now - 2), ex=processes.TTL)
    # Stuck: its key has not expired yet, but it is older than three beats.
    client.set(stale, processes.beat("beat", host, 102, now - 60, now=now - 17), ex=processes.TTL)
    client.set(other, processes.beat("control", "another-host", 103, now - 60, now=now), ex=processes.TTL)
    out = io.StringIO()
    try:
        call_command("worker_health", "--role", "node", "--name", "gpu-1", "--host", host, stdout=out)
        assert "node worker of node 'gpu-1' on host 'hc-host' (pid 101) beat" in out.getvalue()
        with pytest.raises(CommandError, match=r"\(pid 102\) last beat 1[78] s ago, more than 15 s: it is stuck"):
            call_command("worker_health", "--role", "beat", "--host", host)
        call_command("worker_health", "--role", "beat", "--host", host, "--max-age", "30", stdout=out)
        with pytest.raises(CommandError, match="No heartbeat of a node worker of node 'gpu-2' on host 'hc-host'"):
            call_command("worker_health", "--role", "node", "--name", "gpu-2", "--host", host)
        with pytest.raises(CommandError, match="No heartbeat of a control worker on host 'hc-host'"):
            call_command("worker_health", "--role", "control", "--host", host)  # another host's does not count
        with pytest.raises(CommandError, match="a beat has none: leave --name out"):
            call_command("worker_health", "--role", "beat", "--name", "gpu-1", "--host", host)
        with pytest.raises(CommandError, match="is not a duration"):
            call_command("worker_health", "--role", "beat", "--host", host, "--max-age", "0")
    finally:
        client.delete(fresh, stale, other)
        client.close()


def _json_only(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a Celery worker's output (its start banner is plain text on stdout)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.django_db
def test_the_admin_lists_the_processes_that_beat(personas: dict[str, Any], settings: Any) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    now = time.time()
    key = processes.key(settings.REDIS_PREFIX, "node", "gpu-host-7", 4242)
    client.set(key, processes.beat("node", "gpu-host-7", 4242, now - 60, node="gpu-7", now=now - 3), ex=30)
    client.set(processes.key(settings.REDIS_PREFIX, "proxy", "h", 1), b"not json", ex=30)  # ignored
    try:
        admin = Client()
        admin.force_login(personas["admin"])
        page = admin.get("/admin/serving/node/processes/")
        assert page.status_code == 200
        text = page.content.decode()
        assert "gpu-host-7" in text and "4242" in text and "gpu-7" in text and processes.VERSION in text
        assert "/admin/serving/node/processes/" in admin.get("/admin/serving/node/").content.decode()
        assert re.search(r"\([34] s ago\)", text)  # the beat was 3 s before the request
        # In Japanese, the age too (it stayed "s ago" in English).
        admin.cookies[settings.LANGUAGE_COOKIE_NAME] = "ja"
        ja = admin.get("/admin/serving/node/processes/").content.decode()
        assert re.search(r"\([34] 秒前\)", ja), ja[ja.find("gpu-host-7") - 300 : ja.find("gpu-host-7") + 300]
        # Not staff: the admin's login page, as for every admin view.
        owner = Client()
        owner.force_login(personas["owner"])
        assert owner.get("/admin/serving/node/processes/").status_code == 302
    finally:
        client.delete(key, processes.key(settings.REDIS_PREFIX, "proxy", "h", 1))


def test_unit_formatter_fields() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "hello %s", ("you",), None)
    record.status = 5
    logs.bind(request_id="r", node="n")
    try:
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.clear()
    assert line["message"] == "hello you" and line["request_id"] == "r" and line["node"] == "n"
    assert line["status"] == 5 and line["level"] == "ERROR" and line["ts"].endswith("+00:00")
