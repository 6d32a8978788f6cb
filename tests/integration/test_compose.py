"""compose.yaml and the product image (issue 15, "adding a host is one command"): the image is built
from this checkout with scripts/build-server-image.sh, the stack starts on this machine's Docker
engine, web answers /healthz, the proxy answers, and the README's one `docker run ... node` command
joins a node that the control plane sees. Everything is torn down (unique project, volumes removed).

PostgreSQL and Redis: the official images when this engine has them, else stand-ins built from this
host's binaries by scripts/build-backend-images.sh (what an air-gapped user does, README)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import ROOT, free_port, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def run(*args: str, timeout: float = 600, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def compose_command() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False).returncode == 0


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    engine = shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, check=False)
    if not engine or engine.returncode != 0:
        pytest.skip("no Docker engine answers (scripts/docker-up.sh starts one)")
    compose = compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    tag = uuid.uuid4().hex[:8]
    project = f"mstest{tag}"
    images = {"MODELSERVE_IMAGE": f"modelserve-test/server:{tag}"}
    made = [images["MODELSERVE_IMAGE"]]
    run(str(ROOT / "scripts/build-server-image.sh"), images["MODELSERVE_IMAGE"], timeout=900)
    if image_exists("postgres:16") and image_exists("redis:7"):
        images |= {"POSTGRES_IMAGE": "postgres:16", "REDIS_IMAGE": "redis:7"}
    else:
        images |= {"POSTGRES_IMAGE": f"modelserve-test/postgres:{tag}", "REDIS_IMAGE": f"modelserve-test/redis:{tag}"}
        made += [images["POSTGRES_IMAGE"], images["REDIS_IMAGE"]]
        run(str(ROOT / "scripts/build-backend-images.sh"), images["POSTGRES_IMAGE"], images["REDIS_IMAGE"])
    data = Path(tempfile.mkdtemp(prefix=f"{project}-"))
    ports = {
        name: str(free_port()) for name in ("WEB_PORT", "PROXY_PORT", "PROXY_ADMIN_PORT", "POSTGRES_PORT", "REDIS_PORT")
    }
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "MODELSERVE_DATA": str(data),
        "POSTGRES_PASSWORD": f"pg-{tag}",
        "REDIS_PASSWORD": f"redis-{tag}",
        **images,
        **ports,
    }
    base = [*compose, "-f", str(ROOT / "compose.yaml"), "-p", project]
    node = f"{project}-node"
    try:
        run(*base, "up", "-d", env=env, timeout=900)
        yield {**env, "project": project, "node": node, "compose": json.dumps(base)}
    finally:
        logs = run(*base, "logs", "--no-color", "--tail=40", env=env, check=False).stdout
        subprocess.run(["docker", "rm", "-f", "-v", node], capture_output=True, check=False)
        run(*base, "down", "-v", "--remove-orphans", "--timeout", "5", env=env, check=False)
        shutil.rmtree(data, ignore_errors=True)
        for image in made:
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
        print(logs)


def test_stack_serves_web_and_proxy_and_a_node_joins_with_one_command(stack: dict[str, str]) -> None:
    web = f"http://127.0.0.1:{stack['WEB_PORT']}"
    status, body = wait_for(lambda: (r := get(f"{web}/healthz"))[0] == 200 and r, timeout=120, what="web's /healthz")
    assert json.loads(body) == {"status": "ok"}  # daphne up, migrations applied on PostgreSQL

    proxy = f"http://127.0.0.1:{stack['PROXY_PORT']}"
    # 503 until the proxy has loaded the routing table from Redis; then a service it does not know is 404.
    status, body = wait_for(
        lambda: (r := get(f"{proxy}/e/no-such-service/"))[0] == 404 and r, timeout=60, what="the proxy's 404"
    )
    assert json.loads(body)["error"]["code"] == "unknown_service"
    status, body = get(f"http://127.0.0.1:{stack['PROXY_ADMIN_PORT']}/healthz")
    assert status == 200, body

    # The README's node command, pointed at the published PostgreSQL and Redis (this host's
    # loopback here; another host's address in the walkthrough).
    run(
        "docker", "run", "-d", "--name", stack["node"], "--network", "host",
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{stack['MODELSERVE_DATA']}:{stack['MODELSERVE_DATA']}", "-e", f"VAR_DIR={stack['MODELSERVE_DATA']}",
        "-e", f"DATABASE_URL=postgres://modelserve:{stack['POSTGRES_PASSWORD']}@127.0.0.1:{stack['POSTGRES_PORT']}/modelserve",
        "-e", f"REDIS_URL=redis://:{stack['REDIS_PASSWORD']}@127.0.0.1:{stack['REDIS_PORT']}/0",
        "-e", "NODE_NAME=second-host", "-e", "NODE_ADDRESS=127.0.0.1",
        stack["MODELSERVE_IMAGE"], "node",
    )  # fmt: skip
    base = json.loads(stack["compose"])
    query = (
        "from serving.models import Node; print([(n.name, n.engine) for n in Node.objects.exclude(heartbeat_at=None)])"
    )

    def nodes() -> str:
        done = run(
            *base, "exec", "-T", "web", "python3", "manage.py", "shell", "-v", "0", "-c", query, env=stack, check=False
        )
        return done.stdout if "second-host" in done.stdout else ""

    assert "('second-host', 'docker')" in wait_for(nodes, timeout=60, interval=2, what="the node's heartbeat")

    # Without NODE_NAME the node command says what is missing instead of joining as "local".
    done = run("docker", "run", "--rm", stack["MODELSERVE_IMAGE"], "node", check=False)
    assert done.returncode == 2
    assert "set NODE_NAME" in done.stderr
