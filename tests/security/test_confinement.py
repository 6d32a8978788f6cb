"""Replicas are confined (issue 9, Security 5), on the local engine and on Docker.

tests/integration/test_engine_local.py and test_engine_docker.py already check the read-only model
mount, a sibling folder and the repository being invisible (local), the locked-down host config
(Docker: no privilege, no host network/PID/IPC, caps dropped, no-new-privileges, no socket bind)
and the OOM kill being reported. Here, from *inside* a replica, what those do not:

* the kernel's view: NoNewPrivs is 1 and no capability is effective (so a setuid binary or a
  remount can not undo the rest);
* on the local engine: the replica is not root but nobody (or the configured uid/gid) with no
  supplementary group and an empty bounding set, owns its /home/work, can write /tmp, and can not
  read a root-only file of its own model folder;
* the model mount stays read-only even after ``mount -o remount,rw``; a symlink planted in the
  folder does not lead out of it;
* the platform's own files (``var/``: database, secret keys; the storage root's other folders; the
  engine's state) are not there, under their host paths;
* the platform's services on the host (Redis, PostgreSQL, web, proxy) can not be reached;
* on Docker: no Docker socket inside, and the network is not the host's;
* past its memory limit a replica is killed and reported exited, while a neighbour replica keeps
  serving and the engine keeps working.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from serving.node.engines.base import Mount, ReplicaState
from tests.integration import test_engine_docker as docker_tests
from tests.integration import test_engine_local as local_tests
from tests.integration.test_engine_docker import bootstrap_path, docker_client  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]

# The replica's server: answers one question, "what can you see and do?", as JSON.
PROBE = r"""
import http.server, json, os, socket, subprocess, sys, urllib.parse

def attempt(action):
    try:
        return "ok: " + str(action())[:100]
    except OSError as exc:
        return exc.strerror or type(exc).__name__

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()

def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(bytes.fromhex(fields[2])[::-1])
    return None

def connect(target):
    host, port = target.rsplit(":", 1)
    if host == "GATEWAY":
        host = gateway()
        if host is None:
            raise OSError("no default route")
    socket.create_connection((host, int(port)), timeout=2).close()
    return "connected"

def write(path):
    with open(path, "w") as handle:
        handle.write("x")

def remount():
    try:
        done = subprocess.run(["mount", "-o", "remount,rw", "/models"], capture_output=True, text=True, timeout=5)
        return done.returncode
    except OSError as exc:
        return exc.strerror

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        facts = {
            "no_new_privs": status("NoNewPrivs"),
            "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
            "groups": os.getgroups(),
            "cap_bnd": status("CapBnd"),
            "home": [os.environ.get("HOME"), os.stat("/home/work").st_uid],
            "cap_eff": status("CapEff"),
            "remount": remount(),
            "read": {p: attempt(lambda p=p: open(p).read()) for p in query.get("read", [])},
            "exists": {p: os.path.lexists(p) for p in query.get("exists", [])},
            "write": {p: attempt(lambda p=p: write(p)) for p in query.get("write", [])},
            "connect": {t: attempt(lambda t=t: connect(t)) for t in query.get("connect", [])},
            "gateway": gateway(),
        }
        body = json.dumps(facts).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""

HOG = "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n"
# The platform's services (Redis, PostgreSQL, web, proxy and its admin port) as a replica would try
# them: on its own loopback (where the host's are, without a network namespace; the replica's own
# server holds 8000 there), and at the host's address on its network (the default gateway).
SERVICES = ["127.0.0.1:6379", "127.0.0.1:5432", "127.0.0.1:8080", "127.0.0.1:8081"]
HOST_PORTS = (6379, 5432, 8000, 8080, 8081)


class Layout:
    """A storage root with the replica's folder and another user's, beside the platform's var/."""

    def __init__(self, base: Path) -> None:
        self.storage = Path(django_settings.STORAGE_ROOT)
        self.model = self.storage / f"mine-{uuid.uuid4().hex[:8]}"
        self.other = self.storage / f"theirs-{uuid.uuid4().hex[:8]}"
        for folder in (self.model, self.other):
            folder.mkdir(parents=True)
        (self.model / "server.py").write_text(PROBE)
        (self.model / "weights.txt").write_text("the weights")
        (self.other / "secret.txt").write_text("another user's model")
        (self.model / "escape-abs").symlink_to(self.other / "secret.txt")
        (self.model / "escape-rel").symlink_to(Path("..") / self.other.name / "secret.txt")
        var = Path(django_settings.VAR_DIR)
        self.secrets = [var / "secret_key", var / "token_hmac_key", var / "db.sqlite3", ROOT / "var" / "secret_key"]
        self.hidden = [*self.secrets, self.other / "secret.txt", self.storage, var, ROOT / "pyproject.toml"]

    def query(self, engine_state: Path | None = None, host: str = "GATEWAY") -> str:
        hidden = [*self.hidden, *([engine_state] if engine_state else [])]
        return urllib.parse.urlencode(
            {
                "read": [str(p) for p in (*self.secrets, self.other / "secret.txt")]
                + ["/models/escape-abs", "/models/escape-rel", "/models/weights.txt"],
                "exists": [str(p) for p in hidden] + ["/var/run/docker.sock", "/run/docker.sock"],
                "write": ["/models/written-by-replica", "/models/weights.txt", "/home/work/scratch"],
                "connect": [*SERVICES, *(f"{host}:{port}" for port in HOST_PORTS)],
            },
            doseq=True,
        )


def check(facts: dict[str, Any], layout: Layout) -> None:
    assert facts["no_new_privs"] == "1", facts
    assert int(facts["cap_eff"], 16) == 0, facts
    assert facts["remount"] != 0, facts
    assert facts["read"]["/models/weights.txt"] == "ok: the weights"
    assert facts["write"]["/models/written-by-replica"] == "Read-only file system", facts["write"]
    assert facts["write"]["/models/weights.txt"] == "Read-only file system", facts["write"]
    assert facts["write"]["/home/work/scratch"].startswith("ok"), facts["write"]  # it does run, with a home
    assert (layout.model / "weights.txt").read_text() == "the weights"
    assert not (layout.model / "written-by-replica").exists()
    leaked = {
        path: result for path, result in facts["read"].items() if result.startswith("ok") and "weights" not in path
    }
    assert leaked == {}, f"a replica read files it must not see: {leaked}"
    visible = {path for path, there in facts["exists"].items() if there}
    assert visible == set(), f"visible inside the replica: {visible}"
    reached = {target for target, result in facts["connect"].items() if result.startswith("ok")}
    assert reached == set(), f"a replica reached the platform's services: {reached}"


# --- the local engine -------------------------------------------------------------------------------

needs_local = pytest.mark.skipif(local_tests._why_not() is not None, reason=str(local_tests._why_not()))


def _local_spec(layout: Layout, **extra: Any) -> Any:
    return local_tests.spec(layout.model, mounts=(Mount(str(layout.model), "/models", read_only=True),), **extra)


def _unprivileged_facts(engine: Any, layout: Layout) -> dict[str, Any]:
    """What a replica of ``engine`` sees, with the checks every replica passes done."""
    root_only = layout.model / "root-only.txt"
    root_only.write_text("only root reads this")
    root_only.chmod(0o600)
    info = engine.start(_local_spec(layout))
    # The host's end of the replica's veth pair (a /30: the host has the address below the replica's).
    host = str(ipaddress.ip_address(info.host) - 1)
    query = (
        layout.query(Path(engine.state_dir), host=host)
        + "&"
        + urllib.parse.urlencode(
            {"read": "/models/root-only.txt", "write": ["/tmp/scratch", "/var/tmp/scratch"]}, doseq=True
        )
    )
    status, body = local_tests.serving(engine, info.replica_id, "/?" + query)
    assert status == 200, body
    facts = json.loads(body)
    check({**facts, "read": {k: v for k, v in facts["read"].items() if k != "/models/root-only.txt"}}, layout)
    assert facts["read"]["/models/root-only.txt"] == "Permission denied", facts["read"]
    assert facts["write"]["/tmp/scratch"].startswith("ok"), facts["write"]
    assert facts["write"]["/var/tmp/scratch"].startswith("ok"), facts["write"]
    assert int(facts["cap_bnd"], 16) == 0, facts  # nothing a later exec could get back
    return dict(facts)


@needs_local
def test_local_replica_is_confined_and_runs_as_nobody(local_engine: Any, tmp_path: Path) -> None:
    facts = _unprivileged_facts(local_engine, Layout(tmp_path))
    assert facts["ids"] == [65534, 65534, 65534, 65534], facts
    assert facts["groups"] in ([], [65534]), facts  # no supplementary group of root's
    assert facts["home"] == ["/home/work", 65534], facts


@needs_local
def test_local_replica_runs_as_the_configured_user(tmp_path: Path) -> None:
    from serving.node.engines.local.engine import LocalEngine

    engine = LocalEngine(tmp_path / "state", netns_prefix=local_tests.PREFIX, uid=4321, gid=4322)
    try:
        facts = _unprivileged_facts(engine, Layout(tmp_path))
    finally:
        for info in engine.list():
            engine.stop(info.replica_id, grace=0)
    assert facts["ids"] == [4321, 4321, 4322, 4322], facts
    assert facts["groups"] in ([], [4322]), facts
    assert facts["home"] == ["/home/work", 4321], facts


@needs_local
def test_local_replica_past_its_memory_is_killed_and_its_neighbour_serves_on(local_engine: Any, tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    neighbour = local_engine.start(_local_spec(layout))
    assert local_tests.serving(local_engine, neighbour.replica_id, "/?")[0] == 200
    hog = local_engine.start(_local_spec(layout, command=("python3", "-c", HOG), mem_bytes=48 << 20))
    gone = local_tests.exited(local_engine, hog.replica_id, timeout=20)
    assert gone.state is ReplicaState.EXITED and gone.error == "killed: out of memory (limit 48 MiB)", gone.error
    assert local_engine.inspect(neighbour.replica_id).state is ReplicaState.RUNNING
    assert local_tests.serving(local_engine, neighbour.replica_id, "/?")[0] == 200


# --- Docker --------------------------------------------------------------------------------------------


@pytest.fixture
def docker_engine(docker_client: Any, bootstrap_path: Path, tmp_path: Path) -> Any:  # noqa: F811
    from serving.node.engines.docker.engine import DockerEngine

    return DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state")


@pytest.mark.docker
def test_docker_replica_is_confined(docker_engine: Any, docker_client: Any, tmp_path: Path) -> None:  # noqa: F811
    layout = Layout(tmp_path)
    info = docker_engine.start(docker_tests.make_spec(layout.model))
    try:
        body = docker_tests.wait_until(
            lambda: docker_tests.http_get(info.port, "/?" + layout.query(tmp_path / "state")), 20, "the replica"
        )
        facts = json.loads(body)
        check(facts, layout)
        # Its own network: a bridge address, not the host's interfaces.
        attrs = docker_client.api.inspect_container(info.replica_id)
        assert attrs["HostConfig"]["NetworkMode"] != "host" and facts["gateway"]
    finally:
        docker_engine.stop(info.replica_id, grace=1)


@pytest.mark.docker
def test_docker_replica_past_its_memory_is_killed_and_the_node_serves_on(
    docker_engine: Any,
    docker_client: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    neighbour = docker_engine.start(docker_tests.make_spec(layout.model))
    hog = docker_engine.start(docker_tests.make_spec(command=("python3", "-c", HOG), mem_bytes=48 << 20))
    try:
        assert docker_tests.wait_until(lambda: docker_tests.http_get(neighbour.port, "/?"), 20, "the neighbour")
        gone = docker_tests.wait_until(
            lambda: (i := docker_engine.inspect(hog.replica_id)).state is ReplicaState.EXITED and i, 30, "the OOM kill"
        )
        assert gone.error == "killed: out of memory (limit 48 MiB)", gone.error
        assert docker_client.ping()
        assert docker_engine.inspect(neighbour.replica_id).state is ReplicaState.RUNNING
        assert docker_tests.http_get(neighbour.port, "/?") is not None
    finally:
        docker_engine.stop(hog.replica_id, grace=1)
        docker_engine.stop(neighbour.replica_id, grace=1)
