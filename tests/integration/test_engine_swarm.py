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
import time
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

# What a replica can do: its no_new_privs bit, how many children it can have, whom it can reach.
PROBE = r"""
import http.server, json, os, socket, subprocess, urllib.parse

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()

def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(bytes.fromhex(fields[2])[::-1])

def connect(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((gateway() if host == "GATEWAY" else host, int(port)), timeout=2).close()
        return "connected"
    except OSError as exc:
        return "failed: %s" % (exc.strerror or exc)

def spawn(count):
    children, error = [], ""
    try:
        for _ in range(count):
            children.append(subprocess.Popen(["sleep", "30"]))
    except OSError as exc:
        error = exc.strerror or str(exc)
    for child in children:
        child.kill()
        child.wait()
    return {"spawned": len(children), "error": error}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        facts = {
            "no_new_privs": status("NoNewPrivs"),
            "address": socket.gethostbyname(socket.gethostname()),
            "gpu": {k: v for k, v in os.environ.items() if k.startswith("DOCKER_RESOURCE_")},
            "connect": {t: connect(t) for t in query.get("connect", [])},
            "spawn": spawn(int(query["spawn"][0])) if "spawn" in query else None,
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
    for network in client.networks.list(names=[replica_network("")]):
        if network.name.endswith("-config"):
            continue  # removed with the swarm network made from it
        owner = SwarmEngine(client_factory=lambda **_: client, replica_network=network.name)
        # A service removed a moment ago may still be listed: retry until it is not.
        wait_for(owner.remove_replica_network, timeout=30, what=f"network {network.name} removed")
    client.close()


def replica_network(suffix: str) -> str:
    """This run's networks of plain replicas (swept by the fixture): every engine of a test names one."""
    return f"ms-swarm-replicas-mstest-{RUN_ID}{suffix}"


def _try_remove(network: Any) -> bool:
    try:
        network.remove()
    except Exception as exc:
        return "not found" in str(exc).lower()
    return True


@pytest.fixture
def engine(swarm_client: Any, tmp_path: Path) -> SwarmEngine:
    return SwarmEngine(state_dir=tmp_path / "state", stop_grace=2.0, replica_network=replica_network(""))


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


def test_gpu_fractions_other_accelerators_and_the_docker_socket_are_refused(tmp_path: Path) -> None:
    engine = SwarmEngine(client_factory=lambda **_: pytest.fail("must not reach Docker"), state_dir=tmp_path)
    with pytest.raises(EngineError, match="Docker socket"):
        engine.start(make_spec(mounts=(Mount("/run", "/host", read_only=True),)))
    with pytest.raises(EngineError, match=r"asks for cuda.shares 0.5, but Swarm hands out whole GPUs"):
        engine.start(make_spec(accelerators={"cuda.shares": 0.5}))
    with pytest.raises(EngineError, match=r"can not provide rocm.device: only NVIDIA GPUs"):
        engine.start(make_spec(accelerators={"rocm.device": 1}))


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


def probe(info: Any, query: str = "") -> dict[str, Any]:
    body = wait_for(lambda: http_get(info.host, info.port, "/?" + query), timeout=30, what="the probe answers")
    return dict(json.loads(body))


@needs_docker
def test_a_replica_has_no_new_privs_and_a_pids_limit(swarm_client: Any, model_folder: Path, tmp_path: Path) -> None:
    """As on the Docker engine: the server can not gain privileges (on this 1.41 manager the
    bootstrap runner sets the bit; from 1.44 the service does), and can not fork without bound."""
    (model_folder / "probe.py").write_text(PROBE)
    engine = SwarmEngine(
        state_dir=tmp_path / "state", stop_grace=1.0, pids_limit=24, replica_network=replica_network("")
    )
    info = engine.start(make_spec(model_folder, command=("python3", "/models/probe.py")))
    try:
        template = swarm_client.services.get(info.replica_id).attrs["Spec"]["TaskTemplate"]
        assert template["Resources"]["Limits"]["Pids"] == 24
        api = swarm_client.api.api_version
        on_service = tuple(int(p) for p in api.split(".")) >= (1, 44)
        privileges = template["ContainerSpec"].get("Privileges") or {}
        assert privileges.get("NoNewPrivileges", False) is on_service, (api, privileges)
        seen = probe(info)
        assert seen["no_new_privs"] == "1"
        if not on_service:
            assert "[prestart] no_new_privs set: nothing started from here gains privileges" in list(
                engine.logs(info.replica_id)
            )
        assert probe(info, "spawn=8")["spawn"] == {"spawned": 8, "error": ""}  # under the limit: fine
        beyond = probe(info, "spawn=40")["spawn"]
        assert beyond["spawned"] < 24 and beyond["error"] == "Resource temporarily unavailable", beyond
    finally:
        engine.stop(info.replica_id)


@needs_docker
def test_plain_replicas_do_not_reach_each_other_and_egress_deny_keeps_them_off_the_host(
    swarm_client: Any, model_folder: Path, tmp_path: Path
) -> None:
    """Plain replicas share a swarm-scoped bridge with inter-container traffic off; with egress
    denied its bridge's rules drop what they open to the host (here: a server on 0.0.0.0, through
    the bridge's gateway address), while the proxy still reaches them on their published ports."""
    import http.server
    import threading

    (model_folder / "probe.py").write_text(PROBE)
    host_server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=host_server.serve_forever, daemon=True).start()
    host_target = f"GATEWAY:{host_server.server_address[1]}"
    allow = SwarmEngine(state_dir=tmp_path / "allow", stop_grace=1.0, replica_network=replica_network("-allow"))
    deny = SwarmEngine(
        state_dir=tmp_path / "deny", stop_grace=1.0, egress="deny", replica_network=replica_network("-deny")
    )
    started: list[tuple[SwarmEngine, Any]] = []
    try:
        for engine in (allow, allow, deny):
            started.append((engine, engine.start(make_spec(model_folder, command=("python3", "/models/probe.py")))))
        (_, first), (_, second), (_, denied) = started
        network = swarm_client.networks.get(replica_network("-allow"))
        assert network.attrs["Scope"] == "swarm" and network.attrs["ConfigFrom"]["Network"].endswith("-config")
        other = probe(second)["address"]
        seen = probe(first, f"connect={other}:8000&connect={host_target}")
        assert seen["connect"][f"{other}:8000"].startswith("failed"), seen  # no traffic between replicas
        assert seen["connect"][host_target] == "connected", seen  # egress allowed: the host answers
        seen = probe(denied, f"connect={host_target}")
        assert seen["connect"][host_target].startswith("failed"), seen
    finally:
        for engine, info in started:
            engine.stop(info.replica_id)
        host_server.shutdown()
    assert deny.remove_replica_network() and allow.remove_replica_network()
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=False).stdout
    assert deny.replica_network.bridge not in rules  # its rules went with it
    assert swarm_client.networks.list(names=[replica_network("-deny")]) == []


def advertised_gpus(client: Any) -> int:
    node_id = client.info()["Swarm"]["NodeID"]
    resources = client.nodes.get(node_id).attrs["Description"]["Resources"].get("GenericResources") or []
    return sum(
        1 if "NamedResourceSpec" in r else int(r["DiscreteResourceSpec"]["Value"])
        for r in resources
        if (r.get("NamedResourceSpec") or r.get("DiscreteResourceSpec") or {}).get("Kind") == "NVIDIA-GPU"
    )


@needs_docker
def test_gpus_are_swarm_generic_resources(engine: SwarmEngine, swarm_client: Any, model_folder: Path) -> None:
    """A replica asking for a GPU reserves one NVIDIA-GPU and Swarm names the one it got; asking for
    more than the node advertises is an error naming the resource, at once; the node's devices are
    what its Swarm node advertises."""
    count = advertised_gpus(swarm_client)
    if count == 0 or count > 2:
        pytest.skip(
            f"the swarm node advertises {count} NVIDIA-GPU generic resources; this test wants 1 or 2 "
            '(/etc/docker/daemon.json: {"node-generic-resources": ["NVIDIA-GPU=GPU-fake-0", ...]}, as .ci/run writes)'
        )
    inventory = engine.advertised_devices()
    assert [d["id"] for d in inventory] == [f"cuda:{i}" for i in range(count)]
    (model_folder / "probe.py").write_text(PROBE)
    info = engine.start(
        make_spec(model_folder, command=("python3", "/models/probe.py"), accelerators={"cuda.shares": 1})
    )
    try:
        reservations = swarm_client.services.get(info.replica_id).attrs["Spec"]["TaskTemplate"]["Resources"][
            "Reservations"
        ]
        assert reservations["GenericResources"] == [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]
        gpu = probe(info)["gpu"]
        assert list(gpu) == ["DOCKER_RESOURCE_NVIDIA-GPU"]
        assert gpu["DOCKER_RESOURCE_NVIDIA-GPU"] in {d["uuid"] for d in inventory}
    finally:
        engine.stop(info.replica_id)
    began = time.monotonic()
    with pytest.raises(EngineError, match=r"asks for 3 NVIDIA-GPU \(a Swarm generic resource\) and the Swarm node"):
        engine.start(make_spec(model_folder, accelerators={"cuda.shares": 3}))
    assert time.monotonic() - began < 10  # an error at once, not the start timeout
    assert swarm_client.services.list(filters={"label": f"{TEST_LABEL}={RUN_ID}"}) == []


@needs_docker
def test_a_swarm_node_worker_advertises_its_swarm_nodes_gpus(
    engine: SwarmEngine, swarm_client: Any, settings: Any
) -> None:
    """Not nvidia-smi on the worker's host: the Swarm node's generic resources, unless
    NODE_ACCELERATORS lists devices."""
    from serving.node import agent

    settings.NODE_ACCELERATORS = ""
    node_engine.set_engine(engine)
    try:
        inventory = agent.node_devices()
        assert inventory == engine.advertised_devices()
        assert len(inventory) == advertised_gpus(swarm_client)
        assert agent.node_capacity(inventory).get("cuda.shares", 0.0) == len(inventory)
        settings.NODE_ACCELERATORS = "cuda:0"
        assert agent.node_devices() == [{"id": "cuda:0"}]
    finally:
        node_engine.set_engine(None)
