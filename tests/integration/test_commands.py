"""The operator commands of the public contract (docs/architecture.md)."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from tests.factories import SIMPLE_DEFINITION


@pytest.mark.django_db
def test_issue_api_key_prints_a_working_key_as_the_last_word(personas: dict[str, Any]) -> None:
    out = StringIO()
    call_command("issue_api_key", "owner", stdout=out)
    key = out.getvalue().split()[-1]
    client = APIClient()
    assert client.get("/api/v1/me/", HTTP_AUTHORIZATION=f"Token {key}").json()["username"] == "owner"
    assert client.get("/api/v1/me/", HTTP_AUTHORIZATION="Token msk_aaaaaaaaaa_" + "b" * 43).status_code == 401
    assert client.get("/api/v1/me/", HTTP_AUTHORIZATION="Token nope").status_code == 401


def test_validate_model_folder_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model-definition.yaml").write_text(SIMPLE_DEFINITION)
    call_command("validate_model_folder", str(tmp_path))
    assert "OK: the folder is valid for the custom runtime." in capsys.readouterr().out
    (tmp_path / "model-definition.yaml").write_text(SIMPLE_DEFINITION.replace("port: 8000", "port: 0"))
    with pytest.raises(SystemExit) as exit_info:
        call_command("validate_model_folder", str(tmp_path))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "model-definition.yaml:" in err and "models[0].service.port" in err


def test_validate_model_folder_warns_about_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: an unknown key is ignored, as Backend.AI does, but a typo is loud, with the key it meant."""
    text = SIMPLE_DEFINITION.replace("initial_delay", "inital_delay").replace("max_retries", "max-retries")
    assert text != SIMPLE_DEFINITION
    (tmp_path / "model-definition.yaml").write_text(text)
    (tmp_path / "service-definition.toml").write_text(
        '[vllm.environment]\nimage = "vllm/vllm-openai:latest"\narchitecture = "x86_64"\n'
        '[custom.environment]\nimage = "python:3.12"\narchitecture = "x86_64"\nimgae = "typo"\n'
    )
    call_command("validate_model_folder", str(tmp_path), runtime="custom")
    captured = capsys.readouterr()
    assert "OK: the folder is valid for the custom runtime (2 warnings, above)." in captured.out
    assert "models[0].service.health_check.inital_delay: unknown key, ignored; did you mean 'initial_delay'?" in (
        captured.err
    )
    assert "custom.environment.imgae: unknown key, ignored; did you mean 'image'?" in captured.err
    # Without --runtime: the runtime the folder describes, its first known section (vllm).
    call_command("validate_model_folder", str(tmp_path))
    assert "valid for the vllm runtime." in capsys.readouterr().out


def test_stop_replicas_stops_this_installations_local_replicas(settings: Any, tmp_path: Path) -> None:
    """What `make run` runs on Ctrl-C: every replica of this installation stops, none is left behind."""
    from serving.node.engines.base import ReplicaSpec
    from serving.node.engines.local.engine import LocalEngine
    from tests.live import wait_for

    engine = LocalEngine(state_dir=settings.ENGINE_STATE_DIR / "local-cmdtest")
    if not engine.available():
        pytest.skip("the local engine is not available here (bubblewrap missing)")
    started = [
        engine.start(ReplicaSpec(name=f"ms-stop-{n}", image="unused", command=("sleep", "300"), port=8000, labels={}))
        for n in range(2)
    ]
    assert {i.replica_id for i in engine.list()} >= {i.replica_id for i in started}
    out = StringIO()
    call_command("stop_replicas", stdout=out)
    assert "2 on local" in out.getvalue()
    wait_for(lambda: engine.list() == [], timeout=15, what="the replicas to be gone")
