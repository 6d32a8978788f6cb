"""Fault 7 of "Reliability" (issue 9): the disk fills up during an upload.

A real daphne (config.asgi, with the streamed uploads of storage/asgi.py) serves folders whose storage
root is a small tmpfs (8 MiB; as root) — or, without root, a folder whose quota is smaller than the
upload. A 16 MiB upload, as a raw PUT and as a browser's multipart form, must get a clear error, leave
the folder exactly as it was (files, contents, no temp file, the space given back) and leave the
server serving.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from accounts.actions import do_issue_api_key
from storage.fs import UPLOAD_DIR
from tests.factories import FolderFactory
from tests.live import ROOT, database_url, free_port, wait_for

DISK = 8 * 1024 * 1024
UPLOAD = 16 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A tmpfs of DISK bytes as the storage root (root only); None where mounting is not allowed."""
    if os.geteuid() != 0:
        yield None
        return
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=755", "tmpfs", str(mount)], check=False)
    if result.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Web:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, chunked: bool = False
    ) -> Any:
        """One request, sent the way curl sends an upload: the body in pieces, stopping when the server
        answers early (a refusal before the whole body is in) and reading that answer. ``chunked``:
        no Content-Length, so the server learns the size only as the bytes come."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        try:
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "Connection: close\r\n\r\n"
            sock.sendall(head.encode("latin-1"))
            view = memoryview(body)
            pieces = [view[i : i + 256 * 1024] for i in range(0, len(body), 256 * 1024)]
            if chunked:
                pieces = [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
            for piece in pieces:
                if select.select([sock], [], [], 0)[0]:
                    break  # an early answer
                try:
                    sock.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    break
            response = http.client.HTTPResponse(sock)
            response.begin()
            data = response.read()
        finally:
            sock.close()
        return response.status, (json.loads(data) if data else None)


@pytest.fixture
def web(transactional_db: None, tmp_path: Path, settings: Any, small_disk: Path | None) -> Iterator[Web]:
    storage = small_disk or (tmp_path / "storage")
    settings.STORAGE_ROOT = storage
    port = free_port()
    log = tmp_path / "daphne.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "STORAGE_ROOT": str(storage),
        "SECRET_KEY": settings.SECRET_KEY,
        "TOKEN_HMAC_KEY": settings.TOKEN_HMAC_KEY,
        "REDIS_URL": settings.REDIS_URL,
        "REDIS_PREFIX": settings.REDIS_PREFIX,
        "TMPDIR": str(tmp_path),  # twisted spools request bodies here, off the small disk
        "LOG_LEVEL": "WARNING",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "daphne"),
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "config.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Web(port, proc, log)
    try:
        wait_for(lambda: proc.poll() is not None or _answers(port), timeout=30, what="daphne to answer")
        assert proc.poll() is None, log.read_text()
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_fault7_disk_full_during_upload_clear_error_folder_unchanged_server_fine(
    web: Web, personas: dict[str, Any], small_disk: Path | None
) -> None:
    owner = personas["owner"]
    folder = FolderFactory(
        owner=owner, name="models", files={"model-definition.yaml": "models: []\n", "a/b.txt": "keep"}
    )
    if small_disk is None:
        folder.quota_bytes = DISK  # no mount without root: the folder's quota is what fills up
        folder.save()
    key = do_issue_api_key(owner, name="upload")[1]
    auth = {"Authorization": f"Token {key}"}
    base = f"/api/v1/folders/{folder.pk}"
    status, listing = web.request("GET", f"{base}/files/", headers=auth)
    assert status == 200
    before = snapshot(folder.host_path)
    free_before = os.statvfs(folder.host_path).f_bavail
    blob = os.urandom(1024 * 1024) * (UPLOAD // (1024 * 1024))
    expected = (507, "storage_full") if small_disk is not None else (413, "quota_exceeded")

    outcomes = []
    # A raw PUT whose size is known (refused before a byte is written), a chunked PUT (the size shows
    # only as the disk fills up: refused during the upload) and a multipart form (the browser's).
    put = {**auth, "Content-Type": "application/octet-stream"}
    outcomes.append(("PUT", *web.request("PUT", f"{base}/files/big.bin", blob, put)))
    outcomes.append(("PUT chunked", *web.request("PUT", f"{base}/files/big.bin", blob, put, chunked=True)))
    form, content_type = multipart("big.bin", blob)
    outcomes.append(
        ("multipart", *web.request("POST", f"{base}/upload/", form, {**auth, "Content-Type": content_type}))
    )

    for how, status, body in outcomes:
        assert (status, body.get("code")) == expected, (how, status, body)
        message = body["detail"]
        assert "disk" in message if small_disk is not None else "quota" in message, (how, message)
        assert "unchanged" in message or "not saved" in message, (how, message)
    # The folder is exactly as it was: same files, same bytes, no temp file left, the space given back.
    assert snapshot(folder.host_path) == before
    assert (
        not [p for p in (folder.host_path / UPLOAD_DIR).glob("*")] if (folder.host_path / UPLOAD_DIR).exists() else True
    )
    assert os.statvfs(folder.host_path).f_bavail >= free_before - 16  # (a few blocks of directory metadata)
    assert web.request("GET", f"{base}/files/", headers=auth) == (200, listing)
    # The server is fine: it serves, and an upload that fits still works.
    assert web.proc.poll() is None
    status, body = web.request("PUT", f"{base}/files/small.txt", b"fits", {**auth, "Content-Type": "text/plain"})
    assert status == 201, body
    assert (folder.host_path / "small.txt").read_bytes() == b"fits"
    assert web.request("GET", "/api/v1/folders/", headers=auth)[0] == 200
    print(
        f"\n[fault 7: disk full] {len(outcomes) + 1} uploads, {len(outcomes)} refused with {expected[0]} "
        f"{expected[1]}, folder unchanged, server fine"
    )
    for how, status, body in outcomes:
        print(f"  {how}: {status} {body['detail']}")
