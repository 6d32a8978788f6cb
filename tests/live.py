"""A live system for integration tests: real Celery workers (control + nodes) and beat as processes,
pointed at the test database, the real Redis (a private key prefix) and the local engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


# Deadlines in the suite are what the work takes on a fast machine, with a margin; machines of this
# kind differ up to 4x in speed, and CI's is loaded. A deadline is only reached when something is
# wrong, so stretching it costs a passing test nothing: every wait is stretched by this factor
# (TEST_DEADLINE_FACTOR, 4 by default), except a wait for a promise the product makes in seconds
# ("a revoked token is refused within 1 s"), which passes ``promise=True`` and keeps its deadline.
DEADLINE_FACTOR = max(1.0, float(os.environ.get("TEST_DEADLINE_FACTOR", "4")))


def deadline_for(seconds: float) -> float:
    """A deadline tuned on a fast machine, stretched for the slowest one (DEADLINE_FACTOR)."""
    return seconds * DEADLINE_FACTOR


def deadline_ms(seconds: float) -> float:
    """``deadline_for`` in milliseconds, as Playwright's timeouts take them."""
    return deadline_for(seconds) * 1000


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.1,
    what: str = "condition",
    promise: bool = False,
) -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds, stretched by
    DEADLINE_FACTOR unless ``promise`` says the timeout is a figure the product promises."""
    if not promise:
        timeout = deadline_for(timeout)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})")


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def database_url() -> str:
    params = connection.settings_dict
    if params["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{params['NAME']}"
    user = params.get("USER") or ""
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    port = f":{params['PORT']}" if params.get("PORT") else ""
    return f"postgres://{auth}{params.get('HOST') or '127.0.0.1'}{port}/{params['NAME']}"


class LiveSystem:
    def __init__(self, log_dir: Path, **overrides: str) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "REDIS_PREFIX": settings.REDIS_PREFIX,
            "SECRET_KEY": settings.SECRET_KEY,
            "TOKEN_HMAC_KEY": settings.TOKEN_HMAC_KEY,
            "STORAGE_ROOT": str(settings.STORAGE_ROOT),
            "ENGINE_STATE_DIR": str(settings.ENGINE_STATE_DIR),
            "SERVICE_CACHE_ROOT": str(settings.SERVICE_CACHE_ROOT),
            "SERVING_ENGINE": "local",
            "RECONCILE_INTERVAL": "0.5",
            "NODE_HEARTBEAT_INTERVAL": "0.5",
            "NODE_LOST_AFTER": "5",
            "REPLICA_STOP_GRACE": "2",
            "NODE_CPU": "16",
            "NODE_MEM": "32g",
            "PYTHONUNBUFFERED": "1",
            **overrides,
        }

    def _spawn(self, name: str, args: list[str], **env: str) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            args, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_control(self) -> None:
        self._spawn(
            "control",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                "control",
                "-n",
                "control@test",
                "--pool=threads",
                "--concurrency=4",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ],
        )

    def start_node(self, name: str = "local", **env: str) -> None:
        self._spawn(
            f"node-{name}",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                f"node.{name}",
                "-n",
                f"node-{name}@test",
                "--pool=threads",
                "--concurrency=4",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            NODE_NAME=name,
            **env,
        )

    def start_beat(self) -> None:
        self._spawn(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "beat",
                "--loglevel=INFO",
                "--schedule",
                str(self.log_dir / "beat-schedule"),
            ],
        )

    def start_proxy(self) -> str:
        """The data plane on free loopback ports; returns its base URL."""
        port, admin = free_port(), free_port()
        self._spawn("proxy", [sys.executable, "-m", "proxy"], PROXY_PORT=str(port), PROXY_ADMIN_PORT=str(admin))
        wait_for(lambda: _answers(f"http://127.0.0.1:{admin}/healthz"), what="the proxy to answer")
        self.proxy_admin_url = f"http://127.0.0.1:{admin}"  # /metrics, /healthz
        return f"http://127.0.0.1:{port}"

    def start_web(self, port: int | None = None) -> str:
        """The web process (daphne: pages, API, websockets) on a free loopback port (or ``port``);
        returns its URL."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        self._spawn(
            "web",
            # The Procfile's command line, flags included: what `make run` starts is what is tested.
            procfile_command("web", WEB_HOST="127.0.0.1", WEB_PORT=str(port)),
            # Its pages' origin: only they may open its websockets (WEB_ORIGINS follows SITE_URL).
            SITE_URL=url,
        )
        wait_for(lambda: _answers(f"{url}/healthz"), timeout=30, what="the web process (daphne) to answer")
        return url

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"===== {p.stem}\n{p.read_text(errors='replace')[-4000:]}" for p in self.log_dir.glob("*.log"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def procfile_command(process: str, **env: str) -> list[str]:
    """The Procfile's command of ``process`` without its respawn.sh wrapper, ``${VAR:-default}``
    expanded from ``env`` (else the default), and ``.venv/bin/X`` run as ``python -m X`` with this
    interpreter (``.venv/bin/python`` as this interpreter)."""
    import re
    import shlex

    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() != process:
            continue
        words = shlex.split(command)
        if words[:2] == ["scripts/respawn.sh", process]:
            words = words[2:]
        expanded = [re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), word) for word in words]
        program = expanded[0]
        if program.startswith(".venv/bin/"):
            module = program.removeprefix(".venv/bin/")
            return [sys.executable, *([] if module == "python" else ["-m", module]), *expanded[1:]]
        return expanded
    raise LookupError(f"the Procfile has no process {process!r}")
