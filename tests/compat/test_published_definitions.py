"""Issue 18: model folders written for Backend.AI, as published, validate here and launch with their
runtime's defaults. Each file under ``files/`` names its source in a comment at its top."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.folders import validate_model_folder
from serving.node import prestart

FILES = Path(__file__).parent / "files"
FOLDERS = sorted(p.name for p in FILES.iterdir() if p.is_dir())


def test_every_folder_names_its_source() -> None:
    assert FOLDERS
    for name in FOLDERS:
        for path in (FILES / name).iterdir():
            assert path.read_text().startswith("# Source: https://"), path


@pytest.mark.parametrize("name", FOLDERS)
def test_published_folder_validates_with_its_runtime(name: str) -> None:
    result = validate_model_folder(FILES / name, runtime=None)
    assert result.ok, [str(p) for p in result.problems]
    assert result.effective is not None
    assert result.effective.port == 8000
    # What a replica would run: the pre-start plan the runner reads (run_command goes on after a failure).
    actions = prestart.to_specs(result.effective.pre_start_actions)
    assert [a.action for a in actions] == ["run_command"]
    assert actions[0].args["check"] is False


def test_unknown_keys_of_a_published_file_are_warnings_that_name_them() -> None:
    result = validate_model_folder(FILES / "backend-ai-root", runtime=None)
    assert result.runtime == "custom"
    assert [(w.field, w.line) for w in result.warnings] == [("models[0].info", 18)]
    assert "unknown key, ignored" in result.warnings[0].message
