"""build_spec reads the model definition through storage.fs: nothing outside the folder is ever read."""

from __future__ import annotations

import os
from typing import Any

import pytest

from serving.models import Endpoint, Route
from serving.node import replicas
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(owner=personas["owner"], name="model", usage_mode="model", files={"x": "x"})


def route_of(api: Any, folder: Folder, **extra: Any) -> Route:
    body = {"name": f"svc-{os.urandom(3).hex()}", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    created = api("owner").post("/api/v1/services/", {**body, **extra}, format="json")
    assert created.status_code == 201, created.json()
    return Route(endpoint=Endpoint.objects.get(pk=created.json()["id"]))


def test_definition_is_read_and_yml_is_the_fallback(api: Any, folder: Folder) -> None:
    (folder.host_path / "model-definition.yml").write_text(SIMPLE_DEFINITION)
    spec, health = replicas.build_spec(route_of(api, folder))
    assert spec.port and health is not None


@pytest.mark.parametrize("how", ["file symlink", "directory symlink"])
def test_symlinks_out_of_the_folder_are_refused(api: Any, folder: Folder, tmp_path: Any, how: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model-definition.yaml").write_text(SIMPLE_DEFINITION)
    if how == "file symlink":
        (folder.host_path / "model-definition.yaml").symlink_to(outside / "model-definition.yaml")
        route = route_of(api, folder)
    else:
        (folder.host_path / "sub").symlink_to(outside)
        route = route_of(api, folder, model_definition_path="sub/model-definition.yaml")
    with pytest.raises(replicas.SpecError) as caught:
        replicas.build_spec(route)
    assert caught.value.kind == "definition"
    assert "symbolic link" in str(caught.value), str(caught.value)


def test_missing_and_oversized_definitions_say_what_to_do(api: Any, folder: Folder) -> None:
    with pytest.raises(replicas.SpecError, match=r"has no model-definition\.yaml"):
        replicas.build_spec(route_of(api, folder))
    (folder.host_path / "model-definition.yaml").write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(replicas.SpecError, match="at most 1024 KiB"):  # read_folder_file's words
        replicas.build_spec(route_of(api, folder))


def test_a_node_without_the_folders_data_says_so(api: Any, folder: Folder) -> None:
    """The shared reader (folders.read_folder_file) still tells a missing folder directory (this
    node has not the folder's data) from a bad definition file."""
    import shutil

    route = route_of(api, folder)
    shutil.rmtree(folder.host_path)
    with pytest.raises(replicas.SpecError, match="has no data on this node") as caught:
        replicas.build_spec(route)
    assert caught.value.kind == "folder"
