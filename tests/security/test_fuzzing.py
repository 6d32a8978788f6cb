"""Fuzzing (issue 9, Security 4): the definition parsers, the folder path checks and the proxy's request
parsing get arbitrary and hostile input. Each refuses it in its own terms (DefinitionError, FsError, a
4xx answer or a closed connection); none raises anything else, hangs or lets a request be smuggled.

tests/unit/test_definitions_property.py already feeds the parsers arbitrary text, bytes and
structures; here are the hostile YAML/TOML shapes it does not generate (alias bombs, deep nesting,
language tags, huge numbers). Each property test is bounded by ``max_examples`` to a few seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
import re
import time
from pathlib import Path
from typing import Any
from unittest import mock

import httptools
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import proxy.app
from serving.core.definitions import DefinitionError, parse_model_definition, parse_service_definition
from storage.fs import MAX_NAME_BYTES, FolderFS, FsError, check_name, join, split_path
from tests.live import deadline_for, deadline_ms
from tests.unit.test_proxy_protocol import World

FAST = settings(max_examples=200, deadline=deadline_ms(2), suppress_health_check=[HealthCheck.too_slow])

# --- definition parsers: hostile YAML and TOML shapes --------------------------------------------------


def _bomb(levels: int, width: int) -> str:
    lines = ["l0: &l0 [" + ",".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nmodels: *l{levels - 1}\n"


HOSTILE_YAML = {
    "alias bomb": _bomb(9, 9),
    "alias bomb in a field": _bomb(8, 10).replace("models: *l7", "models:\n  - name: *l7\n    model_path: /models"),
    "recursive alias": "models: &a [*a]",
    "merge loop": "a: &a {<<: *a}\nmodels: []",
    "deep lists": "models: " + "[" * 3000 + "]" * 3000,
    "deep maps": "models: " + "{a: " * 3000 + "1" + "}" * 3000,
    "python tag": "models: !!python/object/apply:os.system ['touch /tmp/modelserve-fuzz-pwned']",
    "python name tag": "models:\n  - name: !!python/name:os.system\n    model_path: /models",
    "unknown tag": "models: !custom {a: 1}",
    "huge integer port": "models:\n - name: a\n   model_path: /m\n   service:\n     port: " + "9" * 5000,
    "huge float": "models:\n - name: a\n   model_path: /m\n   service:\n     port: 8000\n"
    "     start_command: [a]\n     health_check: {path: /, interval: 1e400}",
    "binary tag": "models: !!binary AAAA",
    "timestamp name": "models:\n - name: 2001-12-14t21:59:43.10-05:00\n   model_path: /m",
    "document stream": "models: []\n---\nmodels: []\n",
    "BOM and NUL": "\ufeffmodels:\n - name: a\x00b\n",
    "long key": "k" * 100_000 + ": 1",
}
HOSTILE_TOML = {
    "deep arrays": "a = " + "[" * 3000 + "]" * 3000,
    "deep inline tables": "a = " + "{b = " * 3000 + "1" + "}" * 3000,
    "huge integer": "[custom.resource_slots]\ncpu = " + "9" * 5000,
    "infinite float": "[custom.resource_slots]\ncpu = inf\nmem = nan",
    "overflowing float": "[custom.resource_slots]\ncpu = 1e400",
    "duplicate tables": "[custom]\n[custom]\n",
    "dotted key clash": "custom.environment = 1\n[custom.environment]\nimage = 'x'",
    "long string": "[custom.environ]\nA = '" + "x" * 200_000 + "'",
    "NUL": '[custom.environ]\nA = "\\u0000"\n',
    "surrogate escape": '[custom.environ]\nA = "\\ud800"\n',
}


@pytest.mark.parametrize("text", HOSTILE_YAML.values(), ids=HOSTILE_YAML.keys())
def test_hostile_yaml_is_refused_quickly(text: str) -> None:
    started = time.monotonic()
    with contextlib.suppress(DefinitionError):
        parse_model_definition(text)
    assert time.monotonic() - started < deadline_for(3.0)
    assert not Path("/tmp/modelserve-fuzz-pwned").exists()


@pytest.mark.parametrize("text", HOSTILE_TOML.values(), ids=HOSTILE_TOML.keys())
def test_hostile_toml_is_refused_quickly(text: str) -> None:
    started = time.monotonic()
    with contextlib.suppress(DefinitionError):
        parse_service_definition(text)
    assert time.monotonic() - started < deadline_for(3.0)


# YAML built from the constructs that make parsers misbehave: anchors, aliases, tags, flow and
# block nesting, odd scalars. Random text (the unit tests) rarely forms them.
_scalar = st.sampled_from(
    ["", "~", "null", "yes", "0x1f", "0o17", "1e999", "-.inf", ".nan", "'q'", '"\\u0000"', "2001-12-14", "=", "<<"]
)
_yaml_token = st.one_of(
    _scalar,
    st.sampled_from(["&a ", "*a", "&b ", "*b", "!!str ", "!!python/tuple ", "!!set ", "!!omap ", "? ", ": ", "- "]),
    st.sampled_from(["models", "name", "model_path", "service", "start_command", "port", "health_check"]),
    st.sampled_from(["[", "]", "{", "}", ",", "\n", "\n  ", "\n    - ", "#", "|", ">", "---\n", "...\n"]),
    st.text(max_size=4),
)


@FAST
@given(st.lists(_yaml_token, max_size=60).map("".join))
def test_yaml_built_from_hostile_constructs_gives_a_definition_error(text: str) -> None:
    with contextlib.suppress(DefinitionError):
        parse_model_definition("models:\n  - " + text)


# --- storage paths: arbitrary strings -------------------------------------------------------------


@FAST
@given(st.text(max_size=300))
@example("a/../../b")
@example("\udcff")
@example("a/" * 3000)
@example("..")
@example(".\u2024")
def test_split_path_gives_safe_parts_or_a_path_error(path: str) -> None:
    try:
        parts = split_path(path, allow_root=True)
    except FsError:
        return
    for part in parts:
        assert part not in ("", ".", "..") and "/" not in part and "\x00" not in part
        assert len(part.encode()) <= MAX_NAME_BYTES
        assert check_name(part) == part
    normal = posixpath.normpath(join(parts)) if parts else "."
    assert not normal.startswith(("/", "../")) and normal != ".."
    assert join(parts) == path.removesuffix("/")


@FAST
@given(st.text(max_size=300))
def test_check_name_gives_the_name_or_a_path_error(name: str) -> None:
    try:
        assert check_name(name) == name
    except FsError:
        return
    assert name not in ("", ".", "..") and "/" not in name and not re.search(r"[\x00-\x1f\x7f]", name)


_segment = st.one_of(
    st.sampled_from(["..", ".", "", "link", "sub", "%2e%2e", "..\\x", "~", " ", "\x00", "\n"]),
    st.text(max_size=12),
)


def test_every_folder_operation_on_arbitrary_paths_stays_inside(tmp_path: Path) -> None:
    """Arbitrary paths (segments that are traversal shapes, a symlink out) through every operation of
    FolderFS, including the upload path: only FsError, and nothing outside the folder changes."""
    root, outside = tmp_path / "folder", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "sub").mkdir()
    (root / "sub" / "f").write_text("f")
    os.symlink(outside, root / "link")
    before = sorted(p.name for p in outside.iterdir())
    fs = FolderFS(root)

    @settings(max_examples=150, deadline=deadline_ms(2), suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_segment, min_size=1, max_size=5).map("/".join), st.sampled_from(range(7)))
    def run(path: str, op: int) -> None:
        try:
            if op == 0:
                fs.stat(path)
            elif op == 1:
                fs.list(path)
            elif op == 2:
                fs.open_read(path).close()
            elif op == 3:
                fs.preview(path)
            elif op == 4:
                fs.mkdir(path, parents=True)
            elif op == 5:
                fs.move(path, "sub/moved")
            else:
                upload = fs.begin_upload(path, quota=10**6)
                upload.write(b"data")
                upload.commit()
        except FsError:
            pass
        assert sorted(p.name for p in outside.iterdir()) == before
        assert (outside / "secret").read_text() == "s"

    run()


# --- the proxy's request parsing -------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "CONNECT", "TRACE", "PRI", "G ET", "get", "\x00"]
TARGETS = ["/e/s/x", "/e/s/", "/e/s", "*", "http://p/e/s/x", "/e/s/%00", "/e/s/\xff", "/e/s/a b", "//e/s", "e/s"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1 ", "HTTP/11", ""]
HEADERS = [
    "Content-Length: 3",
    "Content-Length: 0",
    "Content-Length: 3, 3",
    "Content-Length: +3",
    "Content-Length: 0x3",
    "Content-Length:  3 ",
    "Content-Length: 99999999999999999999999",
    "Content-Length : 3",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: Chunked",
    "Transfer-Encoding:  chunked ",
    "Transfer-Encoding: chunked, identity",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: xchunked",
    "Transfer-Encoding:\tchunked",
    " Transfer-Encoding: chunked",
    "Transfer-Encoding\x00: chunked",
    "Connection: keep-alive, Transfer-Encoding",
    "Connection: close",
    "Connection: Upgrade",
    "Upgrade: websocket",
    "Expect: 100-continue",
    "Host: p",
    "Host: p\rX-Injected: 1",
    "X-A: b\n c",
    "X-Long: " + "a" * 70_000,
    "X-Forwarded-For: 1.2.3.4",
    "Authorization: Bearer nope",
    ": empty-name",
    "Bad Name: x",
    "X-\xe9: \xff",
]
BODIES = [
    b"",
    b"abc",
    b"3\r\nabc\r\n0\r\n\r\n",
    b"3;ext=" + b"x" * 70_000 + b"\r\nabc\r\n0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"0\r\nX-Trailer: 1\r\n\r\n",
    b"0\r\n\r\nGET /e/s/smuggled HTTP/1.1\r\nHost: p\r\n\r\n",
    b"abcGET /e/s/smuggled HTTP/1.1\r\nHost: p\r\n\r\n",
]


@st.composite
def requests(draw: Any) -> bytes:
    """Request shapes near the edges of HTTP/1.1 framing, with the endpoint's token so they get as far
    as the proxy lets them, or (one in four) plain arbitrary bytes."""
    if draw(st.integers(0, 3)) == 0:
        return bytes(draw(st.binary(max_size=400)))

    def usual(common: str, odd: list[str]) -> str:  # the common value half of the time
        return common if draw(st.booleans()) else draw(st.sampled_from(odd))

    line = f"{usual('POST', METHODS)} {usual('/e/s/x', TARGETS)} {usual('HTTP/1.1', VERSIONS)}"
    headers = ["Host: p", *draw(st.lists(st.sampled_from(HEADERS), max_size=3))]
    if draw(st.integers(0, 4)):
        headers.insert(draw(st.integers(0, len(headers))), "Authorization: Bearer {token}")
    ending = "\r\n" if draw(st.integers(0, 3)) else draw(st.sampled_from(["\n", "\r"]))
    head = line + "\r\n" + "".join(h + ending for h in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + draw(st.sampled_from(BODIES))


@st.composite
def pieces(draw: Any) -> list[bytes]:
    """One or two requests (pipelined), cut into packets at arbitrary places."""
    data = b"".join(draw(st.lists(requests(), min_size=1, max_size=2)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


class _Requests:
    """Counts the requests a strict parser (the replica's) finds in the bytes the proxy sent it."""

    def __init__(self) -> None:
        self.begun = 0

    def on_message_begin(self) -> None:
        self.begun += 1


STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@settings(
    max_examples=300, deadline=deadline_ms(2), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(pieces())
def test_the_proxy_answers_4xx_or_closes_never_raises_hangs_or_smuggles(packets: list[bytes]) -> None:
    w = World(replicas=1)
    token = w.token.token.encode()
    for packet in packets:
        w.client.data_received(packet.replace(b"{token}", token))  # raises: the test fails
    # What reached the replica is at most one request, read the same way by a strict parser.
    forwarded = w.to_replica()
    event("forwarded" if forwarded else "refused" if w.to_client else "waiting")
    if forwarded:
        seen = _Requests()
        with contextlib.suppress(httptools.HttpParserUpgrade):
            httptools.HttpRequestParser(seen).feed_data(forwarded)
        assert seen.begun == 1, forwarded[:300]
        assert b"/smuggled" not in forwarded.split(b"\r\n", 1)[0]
    # Whatever the proxy answered itself is a refusal, never a 5xx from a bug.
    answered = [int(s) for s in STATUS.findall(w.to_client) if s != b"100"]  # 100: Expect: 100-continue
    assert all(400 <= s < 500 or s in (501, 502, 503, 504, 505) for s in answered), w.to_client[:300]
    assert b"internal_error" not in w.to_client
    # Time passes with no answer from the replica: every connection is answered or closed.
    later = time.monotonic() + 10 * max(w.proxy.config.idle_timeout, w.proxy.config.keepalive_timeout)
    with mock.patch.object(proxy.app, "_monotonic", lambda: later):
        w.proxy._sweep()
    for connecting in w.loop.tasks:  # connections the proxy began to open: never completed here
        connecting.close()
    closed = w.client.transport.closed  # type: ignore[attr-defined]
    final = [s for s in STATUS.findall(w.to_client) if s != b"100"]
    assert closed or final, (packets, w.to_client)
