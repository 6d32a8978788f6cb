"""Model store (S1.3) and the launcher values API: GET /api/v1/folders/{id}/launcher/?runtime=..."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db

SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"

[custom.resource_slots]
cpu = 2
mem = "1g"
"cuda.shares" = "0.5"

[custom.environ]
MODEL_NAME = "simple"

[vllm.environment]
image = "vllm/vllm-openai:latest"
architecture = "x86_64"

[vllm.environ]
BACKEND_MODEL_NAME = "llama"
"""


def launcher(api: Any, folder: Folder, **params: str) -> dict[str, Any]:
    response = api("owner").get(f"/api/v1/folders/{folder.pk}/launcher/", params)
    assert response.status_code == 200, response.content
    return response.json()


def test_runnable_folder_prefills_the_launcher(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )
    values = launcher(api, folder)
    assert values == {
        "folder": str(folder.pk),
        "folder_name": "simple",
        "runtime": "custom",
        "image": "modelserve/python:3.11",
        "image_from_folder": True,
        "architecture": "x86_64",
        "resources": {"cpu": 2.0, "mem": 1024.0**3, "cuda.shares": 0.5},
        "environ": {"MODEL_NAME": "simple"},
        "resource_opts": {},
        "model_mount": "/models",
        "model_definition_path": "model-definition.yaml",
        "has_service_definition": True,
        "runnable": True,
        "problems": [],
        "warnings": [],
    }
    assert launcher(api, folder, runtime="vllm")["environ"] == {"BACKEND_MODEL_NAME": "llama"}
    listed = {f["name"]: f for f in api("owner").get("/api/v1/folders/?usage_mode=model").json()}
    assert listed["simple"]["runnable"] is True


def test_launcher_values_can_create_the_service(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )
    values = launcher(api, folder)
    body = {
        "name": "from-store",
        "folder": values["folder"],
        "runtime": values["runtime"],
        "image": values["image"],
        "resources": {"cpu": values["resources"]["cpu"], "mem": values["resources"]["mem"]},
        "environ": values["environ"],
        "model_definition_path": values["model_definition_path"],
    }
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()


def test_yml_name_and_not_runnable_cases(api: Any, personas: dict[str, Any]) -> None:
    yml = FolderFactory(
        owner=personas["owner"],
        name="yml",
        files={"model-definition.yml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )
    assert launcher(api, yml)["model_definition_path"] == "model-definition.yml"
    assert launcher(api, yml)["runnable"] is True
    only_model = FolderFactory(owner=personas["owner"], name="only", files={"model-definition.yaml": SIMPLE_DEFINITION})
    values = launcher(api, only_model)
    assert values["runnable"] is False and values["problems"] == [] and values["image_from_folder"] is False
    general = FolderFactory(
        owner=personas["owner"],
        name="general",
        usage_mode=Folder.UsageMode.GENERAL,
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )
    assert launcher(api, general)["runnable"] is False  # only model-mode folders are in the store
    empty = FolderFactory(owner=personas["owner"], name="empty")
    (problem,) = launcher(api, empty)["problems"]
    assert problem["file"] == "model-definition.yaml" and "is missing" in problem["message"]
    assert launcher(api, empty, runtime="vllm")["problems"] == []  # vllm needs no definition file


def test_problems_name_file_field_and_line(api: Any, personas: dict[str, Any]) -> None:
    broken = SIMPLE_DEFINITION.replace("port: 8000", "port: 99999")
    folder = FolderFactory(
        owner=personas["owner"],
        name="broken",
        files={"model-definition.yaml": broken, "service-definition.toml": "[custom.environment\nimage = 1\n"},
    )
    problems = launcher(api, folder)["problems"]
    by_file = {p["file"]: p for p in problems}
    port = by_file["model-definition.yaml"]
    assert port["field"] == "models[0].service.port"
    assert port["line"] == broken.splitlines().index("      port: 99999") + 1
    toml = by_file["service-definition.toml"]
    assert "TOML syntax error" in toml["message"] and toml["line"] == 1


def test_yaml_syntax_error_has_line_and_column(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"], name="syntax", files={"model-definition.yaml": "models: [\n  - a: b\n"}
    )
    (problem,) = launcher(api, folder)["problems"]
    assert problem["file"] == "model-definition.yaml" and problem["line"] is not None


def test_symlinked_definition_file_is_not_followed(api: Any, personas: dict[str, Any], tmp_path: Path) -> None:
    secret = tmp_path / "secret.toml"
    secret.write_text('[custom.environment]\nimage = "stolen-secret-image"\narchitecture = "x"\n')
    folder = FolderFactory(owner=personas["owner"], name="linked", files={"model-definition.yaml": SIMPLE_DEFINITION})
    os.symlink(secret, folder.host_path / "service-definition.toml")
    values = launcher(api, folder)
    assert "stolen-secret-image" not in str(values)
    (problem,) = values["problems"]
    assert problem["file"] == "service-definition.toml" and "symbolic link" in problem["message"]
    assert values["runnable"] is False


def test_bad_runtime_and_bad_definition_path(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(owner=personas["owner"], name="x", files={"model-definition.yaml": SIMPLE_DEFINITION})
    unknown = launcher(api, folder, runtime="nope")["problems"]
    assert any(p["field"] == "runtime" and "unknown runtime" in p["message"] for p in unknown)
    traversal = launcher(api, folder, model_definition_path="../../etc/passwd")["problems"]
    assert any("'..'" in p["message"] for p in traversal)
    custom_path = launcher(api, folder, model_definition_path="nested/def.yaml")["problems"]
    assert any(p["file"] == "nested/def.yaml" and "is missing" in p["message"] for p in custom_path)


def test_oversized_definition_refused(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"], name="huge", files={"model-definition.yaml": "#" * (1024 * 1024 + 5)}
    )
    (problem,) = launcher(api, folder)["problems"]
    assert "at most 1024 KiB" in problem["message"]  # (worded as validate_model_folder words it)


@pytest.mark.parametrize(("who", "status"), [("owner", 200), ("teammate", 200), ("admin", 200), ("stranger", 404)])
def test_launcher_personas(api: Any, personas: dict[str, Any], who: str, status: int) -> None:
    folder = FolderFactory(owner=personas["owner"], project=personas["project"], name="p")
    assert api(who).get(f"/api/v1/folders/{folder.pk}/launcher/").status_code == status
