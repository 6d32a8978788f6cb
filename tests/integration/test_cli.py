"""The ``modelserve`` command (cli/) run as a user runs it, ``python -m cli ...`` in a subprocess, against
the real web process (daphne, as the Procfile starts it) and, for services, the real workers and
replicas on the local engine. The personas' own API keys: a stranger's key sees nothing of the owner's."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from accounts.actions import do_issue_api_key
from tests.live import ROOT, LiveSystem, deadline_for, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLE = ROOT / "examples" / "simple-http-server"


class Result:
    def __init__(self, done: subprocess.CompletedProcess[str]) -> None:
        self.code = done.returncode
        self.out = done.stdout
        self.err = done.stderr

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    return {
        **env,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result]:
    """``cli("folder", "list", home="owner", env={...})``: run the command as that user's shell would."""

    def run(*args: str, home: str = "owner", env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            check=False,
            cwd=tmp_path,
            env=cli_env(tmp_path / home, **(env or {})),
            capture_output=True,
            text=True,
            timeout=deadline_for(timeout),
        )
        result = Result(done)
        assert "Traceback" not in result.err, result
        return result

    return run


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    system = LiveSystem(tmp_path / "web-logs")
    (tmp_path / "web-logs").mkdir()
    try:
        yield system.start_web()
    finally:
        system.stop_all()


@pytest.fixture
def keys(personas: dict[str, Any]) -> dict[str, str]:
    return {who: do_issue_api_key(personas[who], name="cli")[1] for who in ("owner", "stranger")}


def login(cli: Callable[..., Result], web: str, key: str, home: str) -> None:
    done = cli("login", "--url", web, "--api-key", key, home=home)
    assert done.code == 0, done


def test_login_push_validate_and_errors(
    cli: Callable[..., Result], web: str, keys: dict[str, str], tmp_path: Path
) -> None:
    # Not logged in: a sentence and the way out, no traceback; as JSON for scripts.
    missing = cli("folder", "list")
    assert missing.code == 2 and "modelserve login --url URL --api-key KEY" in missing.err, missing
    assert "Not logged in" in cli("--json", "folder", "list").json()["error"]
    # A wrong key is refused with a sentence.
    wrong = cli("login", "--url", web, "--api-key", "msk_notakey")
    assert wrong.code == 1 and "refused the API key" in wrong.err, wrong
    unreachable = cli("--json", "login", "--url", "http://127.0.0.1:9", "--api-key", keys["owner"])
    assert unreachable.code == 1 and "Can not reach the web app" in unreachable.json()["error"], unreachable

    login(cli, web, keys["owner"], "owner")
    config = tmp_path / "owner" / ".config" / "modelserve" / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert cli("whoami", "--json").json()["username"] == "owner"

    created = cli("folder", "create", "simple", "--json")
    assert created.code == 0, created
    folder = created.json()["id"]
    source = tmp_path / "simple"
    shutil.copytree(EXAMPLE, source)
    (source / "data").mkdir()
    (source / "data" / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))

    first = cli("folder", "push", str(source), "simple", "--json")
    assert first.code == 0, first
    pushed = first.json()
    local = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    assert sorted(pushed["uploaded"]) == local and pushed["unchanged"] == []
    # The bytes really arrived, streamed into the folder.
    listing = cli("--json", "folder", "list").json()
    assert [f["name"] for f in listing] == ["simple"] and listing[0]["runnable"] is True

    # Nothing changed: nothing uploaded.
    again = cli("folder", "push", str(source), folder, "--json").json()
    assert again["uploaded"] == [] and sorted(again["unchanged"]) == local
    # One file changed, with the same size: that one file is uploaded.
    weights = source / "data" / "weights.bin"
    body = bytearray(weights.read_bytes())
    body[1000] ^= 0xFF
    weights.write_bytes(bytes(body))
    once = cli("folder", "push", str(source), "simple")
    assert once.code == 0 and "uploaded data/weights.bin" in once.out and "1 uploaded" in once.out, once
    # Another machine (no cache of ours) pushes everything; a file changed in the folder since
    # our push (replaced through the API by that machine) is uploaded again by ours.
    login(cli, web, keys["owner"], "laptop")
    other = cli("folder", "push", str(source), "simple", "--json", home="laptop").json()
    assert sorted(other["uploaded"]) == local
    assert sorted(cli("folder", "push", str(source), "simple", "--json").json()["uploaded"]) == local

    valid = cli("folder", "validate", "simple")
    assert valid.code == 0 and "is valid" in valid.out, valid
    (source / "model-definition.yaml").write_text("models:\n  - name: broken\n    service: {port: 'x'}\n")
    assert cli("folder", "push", str(source), "simple").code == 0
    broken = cli("folder", "validate", "simple", "--json")
    assert broken.code == 1 and broken.json()["valid"] is False and broken.json()["problems"], broken
    assert "model-definition.yaml" in cli("folder", "validate", "simple").out

    # The stranger's key sees no folder of the owner's, and says so.
    login(cli, web, keys["stranger"], "stranger")
    refused = cli("folder", "push", str(source), folder, home="stranger")
    assert refused.code == 2 and f"No folder '{folder}' that this API key can see" in refused.err, refused


def _reader(process: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_service_lifecycle(
    live_system: LiveSystem, cli: Callable[..., Result], keys: dict[str, str], tmp_path: Path
) -> None:
    web = live_system.start_web()
    login(cli, web, keys["owner"], "owner")
    login(cli, web, keys["stranger"], "stranger")
    assert cli("folder", "create", "simple").code == 0
    assert cli("folder", "push", str(EXAMPLE), "simple").code == 0

    created = cli("service", "create", "web1", "--folder", "simple", "--replicas", "1", "--wait", "--json", timeout=240)
    assert created.code == 0, f"{created}\n{live_system.logs()}"
    service = created.json()
    assert service["status"] == "HEALTHY" and [r["status"] for r in service["routes"]] == ["healthy"]
    shown = cli("service", "show", "web1")
    assert shown.code == 0 and "HEALTHY (1/1 healthy)" in shown.out, shown

    # The stranger's key can not see it, and the CLI says so.
    for args in (("service", "show", "web1"), ("service", "scale", service["id"], "3"), ("token", "create", "web1")):
        refused = cli(*args, home="stranger")
        assert refused.code == 2 and "that this API key can see" in refused.err, refused

    token = cli("token", "create", "web1")
    assert token.code == 0 and token.out.strip().count("\n") == 0 and len(token.out.strip()) > 20, token
    tokens = cli("token", "list", "web1", "--json").json()
    assert len(tokens) == 1 and tokens[0]["active"] is True
    assert cli("token", "revoke", "web1", tokens[0]["id"]).code == 0
    assert cli("token", "list", "web1", "--json").json()[0]["active"] is False

    rule = cli(
        "rule", "create", "web1", "--direction", "out", "--source", "proxy", "--metric", "rps",
        "--comparator", ">", "--threshold", "100", "--step", "1", "--max", "3", "--json",
    )  # fmt: skip
    assert rule.code == 0 and rule.json()["comparator"] == "GREATER_THAN", rule
    assert [r["id"] for r in cli("rule", "list", "web1", "--json").json()] == [rule.json()["id"]]
    bad_rule = cli("rule", "create", "web1", "--direction", "out", "--source", "proxy", "--metric", "rps",
                   "--comparator", ">", "--threshold", "1", "--step", "0")  # fmt: skip
    assert bad_rule.code == 1 and "step" in bad_rule.err and "must not be 0" in bad_rule.err, bad_rule
    assert cli("rule", "delete", "web1", str(rule.json()["id"])).code == 0
    assert cli("rule", "list", "web1", "--json").json() == []

    scaled = cli("service", "scale", "web1", "2", "--wait", "--json", timeout=240)
    assert scaled.code == 0, scaled
    assert scaled.json()["desired_replicas"] == 2
    assert [r["status"] for r in scaled.json()["routes"]] == ["healthy", "healthy"]
    assert "status:" not in scaled.err  # status lines are for people: silent with --json

    logs = cli("service", "logs", "web1", "--json")
    assert logs.code == 0 and any("preparing /home/work" in line for line in logs.json()["lines"]), logs

    # Follow the first replica's log, then terminate the service: the stream says why and ends.
    follow = subprocess.Popen(
        [sys.executable, "-m", "cli", "service", "logs", "web1", "--follow", "--tail", "5"],
        cwd=tmp_path,
        env=cli_env(tmp_path / "owner"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    thread = _reader(follow, lines)
    try:
        wait_for(lambda: len(lines) >= 1, timeout=20, what="the followed log's first lines")
        ended = cli("service", "terminate", "web1", "--wait", timeout=120)
        assert ended.code == 0 and "Terminated web1." in ended.out and "status: gone" in ended.err, ended
        assert follow.wait(timeout=deadline_for(20)) == 0, follow.stderr.read() if follow.stderr else ""
        thread.join(timeout=5)
        assert lines[-1].startswith("-- "), lines
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    listed = cli("service", "list", "--json")
    assert listed.code == 0 and listed.json() == []


def test_the_readme_walkthrough_runs_as_written(live_system: LiveSystem, keys: dict[str, str], tmp_path: Path) -> None:
    """README's "Command line" block, run by bash line by line (set -e): every command must work."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Command line", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    web = live_system.start_web()
    script = block.replace("http://127.0.0.1:8000", web).replace("msk_...", keys["owner"])
    shutil.copytree(EXAMPLE, tmp_path / "my-model")
    done = subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", f'modelserve() {{ "{sys.executable}" -m cli "$@"; }}\n{script}'],
        check=False,
        cwd=tmp_path,
        env=cli_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=deadline_for(300),
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{live_system.logs()}"
    assert "Traceback" not in done.stderr
    assert "Terminated hello." in done.stdout


def test_wait_says_why_a_replica_does_not_start_and_stops_once_the_service_gave_up(
    live_system: LiveSystem, cli: Callable[..., Result], keys: dict[str, str]
) -> None:
    """A replica no node has room for: --wait prints the reason as soon as the platform knows it (once,
    not once a retry) and ends when the service stops retrying, not after its 600 s timeout."""
    web = live_system.start_web()
    login(cli, web, keys["owner"], "owner")
    assert cli("folder", "create", "simple").code == 0
    assert cli("folder", "push", str(EXAMPLE), "simple").code == 0

    started = time.monotonic()
    created = cli("service", "create", "huge", "--folder", "simple", "--resource", "cpu=512", "--wait", timeout=120)
    assert created.code == 1, f"{created}\n{live_system.logs()}"
    assert time.monotonic() - started < deadline_for(60), "the wait ran on after the service gave up"
    assert created.err.count("replica error: Not enough resources: one replica asks for cpu 512") == 1, created.err
    assert "huge stopped retrying after 5 failed starts in a row: Not enough resources" in created.err, created
    assert "`modelserve service clear-errors huge` starts it again." in created.err, created
    shown = cli("service", "show", "huge", "--json").json()
    assert shown["gave_up"] is True and shown["retries"] == 5

    # As JSON: one document with the same sentence, nothing for people on stderr.
    again = cli("--json", "service", "scale", "huge", "1", "--wait", timeout=60)
    assert again.code == 1 and "stopped retrying" in again.json()["error"] and "replica error" not in again.err, again

    cleared = cli("service", "clear-errors", "huge", "--json")
    assert cleared.code == 0 and cleared.json()["retries"] == 0 and cleared.json()["gave_up"] is False, cleared
    assert cli("service", "terminate", "huge", "--wait", timeout=120).code == 0
