"""Hostile input at the REST API (issue 9, Security 3): oversized bodies, wrong types, unicode edge
cases in names, path traversal through every file route, and CSRF for session requests. The rule
for all: a 4xx with a sentence, never a 5xx, never a change outside the caller's folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.actions import do_issue_api_key
from serving.models import AutoScalingRule, Endpoint
from storage.models import Folder
from tests.security.world import World, build_world

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(personas: dict[str, Any]) -> Client:
    client = Client()
    client.force_login(personas["owner"])
    return client


def send(client: Client, method: str, url: str, body: Any, raw: bool = False) -> Any:
    data = body if raw else json.dumps(body)
    return client.generic(method, url, data, content_type="application/json")


def assert_refused_cleanly(response: Any, what: str) -> None:
    assert 400 <= response.status_code < 500, (what, response.status_code, response.content[:300])
    if response.get("Content-Type", "").startswith("application/json"):
        assert response.json(), what


# --- oversized and malformed bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "/api/v1/services/"),
        ("POST", "/api/v1/folders/"),
        ("PATCH", "/api/v1/services/{service}/"),
        ("POST", "/api/v1/services/{service}/rules/"),
        ("POST", "/api/v1/services/{service}/tokens/"),
        ("POST", "/api/v1/me/api-keys/"),
    ],
)
def test_an_oversized_json_body_is_refused(owner: Client, world: World, method: str, url: str) -> None:
    body = json.dumps({"name": "big", "environ": {"X": "a" * (9 * 1024 * 1024)}})
    response = send(owner, method, world.format(url), body, raw=True)
    assert response.status_code in (400, 413), response.status_code
    assert Endpoint.objects.count() == 1


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '"a string"',
        "null",
        "{",
        '{"name": "x"' + "}" * 10_000,
        "[" * 50_000 + "]" * 50_000,
        "\xff\xfe",
    ],
)
def test_a_body_that_is_not_an_object_is_refused(owner: Client, world: World, raw: str) -> None:
    for url in ("/api/v1/services/", "/api/v1/folders/", f"/api/v1/services/{world.service.pk}/rules/"):
        assert_refused_cleanly(send(owner, "POST", url, raw, raw=True), f"{url} {raw[:20]!r}")


SERVICE_BODIES = [
    {"name": ["svc1"]},
    {"name": {"a": 1}},
    {"name": None},
    {"replicas": "many"},
    {"replicas": 1.5},
    {"replicas": 10**30},
    {"replicas": -(10**30)},
    {"replicas": True},
    {"open_to_public": "maybe"},
    {"resources": "lots"},
    {"resources": {"cpu": "many"}},
    {"resources": {"cpu": -1}},
    {"resources": {"mem": 10**40}},
    {"resources": ["cpu"]},
    {"environ": ["A=1"]},
    {"environ": {"A": {"nested": 1}}},
    {"environ": {"A\u0000": "x"}},
    {"environ": {"A": "x\u0000"}},
    {"extra_mounts": "x"},
    {"extra_mounts": [1]},
    {"extra_mounts": [{"folder": 1, "target": 2}]},
    {"folder": 12345},
    {"folder": "../../"},
    {"folder": None},
    {"project": "team"},
    {"project": 10**12},
    {"runtime": ["custom"]},
    {"model_mount": "/models/../../etc"},
    {"model_mount": 5},
    {"model_definition_path": "../../../etc/passwd"},
    {"model_definition_path": "/etc/passwd"},
    {"cluster_size": "x"},
    {"cluster_mode": "everywhere"},
    {"preset": {"cpu": 1}},
    # Issue 13: loader variables (they would reach a privileged prelude), names that are not ASCII
    # identifiers, and cookies forwarded while every service shares the proxy's one origin.
    {"environ": {"LD_PRELOAD": "/models/evil.so"}},
    {"environ": {"LD_LIBRARY_PATH": "/models"}},
    {"environ": {"GCONV_PATH": "/models"}},
    {"environ": {"GLIBC_TUNABLES": "glibc.malloc.check=3"}},
    {"environ": {"MOD\u00c8LE": "x"}},
    {"environ": {"A B": "x"}},
    {"environ": {"1ABC": "x"}},
    {"forward_cookies": True},
    {"forward_cookies": "yes please"},
]


@pytest.mark.parametrize("change", SERVICE_BODIES, ids=lambda c: json.dumps(c)[:40])
def test_wrong_types_on_service_create_and_modify(owner: Client, world: World, change: dict[str, Any]) -> None:
    body = {"name": "svc-hostile", "folder": str(world.folder.pk), "runtime": "custom", "replicas": 1, **change}
    response = send(owner, "POST", "/api/v1/services/", body)
    assert_refused_cleanly(response, f"create {change}")
    assert not Endpoint.objects.filter(name="svc-hostile").exists()
    patch = {k: v for k, v in change.items() if k not in ("folder", "project", "runtime")}
    if patch:
        response = send(owner, "PATCH", f"/api/v1/services/{world.service.pk}/", patch)
        assert response.status_code < 500, (patch, response.status_code)


RULE_BODIES = [
    {"threshold": "NaN"},
    {"threshold": "Infinity"},
    {"threshold": "-Infinity"},
    {"threshold": [1]},
    {"threshold": 1e400},
    {"step": 1.5},
    {"step": "one"},
    {"step": 10**30},
    {"min_replicas": -1},
    {"max_replicas": 10**30},
    {"cooldown": -5},
    {"cooldown": 10**30},
    {"direction": "sideways"},
    {"comparator": "=="},
    {"source": {"x": 1}},
    {"metric": "x" * 10_000},
    {"metric": "m\u0000"},
    {"enabled": "perhaps"},
]


@pytest.mark.parametrize("change", RULE_BODIES, ids=lambda c: json.dumps(c)[:40])
def test_wrong_types_on_rules(owner: Client, world: World, change: dict[str, Any]) -> None:
    body = {
        "direction": "out",
        "source": "kernel",
        "metric": "cpu_util",
        "comparator": "GREATER_THAN",
        "threshold": 0.5,
        "step": 1,
        "min_replicas": 1,
        "max_replicas": 3,
        "cooldown": 60,
        **change,
    }
    before = AutoScalingRule.objects.count()
    assert_refused_cleanly(send(owner, "POST", f"/api/v1/services/{world.service.pk}/rules/", body), f"create {change}")
    assert AutoScalingRule.objects.count() == before
    url = f"/api/v1/services/{world.service.pk}/rules/{world.rule.pk}/"
    assert_refused_cleanly(send(owner, "PATCH", url, change), f"patch {change}")
    # Whatever was sent, the rule still reads back as JSON.
    assert owner.get(url).status_code == 200
    json.loads(owner.get(f"/api/v1/services/{world.service.pk}/rules/").content)


@pytest.mark.parametrize(
    "expires_at", ["yesterday", "2000-01-01T00:00:00Z", 5, ["2030-01-01"], "99999-01-01T00:00:00Z", "2030-13-45"]
)
def test_wrong_expiry_of_a_token(owner: Client, world: World, expires_at: Any) -> None:
    url = f"/api/v1/services/{world.service.pk}/tokens/"
    before = world.service.tokens.count()
    assert_refused_cleanly(send(owner, "POST", url, {"expires_at": expires_at}), str(expires_at))
    assert world.service.tokens.count() == before


# --- unicode in names ----------------------------------------------------------------------------------

NAMES = [
    "名前のフォルダ",
    "a\u202eevil.txt",  # right-to-left override
    "a\u200bb",  # zero width space
    "a\u0000b",
    "a\nb",
    "e\u0301",  # combining accent
    "\U0001f600face",
    "x" * 300,
    ".",
    "..",
    "a/b",
    "a\\b",
    "-rf",
    "CON",
    " lead",
    "<script>alert(1)</script>",
    "",
]


@pytest.mark.parametrize("name", NAMES, ids=lambda n: repr(n)[:20])
def test_unicode_names_of_folders_services_and_keys(owner: Client, world: World, name: str) -> None:
    folders = send(owner, "POST", "/api/v1/folders/", {"name": name, "usage_mode": "general"})
    assert folders.status_code in (201, 400), folders.status_code
    if folders.status_code == 201:
        assert folders.json()["name"] == name.strip()
        folder = Folder.objects.get(pk=folders.json()["id"])
        assert Path(folder.host_path).resolve().is_relative_to(Path(world.folder.host_path).resolve().parent)
    service = send(owner, "POST", "/api/v1/services/", {"name": name, "folder": str(world.folder.pk), "replicas": 0})
    assert service.status_code in (201, 400), service.status_code
    if service.status_code == 201:
        assert service.json()["name"] == name.strip()
    key = send(owner, "POST", "/api/v1/me/api-keys/", {"name": name})
    assert key.status_code in (201, 400), key.status_code
    rename = send(owner, "PATCH", f"/api/v1/folders/{world.folder.pk}/", {"name": name})
    assert rename.status_code in (200, 400), rename.status_code
    for page in ("/folders/", "/services/", f"/folders/{world.folder.pk}/"):
        response = owner.get(page)
        assert response.status_code == 200, page
        assert b"<script>alert(1)</script>" not in response.content, f"{page} does not escape a name"


# --- path traversal through every file route -------------------------------------------------------------

# Paths that reach out of the folder, read literally or once percent-decoded: always refused.
ESCAPES = [
    "../secret.txt",
    "../../etc/passwd",
    "a/../../secret.txt",
    "./../secret.txt",
    "/etc/passwd",
    "//etc/passwd",
    "x\u0000y",
    "link-out/passwd",
    "link-out/../secret.txt",
]
# Odd but legal names: may be served or refused, but whatever happens stays inside the folder
# (a PUT onto a symlink replaces the link itself; nothing it points to is touched).
ODD = ["..%2fsecret.txt", "%2e%2e/secret.txt", "..\\secret.txt", "~/.ssh/id_rsa", ".../x", "link-out", "link-file"]
REFUSED = (400, 403, 404)


@pytest.fixture
def two_folders(personas: dict[str, Any], world: World) -> tuple[World, World]:
    """The owner's folder, with symlinks pointing out of it, and a stranger's folder beside it."""
    other = build_world(personas["stranger"], None)
    outside = Path(world.folder.host_path).parent / "secret.txt"
    outside.write_text("outside every folder\n")
    os.symlink("/etc", Path(world.folder.host_path) / "link-out")
    os.symlink(outside, Path(world.folder.host_path) / "link-file")
    return world, other


def outside_of(world: World) -> dict[str, bytes]:
    """Everything in the storage root but the world's own folder (the other users' folders too)."""
    root = Path(world.folder.host_path).parent
    own = Path(world.folder.host_path)
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
        for p in sorted(root.rglob("*"))
        if own not in p.parents and p != own
    }


def _requests(owner: Client, world: World, candidate: str) -> dict[str, Any]:
    base = f"/api/v1/folders/{world.folder.pk}"
    return {
        "download": owner.get(f"{base}/files/{candidate}"),
        "list": owner.get(f"{base}/files/", {"path": candidate}),
        "preview": owner.get(f"{base}/preview/", {"path": candidate}),
        "launcher": owner.get(f"{base}/launcher/", {"model_definition_path": candidate}),
        "page preview": owner.get(f"/folders/{world.folder.pk}/preview/", {"path": candidate}),
        "page explorer": owner.get(f"/folders/{world.folder.pk}/", {"path": candidate}),
        "upload": owner.put(f"{base}/files/{candidate}", b"pwned", content_type="application/octet-stream"),
        "mkdir": send(owner, "POST", f"{base}/mkdir/", {"path": candidate + "/d"}),
        "move in": send(owner, "POST", f"{base}/move/", {"src": world.file_path, "dst": candidate + "-moved"}),
        "move out": send(owner, "POST", f"{base}/move/", {"src": candidate, "dst": "stolen.txt"}),
        "delete": owner.delete(f"{base}/files/{candidate}"),
    }


@pytest.mark.parametrize("path", [*ESCAPES, *ODD, "cross-folder"], ids=lambda p: repr(p)[:24])
def test_path_traversal_through_every_file_route(owner: Client, two_folders: tuple[World, World], path: str) -> None:
    world, other = two_folders
    before = outside_of(world)
    candidate = f"../{other.folder.pk}/{other.file_path}" if path == "cross-folder" else path
    for what, response in _requests(owner, world, candidate).items():
        assert response.status_code < 500, (what, candidate, response.status_code)
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert b"root:x:0:0" not in body, (what, candidate)
        assert b"outside every folder" not in body, (what, candidate)
        assert not other.leaked(body, asked=candidate), (what, candidate, "another user's data")
        if (path in ESCAPES or path == "cross-folder") and what not in (
            "list",
            "launcher",
            "page explorer",
            "page preview",
        ):
            assert response.status_code in REFUSED, (what, candidate, response.status_code)
    assert outside_of(world) == before, "a request changed something outside its folder"


def test_the_streamed_upload_path_refuses_traversal_too(
    personas: dict[str, Any], two_folders: tuple[World, World]
) -> None:
    """The raw-body PUT is answered by storage/asgi.py in production, before Django."""
    from tests.integration.test_storage_asgi import call

    world, other = two_folders
    before = outside_of(world)
    key = do_issue_api_key(personas["owner"])[1]
    headers = [(b"authorization", f"Token {key}".encode())]
    for candidate in [*ESCAPES, *ODD, f"../{other.folder.pk}/{other.file_path}"]:
        if "\u0000" in candidate:
            continue  # not a path a server passes on
        answer = call("PUT", f"/api/v1/folders/{world.folder.pk}/files/{candidate}", [b"pwned"], headers)
        assert answer.status is not None and answer.status < 500, (candidate, answer.status)
        if candidate in ESCAPES or candidate.startswith("../"):
            assert answer.status in REFUSED, (candidate, answer.status, answer.body[:200])
    assert outside_of(world) == before
    assert (Path(world.folder.host_path).parent / "secret.txt").read_text() == "outside every folder\n"


# --- CSRF ----------------------------------------------------------------------------------------------


def test_a_session_request_with_the_csrf_token_passes_and_without_fails(personas: dict[str, Any]) -> None:
    """The other half of the matrix's CSRF check (every unsafe route refuses a session without the
    token): with the token from the cookie, the same request is served."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(personas["owner"])
    client.get("/folders/")
    secret = client.cookies["csrftoken"].value
    body = json.dumps({"name": "with-csrf", "usage_mode": "general"})
    refused = client.post("/api/v1/folders/", body, content_type="application/json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    served = client.post("/api/v1/folders/", body, content_type="application/json", HTTP_X_CSRFTOKEN=secret)
    assert served.status_code == 201
    other_site = client.post(
        "/api/v1/folders/",
        json.dumps({"name": "from-evil", "usage_mode": "general"}),
        content_type="application/json",
        HTTP_X_CSRFTOKEN=secret,
        HTTP_ORIGIN="https://evil.example",
        secure=True,
        HTTP_REFERER="https://evil.example/",
    )
    assert other_site.status_code == 403
    assert not Folder.objects.filter(name="from-evil").exists()
