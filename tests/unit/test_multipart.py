"""storage/multipart.py: the streaming form parser gives what Django's parser gives, however the body is cut."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.multipart import FormParser

BOUNDARY = "----formboundary7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


class Collect(FileUploadHandler):
    """Keeps each file's bytes in memory (what a test needs to compare parsers)."""

    chunk_size = 64 * 1024

    def __init__(self, skip: tuple[str, ...] = ()) -> None:
        super().__init__(None)
        self.skip = skip
        self.buffer = bytearray()

    def new_file(self, field_name: str, file_name: str, *args: Any, **kwargs: Any) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        if file_name in self.skip:
            raise SkipFile()
        self.buffer = bytearray()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        assert start == len(self.buffer)
        self.buffer += raw_data
        return None

    def file_complete(self, file_size: int) -> Any:
        assert file_size == len(self.buffer)
        return SimpleUploadedFile(self.file_name or "", bytes(self.buffer), self.content_type)


def form(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]) -> bytes:
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, data in files:
        out.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def cut(body: bytes, sizes: list[int]) -> list[bytes]:
    chunks, at = [], 0
    for size in sizes:
        if at >= len(body):
            break
        chunks.append(body[at : at + size])
        at += size
    if at < len(body):
        chunks.append(body[at:])
    return chunks


def ours(body: bytes | list[bytes], handler: Collect | None = None) -> tuple[dict, dict]:
    chunks = [body] if isinstance(body, bytes) else body
    post, files = FormParser(CONTENT_TYPE, handler or Collect()).parse(chunks)
    return _plain(post, files)


def djangos(body: bytes) -> tuple[dict, dict]:
    meta = {"CONTENT_TYPE": CONTENT_TYPE, "CONTENT_LENGTH": str(len(body))}
    post, files = MultiPartParser(meta, io.BytesIO(body), [Collect()], "utf-8").parse()
    return _plain(post, files)


def _plain(post: Any, files: Any) -> tuple[dict, dict]:
    return (
        {k: post.getlist(k) for k in post},
        {k: [(f.name, f.read()) for f in files.getlist(k)] for k in files},
    )


# Data that looks like the boundary's start: CR LF, dashes, a partial boundary at a chunk's end.
tricky_bytes = st.lists(
    st.sampled_from([b"\r\n", b"--", b"\r\n--", f"\r\n--{BOUNDARY[:10]}".encode(), b"x", b"\x00\xff", b"-"]),
    max_size=40,
).map(b"".join) | st.binary(max_size=300)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    fields=st.lists(
        st.tuples(names, st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r"), max_size=30)),
        max_size=3,
    ),
    files=st.lists(st.tuples(names, names.map(lambda n: n + ".bin"), tricky_bytes), max_size=3),
    sizes=st.lists(st.integers(min_value=1, max_value=64), max_size=60),
)
def test_same_result_as_djangos_parser_whatever_the_chunking(fields: list, files: list, sizes: list[int]) -> None:
    body = form(fields, files)
    assert ours(cut(body, sizes)) == djangos(body)


def test_a_large_file_arrives_whole_with_boundary_like_bytes_at_every_chunk_edge() -> None:
    data = (f"\r\n--{BOUNDARY[:-1]}".encode() + b"\r\n" * 7 + bytes(range(256))) * 5000
    body = form([("path", "models")], [("files", "w.bin", data)])
    post, files = ours(cut(body, [4093] * (len(body) // 4093 + 1)))
    assert post == {"path": ["models"]} and files == {"files": [("w.bin", data)]}


def test_file_names_are_sanitized_and_an_empty_file_input_is_skipped() -> None:
    body = form([], [("files", "../../etc/passwd", b"x"), ("files", "", b""), ("files", "C:\\\\dir\\\\a.txt", b"y")])
    _, files = ours(body)
    assert files == {"files": [("passwd", b"x"), ("a.txt", b"y")]}


def test_a_file_the_handler_skips_is_not_delivered() -> None:
    body = form([], [("files", "keep.bin", b"k"), ("files", "drop.bin", b"d")])
    _, files = ours(body, Collect(skip=("drop.bin",)))
    assert files == {"files": [("keep.bin", b"k")]}


def test_a_body_cut_off_before_its_closing_boundary_is_an_error() -> None:
    body = form([], [("files", "a.bin", b"a" * 1000)])
    with pytest.raises(MultiPartParserError, match="closing boundary"):
        ours(body[: len(body) - 20])


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "multipart/form-data", "multipart/form-data; boundary=", 'multipart/form-data; boundary="a\x7fb"'],
)
def test_a_bad_content_type_or_boundary_is_refused(content_type: str) -> None:
    with pytest.raises(MultiPartParserError):
        FormParser(content_type, Collect())


def test_garbage_instead_of_a_form_is_refused() -> None:
    with pytest.raises(MultiPartParserError):
        ours(b"this is not a multipart body at all\r\n")


def test_djangos_limits_apply(settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 2
    with pytest.raises(TooManyFieldsSent):
        ours(form([("a", "1"), ("b", "2"), ("c", "3")], []))
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 100
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    with pytest.raises(RequestDataTooBig):
        ours(form([("a", "x" * 200)], []))
    # File bytes do not count against the in-memory limit.
    assert ours(form([], [("files", "big.bin", b"x" * 1000)]))[1]["files"][0][0] == "big.bin"
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 1
    with pytest.raises(TooManyFilesSent):
        ours(form([], [("files", "a.bin", b"a"), ("files", "b.bin", b"b")]))


def test_oversized_part_headers_are_refused() -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{"n" * 10000}.bin"\r\n\r\n'
        f"x\r\n--{BOUNDARY}--\r\n"
    ).encode()
    with pytest.raises(MultiPartParserError):
        ours(body)


def test_base64_transfer_encoding_is_refused_with_a_reason() -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="a.bin"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\nYQ==\r\n--{BOUNDARY}--\r\n"
    ).encode()
    with pytest.raises(MultiPartParserError, match="Content-Transfer-Encoding"):
        ours(body)
