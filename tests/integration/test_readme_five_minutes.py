"""README's "Five minutes", its shell blocks run by bash as a new user pastes them (set -e), against
the real web process, workers, replicas and proxy: every command must work and the call must answer."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from accounts.actions import do_issue_api_key
from tests.factories import FolderFactory
from tests.live import ROOT, LiveSystem, deadline_for

pytestmark = pytest.mark.django_db(transaction=True)


def five_minutes_blocks() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Five minutes", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```sh\n")[1:]]
    # Indented under the numbered steps: as pasted into a shell, the indentation does not matter.
    return ["\n".join(line.removeprefix("   ") for line in block.splitlines()) for block in blocks]


def test_the_five_minutes_walkthrough_runs_as_written(
    live_system: LiveSystem, personas: dict[str, Any], tmp_path: Any
) -> None:
    proxy = live_system.start_proxy()
    live_system.env["SERVING_PROXY_URL"] = proxy  # the service URL the web process answers with
    web = live_system.start_web()
    source = ROOT / "examples" / "llm-echo"
    FolderFactory(
        owner=personas["owner"], name="llm-echo", files={p.name: p.read_text() for p in source.iterdir() if p.is_file()}
    )
    key = do_issue_api_key(personas["owner"], name="readme")[1]
    create, call = five_minutes_blocks()
    assert "KEY=msk_..." in create and "${URL}v1/chat/completions" in call
    # Between the two blocks the reader re-runs the status command until it says HEALTHY.
    wait = (
        'for _ in $(seq 120); do s=$(curl -s -H "Authorization: Token $KEY" '
        "http://127.0.0.1:8000/api/v1/services/$ID/ "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"status\"])'); "
        '[ "$s" = HEALTHY ] && break; sleep 0.5; done\n'
    )
    script = (create + wait + call).replace("http://127.0.0.1:8000", web).replace("msk_...", key)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=deadline_for(120),
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{live_system.logs()}"
    assert '"content":"hello there"' in done.stdout, done.stdout
