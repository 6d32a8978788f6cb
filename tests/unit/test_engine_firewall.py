"""serving.engines.firewall: the pieces both engines share (ids, egress choice, iptables runner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.engines import firewall
from serving.engines.base import EngineError


def test_both_engines_and_the_settings_use_the_one_definition(tmp_path: Path) -> None:
    from django.conf import settings

    from serving.engines import docker, local

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
