"""Issue 13, item 9: parallel uploads must not each use the whole quota, and a user's folders have a total.

An upload streams into a temp file that the folder's usage does not count, so two uploads started
together each saw the whole free quota (and filled the disk twice over before either finished).
Now each request holds its bytes in Redis while it streams (storage/quota.py): its declared length
at once, or a little ahead of what it wrote. The uploads here run side by side through the real
ASGI upload path, interleaved chunk by chunk; the refused one gets a sentence that says why, and
leaves nothing behind, not even a temp file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler

from accounts.actions import do_issue_api_key
from storage import asgi as storage_asgi
from storage import quota
from storage.models import Folder
from tests.factories import FolderFactory
from tests.integration.test_storage_asgi import multipart, scope_for, temp_files
from tests.live import wait_for

pytestmark = pytest.mark.django_db

MB = 1_000_000


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(owner=personas["owner"], name="quota10", quota_bytes=10 * MB, usage_mode="general")


@pytest.fixture
def token(personas: dict[str, Any]) -> str:
    return do_issue_api_key(personas["owner"], name="uploads")[1]


class Upload:
    """One request through the streaming upload app, fed by hand so that several interleave."""

    def __init__(self, path: str, token: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> None:
        app = storage_asgi.streaming_uploads(ASGIHandler())
        self.method = "POST" if "upload/" in path else "PUT"
        scope = scope_for(self.method, path, [(b"authorization", f"Token {token}".encode()), *headers], query)
        self.communicator = ApplicationCommunicator(app, scope)
        self.status: int | None = None
        self.body = b""

    async def send(self, chunk: bytes, more: bool = True) -> None:
        await self.communicator.send_input({"type": "http.request", "body": chunk, "more_body": more})

    async def answer(self, timeout: float = 20) -> tuple[int | None, Any]:
        start = await self.communicator.receive_output(timeout=timeout)
        self.status = start["status"]
        while True:
            message = await self.communicator.receive_output(timeout=timeout)
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await self.communicator.send_input({"type": "http.disconnect"})
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await self.communicator.wait(timeout=5)
        return self.status, json.loads(self.body) if self.body else None

    async def answered(self) -> bool:
        """Whether an answer came already (a refusal comes before the body is read)."""
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await self.communicator.receive_nothing(timeout=0.3, interval=0.01)
            return False
        return True


def held(scope: str, pk: Any) -> int:
    """Bytes uploads in progress hold now, per storage/quota.py's keys (``scope``: folder or user)."""
    from django.conf import settings

    values = quota._redis().hvals(f"{settings.REDIS_PREFIX}:upload-holds:{scope}:{pk}")
    return sum(int(v) for v in values)


async def until_held(scope: str, pk: Any, size: int) -> None:
    """The upload started before has held its bytes (it runs in a thread of its own): only then does
    the next one start, so the test does not depend on which thread the machine schedules first."""
    deadline = time.monotonic() + 10
    while held(scope, pk) < size:
        assert time.monotonic() < deadline, f"nothing held for {scope} {pk} after 10 s"
        await asyncio.sleep(0.01)


def length(size: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(size).encode())]


def files_of(folder: Folder) -> list[str]:
    return sorted(p.name for p in folder.host_path.iterdir() if not p.name.startswith("."))


def test_parallel_uploads_can_not_each_use_the_whole_folder_quota(folder: Folder, token: str) -> None:
    base = f"/api/v1/folders/{folder.pk}/files"

    async def run() -> tuple[tuple[int | None, Any], tuple[int | None, Any], tuple[int | None, Any]]:
        first = Upload(f"{base}/first.bin", token, length(6 * MB))
        await first.send(b"a" * (3 * MB))  # half of it is in, the other half is on its way
        await until_held("folder", folder.pk, 6 * MB)
        second = Upload(f"{base}/second.bin", token, length(6 * MB))  # 6 + 6 MB > the 10 MB quota
        refused = await second.answer()  # before a byte of its body: the declared length says it all
        await first.send(b"a" * (3 * MB), more=False)
        saved = await first.answer()
        # The first upload's hold ended with it: what is left of the quota is free again.
        third = Upload(f"{base}/third.bin", token, length(4 * MB))
        await third.send(b"c" * (4 * MB), more=False)
        return refused, saved, await third.answer()

    refused, saved, third = async_to_sync(run)()
    assert refused[0] == 413, refused
    message = refused[1]["detail"]
    assert "'second.bin' was not saved" in message and "quota of folder 'quota10'" in message
    assert "other uploads in progress hold 5.7 MiB" in message  # (6 MB)
    assert saved[0] == 201 and third[0] == 201
    assert files_of(folder) == ["first.bin", "third.bin"]
    assert temp_files(folder) == []


def test_parallel_chunked_uploads_are_held_as_they_stream(folder: Folder, token: str) -> None:
    """No Content-Length: each holds a little ahead of what it wrote; the one that does not fit stops."""
    base = f"/api/v1/folders/{folder.pk}/files"

    async def run() -> tuple[tuple[int | None, Any], tuple[int | None, Any]]:
        first = Upload(f"{base}/first.bin", token, [])
        second = Upload(f"{base}/second.bin", token, [])
        for _ in range(4):
            await first.send(b"a" * MB)
        await until_held("folder", folder.pk, MB)
        for _ in range(6):
            await second.send(b"b" * MB)
            if await second.answered():
                break
        refused = await second.answer()
        for _ in range(2):
            await first.send(b"a" * MB)
        await first.send(b"", more=False)
        return refused, await first.answer()

    refused, saved = async_to_sync(run)()
    assert refused[0] == 413 and "other uploads in progress hold" in refused[1]["detail"]
    assert saved[0] == 201
    assert files_of(folder) == ["first.bin"] and (folder.host_path / "first.bin").stat().st_size == 6 * MB
    assert temp_files(folder) == []


def test_parallel_multipart_uploads_hold_their_declared_length(folder: Folder, token: str) -> None:
    body_a, headers_a = multipart({"a.bin": b"a" * (6 * MB)})
    body_b, headers_b = multipart({"b.bin": b"b" * (6 * MB)})
    path = f"/api/v1/folders/{folder.pk}/upload/"

    async def run() -> tuple[tuple[int | None, Any], tuple[int | None, Any]]:
        first = Upload(path, token, headers_a)
        await first.send(body_a[: 3 * MB])
        await until_held("folder", folder.pk, 6 * MB)
        second = Upload(path, token, headers_b)
        await second.send(body_b[:MB])
        refused = await second.answer()
        await first.send(body_a[3 * MB :], more=False)
        return refused, await first.answer()

    refused, saved = async_to_sync(run)()
    assert refused[0] == 413 and "other uploads in progress hold" in refused[1]["detail"], refused
    assert saved[0] == 201, saved
    assert files_of(folder) == ["a.bin"] and temp_files(folder) == []


def test_a_users_folders_share_one_storage_limit(personas: dict[str, Any], token: str, settings: Any) -> None:
    settings.USER_STORAGE_LIMIT = 12 * MB
    owner = personas["owner"]
    full = FolderFactory(owner=owner, name="full", usage_mode="general", files={"old.bin": "x" * (5 * MB)})
    other = FolderFactory(owner=owner, name="other", usage_mode="general")  # 50 GB quota of its own

    async def run() -> tuple[tuple[int | None, Any], ...]:
        # 5 MB in place + 4 MB uploading into one folder + 4 MB into another > 12 MB.
        first = Upload(f"/api/v1/folders/{full.pk}/files/new.bin", token, length(4 * MB))
        await first.send(b"a" * MB)
        await until_held("user", owner.pk, 4 * MB)
        second = Upload(f"/api/v1/folders/{other.pk}/files/big.bin", token, length(4 * MB))
        refused = await second.answer()
        await first.send(b"a" * (3 * MB), more=False)
        saved = await first.answer()
        small = Upload(f"/api/v1/folders/{other.pk}/files/small.bin", token, length(3 * MB))
        await small.send(b"s" * (3 * MB), more=False)
        return refused, saved, await small.answer()

    refused, saved, small = async_to_sync(run)()
    assert refused[0] == 413
    message = refused[1]["detail"]
    assert "'big.bin' was not saved" in message and "owner's storage limit" in message
    assert "across all their folders" in message and "ask an operator for a larger limit" in message
    assert saved[0] == 201 and small[0] == 201  # 5 + 4 + 3 = 12 MB: exactly the limit
    assert files_of(other) == ["small.bin"] and temp_files(other) == [] and temp_files(full) == []

    # A user's own limit overrides the setting (0: none).
    owner.storage_limit = 0
    owner.save(update_fields=["storage_limit"])

    async def more() -> tuple[int | None, Any]:
        upload = Upload(f"/api/v1/folders/{other.pk}/files/more.bin", token, length(2 * MB))
        await upload.send(b"m" * (2 * MB), more=False)
        return await upload.answer()

    assert async_to_sync(more)()[0] == 201


def test_a_crashed_uploads_hold_expires(folder: Folder, token: str, settings: Any) -> None:
    settings.UPLOAD_HOLD_SECONDS = 1.0
    crashed = quota.Hold(folder).start(0)
    crashed.hold(8 * MB, 10 * MB, 8 * MB)  # ... and its process died: never released

    def put(name: str) -> int | None:
        async def run() -> int | None:
            upload = Upload(f"/api/v1/folders/{folder.pk}/files/{name}", token, length(6 * MB))
            if not await upload.answered():
                await upload.send(b"x" * (6 * MB), more=False)
            return (await upload.answer())[0]

        return async_to_sync(run)()

    assert put("early.bin") == 413
    started = time.monotonic()
    wait_for(lambda: put("late.bin") == 201, timeout=10, interval=0.2, what="the crashed upload's hold to expire")
    assert time.monotonic() - started < 5
    assert files_of(folder) == ["late.bin"] and temp_files(folder) == []


def test_without_redis_an_upload_is_refused_not_let_past_the_limits(
    folder: Folder, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # (closed again: nobody answers there)
    monkeypatch.setattr(quota, "_client", redis.Redis(port=dead, socket_connect_timeout=0.5, socket_timeout=0.5))

    async def run() -> tuple[int | None, Any]:
        upload = Upload(f"/api/v1/folders/{folder.pk}/files/x.bin", token, length(MB))
        if not await upload.answered():
            await upload.send(b"x" * MB, more=False)
        return await upload.answer()

    status, body = async_to_sync(run)()
    assert status == 503 and "Redis does not answer" in body["detail"] and "nothing was saved" in body["detail"]
    assert files_of(folder) == [] and temp_files(folder) == []
