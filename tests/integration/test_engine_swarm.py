"""The Swarm engine against a real one-node swarm (docs/architecture.md).

Runs whenever a Docker engine answers: the session makes it a one-node swarm manager if it is not
in a swarm yet (``docker swarm init --advertise-addr 127.0.0.1``, as ../shared/recipes/swarm-up.sh
does; a one-node swarm does not disturb plain containers, so it is left initialised), and every
service and network a test makes is removed. Without an engine, or when it can not become a
manager, the tests that need one are skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from serving.node import engine as node_engine
from serving.node.engines.base import (
    LABEL_ENDPOINT,
    LABEL_ROLE,
    LABEL_ROUTE,
    ClusterPeering,
    Engine,
    EngineError,
    ImageNotFound,
    Mount,
    ReplicaNotFound,
    ReplicaSpec,
    ReplicaState,
)
from serving.node.engines.swarm.engine import SwarmEngine
from tests.live import wait_for

IMAGE = "modelserve/python:3.11"
ROOT = Path(__file__).resolve().parents[2]
RUN_ID = uuid.uuid4().hex[:8]
TEST_LABEL = "serving.test"  # every service of this run carries it, so teardown sweeps them all

# Reports what the replica sees; /peer asks main (BACKENDAI_CLUSTER_MAIN_ADDR) by its host name.
SERVER = r"""
import json, os, sys, http.server, urllib.request

def try_write(path):
    try:
        with open(path, "w") as handle:
            handle.write("x")
        return "ok"
    except OSError as exc:
        return exc.strerror

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/peer":
            main = os.environ["BACKENDAI_CLUSTER_MAIN_ADDR"]
            body = urllib.request.urlopen("http://%s/" % main, timeout=5).read()
        else:
            body = json.dumps({
                "model_name": os.environ.get("MODEL_NAME"),
                "host": os.environ.get("BACKENDAI_CLUSTER_HOST", ""),
                "write_models": try_write("/models/written-by-replica"),
                "write_home": try_write("/home/work/scratch"),
                "model_file": open("/models/weights.txt").read(),
                "uid": os.getuid(),
            }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

print("server up", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""

needs_docker = pytest.mark.docker


def http_get(host: str, port: int, path: str = "/") -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=6) as response:
            return bytes(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture(scope="module")
def swarm_client() -> Iterator[Any]:
    import docker

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc} (start one with scripts/docker-up.sh as root)")
    swarm = client.info().get("Swarm") or {}
    if swarm.get("LocalNodeState") == "inactive":
        try:
            client.swarm.init(advertise_addr="127.0.0.1")
        except Exception as exc:
            pytest.skip(f"the Docker engine could not become a swarm manager: {exc}")
    elif not swarm.get("ControlAvailable"):
        pytest.skip(f"the Docker engine is in a swarm but not a manager ({swarm.get('LocalNodeState')})")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        built = subprocess.run(
            [str(ROOT / "scripts" / "build-image.sh"), IMAGE], capture_output=True, text=True, check=False
        )
        if built.returncode != 0:
            pytest.skip(f"the image {IMAGE} could not be built: {built.stderr.strip()}")
    yield client
    # Sweep whatever a failed test left behind (only this run's services and networks).
    for service in client.services.list(filters={"label": f"{TEST_LABEL}={RUN_ID}"}):
        service.remove()
    for network in client.networks.list(names=[f"ms-swarm-cluster-mstest-{RUN_ID}"]):
        wait_for(lambda n=network: _try_remove(n), timeout=30, what=f"network {network.name} removed")
    client.close()


def _try_remove(network: Any) -> bool:
    try:
        network.remove()
    except Exception as exc:
        return "not found" in str(exc).lower()
    return True


@pytest.fixture
def engine(swarm_client: Any, tmp_path: Path) -> SwarmEngine:
    return SwarmEngine(state_dir=tmp_path / "state", stop_grace=2.0)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    folder.chmod(0o755)
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
        "cpu": 0.25,
        "mem_bytes": 128 << 20,
        "labels": {LABEL_ENDPOINT: f"ep-{RUN_ID}", LABEL_ROUTE: name, TEST_LABEL: RUN_ID},
    }
    values.update(overrides)
    return ReplicaSpec(**values)


# --- no swarm needed ------------------------------------------------------------------------------


def test_engine_satisfies_the_protocol() -> None:
    assert isinstance(SwarmEngine(), Engine)
    assert SwarmEngine.name == "swarm"


def test_a_bad_publish_mode_is_a_sentence() -> None:
    with pytest.raises(EngineError, match=r"SWARM_PUBLISH_MODE='mesh' is not a publish mode; use 'host'"):
        SwarmEngine(publish_mode="mesh")


def test_no_engine_and_not_a_manager_are_sentences(tmp_path: Path) -> None:
    def broken(timeout: float) -> Any:
        raise RuntimeError("no client")

    engine = SwarmEngine(client_factory=broken)
    assert engine.available() is False
    assert "no Docker engine answers" in engine.not_a_manager()

    class Worker:  # a Docker engine that answers but is in no swarm
        def info(self) -> dict[str, Any]:
            return {"Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False}}

        def close(self) -> None:
            pass

    engine = SwarmEngine(client_factory=lambda timeout: Worker())
    assert engine.available() is False
    assert engine.not_a_manager() == (
        "SERVING_ENGINE=swarm but the Docker engine is not a swarm manager (its swarm state is inactive); "
        "make it one with `docker swarm init` (or point DOCKER_HOST at a manager of your swarm), "
        "or use SERVING_ENGINE=docker."
    )


def test_gpus_and_the_docker_socket_are_refused(tmp_path: Path) -> None:
    engine = SwarmEngine(client_factory=lambda **_: pytest.fail("must not reach Docker"), state_dir=tmp_path)
    with pytest.raises(EngineError, match="Docker socket"):
        engine.start(make_spec(mounts=(Mount("/run", "/host", read_only=True),)))


# --- against a real swarm -------------------------------------------------------------------------


@needs_docker
def test_a_replica_is_a_service_that_serves_logs_exits_and_goes(
    engine: SwarmEngine, swarm_client: Any, model_folder: Path
) -> None:
    spec = make_spec(model_folder)
    info = engine.start(spec)
    try:
        assert info.state is ReplicaState.RUNNING and info.port > 0
        assert info.host == "127.0.0.1"  # the one node's advertised address (host publish mode)
        service = swarm_client.services.get(info.replica_id)
        task_template = service.attrs["Spec"]["TaskTemplate"]
        assert task_template["RestartPolicy"]["Condition"] == "none"
        assert task_template["Placement"]["Constraints"] == [f"node.hostname=={engine.placement_node}"]
        resources = task_template["Resources"]
        assert resources["Limits"]["MemoryBytes"] == resources["Reservations"]["MemoryBytes"] == 128 << 20
        assert resources["Limits"]["NanoCPUs"] == resources["Reservations"]["NanoCPUs"] == 250_000_000
        assert service.attrs["Spec"]["EndpointSpec"]["Ports"][0]["PublishMode"] == "host"

        body = wait_for(lambda: http_get(info.host, info.port), timeout=30, what="the replica answers")
        seen = json.loads(body)
        assert seen["model_name"] == "tiny" and seen["model_file"] == "the weights"
        assert seen["write_models"] == "Read-only file system"  # the model folder is read-only
        assert seen["uid"] == 65534  # the replica user, whatever the image says
        assert seen["write_home"] == "ok"  # its own /home/work, though the image's belongs to root
        assert not (model_folder / "written-by-replica").exists()

        wait_for(lambda: "server up" in list(engine.logs(info.replica_id)), timeout=30, what="its log line")
        listed = engine.list({LABEL_ENDPOINT: f"ep-{RUN_ID}"})
        assert [item.replica_id for item in listed] == [info.replica_id]
        assert engine.inspect(info.replica_id).labels[LABEL_ROUTE] == spec.name
        stats = engine.stats(info.replica_id)
        assert 0 < stats.mem_bytes <= 128 << 20 and stats.mem_limit_bytes == 128 << 20

        # Its task killed: Swarm does not restart it, the engine reports the exit.
        task = service.tasks()[0]
        home_volumes = [
            m["Name"]
            for m in swarm_client.api.inspect_container(task["Status"]["ContainerStatus"]["ContainerID"])["Mounts"]
            if m["Destination"] == "/home/work"
        ]
        assert len(home_volumes) == 1
        swarm_client.containers.get(task["Status"]["ContainerStatus"]["ContainerID"]).kill()
        ended = wait_for(
            lambda: (i := engine.inspect(info.replica_id)).state is ReplicaState.EXITED and i,
            timeout=30,
            what="the engine reports the exit",
        )
        assert ended.exit_code == 137 and "SIGKILL" in ended.error
        assert len(service.tasks()) == 1  # restart policy none: no second task
    finally:
        engine.stop(info.replica_id)
    assert swarm_client.services.list(filters={"label": f"{LABEL_ROUTE}={spec.name}"}) == []
    assert swarm_client.containers.list(all=True, filters={"label": f"{LABEL_ROUTE}={spec.name}"}) == []
    assert engine.list({LABEL_ENDPOINT: f"ep-{RUN_ID}"}) == []
    # The home volume (a tmpfs) went with the task's container.
    assert [v for v in home_volumes if swarm_client.volumes.list(filters={"name": v})] == []
    with pytest.raises(ReplicaNotFound):
        engine.inspect(info.replica_id)
    engine.stop(info.replica_id)  # idempotent


@needs_docker
def test_missing_image_is_reported(engine: SwarmEngine, swarm_client: Any) -> None:
    with pytest.raises(ImageNotFound, match=r"modelserve/not-built-anywhere:0\.0 is not on this node"):
        engine.start(make_spec(image="modelserve/not-built-anywhere:0.0"))
    assert swarm_client.services.list(filters={"label": f"{TEST_LABEL}={RUN_ID}"}) == []


@needs_docker
def test_cluster_members_reach_each_other_by_name_on_their_own_overlay(
    engine: SwarmEngine, swarm_client: Any, model_folder: Path
) -> None:
    key = f"mstest-{RUN_ID}"
    hosts = ("main1", "sub1")
    started = []
    try:
        for host in hosts:
            spec = make_spec(
                model_folder,
                name=f"{key}-{host}",
                labels={LABEL_ROUTE: key, LABEL_ROLE: host[:-1], TEST_LABEL: RUN_ID},
                cluster=ClusterPeering(key=key, host=host, hosts=hosts),
                env={"MODEL_NAME": "tiny", "BACKENDAI_CLUSTER_HOST": host},
            )
            started.append(engine.start(spec))
        network = swarm_client.networks.get(f"ms-swarm-cluster-{key}")
        assert network.attrs["Driver"] == "overlay" and network.attrs["Attachable"] is True
        sub = started[1]
        # sub1 asks main1 by its host name, over the cluster's overlay network.
        body = wait_for(lambda: http_get(sub.host, sub.port, "/peer"), timeout=30, what="sub1 reaches main1")
        assert json.loads(body)["host"] == "main1"
    finally:
        for info in started:
            engine.stop(info.replica_id)
    assert swarm_client.services.list(filters={"label": f"{LABEL_ROUTE}={key}"}) == []
    assert swarm_client.networks.list(names=[f"ms-swarm-cluster-{key}"]) == []


@needs_docker
def test_the_node_makes_a_swarm_engine_from_its_settings(swarm_client: Any, settings: Any, tmp_path: Path) -> None:
    settings.ENGINE_STATE_DIR = tmp_path
    settings.SWARM_PUBLISH_MODE = "host"
    settings.SWARM_NODE = "some-host"
    made = node_engine._make_engine("swarm")
    assert isinstance(made, SwarmEngine)
    assert made.publish_mode == "host" and made.placement_node == "some-host"
    assert made.installation == settings.REDIS_PREFIX and made.state_dir == tmp_path / "swarm"


class DrainedNodes:
    """The real client, but every Swarm node reads as drained: a one-node swarm can not drain its
    only node without stopping every other test's services (and a lost node can not be made at all)."""

    def __init__(self, client: Any, availability: str = "drain", state: str = "ready") -> None:
        self._client, self.availability, self.state = client, availability, state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    @property
    def nodes(self) -> Any:
        outer = self

        class Nodes:
            def get(self, node_id: str) -> Any:
                node = outer._client.nodes.get(node_id)
                node.attrs["Spec"]["Availability"] = outer.availability
                node.attrs["Status"]["State"] = outer.state
                return node

        return Nodes()


@needs_docker
@pytest.mark.parametrize(
    ("availability", "state", "sentence"),
    [("drain", "ready", "was drained: Swarm stops its tasks there"), ("active", "down", "is down: its task is lost")],
)
def test_a_task_on_a_drained_or_lost_swarm_node_reads_as_exited(
    engine: SwarmEngine,
    swarm_client: Any,
    model_folder: Path,
    tmp_path: Path,
    availability: str,
    state: str,
    sentence: str,
) -> None:
    """What the node's sync reads (list, inspect): the replica has ended, so the platform replaces it."""
    info = engine.start(make_spec(model_folder))
    try:
        seen = SwarmEngine(
            client_factory=lambda **_: DrainedNodes(docker.from_env(timeout=30), availability, state),
            state_dir=tmp_path / "state",
        )
        ended = seen.inspect(info.replica_id)
        assert ended.state is ReplicaState.EXITED and sentence in ended.error and ended.port == 0
        listed = seen.list({LABEL_ENDPOINT: f"ep-{RUN_ID}"})
        assert [(i.replica_id, i.state) for i in listed] == [(info.replica_id, ReplicaState.EXITED)]
        assert engine.inspect(info.replica_id).state is ReplicaState.RUNNING  # the real node is fine
    finally:
        engine.stop(info.replica_id)
