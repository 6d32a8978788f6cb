"""The Docker engine against a real dockerd (docs/architecture.md).

Runs whenever a Docker engine answers (scripts/docker-up.sh starts one as root); otherwise every
test that needs one is skipped with the reason. The example image is built on demand with
scripts/build-image.sh (no registry). Checks that need no daemon (GPU refusal, socket mounts)
run everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.node.engines.base import (
    LABEL_ENDPOINT,
    LABEL_ROLE,
    LABEL_ROUTE,
    ClusterPeering,
    Engine,
    EngineError,
    ImageNotFound,
    Mount,
    PreStartActionSpec,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
)
from serving.node.engines.docker.engine import DockerEngine
from tests.live import deadline_for, wait_for

IMAGE = "modelserve/python:3.11"
ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "serving" / "node" / "engines" / "bootstrap.py"
RUN_ID = uuid.uuid4().hex[:8]
TEST_LABEL = "serving.test"  # every container of this run carries it, so teardown sweeps them all

# A model folder's server: reports what the replica sees, so one replica checks several facts.
SERVER = r"""
import json, os, http.server

def try_write(path):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        return "ok"
    except OSError as exc:
        return exc.strerror

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/read/"):
            with open(self.path[len("/read"):]) as handle:
                body = handle.read().encode()
        else:
            body = json.dumps({
                "model_name": os.environ.get("MODEL_NAME"),
                "write_models": try_write("/models/written-by-replica"),
                "write_home": try_write("/home/work/scratch"),
                "cwd": os.getcwd(),
                "model_file": open("/models/weights.txt").read(),
            }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""

# Stand-in for serving/node/engines/bootstrap.py, used only if that file is missing (it is written by
# another part of the project): same plan format, same exit code 97 and "[prestart]" lines.
STAND_IN_BOOTSTRAP = r"""
import json, os, subprocess, sys
plan = json.load(open(sys.argv[1]))
os.makedirs(plan.get("workdir") or "/home/work", exist_ok=True)
os.chdir(plan.get("workdir") or "/home/work")
for i, item in enumerate(plan.get("actions") or []):
    action, args = item["action"], item.get("args") or {}
    try:
        if action == "write_file":
            open(args["filename"], "a" if args.get("append") else "w").write(args["body"])
        elif action == "mkdir":
            os.makedirs(args["path"], exist_ok=True)
        elif action == "log":
            print("[prestart] action %d (log): %s" % (i, args["message"]), flush=True)
        elif action == "run_command":
            r = subprocess.run(args["command"], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError("the command exited with code %d" % r.returncode)
        else:
            raise RuntimeError("unknown action %r" % action)
    except Exception as exc:
        print("[prestart] action %d (%s) failed: %s" % (i, action, exc), flush=True)
        sys.exit(97)
cmd = plan["command"]
if plan.get("command_is_shell"):
    shell = plan.get("shell") if os.path.exists(plan.get("shell") or "") else "/bin/sh"
    os.execv(shell, [shell, "-c", cmd[0]])
os.execvp(cmd[0], cmd)
"""

needs_docker = pytest.mark.docker


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    return wait_for(condition, timeout=timeout, interval=interval, what=what)


def http_get(port: int, path: str = "/") -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return bytes(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    import docker

    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc} (start one with scripts/docker-up.sh as root)")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        built = subprocess.run(
            [str(ROOT / "scripts" / "build-image.sh"), IMAGE], capture_output=True, text=True, check=False
        )
        if built.returncode != 0:
            pytest.skip(f"no Docker engine: the image {IMAGE} could not be built: {built.stderr.strip()}")
    yield client
    # Sweep whatever a failed test left behind (only this run's containers).
    for container in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
        container.remove(force=True)
    client.close()


@pytest.fixture(scope="module")
def bootstrap_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if BOOTSTRAP.is_file():
        return BOOTSTRAP
    path = tmp_path_factory.mktemp("bootstrap") / "bootstrap.py"
    path.write_text(STAND_IN_BOOTSTRAP)
    return path


@pytest.fixture
def engine(docker_client: Any, bootstrap_path: Path, tmp_path: Path) -> DockerEngine:
    return DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state")


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "server.py").write_text(SERVER)
    (folder / "weights.txt").write_text("the weights")
    return folder


def make_spec(model_folder: Path | None = None, **overrides: Any) -> ReplicaSpec:
    name = overrides.pop("name", f"mstest-{RUN_ID}-{uuid.uuid4().hex[:6]}")
    values: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "command": ("python3", "/models/server.py"),
        "port": 8000,
        "env": {"MODEL_NAME": "tiny"},
        "mounts": (Mount(str(model_folder), "/models", read_only=True),) if model_folder else (),
        "cpu": 0.5,
        "mem_bytes": 256 << 20,
        "labels": {LABEL_ENDPOINT: f"ep-{RUN_ID}", LABEL_ROUTE: name, TEST_LABEL: RUN_ID},
    }
    values.update(overrides)
    return ReplicaSpec(**values)


# --- no daemon needed -----------------------------------------------------------------------------


def test_engine_satisfies_the_protocol() -> None:
    assert isinstance(DockerEngine(), Engine)
    assert DockerEngine.name == "docker"


def test_available_is_false_and_quick_without_a_daemon(tmp_path: Path) -> None:
    import docker

    def nowhere(timeout: float) -> Any:
        return docker.DockerClient(base_url=f"unix://{tmp_path}/no.sock", timeout=timeout, version="1.41")

    started = time.monotonic()
    assert DockerEngine(client_factory=nowhere).available() is False
    assert time.monotonic() - started < deadline_for(3)

    def broken(timeout: float) -> Any:
        raise RuntimeError("no client")

    assert DockerEngine(client_factory=broken).available() is False


def test_gpu_request_is_refused_on_a_node_without_gpus(tmp_path: Path) -> None:
    engine = DockerEngine(client_factory=lambda **_: pytest.fail("must not reach Docker"), state_dir=tmp_path)
    with pytest.raises(EngineError, match="no GPU") as raised:
        engine.start(make_spec(accelerators={"cuda.shares": 0.5}))
    assert "cuda.shares 0.5" in str(raised.value)
    with pytest.raises(EngineError, match=r"only NVIDIA GPUs"):
        engine.start(make_spec(accelerators={"rocm.device": 1}))


def test_docker_socket_can_not_be_mounted(tmp_path: Path) -> None:
    engine = DockerEngine(client_factory=lambda **_: pytest.fail("must not reach Docker"), state_dir=tmp_path)
    for source in ("/var/run", "/run", "/"):
        if not os.path.exists(source):
            continue
        with pytest.raises(EngineError, match="Docker socket"):
            engine.start(make_spec(mounts=(Mount(source, "/host", read_only=True),)))
    with pytest.raises(EngineError, match="does not exist"):
        engine.start(make_spec(mounts=(Mount(str(tmp_path / "missing"), "/models"),)))


# --- against a real dockerd ----------------------------------------------------------------------


@needs_docker
def test_missing_image_is_reported_and_never_pulled(docker_client: Any, bootstrap_path: Path, tmp_path: Path) -> None:
    import docker

    pulls: list[Any] = []

    def factory(timeout: float) -> Any:
        client = docker.from_env(timeout=timeout)
        client.api.pull = lambda *a, **k: pulls.append((a, k))  # every pull path goes through here
        return client

    engine = DockerEngine(client_factory=factory, bootstrap_path=bootstrap_path, state_dir=tmp_path)
    spec = make_spec(image="modelserve/not-built-anywhere:0.0")
    with pytest.raises(ImageNotFound) as raised:
        engine.start(spec)
    message = str(raised.value)
    assert "modelserve/not-built-anywhere:0.0" in message
    assert "build-image.sh" in message and "docker load" in message
    assert pulls == []
    assert docker_client.containers.list(all=True, filters={"name": spec.name}) == []


@needs_docker
def test_replica_serves_with_read_only_model_env_labels_and_locked_down_host_config(
    engine: DockerEngine, docker_client: Any, model_folder: Path
) -> None:
    spec = make_spec(model_folder)
    info = engine.start(spec)
    try:
        assert info.state is ReplicaState.RUNNING
        assert info.host == "127.0.0.1" and info.port > 0
        facts = json.loads(wait_until(lambda: http_get(info.port), 15, "the replica to answer"))
        assert facts["model_name"] == "tiny"
        assert facts["write_models"] == "Read-only file system"
        assert facts["write_home"] == "ok" and facts["cwd"] == "/home/work"
        assert facts["model_file"] == "the weights"
        assert not (model_folder / "written-by-replica").exists()

        assert info.labels[LABEL_ENDPOINT] == f"ep-{RUN_ID}" and info.labels[LABEL_ROUTE] == spec.name
        assert engine.inspect(info.replica_id).port == info.port
        assert engine.inspect(spec.name).replica_id == info.replica_id

        attrs = docker_client.api.inspect_container(info.replica_id)
        host = attrs["HostConfig"]
        assert host["Privileged"] is False
        assert host["NetworkMode"] not in ("host",) and not host["NetworkMode"].startswith("container:")
        assert host["PidMode"] != "host" and host["IpcMode"] != "host"
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["Init"] is True
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == host["MemorySwap"] == 256 << 20
        assert host["PidsLimit"] > 0
        bindings = host["PortBindings"]["8000/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
        assert all("docker.sock" not in m["Source"] for m in attrs["Mounts"])
        assert not host.get("Binds")
        models = next(m for m in attrs["Mounts"] if m["Destination"] == "/models")
        assert models["RW"] is False and models["Source"] == str(model_folder)
        # Published on loopback only: the replica is reached through the proxy, never directly.
        published = attrs["NetworkSettings"]["Ports"]["8000/tcp"]
        assert {p["HostIp"] for p in published} == {"127.0.0.1"}

        stats = engine.stats(info.replica_id)
        assert 0.0 <= stats.cpu_percent <= 100.0
        assert 1 << 20 < stats.mem_bytes < stats.mem_limit_bytes == 256 << 20

        lines = list(engine.logs(info.replica_id, tail=50))
        assert all(isinstance(line, str) and "\n" not in line for line in lines)
    finally:
        started = time.monotonic()
        engine.stop(info.replica_id, grace=10)
        stop_seconds = time.monotonic() - started
    # init=True forwards SIGTERM to the server, so it stops at once instead of after the grace.
    assert stop_seconds < 3, f"stop took {stop_seconds:.1f} s"
    assert docker_client.containers.list(all=True, filters={"id": info.replica_id}) == []
    with pytest.raises(ReplicaNotFound):
        engine.inspect(info.replica_id)
    with pytest.raises(ReplicaNotFound):
        engine.logs(info.replica_id)
    engine.stop(info.replica_id)  # idempotent
    engine.stop("no-such-container-anywhere")


@needs_docker
def test_list_filters_by_label_and_finds_only_our_containers(engine: DockerEngine, docker_client: Any) -> None:
    a = engine.start(make_spec(command=("sleep", "60"), labels={LABEL_ENDPOINT: "ep-a", TEST_LABEL: RUN_ID}))
    b = engine.start(make_spec(command=("sleep", "60"), labels={LABEL_ENDPOINT: "ep-b", TEST_LABEL: RUN_ID}))
    # A container that is not a replica (no route label) is never listed.
    stranger = docker_client.containers.create(IMAGE, ["sleep", "60"], labels={TEST_LABEL: RUN_ID})
    try:
        mine = {i.replica_id for i in engine.list({TEST_LABEL: RUN_ID})}
        assert mine == {a.replica_id, b.replica_id}
        assert [i.replica_id for i in engine.list({LABEL_ENDPOINT: "ep-a", TEST_LABEL: RUN_ID})] == [a.replica_id]
        assert engine.list({LABEL_ENDPOINT: "ep-none", TEST_LABEL: RUN_ID}) == []
        # The route label was filled in from the name, so a restarted worker finds it again.
        assert engine.inspect(a.replica_id).labels[LABEL_ROUTE] == a.name
    finally:
        stranger.remove(force=True)
        engine.stop(a.replica_id, grace=1)
        engine.stop(b.replica_id, grace=1)
    assert engine.list({TEST_LABEL: RUN_ID}) == []


@needs_docker
def test_installations_sharing_a_daemon_never_see_each_other(
    docker_client: Any, bootstrap_path: Path, tmp_path: Path
) -> None:
    """A test run beside `make run` on one daemon: each lists (and so sweeps) only its own replicas."""
    ours = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "a", installation=f"ms-{RUN_ID}")
    theirs = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "b", installation=f"other-{RUN_ID}")
    a = ours.start(make_spec(command=("sleep", "60")))
    b = theirs.start(make_spec(command=("sleep", "60")))
    try:
        assert [i.replica_id for i in ours.list({TEST_LABEL: RUN_ID})] == [a.replica_id]
        assert [i.replica_id for i in theirs.list({TEST_LABEL: RUN_ID})] == [b.replica_id]
    finally:
        ours.stop(a.replica_id, grace=1)
        theirs.stop(b.replica_id, grace=1)
        # The engine keeps an installation's replica network; a test's made-up ones go with it.
        assert ours.remove_replica_network() and theirs.remove_replica_network()


def a_host_address() -> str | None:
    """An IPv4 address of this host that is not loopback nor a Docker bridge's, like a LAN address."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], check=False, capture_output=True, text=True
    )
    for line in out.stdout.splitlines():
        words = line.split()
        if len(words) > 3 and not words[1].startswith(("docker", "br-", "veth", "ms")):
            return words[3].split("/")[0]
    return None


@needs_docker
def test_a_node_publishes_replicas_on_its_node_address(
    docker_client: Any, bootstrap_path: Path, model_folder: Path, tmp_path: Path, settings: Any
) -> None:
    """NODE_ADDRESS is where other hosts (the proxy, a cluster's members) reach this node's
    replicas: the Docker engine publishes their ports there, and reports that address."""
    from serving.node import engine as node_engine

    address = a_host_address()
    if address is None:
        pytest.skip("this host has no network address besides loopback and Docker's bridges")
    settings.NODE_ADDRESS = address
    made = node_engine._make_engine("docker")
    assert isinstance(made, DockerEngine) and made.publish_host == address
    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", publish_host=address)
    info = engine.start(make_spec(model_folder))
    try:
        assert (info.host, engine.inspect(info.replica_id).host) == (address, address)

        def get(host: str) -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://{host}:{info.port}/", timeout=2) as response:
                    return bytes(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return None

        assert b"the weights" in wait_until(lambda: get(address), 15, f"the replica to answer on {address}")
        assert get("127.0.0.1") is None  # published there only
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_killed_replica_is_reported_exited(engine: DockerEngine, docker_client: Any, model_folder: Path) -> None:
    info = engine.start(make_spec(model_folder))
    try:
        docker_client.containers.get(info.replica_id).kill()
        exited = wait_until(
            lambda: (i := engine.inspect(info.replica_id)).state is ReplicaState.EXITED and i, 10, "EXITED"
        )
        assert exited.exit_code == 137
        assert "SIGKILL" in exited.error
        assert [i.state for i in engine.list({LABEL_ROUTE: info.name})] == [ReplicaState.EXITED]
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_logs_follow_streams_lines_and_ends_with_the_replica(engine: DockerEngine, docker_client: Any) -> None:
    script = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.2)\ntime.sleep(60)"
    info = engine.start(make_spec(command=("python3", "-c", script)))
    try:
        lines = engine.logs(info.replica_id, follow=True)
        assert [next(lines) for _ in range(3)] == ["line 0", "line 1", "line 2"]
        docker_client.containers.get(info.replica_id).kill()
        assert list(lines) == []  # the stream ends when the replica does
        assert list(engine.logs(info.replica_id, tail=2)) == ["line 1", "line 2"]
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_a_follow_of_a_quiet_replica_ends_when_stopped(engine: DockerEngine) -> None:
    """Nobody reads any more (serving.bus.logfollow): the read blocked on a silent replica ends too."""
    import threading

    script = "print('only line', flush=True)\nimport time\ntime.sleep(60)"
    info = engine.start(make_spec(command=("python3", "-c", script)))
    try:
        stop = threading.Event()
        lines = engine.logs(info.replica_id, follow=True, stop=stop)
        assert next(lines) == "only line"
        rest: list[str] = []
        reader = threading.Thread(target=lambda: rest.extend(lines), daemon=True)
        reader.start()
        reader.join(timeout=0.5)
        assert reader.is_alive(), "the follow waits for the next line"
        stop.set()
        reader.join(timeout=3)
        assert not reader.is_alive() and rest == []
        wait_until(
            lambda: not any(t.name.startswith("logs-stop-") for t in threading.enumerate()), 3, "the closer thread"
        )
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_replica_past_its_memory_limit_is_oom_killed(engine: DockerEngine) -> None:
    hog = "import time; data = bytearray(256 * 1024 * 1024); time.sleep(60)"
    info = engine.start(make_spec(command=("python3", "-c", hog), mem_bytes=48 << 20))
    try:
        exited = wait_until(
            lambda: (i := engine.inspect(info.replica_id)).state is ReplicaState.EXITED and i, 20, "the OOM kill"
        )
        assert exited.error == "killed: out of memory (limit 48 MiB)"
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_pre_start_actions_run_before_the_command(engine: DockerEngine, model_folder: Path) -> None:
    actions = (
        PreStartActionSpec("mkdir", {"path": "/home/work/conf"}),
        PreStartActionSpec("write_file", {"filename": "/home/work/conf/greeting.txt", "body": "hello", "mode": "644"}),
        PreStartActionSpec("write_file", {"filename": "/home/work/conf/greeting.txt", "body": "!", "append": True}),
        PreStartActionSpec("run_command", {"command": ["sh", "-c", "echo from-run-command"]}),
        PreStartActionSpec("log", {"message": "about to start"}),
    )
    info = engine.start(make_spec(model_folder, pre_start_actions=actions))
    try:
        body = wait_until(lambda: http_get(info.port, "/read/home/work/conf/greeting.txt"), 15, "the replica")
        assert body == b"hello!"
        logs = "\n".join(engine.logs(info.replica_id))
        assert "about to start" in logs
        assert len(list(engine.state_dir.iterdir())) == 1  # its plan folder, mounted read-only
    finally:
        engine.stop(info.replica_id, grace=1)
    # The per-replica plan folder goes with the replica.
    assert list(engine.state_dir.iterdir()) == []


@needs_docker
def test_failing_pre_start_action_is_reported(engine: DockerEngine) -> None:
    actions = (
        PreStartActionSpec("log", {"message": "first"}),
        PreStartActionSpec("run_command", {"command": ["sh", "-c", "exit 3"], "check": True}),
    )
    info = engine.start(make_spec(command=("sleep", "60"), pre_start_actions=actions))
    try:
        exited = wait_until(
            lambda: (i := engine.inspect(info.replica_id)).state is ReplicaState.EXITED and i, 15, "the failure"
        )
        assert exited.exit_code == 97
        assert exited.error.startswith("pre-start action 1 (run_command) failed:"), exited.error
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_image_command_and_shell_command(engine: DockerEngine, tmp_path: Path) -> None:
    # command=None and no actions: the image's own CMD (python3 -m http.server 8000).
    own = engine.start(make_spec(command=None))
    # A shell command line runs under the image's bash (ReplicaSpec.shell defaults to /bin/bash).
    shell = engine.start(
        make_spec(
            command=('echo "$BASH_VERSION" > /tmp/v && exec python3 -m http.server 8000 --directory /tmp',),
            command_is_shell=True,
        )
    )
    try:
        assert wait_until(lambda: http_get(own.port), 15, "the image's own server") is not None
        version = wait_until(lambda: http_get(shell.port, "/v"), 15, "the shell-started server")
        assert version.strip()[:1].isdigit(), version
    finally:
        engine.stop(own.replica_id, grace=1)
        engine.stop(shell.replica_id, grace=1)


@needs_docker
def test_busy_replica_cpu_is_measured_and_capped(engine: DockerEngine) -> None:
    info = engine.start(make_spec(command=("python3", "-c", "while True: pass"), cpu=0.5))
    try:
        stats = engine.stats(info.replica_id)
        # nano_cpus caps it at half a core; a busy loop uses most of that.
        assert 10.0 < stats.cpu_percent <= 60.0, stats
    finally:
        engine.stop(info.replica_id, grace=1)


@needs_docker
def test_docker_errors_become_sentences(engine: DockerEngine) -> None:
    spec = make_spec(command=("sleep", "60"))
    info = engine.start(spec)
    try:
        with pytest.raises(EngineError, match=f"container named {spec.name} already exists"):
            engine.start(spec)
        with pytest.raises(EngineError, match="Docker could not"):
            engine.start(make_spec(mem_bytes=1 << 20))  # below Docker's 6 MiB minimum
    finally:
        engine.stop(info.replica_id, grace=1)
    # Neither the refused start nor the failed one left a container or a plan folder behind.
    assert not engine.state_dir.exists() or list(engine.state_dir.iterdir()) == []


# --- cluster mode (S4.1) ----------------------------------------------------------------------------

# /whoami: the member's host name; /peer: main by name and by BACKENDAI_CLUSTER_MAIN_ADDR; /fetch: any URL.
PEER_SERVER = r"""
import json, os, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read().decode()
    except Exception as exc:
        return "failed: %s" % exc

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/peer":
            body = json.dumps({
                "by_name": get("http://main1:8000/whoami"),
                "by_main_addr": get("http://%s/whoami" % os.environ.get("BACKENDAI_CLUSTER_MAIN_ADDR", "")),
            })
        elif url.path == "/fetch":
            body = get(query["url"])
        else:
            body = os.environ.get("BACKENDAI_CLUSTER_HOST", "")
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""


@needs_docker
def test_cluster_members_on_two_nodes_reach_each_other_by_name_and_others_can_not(
    engine: DockerEngine, docker_client: Any, bootstrap_path: Path, model_folder: Path, tmp_path: Path
) -> None:
    (model_folder / "peer.py").write_text(PEER_SERVER)
    key = str(uuid.uuid4())
    network = f"ms-cluster-{key}"
    node_b = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "b")

    def member(host: str) -> ReplicaSpec:
        return make_spec(
            model_folder,
            command=("python3", "/models/peer.py"),
            # As the control plane fills them in: main's port published on its node's loopback.
            env={"BACKENDAI_CLUSTER_HOST": host, "BACKENDAI_CLUSTER_MAIN_ADDR": "127.0.0.1:1"},
            labels={
                LABEL_ENDPOINT: f"ep-{RUN_ID}",
                LABEL_ROUTE: key,
                LABEL_ROLE: "main" if host == "main1" else host,
                TEST_LABEL: RUN_ID,
            },
            cluster=ClusterPeering(key=key, host=host, hosts=("main1", "sub1")),
        )

    main = engine.start(member("main1"))
    sub = node_b.start(member("sub1"))
    outsider = engine.start(make_spec(model_folder, command=("python3", "/models/peer.py")))
    try:
        for info in (main, sub, outsider):
            wait_until(lambda info=info: http_get(info.port, "/whoami") is not None, 30, "the replica to answer")
        peer = json.loads(http_get(sub.port, "/peer") or b"{}")
        assert peer == {"by_name": "main1", "by_main_addr": "main1"}
        assert http_get(main.port, "/fetch?url=http://sub1:8000/whoami") == b"sub1"
        # A container outside the cluster's network can not connect to a member.
        main_ip = docker_client.containers.get(main.replica_id).attrs["NetworkSettings"]["Networks"][network][
            "IPAddress"
        ]
        # (Dropped, not refused: the replica's own 2 s timeout ends the attempt, so wait longer here.)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{outsider.port}/fetch?url=http://{main_ip}:8000/whoami", timeout=10
        ) as response:
            answer = response.read()
        assert answer.startswith(b"failed:"), answer
        # Nor does the host name mean anything there.
        assert (http_get(outsider.port, "/fetch?url=http://main1:8000/whoami") or b"").startswith(b"failed:")
    finally:
        node_b.stop(sub.replica_id, grace=0)
        assert [n.name for n in docker_client.networks.list(names=[network])] == [network]  # main still on it
        engine.stop(main.replica_id, grace=0)
        engine.stop(outsider.replica_id, grace=0)
    assert [n.name for n in docker_client.networks.list(names=[network])] == []


def iptables_rules() -> str:
    return subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout


@needs_docker
def test_the_replica_network_and_its_rules_stay_when_its_last_replica_stops(
    docker_client: Any, bootstrap_path: Path, model_folder: Path, tmp_path: Path
) -> None:
    """Removing the shared replica network with its last replica raced with a start in another
    worker (a process: no threading lock covers it): the network vanished under a created replica,
    or its re-made bridge lost its rules to the remover. It costs one address pool: it stays."""
    if os.geteuid() != 0:
        pytest.skip("the firewall rules need root")
    network = f"ms-replicas-t{RUN_ID}-keep"
    engine = DockerEngine(
        bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", egress="deny", replica_network=network
    )
    bridge = engine._bridge_name(network)
    try:
        info = engine.start(make_spec(model_folder))
        engine.stop(info.replica_id, grace=0)
        assert [n.name for n in docker_client.networks.list(names=[network])] == [network]
        assert f"modelserve-replicas {bridge}" in iptables_rules()
        engine._remove_network_if_unused(docker_client, network)  # what a stop elsewhere would call
        assert [n.name for n in docker_client.networks.list(names=[network])] == [network]
    finally:
        assert engine.remove_replica_network()  # an operator's (or a test's) explicit removal
    assert [n.name for n in docker_client.networks.list(names=[network])] == []
    assert bridge not in iptables_rules()


@needs_docker
def test_a_cluster_network_stays_while_a_created_member_is_attached(
    engine: DockerEngine, docker_client: Any, model_folder: Path
) -> None:
    """Docker lists only running containers on a network, and removes a network under a created
    one (whose start then fails with "network not found"): a created member keeps it."""
    key = str(uuid.uuid4())
    network = f"ms-cluster-{key}"
    spec = make_spec(
        model_folder,
        labels={LABEL_ENDPOINT: f"ep-{RUN_ID}", LABEL_ROUTE: key, LABEL_ROLE: "main", TEST_LABEL: RUN_ID},
        cluster=ClusterPeering(key=key, host="main1", hosts=("main1", "sub1")),
    )
    main = engine.start(spec)
    # Another worker's member, created but not started yet.
    created = docker_client.containers.create(
        IMAGE, ["sleep", "60"], name=f"mstest-{RUN_ID}-created", network=network, labels={TEST_LABEL: RUN_ID}
    )
    try:
        engine.stop(main.replica_id, grace=0)
        assert [n.name for n in docker_client.networks.list(names=[network])] == [network]
        created.start()  # its network is still there
        created.remove(force=True)
        engine._remove_network_if_unused(docker_client, network)
        assert [n.name for n in docker_client.networks.list(names=[network])] == []
    finally:
        with contextlib.suppress(Exception):
            created.remove(force=True)
        with contextlib.suppress(Exception):
            docker_client.networks.get(network).remove()


@needs_docker
def test_a_start_remakes_a_network_removed_between_create_and_start(
    docker_client: Any, bootstrap_path: Path, model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = f"ms-replicas-t{RUN_ID}-gone"
    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", replica_network=network)
    create = engine._create
    calls = []

    def create_then_lose_the_network(*args: Any) -> Any:
        container = create(*args)
        calls.append(container.id)
        if len(calls) == 1:
            docker_client.networks.get(network).remove()  # by hand, or by an older worker
        return container

    monkeypatch.setattr(engine, "_create", create_then_lose_the_network)
    try:
        info = engine.start(make_spec(model_folder))
        assert len(calls) == 2 and engine.inspect(info.replica_id).state is ReplicaState.RUNNING
        assert wait_until(lambda: http_get(info.port, "/"), 30, "the replica to answer")
        engine.stop(info.replica_id, grace=0)
    finally:
        engine.remove_replica_network()
