"""A replica's Swarm service arguments (serving/node/engines/swarm/services.py) and a Swarm node's
GPUs as a device inventory (hardening.py): what depends on the manager's API version and on the
generic resources, without a swarm (tests/integration/test_engine_swarm.py runs them for real)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.node.engines.base import EngineError, ReplicaSpec
from serving.node.engines.swarm.hardening import gpu_inventory
from serving.node.engines.swarm.networks import operator_command, options
from serving.node.engines.swarm.services import create_kwargs, version_at_least


def kwargs(spec: ReplicaSpec, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "uid": 65534,
        "gid": 65534,
        "publish_mode": "host",
        "placement_node": "host-a",
        "network": "ms-swarm-replicas",
        "stop_grace": 2.0,
    }
    values.update(overrides)
    return create_kwargs(spec, [], {}, None, **values)


def spec(**overrides: Any) -> ReplicaSpec:
    values: dict[str, Any] = {"name": "r1", "image": "img", "command": ("python3", "s.py"), "port": 8000}
    values.update(overrides)
    return ReplicaSpec(**values)


def test_pids_and_no_new_privileges_go_on_the_service_when_asked() -> None:
    made = kwargs(spec(cpu=0.5, mem_bytes=1 << 30), pids_limit=512, no_new_privileges=True)
    assert made["resources"] == {
        "Limits": {"NanoCPUs": 500_000_000, "MemoryBytes": 1 << 30, "Pids": 512},
        "Reservations": {"NanoCPUs": 500_000_000, "MemoryBytes": 1 << 30},
    }
    assert made["privileges"]["NoNewPrivileges"] is True
    bare = kwargs(spec(), pids_limit=None, no_new_privileges=False)  # an older manager
    assert "Pids" not in bare["resources"]["Limits"] and bare["privileges"] is None


def test_gpus_are_whole_generic_resources() -> None:
    made = kwargs(spec(accelerators={"cuda.shares": 2.0}), gpu_kind="gpu")
    assert made["resources"]["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "gpu", "Value": 2}}
    ]
    assert "MODELSERVE_CUDA_SHARE=1" in made["env"]
    assert not any(item.startswith("CUDA_VISIBLE_DEVICES=") for item in made["env"])  # Swarm picks them
    for shares in (0.5, 1.5):
        with pytest.raises(EngineError, match=f"cuda.shares {shares:g}, but Swarm hands out whole GPUs"):
            kwargs(spec(accelerators={"cuda.shares": shares}))


@pytest.mark.parametrize(
    ("version", "least", "expected"),
    [
        ("1.41", "1.41", True),
        ("1.43", "1.44", False),
        ("1.44", "1.44", True),
        ("1.100", "1.44", True),
        ("x", "1.4", False),
    ],
)
def test_api_versions_compare_as_numbers(version: str, least: str, expected: bool) -> None:
    assert version_at_least(version, least) is expected


def test_a_swarm_nodes_generic_resources_are_its_devices() -> None:
    resources = [
        {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-b"}},
        {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-a"}},
        {"NamedResourceSpec": {"Kind": "FPGA", "Value": "f0"}},
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}},
    ]
    assert [(d["id"], d.get("uuid")) for d in gpu_inventory(resources, "NVIDIA-GPU")] == [
        ("cuda:0", "GPU-a"),
        ("cuda:1", "GPU-b"),
        ("cuda:2", None),
    ]
    assert gpu_inventory(resources, "AMD-GPU") == []


def test_the_replica_bridge_has_icc_off_and_a_known_name_and_operators_can_make_it_elsewhere() -> None:
    made = options("ms-swarm-replicas-prod")
    assert made["com.docker.network.bridge.enable_icc"] == "false"
    assert made["com.docker.network.bridge.name"].startswith("msr")
    command = operator_command("ms-swarm-replicas-prod")
    assert command.startswith("docker network create --config-only --opt com.docker.network.bridge.enable_icc=false")
    assert command.endswith(" ms-swarm-replicas-prod-config")
