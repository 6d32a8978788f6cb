"""serving.node.engines.firewall: the pieces both engines share (ids, egress choice, iptables runner)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from serving.node.engines import firewall
from serving.node.engines.base import EngineError


def test_both_engines_and_the_settings_use_the_one_definition(tmp_path: Path) -> None:
    from django.conf import settings

    from serving.node.engines.docker import engine as docker
    from serving.node.engines.local import engine as local

    assert local.HOST_PATH is firewall.HOST_PATH and local.DEFAULT_UID == docker.DEFAULT_UID == 65534
    assert settings.SERVING_REPLICA_EGRESS in firewall.EGRESS_CHOICES
    for make in (
        lambda **kw: local.LocalEngine(tmp_path / "l", **kw),
        lambda **kw: docker.DockerEngine(state_dir=tmp_path / "d", **kw),
    ):
        with pytest.raises(EngineError, match=r"SERVING_REPLICA_EGRESS='open' is not one of allow, deny\."):
            make(egress="open")
        with pytest.raises(EngineError, match=r"gid 4294967295 is not a valid gid; set (LOCAL_ENGINE|DOCKER_REPLICA)"):
            make(gid=firewall.MAX_ID + 1)


def test_the_iptables_runner_says_which_rule_failed_and_why(tmp_path: Path) -> None:
    fake = tmp_path / "iptables"
    fake.write_text('#!/bin/sh\necho "iptables: Bad rule ($*)" >&2\nexit 1\n')
    fake.chmod(0o755)
    with pytest.raises(EngineError, match=r"The firewall rule `iptables -C INPUT -j DROP` failed: iptables: Bad rule"):
        firewall.run_iptables(str(fake), "-C", "INPUT", "-j", "DROP")
    assert firewall.run_iptables(str(fake), "-C", "INPUT", check=False).returncode == 1
    assert "-w 5 -C INPUT" in firewall.run_iptables(str(fake), "-C", "INPUT", check=False).stderr


# --- the Docker engine's rules for the nodes' addresses, against an iptables of our own ------------


class FakeIptables:
    """The filter table as a list of rules, answering -S, -C, -I and -D as iptables does."""

    def __init__(self) -> None:
        self.rules: list[list[str]] = []

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        op, rest = args[0], list(args[1:])
        if op == "-S":
            if rest:  # one chain: DOCKER-USER exists
                return subprocess.CompletedProcess(args, 0, "", "")
            lines = [" ".join(f'"{w}"' if " " in w else w for w in ["-A", *rule]) for rule in self.rules]
            return subprocess.CompletedProcess(args, 0, "\n".join(lines), "")
        if op == "-I":
            self.rules.insert(0, [rest[0], *rest[2:]])
            return subprocess.CompletedProcess(args, 0, "", "")
        found = rest in self.rules
        if op == "-D" and found:
            self.rules.remove(rest)
        return subprocess.CompletedProcess(args, 0 if found else 1, "", "")

    def addresses(self, bridge: str) -> set[str]:
        return {r[r.index("-d") + 1] for r in self.rules if "-d" in r and f"modelserve-replicas {bridge}" in r}


class FakeNetwork:
    def __init__(self, name: str, bridge: str, labels: dict[str, str]) -> None:
        self.name = name
        self.attrs = {"Options": {"com.docker.network.bridge.name": bridge}, "Labels": labels}


class FakeClient:
    def __init__(self, networks: list[FakeNetwork]) -> None:
        self.networks = self
        self._networks = networks

    def list(self, **_: object) -> list[FakeNetwork]:
        return self._networks


@pytest.fixture
def fake_firewall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeIptables:
    table = FakeIptables()
    monkeypatch.setattr(firewall, "usable_iptables", lambda binary: "iptables")
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("32768\t60999\n")
    monkeypatch.setattr(firewall, "EPHEMERAL_RANGE_FILE", range_file)
    return table


def docker_engine(tmp_path: Path, table: FakeIptables, networks: list[FakeNetwork], **kw: object) -> object:
    from serving.node.engines.docker.engine import DockerEngine

    engine = DockerEngine(
        client_factory=lambda **_: FakeClient(networks),  # type: ignore[arg-type,return-value]
        state_dir=tmp_path / "d",
        publish_host="10.0.0.5",
        **kw,  # type: ignore[arg-type]
    )
    engine.networks.rules.iptables_run = table  # type: ignore[method-assign]
    return engine


def test_a_start_in_a_worker_that_knows_no_other_node_leaves_their_rules_in_place(
    tmp_path: Path, fake_firewall: FakeIptables
) -> None:
    """A forked worker's engine was never told the other nodes' addresses: its starts (which
    guard the bridge) must not take away the rules the node agent put there for them."""
    networks = [FakeNetwork("ms-replicas-prod", "msrprod", {})]
    agent = docker_engine(tmp_path, fake_firewall, networks, installation="prod")
    agent.set_node_addresses(["10.0.0.5", "10.0.0.7", "10.0.0.9"])  # type: ignore[attr-defined]
    assert fake_firewall.addresses("msrprod") == {"10.0.0.5/32", "10.0.0.7/32", "10.0.0.9/32"}
    worker = docker_engine(tmp_path, fake_firewall, networks, installation="prod")
    worker._guard_bridge("msrprod")  # type: ignore[attr-defined]  # what every start does
    assert fake_firewall.addresses("msrprod") == {"10.0.0.5/32", "10.0.0.7/32", "10.0.0.9/32"}
    # Every rule: INPUT and DOCKER-USER, TCP to the ports Docker publishes on, new connections.
    assert len(fake_firewall.rules) == 6
    for rule in fake_firewall.rules:
        assert rule[0] in ("INPUT", "DOCKER-USER") and rule[-2:] == ["-j", "DROP"]
        assert " ".join(rule).count("-p tcp -m tcp --dport 32768:60999 -m conntrack --ctstate NEW") == 1


def test_each_heartbeat_puts_back_a_deleted_rule_and_drops_those_of_gone_nodes(
    tmp_path: Path, fake_firewall: FakeIptables, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="serving.node.engines.docker")
    engine = docker_engine(tmp_path, fake_firewall, [FakeNetwork("ms-replicas", "msrall", {})])
    engine.set_node_addresses(["10.0.0.5", "10.0.0.7"])  # type: ignore[attr-defined]
    deleted = next(rule for rule in fake_firewall.rules if "10.0.0.7/32" in rule)
    fake_firewall.rules.remove(deleted)  # by hand, or by an older worker
    engine.set_node_addresses(["10.0.0.7", "10.0.0.5"])  # type: ignore[attr-defined]  # the same set
    assert deleted in fake_firewall.rules
    engine.set_node_addresses(["10.0.0.5"])  # type: ignore[attr-defined]  # node 10.0.0.7 left the table
    assert fake_firewall.addresses("msrall") == {"10.0.0.5/32"}
    # The guarded set is logged once per change, not at every heartbeat.
    said = [r.getMessage() for r in caplog.records if "can not open connections" in r.getMessage()]
    assert said == [
        "Docker replicas can not open connections to TCP ports 32768-60999 (where Docker publishes replicas) "
        "of the nodes' addresses 10.0.0.5, 10.0.0.7",
        "Docker replicas can not open connections to TCP ports 32768-60999 (where Docker publishes replicas) "
        "of the nodes' addresses 10.0.0.5",
    ], said


def test_a_changed_ephemeral_range_replaces_the_rules(tmp_path: Path, fake_firewall: FakeIptables) -> None:
    engine = docker_engine(tmp_path, fake_firewall, [FakeNetwork("ms-replicas", "msrall", {})])
    engine.set_node_addresses(["10.0.0.5"])  # type: ignore[attr-defined]
    firewall.EPHEMERAL_RANGE_FILE.write_text("40000 50000\n")
    engine.set_node_addresses(["10.0.0.5"])  # type: ignore[attr-defined]
    assert len(fake_firewall.rules) == 2
    assert all(rule[rule.index("--dport") + 1] == "40000:50000" for rule in fake_firewall.rules)


def test_node_addresses_touch_only_this_installations_networks(tmp_path: Path, fake_firewall: FakeIptables) -> None:
    from serving.node.engines.base import LABEL_INSTALLATION

    networks = [
        FakeNetwork("ms-replicas-prod", "msrprod", {}),
        FakeNetwork("ms-cluster-a", "msrclusa", {LABEL_INSTALLATION: "prod"}),
        FakeNetwork("ms-cluster-b", "msrclusb", {LABEL_INSTALLATION: "staging"}),  # another installation
        FakeNetwork("ms-cluster-c", "msrclusc", {}),  # the default installation's (or a test suite's)
        FakeNetwork("ms-replicas-staging", "msrstaging", {}),
    ]
    fake_firewall.rules.append(["INPUT", "-i", "msrclusb", "-d", "10.9.9.9/32", "-m", "comment", "--comment",
                                "modelserve-replicas msrclusb", "-j", "DROP"])  # fmt: skip
    engine = docker_engine(tmp_path, fake_firewall, networks, installation="prod")
    engine.set_node_addresses(["10.0.0.5"])  # type: ignore[attr-defined]
    guarded = {r[r.index("-i") + 1] for r in fake_firewall.rules if "-d" in r and "10.0.0.5/32" in r}
    assert guarded == {"msrprod", "msrclusa"}
    assert fake_firewall.addresses("msrclusb") == {"10.9.9.9/32"}  # staging's own rule stays


def test_the_unguarded_warning_names_the_addresses_it_can_not_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from serving.node.engines.docker.engine import DockerEngine

    monkeypatch.setattr(firewall, "usable_iptables", lambda binary: None)  # not root
    engine = DockerEngine(state_dir=tmp_path / "d", publish_host="127.0.0.1")
    engine.set_node_addresses(["127.0.0.1", "10.0.0.7"])  # only another node's address to guard
    engine._guard_bridge("msrtest")
    assert "published replica ports of the nodes' addresses 10.0.0.7: run the node worker as root" in caplog.text
    assert "NODE_ADDRESS=127.0.0.1" not in caplog.text


# --- the Docker engine's machine-wide network lock ---------------------------------------------------


def test_the_network_lock_is_owners_only_and_a_held_lock_is_a_sentence_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import re
    import stat
    import time

    from serving.node.engines.docker import engine as docker
    from serving.node.engines.docker import networks

    path = tmp_path / "run" / "modelserve" / "docker-networks.lock"
    monkeypatch.setattr(networks, "NETWORK_LOCK", path)
    monkeypatch.setattr(networks, "NETWORK_LOCK_TIMEOUT", 0.3)
    engine = docker.DockerEngine(state_dir=tmp_path / "d")
    with engine._network_lock():
        pass
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)  # as an older version left it
    with open(path) as holder:  # read-only is enough to hold a flock
        fcntl.flock(holder, fcntl.LOCK_EX)
        began = time.monotonic()
        held = rf"The network lock {re.escape(str(path))} has been held for over 0.3 s"
        with pytest.raises(EngineError, match=held), engine._network_lock():
            pass
        assert time.monotonic() - began < 5
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with engine._network_lock():  # free again
        pass
