"""GPUs are allocated by device, simulated with a node of fake devices: what the heartbeat stores,
what the scheduler assigns (in the placement's transaction), what the Docker engine would be given,
what the local engine's sandbox shows, and what the API and the admin say."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from serving.control import lifecycle
from serving.core import devices
from serving.models import Endpoint, Node, Route
from serving.node import agent, replicas
from serving.node import engine as node_engine
from serving.node.engines.base import EngineError, Mount, ReplicaSpec
from serving.node.engines.docker import containers
from serving.node.engines.local import sandbox
from serving.node.engines.local.engine import LocalEngine
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import wait_for

pytestmark = pytest.mark.django_db

GIB = float(1 << 30)


def gpu_node(name: str = "gpu", ids: tuple[str, ...] = ("cuda:0", "cuda:1")) -> Node:
    return Node.objects.create(
        name=name,
        capacity={"cpu": 16.0, "mem": 64 * GIB, "cuda.shares": float(len(ids))},
        devices=[{"id": d} for d in ids],
        heartbeat_at=timezone.now(),
    )


def service(personas: dict[str, Any], name: str, shares: float, replicas: int, **extra: Any) -> Endpoint:
    return Endpoint.objects.create(
        name=name,
        owner=personas["owner"],
        project=personas["project"],
        desired_replicas=replicas,
        resources={"cpu": 1.0, "mem": GIB, "cuda.shares": shares},
        **extra,
    )


def assignments(endpoint: Endpoint) -> list[dict[str, float]]:
    routes = Route.objects.filter(endpoint=endpoint, status=Route.Status.PROVISIONING).order_by("created_at")
    return [r.devices for r in routes]


# --- the node's inventory -------------------------------------------------------------------------


@pytest.fixture
def local_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalEngine:
    """The node worker's engine, a real local one (the heartbeat hands it the node addresses)."""
    engine = LocalEngine(tmp_path / "state", netns_prefix="mg")
    monkeypatch.setattr(node_engine, "_engine", engine)
    return engine


def test_heartbeat_stores_the_listed_devices_and_their_total(settings: Any, local_engine: LocalEngine) -> None:
    settings.NODE_NAME = "gpu-hb"
    settings.NODE_ACCELERATORS = "cuda:0,cuda:1"
    node = agent.heartbeat()
    assert node.devices == [{"id": "cuda:0"}, {"id": "cuda:1"}]
    assert node.capacity["cuda.shares"] == 2.0
    # Today's syntax keeps working: N shares read as N devices.
    settings.NODE_ACCELERATORS = "cuda.shares=3"
    node = agent.heartbeat()
    assert devices.inventory_ids(node.devices) == ["cuda:0", "cuda:1", "cuda:2"]
    assert node.capacity["cuda.shares"] == 3.0
    settings.NODE_ACCELERATORS = "cuda.shares=0.5"
    with pytest.raises(devices.DeviceError, match=r"NODE_ACCELERATORS=cuda:0,cuda:1"):
        agent.heartbeat()


# --- scheduling -----------------------------------------------------------------------------------


def test_fractions_pack_two_per_device_and_the_fifth_fails_naming_the_devices(personas: dict[str, Any]) -> None:
    gpu_node()
    endpoint = service(personas, "halves", 0.5, 4)
    lifecycle.reconcile(str(endpoint.pk))
    assert sorted(tuple(a.items()) for a in assignments(endpoint)) == [
        (("cuda:0", 0.5),),
        (("cuda:0", 0.5),),
        (("cuda:1", 0.5),),
        (("cuda:1", 0.5),),
    ]
    Endpoint.objects.filter(pk=endpoint.pk).update(desired_replicas=5)
    lifecycle.reconcile(str(endpoint.pk))
    failed = Route.objects.get(endpoint=endpoint, status=Route.Status.FAILED_TO_START)
    assert "cuda:0 0 free, cuda:1 0 free" in failed.error["message"]
    assert failed.devices == {}


def test_a_whole_ask_gets_a_device_no_fraction_holds_even_across_transactions(personas: dict[str, Any]) -> None:
    """Two reconciles, each its own transaction: the second reads what the first stored on its
    route (Route.devices), not only what its own pool holds."""
    gpu_node()
    quarter = service(personas, "quarter", 0.25, 1)
    whole = service(personas, "whole", 1, 1)
    lifecycle.reconcile(str(quarter.pk))
    lifecycle.reconcile(str(whole.pk))
    assert assignments(quarter) == [{"cuda:0": 0.25}]
    assert assignments(whole) == [{"cuda:1": 1.0}]
    # The slot sum still has 0.75 free, but no whole device is: a second whole ask fails.
    other = service(personas, "whole-2", 1, 1)
    lifecycle.reconcile(str(other.pk))
    failed = Route.objects.get(endpoint=other)
    assert failed.status == Route.Status.FAILED_TO_START
    assert "cuda:0 0.75 free, cuda:1 0 free" in failed.error["message"]
    # A route gone (stopped and forgotten) gives its device back.
    Endpoint.objects.filter(pk=whole.pk).update(desired_replicas=0)
    Route.objects.filter(endpoint=whole).delete()
    Route.objects.filter(endpoint=other).delete()
    Endpoint.objects.filter(pk=other.pk).update(retries=0)
    lifecycle.reconcile(str(other.pk), now=timezone.now() + timedelta(seconds=1))
    assert assignments(other) == [{"cuda:1": 1.0}]


def test_one_batch_places_many_services_without_sharing_a_whole_device(personas: dict[str, Any]) -> None:
    gpu_node("a", ("cuda:0", "cuda:1"))
    gpu_node("b", ("cuda:0", "cuda:1"))
    endpoints = [service(personas, f"w{i}", 1, 1) for i in range(4)]
    lifecycle.reconcile_many([e.pk for e in endpoints])
    held = {(r.node.name, d) for r in Route.objects.filter(status=Route.Status.PROVISIONING) for d in r.devices}
    assert held == {("a", "cuda:0"), ("a", "cuda:1"), ("b", "cuda:0"), ("b", "cuda:1")}


def test_cluster_members_get_their_own_devices(personas: dict[str, Any]) -> None:
    gpu_node()
    endpoint = service(personas, "tp", 1, 1, cluster_size=2)
    lifecycle.reconcile(str(endpoint.pk))
    route = Route.objects.get(endpoint=endpoint)
    [member] = route.members.all()
    assert (route.devices, member.devices) == ({"cuda:0": 1.0}, {"cuda:1": 1.0})


# --- the replica's spec and what the engines make of it --------------------------------------------


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    made = FolderFactory(owner=personas["owner"], name="gpu-model", usage_mode="model", files={"x": "x"})
    (made.host_path / "model-definition.yaml").write_text(SIMPLE_DEFINITION)
    return made


def test_the_spec_carries_the_devices_the_share_and_shm(personas: dict[str, Any], folder: Folder) -> None:
    node = gpu_node()
    endpoint = service(personas, "spec", 0.5, 1, model_folder=folder)
    route = Route(endpoint=endpoint, node=node, devices={"cuda:1": 0.5}, resources={"mem": 8 * GIB, "cuda.shares": 0.5})
    spec, _ = replicas.build_spec(route)
    assert spec.devices == {"cuda:1": 0.5}
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "1" and spec.env[devices.SHARE_ENV] == "0.5"
    assert spec.shm_bytes == 2 << 30
    assert spec.accelerators == {"cuda.shares": 0.5}
    # An asked shm wins; a user's CUDA_VISIBLE_DEVICES can not point at another replica's device.
    Endpoint.objects.filter(pk=endpoint.pk).update(environ={"CUDA_VISIBLE_DEVICES": "0"})
    endpoint.refresh_from_db()
    route = Route(endpoint=endpoint, node=node, devices={"cuda:1": 0.5}, resources={"mem": GIB, "shm": 3 * GIB})
    spec, _ = replicas.build_spec(route)
    assert spec.shm_bytes == 3 << 30 and spec.env["CUDA_VISIBLE_DEVICES"] == "1"


def gpu_spec(**extra: Any) -> ReplicaSpec:
    values: dict[str, Any] = {
        "name": "ms-gpu",
        "image": "unused",
        "command": ("python3", "-c", "pass"),
        "port": 8000,
        "accelerators": {"cuda.shares": 0.5},
        "devices": {"cuda:1": 0.5},
        "shm_bytes": 1 << 30,
    }
    values.update(extra)
    return ReplicaSpec(**values)


def test_docker_is_given_device_ids_never_a_count() -> None:
    spec = gpu_spec(env={"CUDA_VISIBLE_DEVICES": "1"})
    [request] = containers.device_requests(spec, gpus=True)
    assert request["DeviceIDs"] == ["1"] and not request["Count"]
    kwargs = containers.create_kwargs(
        spec, [], {}, None, [request], uid=1000, gid=1000, publish_host="127.0.0.1", pids_limit=64, cap_add=()
    )
    assert kwargs["device_requests"] == [request]
    assert kwargs["shm_size"] == 1 << 30
    # The NVIDIA runtime numbers the container's devices from 0.
    assert kwargs["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert kwargs["environment"][devices.SHARE_ENV] == "0.5"
    two = containers.device_requests(
        gpu_spec(accelerators={"cuda.shares": 2}, devices={"cuda:3": 1, "cuda:1": 1}), True
    )
    assert two[0]["DeviceIDs"] == ["1", "3"]
    with pytest.raises(EngineError, match="assigned no GPU device"):
        containers.device_requests(gpu_spec(devices={}), gpus=True)
    assert containers.device_requests(gpu_spec(accelerators={}, devices={}), gpus=False) == []


@pytest.fixture
def fake_dev(tmp_path: Path) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for node in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (dev / node).write_text(node)
    return dev


def test_the_sandbox_binds_only_the_assigned_device_nodes(fake_dev: Path) -> None:
    args = sandbox.device_args({"cuda:1": 0.5}, str(fake_dev))
    binds = [args[i + 1 : i + 3] for i, a in enumerate(args) if a == "--dev-bind"]
    assert binds == [
        [str(fake_dev / "nvidia1"), "/dev/nvidia1"],
        [str(fake_dev / "nvidiactl"), "/dev/nvidiactl"],
        [str(fake_dev / "nvidia-uvm"), "/dev/nvidia-uvm"],
    ]
    assert sandbox.device_args({}, str(fake_dev)) == []
    with pytest.raises(EngineError, match=r"no .*nvidia7"):
        sandbox.device_args({"cuda:7": 1.0}, str(fake_dev))


@pytest.mark.skipif(not LocalEngine(Path("/nonexistent")).available(), reason="the local engine can not run here")
def test_a_local_replica_sees_only_its_devices_and_its_shm(tmp_path: Path, fake_dev: Path) -> None:
    """A real sandbox: /dev lists the assigned nvidia1 (and the driver's shared nodes) only, and
    /dev/shm has the size asked."""
    model = tmp_path / "model"
    model.mkdir()
    engine = LocalEngine(tmp_path / "state", netns_prefix="mg", dev_root=str(fake_dev))
    script = (
        "import os; print('DEV', sorted(n for n in os.listdir('/dev') if n.startswith('nvidia'))); "
        "s = os.statvfs('/dev/shm'); print('SHM', s.f_blocks * s.f_frsize); "
        "print('CVD', os.environ.get('CUDA_VISIBLE_DEVICES')); print('READ', open('/dev/nvidia1').read()); "
        "import time; time.sleep(60)"
    )
    spec = gpu_spec(
        command=("python3", "-c", script),
        mounts=(Mount(str(model), "/models", read_only=True),),
        mem_bytes=256 << 20,
        shm_bytes=32 << 20,
        env={"CUDA_VISIBLE_DEVICES": "1"},
        labels={"serving.route": "gpu"},
    )
    info = engine.start(spec)
    try:
        lines = wait_for(
            lambda: (text := "\n".join(engine.logs(info.replica_id, tail=50))) and "READ" in text and text,
            10,
            what="the replica to print its devices",
        )
    finally:
        engine.stop(info.replica_id, grace=0)
    assert "DEV ['nvidia-uvm', 'nvidia1', 'nvidiactl']" in lines
    assert f"SHM {32 << 20}" in lines
    assert "CVD 1" in lines and "READ nvidia1" in lines


# --- API and admin --------------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "status"), [("owner", 200), ("teammate", 200), ("stranger", 404), ("admin", 200)])
def test_api_shows_every_replicas_devices_and_the_nodes_inventory(
    api: Any, personas: dict[str, Any], who: str, status: int
) -> None:
    gpu_node()
    endpoint = service(personas, "shown", 1, 1, cluster_size=2)
    lifecycle.reconcile(str(endpoint.pk))
    response = api(who).get(f"/api/v1/services/{endpoint.pk}/")
    assert response.status_code == status
    if status == 200:
        [route] = response.json()["routes"]
        assert route["devices"] == {"cuda:0": 1.0}
        assert [m["devices"] for m in route["members"]] == [{"cuda:0": 1.0}, {"cuda:1": 1.0}]
    nodes = api(who).get("/api/v1/nodes/")
    assert nodes.status_code == 200
    [node] = nodes.json()
    assert node["devices"] == [{"id": "cuda:0"}, {"id": "cuda:1"}] and node["capacity"]["cuda.shares"] == 2.0


@pytest.mark.parametrize("who", ["owner", "teammate", "stranger", "admin"])
def test_admin_shows_the_inventory_and_each_replicas_devices(browser: Any, personas: dict[str, Any], who: str) -> None:
    gpu_node()
    endpoint = service(personas, "admin-shown", 0.5, 1)
    lifecycle.reconcile(str(endpoint.pk))
    client = browser(who)
    nodes = client.get("/admin/serving/node/")
    routes = client.get("/admin/serving/route/")
    if who != "admin":
        # Only staff reach the admin: the others are sent to its login.
        assert nodes.status_code == 302 and routes.status_code == 302
        return
    assert nodes.status_code == 200 and "cuda:0, cuda:1" in nodes.content.decode()
    # The capacity as people read it (the scheduler's own words), not the JSON of bytes.
    assert "cpu 16, mem 64.0 GiB, cuda.shares 2" in nodes.content.decode()
    assert "68719476736" not in nodes.content.decode()
    assert routes.status_code == 200 and "cuda:0 0.5" in routes.content.decode()
    route = Route.objects.get(endpoint=endpoint)
    detail = client.get(f"/admin/serving/route/{route.pk}/change/")
    assert detail.status_code == 200 and "cuda:0" in detail.content.decode()


def test_a_share_above_one_that_is_not_whole_is_refused_with_a_sentence(api: Any, folder: Folder) -> None:
    body = {"name": "odd", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    response = api("owner").post("/api/v1/services/", {**body, "resources": {"cuda.shares": 1.5}}, format="json")
    assert response.status_code == 400
    assert "whole number of devices" in str(response.json()["resources"])
