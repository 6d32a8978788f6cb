"""Model folders copied to nodes that do not share the web app's storage (serving/node/snapshots.py):
the web app's node endpoints, and the node's fetcher against a real web process (daphne)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client

from serving.bus import dryrun, telemetry
from serving.core import snapshots as core
from serving.models import Endpoint, Node, Revision, Route
from serving.node import replicas, snapshots
from serving.node.engines.local.engine import LocalEngine
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import LiveSystem, free_port, wait_for

FILES = {
    "model-definition.yaml": "models: []\n",
    "weights/a.bin": "a" * 1000,
    "weights/b.bin": "b" * 3000,
    "run.sh": "#!/bin/sh\necho hi\n",
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def node_header(name: str, secret: str | None = None) -> str:
    return core.node_authorization(name, core.node_key(secret or settings.SECRET_KEY, name))


@pytest.fixture
def served(personas: dict[str, Any]) -> tuple[Folder, Endpoint]:
    folder = FolderFactory(owner=personas["owner"], name="weights", files=FILES)
    os.chmod(Path(folder.host_path) / "run.sh", 0o755)
    endpoint = Endpoint.objects.create(name="svc-snap", owner=personas["owner"], model_folder=folder)
    Node.objects.create(name="far")
    return folder, endpoint


def test_manifest_and_files_need_a_node_key(served: tuple[Folder, Endpoint], personas: dict[str, Any]) -> None:
    folder, endpoint = served
    manifest_url = f"/api/v1/node/folders/{folder.pk}/manifest/"
    file_url = f"/api/v1/node/folders/{folder.pk}/files/weights/b.bin"
    node = Client(HTTP_AUTHORIZATION=node_header("far"))

    answer = node.get(manifest_url)
    assert answer.status_code == 200
    files = {f["path"]: f for f in answer.json()["files"]}
    assert set(files) == set(FILES)
    assert files["weights/b.bin"] == {"path": "weights/b.bin", "size": 3000, "mode": 0o644, "sha256": sha("b" * 3000)}
    assert files["run.sh"]["mode"] == 0o755
    assert b"".join(node.get(file_url).streaming_content) == b"b" * 3000  # type: ignore[attr-defined]
    part = node.get(file_url, HTTP_RANGE="bytes=2990-")
    assert part.status_code == 206 and b"".join(part.streaming_content) == b"b" * 10  # type: ignore[attr-defined]

    # Users are not nodes: no persona's session or key opens these, nor a made-up or foreign node key.
    for persona in ("owner", "teammate", "stranger", "admin"):
        browser = Client()
        browser.force_login(personas[persona])
        assert browser.get(manifest_url).status_code == 401
        assert browser.get(file_url).status_code == 401
    refused = Client().get(manifest_url)
    assert refused.status_code == 401 and "Authorization: Node <name>:<key>" in refused.json()["detail"]
    for header in (f"Node far:{'0' * 64}", node_header("far", secret="another installation"), "Token abc"):
        assert Client(HTTP_AUTHORIZATION=header).get(file_url).status_code == 401
    # A well-made key of a node that never registered: refused with a sentence.
    ghost = Client(HTTP_AUTHORIZATION=node_header("ghost")).get(manifest_url)
    assert ghost.status_code == 403 and "not registered" in ghost.json()["detail"]

    # Only the model folder of a live service: any other folder is not found.
    other = FolderFactory(owner=personas["stranger"], name="private", files={"secret.txt": "s"})
    assert node.get(f"/api/v1/node/folders/{other.pk}/manifest/").status_code == 404
    assert node.get(f"/api/v1/node/folders/{other.pk}/files/secret.txt").status_code == 404
    assert node.get(f"/api/v1/node/folders/{folder.pk}/files/nope.bin").status_code == 404
    assert node.get(f"/api/v1/node/folders/{folder.pk}/files/../x").status_code in (400, 404, 409)
    Endpoint.objects.filter(pk=endpoint.pk).update(lifecycle=Endpoint.Lifecycle.DESTROYED)
    assert node.get(manifest_url).status_code == 404

    # A dry run of a service not created yet: its node may read the folder while the run lasts.
    run_id = uuid.uuid4().hex  # as serving.actions names dry runs
    dryrun.save_request(dryrun.ValidationRequest(run_id, personas["owner"].pk, "far", {"folder": str(other.pk)}))
    dryrun.publish(run_id, "lifecycle", message="Validation started on node far.")
    assert node.get(f"/api/v1/node/folders/{other.pk}/manifest/?validation={run_id}").status_code == 200
    assert node.get(f"/api/v1/node/folders/{other.pk}/files/secret.txt?validation={run_id}").status_code == 200
    Node.objects.create(name="near")
    near = Client(HTTP_AUTHORIZATION=node_header("near"))  # not the node the run was placed on
    assert near.get(f"/api/v1/node/folders/{other.pk}/manifest/?validation={run_id}").status_code == 404
    assert node.get(f"/api/v1/node/folders/{folder.pk}/manifest/?validation={run_id}").status_code == 404
    assert node.get(f"/api/v1/node/folders/{other.pk}/manifest/?validation=nonsense").status_code == 404
    dryrun.publish(run_id, "finished", outcome="healthy", message="done")
    assert node.get(f"/api/v1/node/folders/{other.pk}/manifest/?validation={run_id}").status_code == 404

    # An earlier revision's folder, which its routes (a canary's stable side, a rollback) still run.
    moved = Endpoint.objects.create(name="svc-moved", owner=personas["stranger"], model_folder=None, spec_version=2)
    Revision.objects.create(endpoint=moved, number=1, config={"model_folder": str(other.pk)})
    assert node.get(f"/api/v1/node/folders/{other.pk}/manifest/").status_code == 200
    Endpoint.objects.filter(pk=moved.pk).update(lifecycle=Endpoint.Lifecycle.DESTROYED)
    assert node.get(f"/api/v1/node/folders/{other.pk}/manifest/").status_code == 404


def test_manifest_skips_symlinks_and_reuses_hashes(served: tuple[Folder, Endpoint]) -> None:
    folder, _ = served
    root = Path(folder.host_path)
    os.symlink("/etc/passwd", root / "passwd")
    os.symlink("weights", root / "more-weights")
    node = Client(HTTP_AUTHORIZATION=node_header("far"))
    first = node.get(f"/api/v1/node/folders/{folder.pk}/manifest/").json()
    assert {f["path"] for f in first["files"]} == set(FILES)
    # A rewritten file gets its new hash (a new inode and mtime), the others are not read again.
    (root / "weights" / "a.bin").write_text("A" * 1000)
    second = {f["path"]: f["sha256"] for f in node.get(f"/api/v1/node/folders/{folder.pk}/manifest/").json()["files"]}
    assert second["weights/a.bin"] == sha("A" * 1000)


def test_a_copy_under_way_shows_on_the_service_page_and_in_the_api(
    served: tuple[Folder, Endpoint], browser: Callable[[str | None], Client], api: Any
) -> None:
    _, endpoint = served
    progress = {"folder": "f", "digest": "d" * 64, "done": 512 * 1024**2, "total": 2 * 1024**3, "state": "fetching"}
    route = Route.objects.create(
        endpoint=endpoint, node=Node.objects.get(name="far"), status=Route.Status.PROVISIONING, snapshot=progress
    )
    page = f"/services/{endpoint.pk}/"
    for persona in ("owner", "admin"):
        html = browser(persona).get(page).content.decode()
        assert "copying the model folder: 512.0 MiB of 2.0 GiB" in html
        [listed] = api(persona).get(f"/api/v1/services/{endpoint.pk}/").json()["routes"]
        assert listed["snapshot"] == progress
    assert browser("stranger").get(page).status_code == 404
    assert api("stranger").get(f"/api/v1/services/{endpoint.pk}/").status_code == 404
    # Done (or on shared storage, where nothing is copied): nothing shows.
    Route.objects.filter(pk=route.pk).update(snapshot={**progress, "state": "ready"})
    assert "copying the model folder" not in browser("owner").get(page).content.decode().split("<template")[0]


@pytest.fixture
def web(transactional_db: None, tmp_path: Path, settings: Any) -> Iterator[str]:
    """A real web process; this process plays node `far`, which copies folders into its own cache."""
    system = LiveSystem(tmp_path)
    try:
        url = system.start_web()
        settings.NODE_NAME = "far"
        settings.NODE_CACHE_ROOT = str(tmp_path / "cache-far")
        settings.NODE_SHARED_STORAGE = False
        settings.NODE_WEB_URL = url
        yield url
    finally:
        system.stop_all()


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_node_fetches_a_snapshot_and_refetches_only_what_changed(web: str, served: tuple[Folder, Endpoint]) -> None:
    folder, _ = served
    first = snapshots.fetch_snapshot(str(folder.pk))
    assert tree(first.path) == {k: v.encode() for k, v in FILES.items()}
    assert (first.files, first.fetched_files, first.transferred) == (4, 4, first.total_bytes)
    assert first.path.is_relative_to(settings.NODE_CACHE_ROOT)
    # Read-only, readable by the replica's unprivileged user; the executable bit survives.
    assert stat.S_IMODE((first.path / "weights" / "a.bin").stat().st_mode) == 0o444
    assert stat.S_IMODE((first.path / "run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE((first.path / "weights").stat().st_mode) == 0o555
    assert "4 files" in first.describe("weights") and "fetched in" in first.describe("weights")

    # Unchanged content: the same snapshot, nothing transferred.
    again = snapshots.fetch_snapshot(str(folder.pk))
    assert again.reused and again.path == first.path and again.transferred == 0

    # One file changes: a new snapshot; only that file crosses the network, the rest is hard-linked,
    # and the first snapshot (a running replica's) is untouched.
    (Path(folder.host_path) / "weights" / "b.bin").write_text("c" * 3000)
    second = snapshots.fetch_snapshot(str(folder.pk))
    assert second.path != first.path and second.transferred == 3000 and second.fetched_files == 1
    assert (second.path / "weights" / "b.bin").read_text() == "c" * 3000
    assert (first.path / "weights" / "b.bin").read_text() == "b" * 3000
    assert (second.path / "weights" / "a.bin").stat().st_ino == (first.path / "weights" / "a.bin").stat().st_ino
    # The bytes that crossed the network are the platform's metrics (issue 20): both fetches, no reuse.
    moved = telemetry.read()[("modelserve_snapshot_bytes_total", (("node", settings.NODE_NAME),))]
    assert moved == first.transferred + 3000

    # Collection: a snapshot in use stays; the other goes, with the objects only it linked.
    assert snapshots.collect({second.digest}, keep=0) == 1
    assert not first.path.exists() and tree(second.path)["weights/b.bin"] == b"c" * 3000
    objects = [p for p in (Path(settings.NODE_CACHE_ROOT) / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 4  # b's old content is gone
    assert snapshots.collect(set(), keep=0) == 1
    assert not any(p.is_file() for p in (Path(settings.NODE_CACHE_ROOT) / "objects").rglob("*"))


def test_an_interrupted_transfer_resumes(web: str, served: tuple[Folder, Endpoint]) -> None:
    folder, _ = served
    entry = core.FileEntry("weights/b.bin", 3000, 0o644, sha("b" * 3000))
    incoming = Path(settings.NODE_CACHE_ROOT) / "incoming"
    incoming.mkdir(parents=True)
    (incoming / f"{entry.object_name}.part").write_bytes(b"b" * 1200)  # what a killed worker left
    result = snapshots.fetch_snapshot(str(folder.pk))
    assert (result.path / "weights" / "b.bin").read_text() == "b" * 3000
    assert result.transferred == result.total_bytes - 1200

    # A partial file with wrong bytes is caught by the hash, named, and thrown away: the retry succeeds.
    (Path(folder.host_path) / "weights" / "a.bin").write_text("x" * 1000)
    bad = core.FileEntry("weights/a.bin", 1000, 0o644, sha("x" * 1000))
    (incoming / f"{bad.object_name}.part").write_bytes(b"y" * 500)
    with pytest.raises(snapshots.SnapshotError, match=r"'weights/a.bin' changed while it was copied"):
        snapshots.fetch_snapshot(str(folder.pk))
    assert (snapshots.fetch_snapshot(str(folder.pk)).path / "weights" / "a.bin").read_text() == "x" * 1000


def test_replicas_starting_together_share_one_transfer(web: str, served: tuple[Folder, Endpoint]) -> None:
    folder, _ = served
    results: list[snapshots.SnapshotResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(snapshots.fetch_snapshot(str(folder.pk)))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and len({r.path for r in results}) == 1
    assert sum(r.transferred for r in results) == results[0].total_bytes

    # Another folder with the same files, and a changed copy of the first, fetched at the same time:
    # each content is written once (one writer per object), both snapshots are whole.
    twin = FolderFactory(owner=folder.owner, name="twin", files={**FILES, "extra.txt": "e"})
    os.chmod(Path(twin.host_path) / "run.sh", 0o755)  # (else its content is another object: not executable)
    Endpoint.objects.create(name="svc-twin", owner=folder.owner, model_folder=twin)
    (Path(folder.host_path) / "weights" / "a.bin").write_text("z" * 1000)
    both: dict[str, snapshots.SnapshotResult] = {}
    threads = [
        threading.Thread(target=lambda f=f: both.__setitem__(str(f.pk), snapshots.fetch_snapshot(str(f.pk))))
        for f in (folder, twin)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert tree(both[str(twin.pk)].path) == {**{k: v.encode() for k, v in FILES.items()}, "extra.txt": b"e"}
    assert tree(both[str(folder.pk)].path)["weights/a.bin"] == b"z" * 1000
    assert sum(r.transferred for r in both.values()) == 1000 + 1  # only the new contents crossed


def test_a_failed_fetch_says_which_file_and_why(web: str, served: tuple[Folder, Endpoint], settings: Any) -> None:
    folder, _ = served
    with pytest.raises(snapshots.SnapshotError, match="HTTP 404"):
        snapshots.fetch_snapshot("00000000-0000-0000-0000-000000000000")
    settings.NODE_KEY = "0" * 64
    with pytest.raises(snapshots.SnapshotError, match="manifest: HTTP 401: This node key is not valid"):
        snapshots.fetch_snapshot(str(folder.pk))
    settings.NODE_KEY = ""
    settings.NODE_WEB_URL = "http://127.0.0.1:9"  # nothing listens
    with pytest.raises(snapshots.SnapshotError, match=r"could not be fetched from http://127\.0\.0\.1:9"):
        snapshots.fetch_snapshot(str(folder.pk))


# --- two nodes that share nothing but the database and Redis --------------------------------------


def put_file(api: Any, folder_id: str, path: str, body: bytes) -> None:
    answer = api("owner").put(
        f"/api/v1/folders/{folder_id}/files/{path}", data=body, content_type="application/octet-stream"
    )
    assert answer.status_code in (200, 201), answer.content


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def healthy(api: Any, service_id: str) -> list[dict[str, Any]]:
    body = api("owner").get(f"/api/v1/services/{service_id}/").json()
    return [r for r in body["routes"] if r["status"] == "healthy"]


def test_a_node_that_shares_no_directory_serves_the_folder_and_a_modify_takes_the_new_content(
    live_factory: Callable[..., LiveSystem], api: Any, tmp_path: Path
) -> None:
    port = free_port()
    far = {name: tmp_path / f"far-{name}" for name in ("storage", "cache", "engine")}
    for directory in far.values():
        directory.mkdir()
    system = live_factory(
        nodes={
            # The web app's own host: it reads STORAGE_ROOT itself (no cache root: shared storage).
            "near": {"NODE_CPU": "1"},
            # Another host: its own storage root (empty), cache and engine state; only HTTP to the web app.
            "far": {
                "NODE_CPU": "8",
                "STORAGE_ROOT": str(far["storage"]),
                "NODE_CACHE_ROOT": str(far["cache"]),
                "ENGINE_STATE_DIR": str(far["engine"]),
                "NODE_WEB_URL": f"http://127.0.0.1:{port}",
            },
        }
    )
    far_engine = LocalEngine(state_dir=far["engine"] / "local-far")
    try:
        system.start_web(port=port)
        # A folder uploaded through the API.
        created = api("owner").post("/api/v1/folders/", {"name": "hello", "usage_mode": "model"}, format="json")
        assert created.status_code == 201, created.content
        folder_id = created.json()["id"]
        put_file(api, folder_id, "model-definition.yaml", SIMPLE_DEFINITION.encode())
        put_file(api, folder_id, "hello.txt", b"version 1")

        # It needs 2 CPUs: only node far fits.
        body = {"name": "svc-far", "folder": folder_id, "replicas": 1, "resources": {"cpu": 2, "mem": "256m"}}
        answer = api("owner").post("/api/v1/services/", body, format="json")
        assert answer.status_code == 201, answer.json()
        sid = answer.json()["id"]
        [route] = wait_for(lambda: healthy(api, sid) or None, timeout=60, what="a healthy route on node far")
        assert route["node"] == "far"
        assert fetch_text(f"http://{route['host']}:{route['port']}/hello.txt") == "version 1"
        # What it serves is node far's snapshot: far's storage root has nothing, its cache has the copy.
        assert not any(far["storage"].iterdir())
        snapshot = route["snapshot"]
        assert snapshot["state"] == "ready" and snapshot["folder"] == folder_id and snapshot["total"] > 0
        assert (far["cache"] / "snapshots" / folder_id / snapshot["digest"] / "hello.txt").read_text() == "version 1"
        events = [e["message"] for e in api("owner").get(f"/api/v1/services/{sid}/events/").json()]
        assert any("on node far: model folder 'hello' copied to this node as snapshot" in m for m in events), events

        # The file changes through the API: the running replica keeps what it started with...
        put_file(api, folder_id, "hello.txt", b"version 2")
        assert fetch_text(f"http://{route['host']}:{route['port']}/hello.txt") == "version 1"
        # ...and a modify rolls it: the new replica takes a new snapshot and serves the new content.
        modified = api("owner").patch(f"/api/v1/services/{sid}/", {"environ": {"ROLL": "1"}}, format="json")
        assert modified.status_code == 200, modified.json()

        def rolled() -> dict[str, Any] | None:
            routes = healthy(api, sid)
            return routes[0] if len(routes) == 1 and routes[0]["id"] != route["id"] else None

        new = wait_for(rolled, timeout=60, what="the rolled replica healthy")
        assert new["node"] == "far" and new["snapshot"]["digest"] != snapshot["digest"]
        assert fetch_text(f"http://{new['host']}:{new['port']}/hello.txt") == "version 2"
    finally:
        system.stop_all()
        for info in far_engine.list():
            far_engine.stop(info.replica_id, grace=1)


def test_node_key_command_prints_the_key_a_node_sets(db: None) -> None:
    out = io.StringIO()
    call_command("node_key", "gpu-7", stdout=out)
    assert out.getvalue().strip() == core.node_key(settings.SECRET_KEY, "gpu-7")
    with pytest.raises(CommandError, match="is not a node name"):
        call_command("node_key", "no spaces", stdout=io.StringIO())


def test_a_copying_node_fails_the_start_with_a_sentence(
    served: tuple[Folder, Endpoint], settings: Any, tmp_path: Path, personas: dict[str, Any]
) -> None:
    folder, endpoint = served
    settings.NODE_NAME, settings.NODE_SHARED_STORAGE = "far", False
    settings.NODE_CACHE_ROOT, settings.NODE_WEB_URL = str(tmp_path / "cache"), "http://127.0.0.1:9"
    route = Route.objects.create(endpoint=endpoint, node=Node.objects.get(name="far"))
    with pytest.raises(replicas.SpecError, match=r"could not be copied to node far: .*127\.0\.0\.1:9") as failed:
        replicas.build_spec(route)
    assert failed.value.kind == "snapshot"
    # Writable additional mounts need shared storage: refused before anything is fetched.
    extra = FolderFactory(owner=personas["owner"], name="scratch", usage_mode=Folder.UsageMode.GENERAL)
    Endpoint.objects.filter(pk=endpoint.pk).update(extra_mounts=[{"folder": str(extra.pk), "target": "/data"}])
    route.endpoint.refresh_from_db()
    with pytest.raises(replicas.SpecError, match="can not mount additional"):
        replicas.build_spec(route)
    # On shared storage (the default without NODE_CACHE_ROOT) nothing is fetched: the folder itself.
    settings.NODE_SHARED_STORAGE = True
    Endpoint.objects.filter(pk=endpoint.pk).update(extra_mounts=[])
    route.endpoint.refresh_from_db()
    assert replicas.model_root(route) == folder.host_path


def test_a_dry_run_on_a_copying_node_runs_from_a_snapshot(
    live_factory: Callable[..., LiveSystem], api: Any, personas: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    far = {name: tmp_path / f"far-{name}" for name in ("storage", "cache", "engine")}
    system = live_factory(
        nodes={
            "far": {
                "STORAGE_ROOT": str(far["storage"]),
                "NODE_CACHE_ROOT": str(far["cache"]),
                "ENGINE_STATE_DIR": str(far["engine"]),
                "NODE_WEB_URL": f"http://127.0.0.1:{port}",
            }
        }
    )
    far_engine = LocalEngine(state_dir=far["engine"] / "local-far")
    try:
        system.start_web(port=port)
        folder = FolderFactory(
            owner=personas["owner"], name="checked", files={"model-definition.yaml": SIMPLE_DEFINITION}
        )
        answer = api("owner").post(
            "/api/v1/services/validate/", {"name": "check", "folder": str(folder.pk)}, format="json"
        )
        assert answer.status_code == 202, answer.json()
        run_id = str(answer.json()["id"])
        wait_for(lambda: dryrun.is_finished(run_id) and dryrun.history(run_id), timeout=60, what="the dry run to end")
        history = dryrun.history(run_id)
        assert history[-1]["outcome"] == "healthy", [e.get("message") for e in history]
        assert any((far["cache"] / "snapshots" / str(folder.pk)).iterdir())
    finally:
        system.stop_all()
        for info in far_engine.list():
            far_engine.stop(info.replica_id, grace=1)
