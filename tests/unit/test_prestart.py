"""Pre-start actions (S2.3): the plan helpers, and the standalone runner run directly (no sandbox)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from serving.core.definitions import PreStartAction
from serving.node import prestart
from serving.node.engines.base import PreStartActionSpec, ReplicaSpec

BOOTSTRAP = Path(prestart.__file__).parent / "engines" / "bootstrap.py"


@pytest.fixture
def settings() -> types.SimpleNamespace:
    """Stands in for pytest-django's fixture (the root conftest asks for it) when run with -p no:django."""
    return types.SimpleNamespace()


def test_to_specs_keeps_order_and_makes_args_json_ready() -> None:
    actions = [
        PreStartAction("run_command", {"command": ("pip", "list")}),
        PreStartAction("write_file", {"filename": "a.txt", "body": "x", "mode": "600", "append": False}),
    ]
    specs = prestart.to_specs(actions)
    assert [s.action for s in specs] == ["run_command", "write_file"]
    assert specs[0].args == {"command": ["pip", "list"]}
    assert specs[1].args["mode"] == "600"


def test_plan_for_list_and_shell_commands() -> None:
    spec = ReplicaSpec(
        name="r",
        image="i",
        command=("echo $HOME && sleep 1",),
        command_is_shell=True,
        port=8000,
        pre_start_actions=(PreStartActionSpec("log", {"message": "hi"}),),
    )
    plan = prestart.plan(spec)
    assert plan == {
        "actions": [{"action": "log", "args": {"message": "hi"}}],
        "command": ["echo $HOME && sleep 1"],
        "command_is_shell": True,
        "shell": "/bin/bash",
        "workdir": "/home/work",
    }
    assert json.loads(prestart.plan_json(spec)) == plan


def test_failure_reason_names_the_action_and_ignores_command_output() -> None:
    lines = [
        "[prestart] action 0 (log): hi",
        "[prestart] action 1 (run_command) err: something failed: not us",
        "[prestart] action 1 (run_command) failed: sh exited with code 3",
    ]
    assert prestart.failure_reason(lines) == "pre-start action 1 (run_command) failed: sh exited with code 3"
    assert prestart.failure_reason(lines[:2]) is None
    assert prestart.failure_reason(["[prestart] setup failed: No such file"]) == "pre-start setup failed: No such file"


# --- the runner itself, on the host's python3 (it must need nothing but the standard library) ---------


def run_bootstrap(tmp_path: Path, actions: list[dict[str, Any]], command: Any, **plan: Any) -> tuple[int, str]:
    doc = {"actions": actions, "command": command, "workdir": str(tmp_path / "work"), **plan}
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    python = shutil.which("python3") or sys.executable
    result = subprocess.run(
        [python, "-I", str(BOOTSTRAP), str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GREETING": "hi"},
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_actions_run_in_order_then_the_command_is_executed(tmp_path: Path) -> None:
    actions = [
        {"action": "mkdir", "args": {"path": "conf/deep"}},
        {"action": "write_file", "args": {"filename": "conf/deep/a.txt", "body": "one", "mode": "600"}},
        {"action": "write_file", "args": {"filename": "conf/deep/a.txt", "body": "+two", "append": True, "mode": 644}},
        {"action": "write_tempfile", "args": {"body": "print(1)\n", "mode": "0o700"}},
        {"action": "run_command", "args": {"command": ["sh", "-c", "echo out-line; echo err-line >&2"]}},
        {"action": "log", "args": {"message": "ready"}},
    ]
    code, output = run_bootstrap(
        tmp_path, actions, ["sh", "-c", 'echo "cmd $GREETING $BACKEND_TEMPFILE"; cat conf/deep/a.txt']
    )
    assert code == 0, output
    target = tmp_path / "work" / "conf" / "deep" / "a.txt"
    assert target.read_text() == "one+two"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    lines = output.splitlines()
    numbered = [int(line.split()[2]) for line in lines if line.startswith("[prestart] action")]
    assert numbered == sorted(numbered) and set(numbered) == set(range(6))
    assert "[prestart] action 4 (run_command) out: out-line" in lines
    assert "[prestart] action 4 (run_command) err: err-line" in lines
    assert "[prestart] action 5 (log): ready" in lines
    temp = next(line for line in lines if "(write_tempfile)" in line).split("wrote ")[1].split()[0]
    assert temp.endswith(".py") and oct(Path(temp).stat().st_mode & 0o777) == "0o700"
    assert f"cmd hi {temp}" in lines
    assert lines[-1] == "one+two"
    os.unlink(temp)


@pytest.mark.parametrize(
    ("action", "reason"),
    [
        (
            {"action": "run_command", "args": {"command": ["sh", "-c", "exit 4"], "check": True}},
            "sh exited with code 4",
        ),
        ({"action": "log", "args": {"message": "{r[nope]}"}}, "r has no 'nope'"),
        ({"action": "run_command", "args": {"command": ["no-such-program-xyz"]}}, "can not run no-such-program-xyz"),
        ({"action": "write_file", "args": {"body": "x"}}, "missing argument 'filename'"),
        ({"action": "write_file", "args": {"filename": "f", "body": "x", "mode": "999"}}, "octal"),
        ({"action": "explode", "args": {}}, "unknown action 'explode'"),
    ],
)
def test_a_failing_action_stops_the_start_with_code_97(tmp_path: Path, action: dict[str, Any], reason: str) -> None:
    first = {"action": "run_command", "args": {"command": ["true"]}, "ref": "r"}
    actions = [first, action, {"action": "log", "args": {"message": "no"}}]
    code, output = run_bootstrap(tmp_path, actions, ["sh", "-c", "echo started"])
    assert code == prestart.BOOTSTRAP_FAILED_EXIT
    error = prestart.failure_reason(output.splitlines())
    assert error is not None and error.startswith(f"pre-start action 1 ({action['action']}) failed: "), output
    assert reason in error
    assert "started" not in output and "(log): no" not in output


def test_shell_string_and_missing_shell_fallback(tmp_path: Path) -> None:
    code, output = run_bootstrap(tmp_path, [], ["echo via $0 && exit 5"], command_is_shell=True, shell="/no/such/bash")
    assert code == 5
    assert "/no/such/bash is not installed; running the start command with /bin/sh" in output
    assert "via /bin/sh" in output


def test_unexecutable_command_exits_127(tmp_path: Path) -> None:
    code, output = run_bootstrap(tmp_path, [], ["no-such-server-xyz"])
    assert code == 127 and "start command failed: can not execute no-such-server-xyz" in output


def test_a_failing_run_command_is_recorded_and_the_start_goes_on(tmp_path: Path) -> None:
    """Issue 18: as Backend.AI does, a non-zero exit is recorded and the start goes on (check: true stops it)."""
    actions = [{"action": "run_command", "args": {"command": ["sh", "-c", "echo oops >&2; exit 3"]}}]
    code, output = run_bootstrap(tmp_path, actions, ["sh", "-c", "echo started"])
    assert code == 0, output
    assert "[prestart] action 0 (run_command) err: oops" in output
    assert "sh exited with code 3; going on (add check: true" in output
    assert output.splitlines()[-1] == "started"


def test_ref_saves_a_result_for_later_actions(tmp_path: Path) -> None:
    """Issue 18: ``ref`` as in Backend.AI's service actions; resolved values are shown, secrets are not."""
    actions = [
        {"action": "run_command", "args": {"command": ["sh", "-c", "echo v1.2; echo warn >&2"]}, "ref": "ver"},
        {"action": "write_tempfile", "args": {"body": "x = 1\n"}, "ref": "conf"},
        {"action": "run_command", "args": {"command": ["echo", "s3cr3t"]}, "ref": "hf_token"},
        {
            "action": "write_file",
            "args": {
                "filename": "out.txt",
                "body": '{"v": "{ver}", "e": "{ver[err]}", "c": "{conf}", "t": "{hf_token}"}',
            },
        },
        {"action": "log", "args": {"message": "{ver[out]}|{unknown}|{ conf }"}},
    ]
    code, output = run_bootstrap(tmp_path, actions, ["cat", "out.txt"])
    assert code == 0, output
    temp = next(line for line in output.splitlines() if "(write_tempfile)" in line).split("wrote ")[1].split()[0]
    # Only saved names are replaced; the JSON braces and {unknown} stay as written.
    written = (tmp_path / "work" / "out.txt").read_text()
    assert written == '{"v": "v1.2", "e": "warn\n", "c": "' + temp + '", "t": "s3cr3t"}'
    assert '[prestart] action 3 (write_file): {ver} is "v1.2"' in output
    assert '[prestart] action 3 (write_file): {ver[err]} is "warn\\n"' in output
    assert "[prestart] action 3 (write_file): {hf_token} is (hidden: the name looks like a secret)" in output
    assert "[prestart] action 4 (log): v1.2\n|{unknown}|" + temp in output
    os.unlink(temp)


def test_plan_carries_the_ref() -> None:
    spec = ReplicaSpec(
        name="r",
        image="i",
        command=("x",),
        port=1,
        pre_start_actions=(PreStartActionSpec("log", {"message": "m"}, "a"),),
    )
    assert prestart.plan(spec)["actions"] == [{"action": "log", "args": {"message": "m"}, "ref": "a"}]


def test_no_new_privs_is_set_before_the_actions_and_kept_by_the_command(tmp_path: Path) -> None:
    """The Swarm engine's plan on a manager that can not set no-new-privileges on a service."""
    read = ["sh", "-c", "grep NoNewPrivs /proc/self/status"]
    actions = [{"action": "run_command", "args": {"command": read}}]
    code, output = run_bootstrap(tmp_path, actions, read, no_new_privs=True)
    assert code == 0, output
    assert "[prestart] action 0 (run_command) out: NoNewPrivs:\t1" in output
    assert output.rstrip().endswith("NoNewPrivs:\t1")  # the command's own line
    code, output = run_bootstrap(tmp_path, [], read)
    assert code == 0 and output.rstrip().endswith("NoNewPrivs:\t0"), output  # not asked: not set
