"""GPU device allocation (serving.core.devices): best fit for fractions, whole devices for whole asks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.core import cluster, devices, slots

GPUS = ["cuda:0", "cuda:1"]


def test_fractions_pack_onto_one_device_up_to_one() -> None:
    used: dict[str, float] = {}
    placed = []
    for _ in range(4):
        one = devices.assign(0.5, GPUS, used)
        assert one is not None
        placed.append(one)
        used = devices.held([used, one])
    assert placed == [{"cuda:0": 0.5}, {"cuda:0": 0.5}, {"cuda:1": 0.5}, {"cuda:1": 0.5}]
    assert devices.assign(0.5, GPUS, used) is None
    assert devices.assign(0.01, GPUS, used) is None


def test_best_fit_takes_the_fullest_device_that_holds_the_share() -> None:
    # cuda:1 has 0.3 left, cuda:0 has 0.6 left: a 0.25 goes to cuda:1, keeping cuda:0's room.
    assert devices.assign(0.25, GPUS, {"cuda:0": 0.4, "cuda:1": 0.7}) == {"cuda:1": 0.25}
    assert devices.assign(0.5, GPUS, {"cuda:0": 0.4, "cuda:1": 0.7}) == {"cuda:0": 0.5}


def test_whole_asks_get_devices_nobody_holds_anything_of() -> None:
    assert devices.assign(1, GPUS, {}) == {"cuda:0": 1.0}
    assert devices.assign(2, GPUS, {}) == {"cuda:0": 1.0, "cuda:1": 1.0}
    # A fraction on cuda:0 leaves only cuda:1 whole.
    assert devices.assign(1, GPUS, {"cuda:0": 0.25}) == {"cuda:1": 1.0}
    assert devices.assign(2, GPUS, {"cuda:0": 0.25}) is None
    assert devices.assign(3, GPUS, {}) is None


def test_no_shares_is_an_empty_assignment_even_without_devices() -> None:
    assert devices.assign(0, [], {}) == {}
    assert devices.assign(0.5, [], {}) is None


def test_a_share_above_one_must_be_whole() -> None:
    devices.check_request(2)
    devices.check_request(0.5)
    with pytest.raises(devices.DeviceError, match="whole number of devices"):
        devices.check_request(1.5)
    # An older service saved before the rule still places: whole devices, rounded up.
    assert devices.assign(1.5, GPUS, {}) == {"cuda:0": 1.0, "cuda:1": 1.0}


def test_assign_many_sees_its_own_earlier_members() -> None:
    assert devices.assign_many(1, 2, GPUS, {}) == [{"cuda:0": 1.0}, {"cuda:1": 1.0}]
    assert devices.assign_many(0.5, 3, GPUS, {}) == [{"cuda:0": 0.5}, {"cuda:0": 0.5}, {"cuda:1": 0.5}]
    assert devices.assign_many(1, 3, GPUS, {}) is None


def test_node_accelerators_syntax() -> None:
    assert devices.parse_node_accelerators("cuda:0, cuda:1") == (["cuda:0", "cuda:1"], {})
    # Before devices: cuda.shares=N reads as N devices.
    assert devices.parse_node_accelerators("cuda.shares=2") == (["cuda:0", "cuda:1"], {})
    assert devices.parse_node_accelerators("cuda:3,rocm.shares=1") == (["cuda:3"], {"rocm.shares": "1"})
    assert devices.parse_node_accelerators("") == ([], {})
    with pytest.raises(devices.DeviceError, match=r"cuda:0,cuda:1"):
        devices.parse_node_accelerators("cuda.shares=1.5")
    with pytest.raises(devices.DeviceError, match="list the devices only"):
        devices.parse_node_accelerators("cuda:0,cuda.shares=2")
    with pytest.raises(devices.DeviceError, match="not a device id"):
        devices.parse_node_accelerators("gpu0")


def test_nvidia_smi_output_becomes_an_inventory() -> None:
    text = "0, NVIDIA A100-SXM4-40GB, 40960, GPU-aaaa\n1, NVIDIA A100-SXM4-40GB, 40960, GPU-bbbb\n\nNo devices\n"
    assert devices.parse_nvidia_smi(text) == [
        {"id": "cuda:0", "name": "NVIDIA A100-SXM4-40GB", "memory": 40960 << 20, "uuid": "GPU-aaaa"},
        {"id": "cuda:1", "name": "NVIDIA A100-SXM4-40GB", "memory": 40960 << 20, "uuid": "GPU-bbbb"},
    ]
    assert devices.inventory_ids(devices.parse_nvidia_smi(text)) == ["cuda:0", "cuda:1"]


def test_replica_env_host_indices_or_renumbered() -> None:
    assert devices.replica_env({"cuda:3": 0.25}) == {"CUDA_VISIBLE_DEVICES": "3", devices.SHARE_ENV: "0.25"}
    assert devices.replica_env({"cuda:3": 1.0, "cuda:1": 1.0}, renumbered=True) == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        devices.SHARE_ENV: "1",
    }
    assert devices.replica_env({"cuda:10": 1.0, "cuda:2": 1.0})["CUDA_VISIBLE_DEVICES"] == "2,10"
    assert devices.replica_env({}) == {}


def test_shm_defaults_to_a_quarter_of_mem_and_is_no_slot() -> None:
    assert devices.default_shm(8 << 30) == 2 << 30
    assert devices.default_shm(128 << 20) == 64 << 20
    asked = slots.normalize({"cpu": 1, "mem": "8g", "shm": "4g"})
    assert asked["shm"] == float(4 << 30)
    # A node advertises no shm: it is part of the replica's memory, never a reason not to fit.
    assert slots.fits(asked, {"cpu": 2, "mem": float(16 << 30)})
    assert "shm 4.0 GiB" in slots.describe(asked)


def test_cluster_placement_assigns_devices_per_member() -> None:
    request = {"cpu": 1.0, "cuda.shares": 1.0}
    node = cluster.NodeFree("gpu", {"cpu": 8, "cuda.shares": 2}, ("cuda:0", "cuda:1"), {})
    single = cluster.place(request, 2, False, [node])
    assert single.nodes == ("gpu", "gpu") and single.devices == ({"cuda:0": 1.0}, {"cuda:1": 1.0})
    # The slot sum fits (2 shares free) but no two whole devices are free: a sentence with the devices.
    busy = cluster.NodeFree("gpu", {"cpu": 8, "cuda.shares": 2}, ("cuda:0", "cuda:1", "cuda:2"), {"cuda:0": 0.5})
    busy = cluster.NodeFree(busy.name, {"cpu": 8, "cuda.shares": 2.5}, busy.devices, {"cuda:0": 0.5, "cuda:2": 0.5})
    failed = cluster.place(request, 2, False, [busy])
    assert not failed.nodes
    assert "cuda:0 0.5 free, cuda:1 1 free, cuda:2 0.5 free" in failed.reason
    a = cluster.NodeFree("a", {"cpu": 8, "cuda.shares": 1}, ("cuda:0",), {})
    b = cluster.NodeFree("b", {"cpu": 8, "cuda.shares": 1}, ("cuda:0",), {"cuda:0": 0.5})
    c = cluster.NodeFree("c", {"cpu": 8, "cuda.shares": 1}, ("cuda:0",), {})
    multi = cluster.place({"cpu": 1.0, "cuda.shares": 0.5}, 2, True, [a, b, c])
    assert multi.nodes == ("a", "b") and multi.devices == ({"cuda:0": 0.5}, {"cuda:0": 0.5})


# --- properties -----------------------------------------------------------------------------------

share = st.one_of(st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.75]), st.integers(min_value=1, max_value=3).map(float))


@settings(max_examples=300, deadline=None)
@given(count=st.integers(min_value=0, max_value=6), asks=st.lists(share, max_size=25))
def test_no_device_is_ever_over_committed_and_whole_devices_are_exclusive(count: int, asks: list[float]) -> None:
    inventory = [f"cuda:{i}" for i in range(count)]
    used: dict[str, float] = {}
    exclusive: set[str] = set()
    for ask in asks:
        one = devices.assign(ask, inventory, used)
        if one is None:
            # Refused only when it really does not fit.
            if ask < 1:
                assert all(1.0 - used.get(d, 0.0) < ask - 1e-9 for d in inventory)
            else:
                assert sum(1 for d in inventory if used.get(d, 0.0) <= 1e-9) < ask
            continue
        assert set(one) <= set(inventory)
        assert abs(sum(one.values()) - ask) < 1e-9 if ask < 1 else len(one) == int(ask)
        assert not (set(one) & exclusive)
        if ask >= 1:
            assert all(used.get(d, 0.0) <= 1e-9 for d in one)
            exclusive |= set(one)
        used = devices.held([used, one])
        assert all(v <= 1.0 + 1e-9 for v in used.values())
