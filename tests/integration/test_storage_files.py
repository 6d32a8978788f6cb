"""The files API (S1.2, docs/architecture.md): every explorer action, every refused path, the quota, the personas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from storage.models import Folder
from tests.factories import FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="shared",
        usage_mode=Folder.UsageMode.GENERAL,
        files={"README.md": "hello\n", "models/weights.bin": "w" * 10, "conf/service.toml": 'a = "b"\n'},
    )


def url(folder: Folder, tail: str = "") -> str:
    return f"/api/v1/folders/{folder.pk}/{tail}"


def put(client: Any, folder: Folder, path: str, body: bytes, **extra: Any) -> Any:
    return client.put(url(folder, f"files/{path}"), data=body, content_type="application/octet-stream", **extra)


def body_of(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


# --- listing -------------------------------------------------------------------------------------


def test_list_root_and_subdirectory(api: Any, folder: Folder) -> None:
    response = api("owner").get(url(folder, "files/"))
    assert response.status_code == 200
    assert [(e["name"], e["type"], e["path"]) for e in response.json()] == [
        ("conf", "dir", "conf"),
        ("models", "dir", "models"),
        ("README.md", "file", "README.md"),
    ]
    (entry,) = api("owner").get(url(folder, "files/"), {"path": "models"}).json()
    assert entry == {
        "name": "weights.bin",
        "path": "models/weights.bin",
        "type": "file",
        "size": 10,
        "modified": entry["modified"],
    }
    assert entry["modified"].endswith("Z") or "+" in entry["modified"]


def test_list_missing_and_file(api: Any, folder: Folder) -> None:
    missing = api("owner").get(url(folder, "files/"), {"path": "nope"})
    assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]
    not_dir = api("owner").get(url(folder, "files/"), {"path": "README.md"})
    assert not_dir.status_code == 409 and "not a directory" in not_dir.json()["detail"]


def test_list_shows_symlink_but_never_follows_it(api: Any, folder: Folder, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside, folder.host_path / "escape")
    entries = {e["name"]: e for e in api("owner").get(url(folder, "files/")).json()}
    assert entries["escape"]["type"] == "symlink"
    response = api("owner").get(url(folder, "files/"), {"path": "escape"})
    assert response.status_code == 400 and "symbolic link" in response.json()["detail"]
    download = api("owner").get(url(folder, "files/escape/secret.txt"))
    assert download.status_code == 400 and "symbolic link" in download.json()["detail"]


# --- upload with the raw body, download, delete ------------------------------------------------------


def test_put_creates_parents_then_replaces(api: Any, folder: Folder) -> None:
    created = put(api("owner"), folder, "new/deep/model.safetensors", b"0123456789")
    assert created.status_code == 201, created.content
    assert created.json()["path"] == "new/deep/model.safetensors" and created.json()["size"] == 10
    assert (folder.host_path / "new" / "deep" / "model.safetensors").read_bytes() == b"0123456789"
    replaced = put(api("teammate"), folder, "new/deep/model.safetensors", b"abc")
    assert replaced.status_code == 200 and replaced.json()["size"] == 3
    assert not any((folder.host_path / ".modelserve-uploads").iterdir())


def test_download_whole_and_ranges(api: Any, folder: Folder) -> None:
    put(api("owner"), folder, "data.bin", bytes(range(100)))
    whole = api("owner").get(url(folder, "files/data.bin"))
    assert whole.status_code == 200 and body_of(whole) == bytes(range(100))
    assert whole["Content-Length"] == "100" and whole["Accept-Ranges"] == "bytes"
    assert whole["Content-Disposition"] == 'attachment; filename="data.bin"'
    part = api("owner").get(url(folder, "files/data.bin"), HTTP_RANGE="bytes=10-19")
    assert part.status_code == 206 and body_of(part) == bytes(range(10, 20))
    assert part["Content-Range"] == "bytes 10-19/100" and part["Content-Length"] == "10"
    tail = api("owner").get(url(folder, "files/data.bin"), HTTP_RANGE="bytes=-5")
    assert body_of(tail) == bytes(range(95, 100))
    open_end = api("owner").get(url(folder, "files/data.bin"), HTTP_RANGE="bytes=98-")
    assert body_of(open_end) == bytes([98, 99])
    beyond = api("owner").get(url(folder, "files/data.bin"), HTTP_RANGE="bytes=200-300")
    assert beyond.status_code == 416 and beyond["Content-Range"] == "bytes */100"
    stale = api("owner").get(url(folder, "files/data.bin"), HTTP_RANGE="bytes=0-1", HTTP_IF_RANGE='"old"')
    assert stale.status_code == 200 and len(body_of(stale)) == 100
    fresh = api("owner").get(url(folder, "files/data.bin"), HTTP_RANGE="bytes=0-1", HTTP_IF_RANGE=whole["ETag"])
    assert fresh.status_code == 206


def test_download_html_is_an_attachment(api: Any, folder: Folder) -> None:
    put(api("owner"), folder, "page.html", b"<script>alert(1)</script>")
    response = api("owner").get(url(folder, "files/page.html"))
    assert response["Content-Disposition"].startswith("attachment")
    assert response["Content-Type"] == "text/html"


def test_download_directory_and_missing(api: Any, folder: Folder) -> None:
    directory = api("owner").get(url(folder, "files/models"))
    assert directory.status_code == 400 and "is a directory" in directory.json()["detail"]
    assert api("owner").get(url(folder, "files/missing.bin")).status_code == 404


def test_delete_file_and_tree(api: Any, folder: Folder) -> None:
    assert api("teammate").delete(url(folder, "files/README.md")).status_code == 204
    assert api("owner").delete(url(folder, "files/models")).status_code == 204
    assert not (folder.host_path / "models").exists()
    assert api("owner").delete(url(folder, "files/models")).status_code == 404


# --- mkdir, move, preview ----------------------------------------------------------------------------


def test_mkdir(api: Any, folder: Folder) -> None:
    made = api("owner").post(url(folder, "mkdir/"), {"path": "checkpoints"}, format="json")
    assert made.status_code == 201 and made.json()["type"] == "dir"
    again = api("owner").post(url(folder, "mkdir/"), {"path": "checkpoints"}, format="json")
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    deep = api("owner").post(url(folder, "mkdir/"), {"path": "a/b/c", "parents": True}, format="json")
    assert deep.status_code == 201 and (folder.host_path / "a" / "b" / "c").is_dir()
    missing = api("owner").post(url(folder, "mkdir/"), {}, format="json")
    assert missing.status_code == 400 and "'path' is required" in missing.json()["detail"]


def test_move_and_rename(api: Any, folder: Folder) -> None:
    client = api("teammate")
    renamed = client.post(url(folder, "move/"), {"src": "README.md", "dst": "README.txt"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["path"] == "README.txt"
    moved = client.post(url(folder, "move/"), {"src": "README.txt", "dst": "models/README.txt"}, format="json")
    assert moved.status_code == 200 and (folder.host_path / "models" / "README.txt").exists()
    clash = client.post(url(folder, "move/"), {"src": "conf", "dst": "models"}, format="json")
    assert clash.status_code == 409
    into_itself = client.post(url(folder, "move/"), {"src": "models", "dst": "models/inner"}, format="json")
    assert into_itself.status_code == 400 and "into itself" in into_itself.json()["detail"]


def test_preview(api: Any, folder: Folder) -> None:
    response = api("owner").get(url(folder, "preview/"), {"path": "conf/service.toml"})
    assert response.status_code == 200
    assert response.json() == {"path": "conf/service.toml", "size": 8, "truncated": False, "text": 'a = "b"\n'}
    put(api("owner"), folder, "model.bin", b"\x00\x01binary")
    binary = api("owner").get(url(folder, "preview/"), {"path": "model.bin"})
    assert binary.status_code == 415 and "binary" in binary.json()["detail"]
    put(api("owner"), folder, "train.log", b"line\n" * 60000)
    big = api("owner").get(url(folder, "preview/"), {"path": "train.log"}).json()
    assert big["truncated"] is True and big["size"] == 300000 and len(big["text"]) == 256 * 1024


# --- multipart upload for the browser ---------------------------------------------------------------


def test_multipart_upload_many_files(api: Any, folder: Folder) -> None:
    files = [SimpleUploadedFile("a.txt", b"aaa"), SimpleUploadedFile("b.bin", b"\x00" * 1000)]
    response = api("teammate").post(url(folder, "upload/"), {"path": "incoming", "files": files}, format="multipart")
    assert response.status_code == 201, response.content
    assert [(e["path"], e["size"]) for e in response.json()["uploaded"]] == [
        ("incoming/a.txt", 3),
        ("incoming/b.bin", 1000),
    ]
    assert (folder.host_path / "incoming" / "b.bin").stat().st_size == 1000
    in_query = api("owner").post(
        url(folder, "upload/") + "?path=models", {"files": [SimpleUploadedFile("c.txt", b"c")]}, format="multipart"
    )
    assert in_query.status_code == 201 and in_query.json()["uploaded"][0]["path"] == "models/c.txt"
    assert not any((folder.host_path / ".modelserve-uploads").iterdir())


def test_multipart_upload_refusals(api: Any, folder: Folder) -> None:
    none = api("owner").post(url(folder, "upload/"), {"path": "x"}, format="multipart")
    assert none.status_code == 400 and "at least one file" in none.json()["detail"]
    bad_dir = api("owner").post(
        url(folder, "upload/"), {"path": "../x", "files": [SimpleUploadedFile("a", b"a")]}, format="multipart"
    )
    assert bad_dir.status_code == 400 and "'..'" in bad_dir.json()["detail"]
    onto_dir = api("owner").post(
        url(folder, "upload/"), {"files": [SimpleUploadedFile("models", b"a")]}, format="multipart"
    )
    assert onto_dir.status_code == 409 and "is a directory" in onto_dir.json()["detail"]
    assert not (folder.host_path / "x").exists()


def test_multipart_over_quota_saves_nothing(api: Any, folder: Folder) -> None:
    Folder.objects.filter(pk=folder.pk).update(quota_bytes=100)
    files = [SimpleUploadedFile("a.bin", b"a" * 50), SimpleUploadedFile("b.bin", b"b" * 50)]  # 20 + 100 > 100
    response = api("owner").post(url(folder, "upload/"), {"files": files}, format="multipart")
    assert response.status_code == 413 and "quota" in response.json()["detail"]
    assert not (folder.host_path / "a.bin").exists() and not (folder.host_path / "b.bin").exists()
    assert not any((folder.host_path / ".modelserve-uploads").iterdir())


# --- every refused path, through the API --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("..%2Foutside.txt", "'..'"),
        ("a/../../outside.txt", "'..'"),
        ("./x", "'.'"),
        ("a%00b", "NUL byte"),
        ("a//b", "empty name"),
        ("x" * 256, "limit is 255 bytes"),
        ("/".join(["y" * 250] * 17), "limit is 4096 bytes"),
        ("a%0Ab", "control character"),
        (".modelserve-uploads/x.part", "reserved"),
    ],
)
def test_refused_paths_for_put(api: Any, folder: Folder, path: str, words: str) -> None:
    response = api("owner").put(url(folder, f"files/{path}"), data=b"x", content_type="application/octet-stream")
    assert response.status_code == 400, response.content
    assert words in response.json()["detail"]
    assert sorted(p.name for p in folder.host_path.iterdir() if p.name != ".modelserve-uploads") == [
        "README.md",
        "conf",
        "models",
    ]


@pytest.mark.parametrize("path", ["/etc/passwd", "../../etc/passwd", "a\x00b", "", "a//b", "."])
def test_refused_paths_for_every_operation(api: Any, folder: Folder, path: str) -> None:
    client = api("owner")
    answers = [
        client.get(url(folder, "files/"), {"path": path or "//"}),
        client.get(url(folder, "preview/"), {"path": path}),
        client.post(url(folder, "mkdir/"), {"path": path}, format="json"),
        client.post(url(folder, "move/"), {"src": "README.md", "dst": path}, format="json"),
        client.post(url(folder, "move/"), {"src": path, "dst": "x"}, format="json"),
    ]
    for response in answers:
        assert response.status_code == 400, (response.request, response.content)
        assert response.json()["detail"]
    assert (folder.host_path / "README.md").exists()


def test_absolute_path_in_url(api: Any, folder: Folder) -> None:
    # files//etc/passwd: the path after files/ starts with '/'
    response = api("owner").get(url(folder, "files//etc/passwd"))
    assert response.status_code == 400 and "absolute path" in response.json()["detail"]


def test_symlink_out_refused_for_upload_and_delete(api: Any, folder: Folder, tmp_path: Path) -> None:
    outside = tmp_path / "outside-w"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    os.symlink(outside, folder.host_path / "escape")
    upload = put(api("owner"), folder, "escape/planted.txt", b"evil")
    assert upload.status_code == 400 and "symbolic link" in upload.json()["detail"]
    delete = api("owner").delete(url(folder, "files/escape/victim.txt"))
    assert delete.status_code == 400
    mkdir = api("owner").post(url(folder, "mkdir/"), {"path": "escape/x", "parents": True}, format="json")
    assert mkdir.status_code == 400
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert api("owner").delete(url(folder, "files/escape")).status_code == 204  # the link itself may go
    assert (outside / "victim.txt").read_text() == "keep me"


# --- quota -------------------------------------------------------------------------------------------


def test_quota_refused_before_upload_by_content_length(api: Any, folder: Folder) -> None:
    Folder.objects.filter(pk=folder.pk).update(quota_bytes=100)  # 24 bytes used
    response = put(api("owner"), folder, "big.bin", b"x" * 77)
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "would exceed the folder's quota of 100 bytes" in detail and "76 bytes is free" in detail
    assert not (folder.host_path / "big.bin").exists()
    assert put(api("owner"), folder, "fits.bin", b"x" * 76).status_code == 201


def test_quota_counted_during_upload_without_length(api: Any, folder: Folder) -> None:
    Folder.objects.filter(pk=folder.pk).update(quota_bytes=100)
    from storage import actions

    folder.refresh_from_db()
    chunks = iter([b"x" * 50, b"x" * 50])
    with pytest.raises(Exception, match="quota"):
        actions.do_upload_file(folder, "stream.bin", chunks, acting_user=folder.owner)
    assert not (folder.host_path / "stream.bin").exists()
    assert not any((folder.host_path / ".modelserve-uploads").iterdir())


def test_usage_in_folder_detail(api: Any, folder: Folder) -> None:
    body = api("owner").get(url(folder)).json()
    assert (body["used_bytes"] == 24 and body["effective_quota"] == body["quota_bytes"]) or body["quota_bytes"] is None


# --- personas: owner, teammate, stranger, admin, anonymous --------------------------------------------


@pytest.mark.parametrize(
    ("who", "read", "write"),
    [
        ("owner", 200, 201),
        ("teammate", 200, 201),
        ("stranger", 404, 404),
        ("admin", 200, 201),
        (None, 401, 401),
    ],
)
def test_persona_matrix_for_files(api: Any, folder: Folder, who: str | None, read: int, write: int) -> None:
    client = api(who)
    assert client.get(url(folder, "files/")).status_code == read
    assert client.get(url(folder, "files/README.md")).status_code == read
    assert client.get(url(folder, "files/no-such-file")).status_code == (404 if read == 200 else read)
    assert client.get(url(folder, "preview/"), {"path": "README.md"}).status_code == read
    assert client.get(url(folder, "launcher/")).status_code == read
    assert put(client, folder, f"by-{who}.txt", b"x").status_code == write
    assert client.post(url(folder, "mkdir/"), {"path": f"dir-{who}"}, format="json").status_code == write
    moved = client.post(url(folder, "move/"), {"src": "README.md", "dst": f"moved-{who}.md"}, format="json")
    assert moved.status_code == (200 if write == 201 else write)
    multipart = client.post(url(folder, "upload/"), {"files": [SimpleUploadedFile("m.txt", b"m")]}, format="multipart")
    assert multipart.status_code == write
    assert client.delete(url(folder, "files/conf")).status_code == (204 if write == 201 else write)
    if write != 201:
        assert sorted(p.name for p in folder.host_path.iterdir() if not p.name.startswith(".")) == [
            "README.md",
            "conf",
            "models",
        ]


def test_stranger_gets_404_for_any_folder_id(api: Any, folder: Folder) -> None:
    other = "00000000-0000-0000-0000-000000000000"
    for client in (api("stranger"), api("owner")):
        assert client.get(f"/api/v1/folders/{other}/files/").status_code == 404
    stranger_answer = api("stranger").get(url(folder, "files/README.md"))
    missing_answer = api("stranger").get(f"/api/v1/folders/{other}/files/README.md")
    assert stranger_answer.json() == missing_answer.json()
