"""Folders REST API with every persona (the explorer's file API comes with the Storage issue)."""

from __future__ import annotations

from typing import Any

import pytest

from storage.models import Folder
from tests.factories import FolderFactory

pytestmark = pytest.mark.django_db


def test_create_list_and_directory_named_by_id(api: Any, personas: dict[str, Any]) -> None:
    response = api("owner").post("/api/v1/folders/", {"name": "weights", "usage_mode": "model"}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    folder = Folder.objects.get(pk=body["id"])
    assert folder.host_path.name == body["id"] and folder.host_path.is_dir()
    assert [f["name"] for f in api("owner").get("/api/v1/folders/?usage_mode=model").json()] == ["weights"]
    again = api("owner").post("/api/v1/folders/", {"name": "weights"}, format="json")
    assert again.status_code == 400 and "already have a folder" in again.json()["name"][0]
    bad = api("owner").post("/api/v1/folders/", {"name": "../x", "usage_mode": "nope"}, format="json")
    assert set(bad.json()) == {"name", "usage_mode"}


@pytest.mark.parametrize(
    ("who", "read", "manage"),
    [("owner", 200, 200), ("teammate", 200, 403), ("stranger", 404, 404), ("admin", 200, 200)],
)
def test_persona_matrix(api: Any, personas: dict[str, Any], who: str, read: int, manage: int) -> None:
    folder = FolderFactory(owner=personas["owner"], project=personas["project"], name="shared")
    url = f"/api/v1/folders/{folder.pk}/"
    assert api(who).get(url).status_code == read
    assert (str(folder.pk) in [f["id"] for f in api(who).get("/api/v1/folders/").json()]) == (read == 200)
    assert api(who).patch(url, {"usage_mode": "data"}, format="json").status_code == manage
    assert api(who).delete(url).status_code == (204 if manage == 200 else manage)
    assert api(None).get(url).status_code in (401, 403)


def test_delete_refused_while_a_service_mounts_it(api: Any, personas: dict[str, Any]) -> None:
    from tests.factories import SIMPLE_DEFINITION

    folder = FolderFactory(owner=personas["owner"], name="m", files={"model-definition.yaml": SIMPLE_DEFINITION})
    created = api("owner").post("/api/v1/services/", {"name": "uses-m", "folder": str(folder.pk)}, format="json")
    assert created.status_code == 201
    response = api("owner").delete(f"/api/v1/folders/{folder.pk}/")
    assert response.status_code == 400
    assert "uses-m" in response.json()["detail"]
    assert api("owner").patch(f"/api/v1/folders/{folder.pk}/", {"usage_mode": "data"}, format="json").status_code == 400
    assert folder.host_path.is_dir()
