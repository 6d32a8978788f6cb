"""Issue 13, item 4: a symlink planted in a folder must never make the platform read a host file.

A replica can write into the folders it mounts (and a folder's usage mode can change later), so it
can leave ``service-definition.toml -> /etc/shadow`` behind. The web app read that file with a
plain ``open`` (serving/folders.py) and a 0600 secret came back through the API as the service's
image. Every code path that reads a folder's content now goes through storage/fs.py, which opens
each path component without following a link.

The test plants a symlink to a secret outside the folder at each name the platform reads, then
walks every code path that reads one: launcher defaults (page and API), "Run this model", service
create, the folder API, downloads and previews (API and page), the replica's start (build_spec),
and ``manage.py validate_model_folder``. The secret never comes back, and the user is told why.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from serving import folders
from serving.models import Endpoint, Route
from serving.node import replicas
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db

SERVICE_DEFINITION = '[custom.environment]\nimage = "modelserve/python:3.11"\narchitecture = "x86_64"\n'


def _secrets(base: Path, marker: str) -> dict[str, Path]:
    """Host files a replica would like to read, each mode 0600, each a well-formed definition (so
    a path that followed the link would show the marker in the values it fills) or plain text."""
    base.mkdir()
    files = {
        "toml": (
            f'[custom.environment]\nimage = "{marker}"\narchitecture = "x86_64"\n'
            f'[custom.environ]\nLEAKED = "{marker}"\n'
        ),
        "yaml": SIMPLE_DEFINITION.replace('"simple-http-server"', f'"{marker}"').replace(
            "/models, ", f"/models-{marker}, "
        ),
        "text": f"root:{marker}:19000:0:99999:7:::\n",
    }
    out = {}
    for kind, body in files.items():
        path = base / f"secret.{kind}"
        path.write_text(body)
        path.chmod(0o600)
        out[kind] = path
    (base / "conf").mkdir()  # for a symlinked directory on a custom definition path
    (base / "conf" / "serve.yaml").write_text(files["yaml"])
    (base / "conf" / "serve.yaml").chmod(0o600)
    return out


# (where the link is planted, what it points to, the model definition path the service uses)
CASES = [
    ("model-definition.yaml", "yaml", "model-definition.yaml"),
    ("model-definition.yaml", "text", "model-definition.yaml"),
    ("model-definition.yml", "yaml", "model-definition.yaml"),  # the fallback name of the default path
    ("conf/serve.yaml", "yaml", "conf/serve.yaml"),  # a custom definition path
    ("conf", "conf", "conf/serve.yaml"),  # ... with a symlinked directory on its way
    ("service-definition.toml", "toml", "model-definition.yaml"),
    ("service-definition.toml", "text", "model-definition.yaml"),
]


@pytest.mark.parametrize(("planted", "target", "definition_path"), CASES)
def test_symlink_planted_by_a_replica_never_leaks_a_host_secret(
    personas: dict[str, Any], tmp_path: Path, planted: str, target: str, definition_path: str
) -> None:
    owner = personas["owner"]
    marker = f"HOST-SECRET-{uuid.uuid4().hex[:12]}"
    secrets = _secrets(tmp_path / "host", marker)
    points_to = tmp_path / "host" / "conf" if target == "conf" else secrets[target]
    # Every file the platform reads is there as a regular file, except the one the link replaces.
    files = {"service-definition.toml": SERVICE_DEFINITION}
    if definition_path == "model-definition.yaml" and not planted.startswith("model-definition."):
        files["model-definition.yaml"] = SIMPLE_DEFINITION
    files.pop(planted, None)
    folder = FolderFactory(owner=owner, name=f"f{marker[-8:]}", files=files)
    link = Path(folder.host_path) / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(points_to)
    assert marker in (link / "serve.yaml" if target == "conf" else link).read_text()  # the bait works

    api, page = Client(), Client()
    api.force_login(owner)
    page.force_login(owner)
    seen: dict[str, str] = {}

    def look(name: str, text: str | bytes) -> str:
        text = text.decode(errors="replace") if isinstance(text, bytes) else text
        seen[name] = text
        return text

    base = f"/api/v1/folders/{folder.pk}"
    q = "" if definition_path == "model-definition.yaml" else f"model_definition_path={definition_path}"
    launcher_api = look("launcher API", api.get(f"{base}/launcher/?{q}").content)
    look("launcher defaults (page)", page.get(f"/services/new/defaults/?folder={folder.pk}&runtime=custom").content)
    look("launcher (Run this model)", page.get(f"/services/new/?folder={folder.pk}&runtime=custom").content)
    look("folder API (runnable)", api.get(f"{base}/").content)
    look("folder list (model store)", page.get("/folders/").content)
    look("explorer", page.get(f"/folders/{folder.pk}/").content)
    download = api.get(f"{base}/files/{planted}/serve.yaml" if target == "conf" else f"{base}/files/{planted}")
    look("download", b"".join(download.streaming_content) if download.streaming else download.content)
    look("preview API", api.get(f"{base}/preview/?path={planted}").content)
    look("preview page", page.get(f"/folders/{folder.pk}/preview/?path={planted}").content)
    created = api.post(
        "/api/v1/services/",
        json.dumps({"name": f"s{marker[-8:]}", "folder": str(folder.pk), "model_definition_path": definition_path}),
        content_type="application/json",
    )
    look("service create", created.content)
    look("folders.folder_defaults", repr(folders.folder_defaults(folder, "custom")))

    start_message = ""
    if created.status_code == 201:
        endpoint = Endpoint.objects.get(pk=created.json()["id"])
        route = Route.objects.create(endpoint=endpoint, node=None, status=Route.Status.PROVISIONING, error={})
        try:
            spec, _health = replicas.build_spec(route)
            start_message = look("replica start", repr(spec))
        except replicas.SpecError as exc:
            start_message = look("replica start", str(exc))

    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command(
            "validate_model_folder", str(folder.host_path), definition_path=definition_path, stdout=out, stderr=err
        )
    assert exit_info.value.code == 1
    command = look("validate_model_folder", out.getvalue() + err.getvalue())

    leaks = [name for name, text in seen.items() if marker in text]
    assert not leaks, f"the host secret came back through: {', '.join(leaks)}"

    # The user is told what is wrong and what to do, where the file was read.
    assert download.status_code == 400 and "symbolic link" in download.json()["detail"]
    assert "symbolic link" in command
    assert api.get(f"{base}/").json()["runnable"] is False
    if planted == "service-definition.toml":
        problems = json.loads(launcher_api)["problems"]
        assert [p["file"] for p in problems] == ["service-definition.toml"]
        assert "symbolic link" in problems[0]["message"] and "upload the file itself" in problems[0]["message"]
        assert "symbolic link" in " ".join(folders.folder_defaults(folder, "custom").problems)
    else:
        assert "symbolic link" in json.dumps(json.loads(launcher_api)["problems"])
        assert "symbolic link" in start_message and "model-definition.yaml" in start_message


def test_a_link_swapped_in_after_the_check_is_not_followed(personas: dict[str, Any], tmp_path: Path) -> None:
    """No check-then-open race: the open itself refuses a link (O_NOFOLLOW on every component)."""
    from serving.core import definitions
    from storage.fs import FolderFS

    secret = tmp_path / "shadow"
    secret.write_text('[custom.environment]\nimage = "HOST-SECRET"\n')
    folder = FolderFactory(owner=personas["owner"], files={"service-definition.toml": SERVICE_DEFINITION})
    root = Path(folder.host_path)
    assert FolderFS(root).stat("service-definition.toml").type == "file"  # a check would pass here...
    (tmp_path / "link").symlink_to(secret)
    os.replace(tmp_path / "link", root / "service-definition.toml")  # a replica swaps a link in
    with pytest.raises(definitions.DefinitionError, match="symbolic link"):
        folders.read_folder_file(FolderFS(root), "service-definition.toml")  # ... the read refuses
    assert folders.folder_defaults(folder, "custom").image == ""
