"""Cluster mode's pure parts (S4.1): each member's environment and where the members go."""

from __future__ import annotations

import pytest

from serving.core import cluster
from serving.core.cluster import MemberName, NodeFree, member_names, place

GIB = float(1024**3)
REQUEST = {"cpu": 1.0, "mem": GIB}


def test_member_names_are_main_then_subs() -> None:
    assert [n.host for n in member_names(3)] == ["main1", "sub1", "sub2"]
    assert [n.host for n in member_names(1)] == ["main1"]
    with pytest.raises(ValueError):
        member_names(0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, MemberName("main", 1)),
        ("", MemberName("main", 1)),
        ("main", MemberName("main", 1)),
        ("Main1", MemberName("main", 1)),
        ("sub1", MemberName("sub", 1)),
        (" sub12 ", MemberName("sub", 12)),
    ],
)
def test_a_member_is_named_by_its_host_name(raw: str | None, expected: MemberName) -> None:
    assert cluster.parse_member(raw) == expected


@pytest.mark.parametrize("raw", ["main2", "sub0", "sub", "sub-1", "worker1", "sub1000", "sub1; rm", "x" * 500])
def test_anything_else_is_refused_with_what_is_accepted(raw: str) -> None:
    with pytest.raises(ValueError, match=r"main1, or sub1, sub2") as caught:
        cluster.parse_member(raw)
    assert len(str(caught.value)) < 200


def test_environment_of_every_member_of_a_cluster_of_three() -> None:
    main = cluster.cluster_env(3, MemberName("main", 1))
    assert main == {
        "BACKENDAI_CLUSTER_SIZE": "3",
        "BACKENDAI_CLUSTER_ROLE": "main",
        "BACKENDAI_CLUSTER_IDX": "1",
        "BACKENDAI_CLUSTER_HOST": "main1",
        "BACKENDAI_CLUSTER_HOSTS": "main1,sub1,sub2",
        "BACKENDAI_CLUSTER_REPLICAS": "main:1,sub:2",
    }
    sub2 = cluster.cluster_env(3, MemberName("sub", 2), {"main1": "10.0.0.2:8000"})
    assert sub2["BACKENDAI_CLUSTER_ROLE"] == "sub"
    assert sub2["BACKENDAI_CLUSTER_IDX"] == "2"
    assert sub2["BACKENDAI_CLUSTER_HOST"] == "sub2"
    assert sub2["BACKENDAI_CLUSTER_HOSTS"] == "main1,sub1,sub2"
    assert sub2["BACKENDAI_CLUSTER_REPLICAS"] == "main:1,sub:2"
    assert sub2["BACKENDAI_CLUSTER_MAIN_ADDR"] == "10.0.0.2:8000"
    assert sub2["BACKENDAI_CLUSTER_ADDRS"] == "main1=10.0.0.2:8000"


def test_a_member_is_not_listed_among_its_own_peers_and_a_plain_replica_is_a_cluster_of_one() -> None:
    main = cluster.cluster_env(2, MemberName("main", 1), {"main1": "10.0.0.2:8000"})
    assert "BACKENDAI_CLUSTER_ADDRS" not in main and "BACKENDAI_CLUSTER_MAIN_ADDR" not in main
    single = cluster.cluster_env(1, MemberName("main", 1))
    assert single["BACKENDAI_CLUSTER_HOSTS"] == "main1"
    assert single["BACKENDAI_CLUSTER_REPLICAS"] == "main:1"
    with pytest.raises(ValueError):
        cluster.cluster_env(2, MemberName("sub", 2))


def test_multi_node_puts_each_member_on_a_distinct_node_in_preference_order() -> None:
    nodes = [NodeFree("b", {"cpu": 4.0, "mem": 8 * GIB}), NodeFree("a", {"cpu": 2.0, "mem": 8 * GIB})]
    assert place(REQUEST, 2, True, nodes).nodes == ("b", "a")
    # A node without room is skipped, not doubled up.
    nodes = [NodeFree("full", {"cpu": 0.5, "mem": 8 * GIB}), *nodes]
    assert place(REQUEST, 2, True, nodes).nodes == ("b", "a")


def test_multi_node_with_too_few_nodes_says_what_was_asked_and_what_is_free() -> None:
    nodes = [NodeFree("a", {"cpu": 8.0, "mem": 8 * GIB}), NodeFree("b", {"cpu": 0.5, "mem": 8 * GIB})]
    result = place(REQUEST, 2, True, nodes)
    assert result.nodes == ()
    # Node a could hold both, but multi-node never packs two members on one node.
    assert "cluster size 2 needs 2 distinct nodes" in result.reason
    assert "cpu 1" in result.reason and "only 1 has that" in result.reason
    assert "node a: cpu 8" in result.reason and "node b: cpu 0.5" in result.reason
    assert "single-node cluster mode" in result.reason


def test_single_node_puts_every_member_on_one_node_with_room_for_all() -> None:
    nodes = [NodeFree("small", {"cpu": 1.5, "mem": 8 * GIB}), NodeFree("big", {"cpu": 3.0, "mem": 8 * GIB})]
    assert place(REQUEST, 3, False, nodes).nodes == ("big", "big", "big")
    result = place(REQUEST, 4, False, nodes)
    assert result.nodes == () and "cluster size 4 needs cpu 4" in result.reason and "one node" in result.reason


def test_a_plain_replica_that_fits_nowhere_says_what_it_asks_and_what_is_free() -> None:
    """The sentence a user reads on the service page and in `modelserve ... --wait` (issue: newuser)."""
    nodes = [NodeFree("local", {"cpu": 0.0, "mem": 8 * GIB})]
    result = place(REQUEST, 1, False, nodes)
    assert result.nodes == ()
    assert result.reason.startswith("Not enough resources: one replica asks for cpu 1, mem 1.0 GiB, ")
    assert "but no node has that much free (free now: node local: cpu 0, mem 8.0 GiB)." in result.reason
    assert result.reason.endswith("Lower the replica's resources, reduce replicas, or add a node.")
