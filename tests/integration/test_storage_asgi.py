"""storage.asgi: uploads streamed from ``receive()`` into the folder, authenticated like the REST API,
and the daphne patch that stops daphne from holding a whole body in memory (S1.2)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler

from accounts.actions import do_issue_api_key
from storage import asgi as storage_asgi
from storage.fs import UPLOAD_DIR
from storage.models import Folder
from tests.factories import FolderFactory
from tests.live import wait_for

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"], project=personas["project"], name="shared", files={"README.md": "hello\n"}
    )


@pytest.fixture
def key(personas: dict[str, Any]) -> Any:
    return lambda who: do_issue_api_key(personas[who], name="test")[1]


def scope_for(method: str, path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


class Answer:
    def __init__(self, status: int | None, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    method: str,
    path: str,
    chunks: list[bytes],
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    *,
    query: bytes = b"",
    disconnect_after: int | None = None,
) -> Answer:
    """Drive the wrapped app chunk by chunk, as a server would; optionally vanish mid-body."""
    app = storage_asgi.streaming_uploads(ASGIHandler())

    async def run() -> Answer:
        communicator = ApplicationCommunicator(app, scope_for(method, path, list(headers), query))
        for index, chunk in enumerate(chunks):
            if disconnect_after is not None and index == disconnect_after:
                await communicator.send_input({"type": "http.disconnect"})
                await communicator.wait(timeout=10)
                return Answer(None, {}, b"")
            more = index < len(chunks) - 1
            await communicator.send_input({"type": "http.request", "body": chunk, "more_body": more})
        if not chunks:
            await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await communicator.receive_output(timeout=20)
        body = b""
        while True:
            message = await communicator.receive_output(timeout=20)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await communicator.send_input({"type": "http.disconnect"})
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await communicator.wait(timeout=5)
        return Answer(start["status"], dict(start["headers"]), body)

    return async_to_sync(run)()


def auth(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Token {token}".encode())]


def temp_files(folder: Folder) -> list[str]:
    updir = folder.host_path / UPLOAD_DIR
    return [p.name for p in updir.iterdir()] if updir.exists() else []


# --- PUT --------------------------------------------------------------------------------------------


def test_put_streams_chunks_into_the_folder(folder: Folder, key: Any) -> None:
    chunks = [os.urandom(300_000) for _ in range(5)]
    length = str(sum(map(len, chunks))).encode()
    answer = call(
        "PUT",
        f"/api/v1/folders/{folder.pk}/files/models/big.bin",
        chunks,
        [*auth(key("owner")), (b"content-length", length)],
    )
    assert answer.status == 201, answer.body
    assert answer.json()["path"] == "models/big.bin" and answer.json()["size"] == 1_500_000
    assert (folder.host_path / "models" / "big.bin").read_bytes() == b"".join(chunks)
    assert answer.headers[b"content-type"] == b"application/json"
    again = call("PUT", f"/api/v1/folders/{folder.pk}/files/models/big.bin", [b"x"], auth(key("teammate")))
    assert again.status == 200 and (folder.host_path / "models" / "big.bin").read_bytes() == b"x"
    assert temp_files(folder) == []


@pytest.mark.parametrize(("who", "status"), [("owner", 201), ("teammate", 201), ("admin", 201), ("stranger", 404)])
def test_put_personas(folder: Folder, key: Any, who: str, status: int) -> None:
    answer = call("PUT", f"/api/v1/folders/{folder.pk}/files/by-{who}.txt", [b"hi"], auth(key(who)))
    assert answer.status == status
    assert (folder.host_path / f"by-{who}.txt").exists() == (status == 201)


def test_put_anonymous_and_bad_key(folder: Folder) -> None:
    anonymous = call("PUT", f"/api/v1/folders/{folder.pk}/files/x.txt", [b"hi"])
    assert anonymous.status == 401 and anonymous.headers[b"www-authenticate"] == b"Token"
    bad = call("PUT", f"/api/v1/folders/{folder.pk}/files/x.txt", [b"hi"], auth("msk_nope_nope"))
    assert bad.status == 401 and "API key" in bad.json()["detail"]
    assert not (folder.host_path / "x.txt").exists()


def test_put_with_session_needs_csrf(folder: Folder, personas: dict[str, Any]) -> None:
    from django.test import Client

    client = Client()
    client.force_login(personas["teammate"])
    session = client.cookies["sessionid"].value
    secret = "a" * 32
    cookies = (b"cookie", f"sessionid={session}; csrftoken={secret}".encode())
    without = call("PUT", f"/api/v1/folders/{folder.pk}/files/s.txt", [b"x"], [cookies])
    assert without.status == 403 and "CSRF" in without.json()["detail"]
    with_token = call(
        "PUT", f"/api/v1/folders/{folder.pk}/files/s.txt", [b"x"], [cookies, (b"x-csrftoken", secret.encode())]
    )
    assert with_token.status == 201


def test_put_refused_path_is_a_json_sentence(folder: Folder, key: Any) -> None:
    answer = call("PUT", f"/api/v1/folders/{folder.pk}/files/a/../../etc/passwd", [b"x"], auth(key("owner")))
    assert answer.status == 400 and "'..'" in answer.json()["detail"]


def test_put_over_quota_refused_before_reading_the_body(folder: Folder, key: Any) -> None:
    Folder.objects.filter(pk=folder.pk).update(quota_bytes=100)
    app = storage_asgi.streaming_uploads(ASGIHandler())
    headers = [*auth(key("owner")), (b"content-length", b"1000000")]

    async def run() -> tuple[dict[str, Any], bytes]:
        communicator = ApplicationCommunicator(
            app, scope_for("PUT", f"/api/v1/folders/{folder.pk}/files/big.bin", headers)
        )
        # No body sent at all: the answer comes from the Content-Length alone.
        start = await communicator.receive_output(timeout=10)
        body = await communicator.receive_output(timeout=10)
        await communicator.wait(timeout=5)
        return start, body["body"]

    start, body = async_to_sync(run)()
    assert start["status"] == 413
    assert "quota of 100 bytes" in json.loads(body)["detail"]
    assert not (folder.host_path / "big.bin").exists() and temp_files(folder) == []


def test_put_over_quota_counted_while_streaming(folder: Folder, key: Any) -> None:
    Folder.objects.filter(pk=folder.pk).update(quota_bytes=2_000_000)
    chunks = [b"x" * 600_000] * 5  # no Content-Length (chunked): 3 MB > 2 MB found while counting
    answer = call("PUT", f"/api/v1/folders/{folder.pk}/files/big.bin", chunks, auth(key("owner")))
    assert answer.status == 413 and "quota" in answer.json()["detail"]
    assert not (folder.host_path / "big.bin").exists() and temp_files(folder) == []


def test_client_disconnect_mid_upload_saves_nothing(folder: Folder, key: Any) -> None:
    chunks = [b"x" * 1_200_000] * 4
    answer = call(
        "PUT", f"/api/v1/folders/{folder.pk}/files/partial.bin", chunks, auth(key("owner")), disconnect_after=2
    )
    assert answer.status is None
    assert not (folder.host_path / "partial.bin").exists()
    assert temp_files(folder) == []


@pytest.mark.django_db(transaction=True)  # Django's handler runs views in a thread of its own (own connection)
def test_other_requests_go_to_django(folder: Folder, key: Any) -> None:
    listing = call("GET", f"/api/v1/folders/{folder.pk}/files/", [], auth(key("owner")))
    assert listing.status == 200 and [e["name"] for e in listing.json()] == ["README.md"]
    download = call("GET", f"/api/v1/folders/{folder.pk}/files/README.md", [], auth(key("owner")))
    assert download.status == 200 and download.body == b"hello\n"
    ranged = call(
        "GET", f"/api/v1/folders/{folder.pk}/files/README.md", [], [*auth(key("owner")), (b"range", b"bytes=1-3")]
    )
    assert ranged.status == 206 and ranged.body == b"ell"


# --- multipart --------------------------------------------------------------------------------------------


def multipart(files: dict[str, bytes], fields: dict[str, str] | None = None, *, fields_last: bool = False) -> tuple:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    field_parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (fields or {}).items()
    ]
    file_parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files.items()
    ]
    parts = file_parts + field_parts if fields_last else field_parts + file_parts
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return body, headers


def split(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def test_multipart_streamed_in_small_chunks(folder: Folder, key: Any) -> None:
    big = os.urandom(700_000)
    body, headers = multipart({"weights.bin": big, "config.json": b"{}"})
    answer = call(
        "POST",
        f"/api/v1/folders/{folder.pk}/upload/",
        split(body, 65_000),
        [*auth(key("teammate")), *headers],
        query=b"path=incoming",
    )
    assert answer.status == 201, answer.body
    assert [e["path"] for e in answer.json()["uploaded"]] == ["incoming/weights.bin", "incoming/config.json"]
    assert (folder.host_path / "incoming" / "weights.bin").read_bytes() == big
    assert temp_files(folder) == []


def test_multipart_directory_named_after_the_files(folder: Folder, key: Any) -> None:
    body, headers = multipart({"a.txt": b"a"}, {"path": "later"}, fields_last=True)
    answer = call("POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [*auth(key("owner")), *headers])
    assert answer.status == 201 and answer.json()["uploaded"][0]["path"] == "later/a.txt"


def test_multipart_refusals(folder: Folder, key: Any) -> None:
    Folder.objects.filter(pk=folder.pk).update(quota_bytes=1000)
    body, headers = multipart({"a.bin": b"a" * 600, "b.bin": b"b" * 600})
    over = call("POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [*auth(key("owner")), *headers])
    assert over.status == 413 and "quota" in over.json()["detail"]
    assert not (folder.host_path / "a.bin").exists() and temp_files(folder) == []
    body, headers = multipart({}, {"path": "x"})
    empty = call("POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [*auth(key("owner")), *headers])
    assert empty.status == 400 and "at least one file" in empty.json()["detail"]
    body, headers = multipart({"a.txt": b"a"})
    stranger = call("POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [*auth(key("stranger")), *headers])
    assert stranger.status == 404
    traversal = call(
        "POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [*auth(key("owner")), *headers], query=b"path=../up"
    )
    assert traversal.status == 400 and "'..'" in traversal.json()["detail"]
    garbage = call(
        "POST",
        f"/api/v1/folders/{folder.pk}/upload/",
        [b"not multipart"],
        [*auth(key("owner")), (b"content-type", b"multipart/form-data; boundary=zz"), (b"content-length", b"13")],
    )
    assert garbage.status == 400


def test_plain_html_form_upload_checks_csrf_from_the_form(folder: Folder, personas: dict[str, Any]) -> None:
    """No JavaScript: the token travels as a form field, before the files; nothing is saved without it."""
    from django.test import Client

    client = Client()
    client.force_login(personas["owner"])
    secret = "b" * 32
    cookies = (b"cookie", f"sessionid={client.cookies['sessionid'].value}; csrftoken={secret}".encode())
    back = f"/folders/{folder.pk}/"
    query = f"path=form&next={back}".encode()
    body, headers = multipart({"a.txt": b"a"}, {"csrfmiddlewaretoken": secret})
    ok = call("POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [cookies, *headers], query=query)
    assert ok.status == 303 and ok.headers[b"location"] == back.encode(), ok.body
    assert (folder.host_path / "form" / "a.txt").read_bytes() == b"a"
    body, headers = multipart({"b.txt": b"b"}, {"csrfmiddlewaretoken": "c" * 32})
    forged = call("POST", f"/api/v1/folders/{folder.pk}/upload/", [body], [cookies, *headers], query=query)
    assert forged.status == 403 and "CSRF" in forged.json()["detail"]
    assert not (folder.host_path / "form" / "b.txt").exists() and temp_files(folder) == []
    # The explorer's script sends the token as a header instead, and gets JSON back.
    body, headers = multipart({"c.txt": b"c"})
    scripted = call(
        "POST",
        f"/api/v1/folders/{folder.pk}/upload/",
        [body],
        [cookies, (b"x-csrftoken", secret.encode()), *headers],
        query=b"path=form",
    )
    assert scripted.status == 201 and scripted.json()["uploaded"][0]["path"] == "form/c.txt"


# --- daphne: lazy bodies -------------------------------------------------------------------------------


def test_spooled_body_hands_out_chunks_then_queued_messages() -> None:
    spool = io.BytesIO(b"a" * (storage_asgi._SpooledBody.CHUNK + 10))
    body = storage_asgi._SpooledBody(spool)

    async def run() -> list[dict[str, Any]]:
        body.put_nowait({"type": "http.request", "body": b"", "more_body": False})  # daphne's empty copy: dropped
        first = await body.receive()
        second = await body.receive()
        body.put_nowait({"type": "http.disconnect"})
        third = await body.receive()
        return [first, second, third]

    first, second, third = async_to_sync(run)()
    assert len(first["body"]) == storage_asgi._SpooledBody.CHUNK and first["more_body"] is True
    assert second == {"type": "http.request", "body": b"a" * 10, "more_body": False}
    assert third == {"type": "http.disconnect"}
    assert spool.closed


def test_spooled_body_stops_on_disconnect() -> None:
    body = storage_asgi._SpooledBody(io.BytesIO(b"x" * 3_000_000))

    async def run() -> list[dict[str, Any]]:
        first = await body.receive()
        body.put_nowait({"type": "http.disconnect"})
        return [first, await body.receive()]

    first, second = async_to_sync(run)()
    assert first["more_body"] is True and second == {"type": "http.disconnect"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class LiveDaphne:
    def __init__(self, port: int, pid: int, folder_id: str, token: str, storage: Path, spool: Path) -> None:
        self.port, self.pid, self.folder_id, self.token, self.storage = port, pid, folder_id, token, storage
        self.spool = spool

    def connection(self, method: str, path: str, length: int | None = None) -> Any:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.putrequest(method, f"/api/v1/folders/{self.folder_id}/files/{path}")
        conn.putheader("Authorization", f"Token {self.token}")
        if length is not None:
            conn.putheader("Content-Length", str(length))
        conn.endheaders()
        return conn


@pytest.fixture(scope="module")
def live_daphne(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real daphne serving config.asgi wrapped by streaming_uploads, on its own SQLite database."""
    tmp_path = tmp_path_factory.mktemp("daphne")
    module = tmp_path / "streamed_app.py"
    module.write_text(
        "from config.asgi import application as inner\n"
        "from storage.asgi import streaming_uploads\n"
        "application = streaming_uploads(inner)\n"
    )
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "VAR_DIR": str(tmp_path / "var"),
            "STORAGE_ROOT": str(tmp_path / "storage"),
            # twisted would spool bodies here: the tests check that streamed uploads never do.
            "TMPDIR": str(tmp_path / "spool"),
            "DEFAULT_FOLDER_QUOTA": str(1024**3),
            "LOG_LEVEL": "WARNING",
        }
    )
    (tmp_path / "spool").mkdir()
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=REPO, env=env, check=True)
    setup = (
        "from accounts.models import User; from accounts.actions import do_issue_api_key;"
        "from storage.actions import do_create_folder;"
        "u = User.objects.create_user('big'); f = do_create_folder(acting_user=u, name='big');"
        "print(f.pk, do_issue_api_key(u)[1])"
    )
    out = subprocess.run(
        [python, "manage.py", "shell", "-v", "0", "-c", setup],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    folder_id, token = out[-2], out[-1]
    port = _free_port()
    log = (tmp_path / "daphne.log").open("wb")
    # As in the Procfile (no --proxy-headers: forwarding headers are config/asgi_guards.py's business).
    command = [str(Path(python).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(
        [*command, "streamed_app:application"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "daphne.log").read_text()
                time.sleep(0.1)
        live = LiveDaphne(port, server.pid, folder_id, token, tmp_path / "storage" / folder_id, tmp_path / "spool")
        conn = live.connection("PUT", "warmup.bin", 1024 * 1024)  # imports and first allocations
        conn.send(b"w" * 1024 * 1024)
        assert conn.getresponse().status == 201
        yield live
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)  # a loaded machine (the whole suite beside other work) is slow
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
            raise


BIG = 256 * 1024 * 1024


def test_real_daphne_streams_a_large_put_with_flat_memory(live_daphne: LiveDaphne) -> None:
    """256 MiB in through a real daphne: server RSS grows far less (it was +256 MiB before the patch)."""
    block = os.urandom(1024 * 1024)
    before = _rss_kib(live_daphne.pid)
    conn = live_daphne.connection("PUT", "big.bin", BIG)
    for sent in range(BIG // len(block)):
        conn.send(block)
        if sent == 128:  # halfway: the body goes straight to the folder, never to a spool file
            assert not any(live_daphne.spool.iterdir())
    response = conn.getresponse()
    after = _rss_kib(live_daphne.pid)
    assert response.status == 201, response.read()
    assert (live_daphne.storage / "big.bin").stat().st_size == BIG
    growth_mib = (after - before) / 1024
    assert growth_mib < 64, f"server RSS grew by {growth_mib:.0f} MiB for a 256 MiB upload"


def test_real_daphne_slow_download_is_not_buffered_in_memory(live_daphne: LiveDaphne) -> None:
    """A client that stops reading must not make the server buffer the rest of the file in memory."""
    (live_daphne.storage / "download.bin").write_bytes(os.urandom(1024 * 1024) * 256)
    before = _rss_kib(live_daphne.pid)
    conn = live_daphne.connection("GET", "download.bin")
    response = conn.getresponse()
    assert response.status == 200 and int(response.headers["Content-Length"]) == BIG
    first = response.read(64 * 1024)
    time.sleep(2)  # the server meanwhile reads the disk as fast as twisted lets it
    stalled = _rss_kib(live_daphne.pid)
    rest = 0
    while chunk := response.read(1024 * 1024):
        rest += len(chunk)
    assert len(first) + rest == BIG
    growth_mib = (stalled - before) / 1024
    assert growth_mib < 64, f"server RSS grew by {growth_mib:.0f} MiB while the client was not reading"


def test_real_daphne_refuses_an_over_quota_upload_before_its_body(live_daphne: LiveDaphne) -> None:
    """The app starts when the headers are in: a 4 GiB upload to a 1 GiB quota is refused at once,
    not after 4 GiB have been received into a spool file."""
    conn = live_daphne.connection("PUT", "huge.bin", 4 * 1024**3)
    conn.send(b"x" * 1024 * 1024)
    started = time.monotonic()
    response = conn.getresponse()
    assert time.monotonic() - started < 10
    assert response.status == 413
    assert "quota" in json.loads(response.read())["detail"]
    assert response.getheader("Connection", "").lower() == "close"  # the rest of the body can not be parsed
    assert not (live_daphne.storage / "huge.bin").exists()
    assert not any(live_daphne.spool.iterdir())


def test_real_daphne_keeps_the_connection_after_a_streamed_upload(live_daphne: LiveDaphne) -> None:
    """A streamed upload ends like any request: the same connection serves the next one."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", live_daphne.port, timeout=30)
    headers = {"Authorization": f"Token {live_daphne.token}"}
    for name in ("one.bin", "two.bin"):
        conn.request("PUT", f"/api/v1/folders/{live_daphne.folder_id}/files/{name}", b"y" * 300_000, headers)
        answer = conn.getresponse()
        assert answer.status == 201, answer.read()
        answer.read()
    conn.request("GET", f"/api/v1/folders/{live_daphne.folder_id}/files/?path=", headers=headers)
    listing = conn.getresponse()
    assert listing.status == 200
    names = {entry["name"] for entry in json.loads(listing.read())}
    assert {"one.bin", "two.bin"} <= names
    assert (live_daphne.storage / "two.bin").read_bytes() == b"y" * 300_000


def test_real_daphne_client_gone_mid_upload_leaves_nothing(live_daphne: LiveDaphne) -> None:
    conn = live_daphne.connection("PUT", "gone.bin", 64 * 1024 * 1024)
    for _ in range(8):
        conn.send(b"z" * 1024 * 1024)
    conn.sock.close()
    updir = live_daphne.storage / UPLOAD_DIR
    wait_for(
        lambda: not (updir.exists() and any(updir.iterdir())),
        timeout=10,
        what="the half-received upload to be removed",
    )
    assert not (live_daphne.storage / "gone.bin").exists()
    assert not any(live_daphne.spool.iterdir())


def test_real_daphne_stops_promptly_in_the_middle_of_an_upload(live_daphne: LiveDaphne) -> None:
    """Ctrl-C of make run during an upload: the server exits, nothing half-written stays.

    (Last in this module on purpose: it stops the module's server.) A worker thread waiting for the
    next part of the body used to wait forever once the event loop had stopped, so daphne never
    exited."""
    conn = live_daphne.connection("PUT", "interrupted.bin", 64 * 1024 * 1024)
    for _ in range(4):
        conn.send(b"i" * 1024 * 1024)
    updir = live_daphne.storage / UPLOAD_DIR
    wait_for(lambda: updir.exists() and any(updir.iterdir()), timeout=10, what="the upload to be under way")
    os.kill(live_daphne.pid, signal.SIGTERM)
    wait_for(
        lambda: not Path(f"/proc/{live_daphne.pid}").exists() or _zombie(live_daphne.pid),
        timeout=15,
        what="daphne to exit",
    )
    conn.sock.close()
    assert not (live_daphne.storage / "interrupted.bin").exists()
    assert not any(updir.iterdir()), "the half-written upload was left behind"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
