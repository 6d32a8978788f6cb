"""Folder pages (S1.1-S1.3): tabs, create, explorer actions, preview, model store, personas, escaping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import URLResolver, include, path

from config.urls import urlpatterns as _project_urls
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

# The pages are mounted at folders/ by config/urls.py; until that line lands, mount them here.
urlpatterns = list(_project_urls)
if not any(isinstance(p, URLResolver) and p.app_name == "storage" for p in urlpatterns):
    urlpatterns.append(path("folders/", include("storage.urls")))

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"

[custom.resource_slots]
cpu = 1
mem = "1g"

[custom.environ]
MODEL_NAME = "simple"
"""


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="shared",
        usage_mode=Folder.UsageMode.GENERAL,
        files={"README.md": "hello\n", "models/weights.bin": "w" * 10},
    )


def page(folder: Folder, tail: str = "") -> str:
    return f"/folders/{folder.pk}/{tail}"


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# --- folder list and tabs ----------------------------------------------------------------------------


def test_tabs_and_model_store(browser: Any, personas: dict[str, Any], folder: Folder) -> None:
    runnable = FolderFactory(
        owner=personas["owner"],
        name="runnable",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )
    FolderFactory(owner=personas["owner"], name="half-model", files={"model-definition.yaml": SIMPLE_DEFINITION})
    FolderFactory(owner=personas["owner"], name="datasets", usage_mode=Folder.UsageMode.DATA)
    FolderFactory(owner=personas["stranger"], name="not-yours")
    client = browser("owner")
    everything = client.get("/folders/").content.decode()
    for name in ("shared", "runnable", "half-model", "datasets"):
        assert name in everything
    assert "not-yours" not in everything
    models = client.get("/folders/?tab=model").content.decode()
    assert "runnable" in models and "half-model" in models and "datasets" not in models and "shared" not in models
    assert models.count("Run this model") == 1
    assert f"/services/new/?folder={runnable.pk}" in models  # "Run this model" opens the launcher (S1.3)
    data = client.get("/folders/?tab=data").content.decode()
    assert "datasets" in data and "runnable" not in data
    assert 'aria-current="page"' in data


def test_create_folder_form(browser: Any, personas: dict[str, Any]) -> None:
    client = browser("teammate")
    response = client.post(
        "/folders/?tab=model",
        {"name": "weights", "usage_mode": "model", "project": personas["project"].pk, "quota_gib": "0.5"},
    )
    created = Folder.objects.get(name="weights")
    assert response.status_code == 302 and response["Location"] == f"/folders/{created.pk}/"
    assert created.project == personas["project"] and created.quota_bytes == 512 * 1024**2
    assert created.host_path.is_dir()
    again = client.post("/folders/", {"name": "weights"}, follow=True)
    assert any("already have a folder" in m for m in messages_of(again))
    bad = client.post("/folders/", {"name": "../evil"}, follow=True)
    assert any("1-64 letters" in m for m in messages_of(bad))
    over = client.post("/folders/", {"name": "huge", "quota_gib": "100000"}, follow=True)
    assert any("Only an operator" in m for m in messages_of(over))
    not_member = client.post("/folders/", {"name": "x", "project": "999"}, follow=True)
    assert any("No such project" in m for m in messages_of(not_member))


def test_anonymous_is_sent_to_login(browser: Any, folder: Folder) -> None:
    for url in ("/folders/", page(folder), page(folder, "preview/?path=README.md")):
        response = browser(None).get(url)
        assert response.status_code == 302 and "/accounts/login/" in response["Location"]


# --- explorer -----------------------------------------------------------------------------------------


def test_explorer_lists_with_breadcrumbs(browser: Any, folder: Folder) -> None:
    client = browser("teammate")
    root = client.get(page(folder)).content.decode()
    assert "README.md" in root and f'href="/folders/{folder.pk}/?path=models"' in root
    assert f'href="/api/v1/folders/{folder.pk}/files/README.md"' in root
    inside = client.get(page(folder), {"path": "models"}).content.decode()
    assert "weights.bin" in inside and "10 bytes" in inside
    assert '<span aria-current="page">models</span>' in inside
    assert f'<a href="/folders/{folder.pk}/">shared</a>' in inside
    assert "Parent directory" in inside


def test_explorer_refuses_bad_paths_with_a_sentence(browser: Any, folder: Folder, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside, folder.host_path / "escape")
    client = browser("owner")
    for bad, words in (("../..", "'..'"), ("escape", "symbolic link"), ("nope", "does not exist")):
        body = client.get(page(folder), {"path": bad}).content.decode()
        assert words.replace("'", "&#x27;") in body
        assert "secret.txt" not in body
    listing = client.get(page(folder)).content.decode()
    assert "symbolic link (not followed)" in listing


def test_names_are_escaped(browser: Any, folder: Folder) -> None:
    evil = '<img src=x onerror="alert(1)">.txt'
    (folder.host_path / evil).write_text("<script>alert(2)</script>")
    client = browser("owner")
    listing = client.get(page(folder)).content.decode()
    assert "<img src=x" not in listing and "&lt;img src=x" in listing
    preview = client.get(page(folder, "preview/"), {"path": evil}).content.decode()
    assert "<script>alert(2)" not in preview and "&lt;script&gt;alert(2)" in preview


def test_mkdir_move_delete_through_forms(browser: Any, folder: Folder) -> None:
    client = browser("teammate")
    made = client.post(page(folder, "mkdir/"), {"cwd": "models", "name": "checkpoints"})
    assert made.status_code == 302 and made["Location"] == f"/folders/{folder.pk}/?path=models"
    assert (folder.host_path / "models" / "checkpoints").is_dir()
    moved = client.post(page(folder, "move/"), {"src": "README.md", "dst": "models/README.md"}, follow=True)
    assert any("is now" in m for m in messages_of(moved))
    assert (folder.host_path / "models" / "README.md").exists()
    deleted = client.post(page(folder, "delete-path/"), {"path": "models/checkpoints", "cwd": "models"}, follow=True)
    assert any("deleted" in m for m in messages_of(deleted))
    assert not (folder.host_path / "models" / "checkpoints").exists()
    refused = client.post(page(folder, "mkdir/"), {"cwd": "", "name": ".."}, follow=True)
    assert any("'..'" in m for m in messages_of(refused))
    clash = client.post(page(folder, "move/"), {"src": "models/README.md", "dst": "models"}, follow=True)
    assert any("already exists" in m for m in messages_of(clash))
    nested = client.post(page(folder, "mkdir/"), {"cwd": "", "name": "a/b"}, follow=True)
    assert any("can not contain '/'" in m for m in messages_of(nested))


def test_plain_html_upload_form_comes_back_to_the_explorer(browser: Any, folder: Folder) -> None:
    client = browser("owner")
    back = f"/folders/{folder.pk}/?path=models"
    response = client.post(
        f"/api/v1/folders/{folder.pk}/upload/?path=models&next={back}",
        {"files": [SimpleUploadedFile("one.txt", b"1"), SimpleUploadedFile("two.txt", b"2")]},
    )
    assert response.status_code == 303 and response["Location"] == back
    assert (folder.host_path / "models" / "two.txt").read_bytes() == b"2"
    offsite = client.post(
        f"/api/v1/folders/{folder.pk}/upload/?next=https://evil.example/",
        {"files": [SimpleUploadedFile("three.txt", b"3")]},
    )
    assert offsite.status_code == 201


def test_preview_page(browser: Any, folder: Folder) -> None:
    (folder.host_path / "config.yaml").write_text("key: value\n")
    client = browser("owner")
    body = client.get(page(folder, "preview/"), {"path": "config.yaml"}).content.decode()
    assert "key: value" in body and "<pre" in body
    (folder.host_path / "blob.bin").write_bytes(b"\x00\x01")
    binary = client.get(page(folder, "preview/"), {"path": "blob.bin"})
    assert binary.status_code == 400 and "binary" in binary.content.decode()


def test_explorer_wires_the_upload_script(browser: Any, folder: Folder) -> None:
    body = browser("owner").get(page(folder), {"path": "models"}).content.decode()
    assert f'data-upload-url="/api/v1/folders/{folder.pk}/upload/"' in body
    assert 'data-cwd="models"' in body
    assert "js/explorer.js" in body
    assert '<label for="upload-files">' in body and 'id="upload-files"' in body


# --- folder settings and deletion -----------------------------------------------------------------------


def test_settings_only_for_managers(browser: Any, folder: Folder) -> None:
    assert "Folder settings" in browser("owner").get(page(folder)).content.decode()
    assert "Folder settings" not in browser("teammate").get(page(folder)).content.decode()
    assert browser("teammate").post(page(folder, "settings/"), {"name": "renamed"}).status_code == 403
    assert browser("teammate").post(page(folder, "delete/"), {"confirm_name": "shared"}).status_code == 403
    renamed = browser("owner").post(page(folder, "settings/"), {"name": "renamed", "usage_mode": "data"}, follow=True)
    assert any("saved" in m for m in messages_of(renamed))
    folder.refresh_from_db()
    assert (folder.name, folder.usage_mode) == ("renamed", "data")


def test_delete_folder_needs_its_name(browser: Any, folder: Folder) -> None:
    client = browser("owner")
    wrong = client.post(page(folder, "delete/"), {"confirm_name": "nope"}, follow=True)
    assert any("Type the folder's name" in m for m in messages_of(wrong))
    assert Folder.objects.filter(pk=folder.pk).exists()
    gone = client.post(page(folder, "delete/"), {"confirm_name": "shared"})
    assert gone.status_code == 302 and gone["Location"] == "/folders/"
    assert not Folder.objects.filter(pk=folder.pk).exists()


def test_delete_folder_refused_while_a_service_mounts_it(browser: Any, api: Any, personas: dict[str, Any]) -> None:
    model = FolderFactory(owner=personas["owner"], name="m", files={"model-definition.yaml": SIMPLE_DEFINITION})
    data = FolderFactory(owner=personas["owner"], name="d", usage_mode=Folder.UsageMode.DATA)
    created = api("owner").post(
        "/api/v1/services/",
        {"name": "uses-both", "folder": str(model.pk), "extra_mounts": [{"folder": str(data.pk), "target": "/data"}]},
        format="json",
    )
    assert created.status_code == 201, created.json()
    for mounted in (model, data):
        refused = browser("owner").post(page(mounted, "delete/"), {"confirm_name": mounted.name}, follow=True)
        assert any("uses-both" in m for m in messages_of(refused)), messages_of(refused)
        assert Folder.objects.filter(pk=mounted.pk).exists() and mounted.host_path.is_dir()
        api_refused = api("owner").delete(f"/api/v1/folders/{mounted.pk}/")
        assert api_refused.status_code == 400 and "uses-both" in api_refused.json()["detail"]


# --- personas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "status"), [("owner", 200), ("teammate", 200), ("admin", 200), ("stranger", 404)])
def test_persona_matrix_for_pages(browser: Any, folder: Folder, who: str, status: int) -> None:
    client = browser(who)
    assert client.get(page(folder)).status_code == status
    assert client.get(page(folder, "preview/"), {"path": "README.md"}).status_code == status
    write = client.post(page(folder, "mkdir/"), {"cwd": "", "name": f"by-{who}"})
    assert write.status_code == (302 if status == 200 else 404)
    assert (folder.host_path / f"by-{who}").exists() == (status == 200)
    assert client.post(page(folder, "delete-path/"), {"path": "README.md"}).status_code in (302, 404)
    assert (folder.host_path / "README.md").exists() == (status != 200)


# --- model store: Run this model, and problems with file, field and line ----------------------------------


def test_run_panel_shows_launcher_defaults(browser: Any, personas: dict[str, Any]) -> None:
    model = FolderFactory(
        owner=personas["owner"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )
    body = browser("owner").get(page(model)).content.decode()
    assert 'id="run"' in body
    # "Run this model" opens the launcher page once it exists; until then the launcher values are linked.
    assert "Run this model" in body or f"/api/v1/folders/{model.pk}/launcher/?runtime=custom" in body
    assert "modelserve/python:3.11" in body and "MODEL_NAME=simple" in body and "x86_64" in body
    assert "mem=1.0 GiB" in body and "cpu=1<" in body


def test_run_panel_shows_problems_with_file_field_and_line(browser: Any, personas: dict[str, Any]) -> None:
    broken_yaml = SIMPLE_DEFINITION.replace("port: 8000", 'port: "eighty"')
    broken_toml = SERVICE_DEFINITION.replace("cpu = 1", 'cpu = "lots"')
    model = FolderFactory(
        owner=personas["owner"],
        name="broken",
        files={"model-definition.yaml": broken_yaml, "service-definition.toml": broken_toml},
    )
    body = browser("owner").get(page(model)).content.decode()
    assert "Problems in the definition files" in body
    assert "<code>model-definition.yaml</code>" in body and "models[0].service.port" in body
    assert "<code>service-definition.toml</code>" in body and "custom.resource_slots.cpu" in body
    port_line = broken_yaml.splitlines().index('      port: "eighty"') + 1
    assert f'<td data-label="Line">{port_line}:' in body
