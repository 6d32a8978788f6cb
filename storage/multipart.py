"""Streaming multipart/form-data parsing for uploads into a folder (S1.2).

Django's ``MultiPartParser`` reads the body through a chain of small Python-level copies (LazyStream,
ChunkIter, 64 KiB at a time): it held a browser upload to about 0.3x the speed of a local file copy.
Here python-multipart (the parser Starlette and FastAPI use) finds the boundaries with ``bytes.find``
and hands each file part's bytes to the upload handler as views into the received chunk, so a
file's bytes are copied once, into the file.

The behaviour is Django's, so the same forms work either way: a part is a file when its
Content-Disposition has a ``filename``, file names are sanitized as Django does, and Django's limits
apply (``DATA_UPLOAD_MAX_NUMBER_FIELDS``, ``DATA_UPLOAD_MAX_MEMORY_SIZE`` for the non-file fields,
``DATA_UPLOAD_MAX_NUMBER_FILES``). Unlike Django, a body that ends before its closing boundary is an
error, not a shorter form: a cut-off upload must never be saved as if it were complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.files.uploadhandler import FileUploadHandler, SkipFile
from django.http import QueryDict
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from django.utils.datastructures import MultiValueDict
from django.utils.encoding import force_str
from django.utils.http import parse_header_parameters
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

# Per part: Content-Disposition and Content-Type are all a form sends; a browser's stay far below.
MAX_PART_HEADERS = 16
MAX_PART_HEADER_SIZE = 8 * 1024


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, checked as Django checks it."""
    if not content_type.startswith("multipart/"):
        raise MultiPartParserError(f"Invalid Content-Type: {content_type}")
    try:
        content_type.encode("ascii")
    except UnicodeEncodeError:
        raise MultiPartParserError("Invalid non-ASCII Content-Type in multipart") from None
    _, options = parse_header_parameters(content_type)
    boundary = options.get("boundary")
    if not boundary or not MultiPartParser.boundary_re.fullmatch(boundary):
        raise MultiPartParserError(f"Invalid boundary in multipart: {boundary}")
    return boundary.encode("ascii")


class _Part:
    __slots__ = ("field_data", "file_name", "headers", "kind", "name", "size", "skip")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.name = ""
        self.kind = ""  # "field", "file" or "" (no usable Content-Disposition: ignored, as Django does)
        self.skip = False
        self.field_data: list[bytes] = []
        self.size = 0
        self.file_name = ""


class FormParser:
    """Feeds the parts of one multipart body to a Django upload handler; fields are kept in a QueryDict.

    ``parse(chunks)`` returns ``(post, files)`` like Django's parser. The handler's ``receive_data_chunk``
    gets memoryviews into the received chunks; it must use (write) them before returning.
    """

    def __init__(self, content_type: str, handler: FileUploadHandler, encoding: str | None = None) -> None:
        self.boundary = boundary_of(content_type)
        self.handler = handler
        self.encoding = encoding or settings.DEFAULT_CHARSET
        self.post = QueryDict(mutable=True, encoding=self.encoding)
        self.files: MultiValueDict[str, Any] = MultiValueDict()
        self._part = _Part()
        self._field = b""
        self._value = b""
        self._header_bytes = 0
        self._fields = 0
        self._field_bytes = 0
        self._files = 0
        self._ended = False

    def parse(self, chunks: Iterable[bytes]) -> tuple[QueryDict, MultiValueDict[str, Any]]:
        parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_SIZE,
        )
        try:
            for chunk in chunks:
                if self._ended:
                    continue  # the epilogue after the closing boundary means nothing; read it to the end
                parser.write(chunk)
        except MultipartParseError as exc:
            raise MultiPartParserError(str(exc)) from None
        if not self._ended:
            raise MultiPartParserError(
                "the body ended before the form's closing boundary (was the upload cut off?); nothing was saved"
            )
        self.post._mutable = False
        return self.post, self.files

    # -- callbacks --

    def _on_part_begin(self) -> None:
        self._part = _Part()
        self._field = self._value = b""
        self._header_bytes = 0

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._part.headers[name] = self._value.decode(self.encoding, errors="replace").strip()
        self._field = self._value = b""

    def _on_headers_finished(self) -> None:
        part = self._part
        disposition = part.headers.get("content-disposition")
        if not disposition:
            return
        _, options = parse_header_parameters(disposition)
        name = options.get("name")
        if name is None:
            return
        part.name = force_str(name, self.encoding, errors="replace").strip()
        if "filename" not in options:
            part.kind = "field"
            self._fields += 1
            limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
            if limit is not None and self._fields > limit:
                raise TooManyFieldsSent(
                    "The number of GET/POST parameters exceeded settings.DATA_UPLOAD_MAX_NUMBER_FIELDS."
                )
            return
        part.kind = "file"
        self._files += 1
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        if limit is not None and self._files > limit:
            raise TooManyFilesSent("The number of files exceeded settings.DATA_UPLOAD_MAX_NUMBER_FILES.")
        if part.headers.get("content-transfer-encoding", "").lower() not in ("", "binary", "8bit", "7bit"):
            raise MultiPartParserError(
                "Content-Transfer-Encoding is not supported for files (RFC 7578 deprecates it); send the raw bytes"
            )
        file_name = MultiPartParser.sanitize_file_name(None, options.get("filename") or "")  # type: ignore[arg-type]
        if not file_name:
            part.skip = True  # as Django does: a file input left empty sends a part with filename=""
            return
        content_type, extra = parse_header_parameters(part.headers.get("content-type", ""))
        try:
            content_length: int | None = int(part.headers.get("content-length", ""))
        except ValueError:
            content_length = None
        part.file_name = file_name
        try:
            # Django passes the Content-Type parameters as str too (its stubs say bytes).
            extra_params: Any = extra
            self.handler.new_file(
                part.name, file_name, content_type.strip(), content_length, extra.get("charset"), extra_params
            )
        except SkipFile:
            part.skip = True

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.kind == "field":
            self._field_bytes += end - start
            self._check_field_bytes(part)
            part.field_data.append(data[start:end])
        elif part.kind == "file" and not part.skip:
            part.size += end - start
            self.handler.receive_data_chunk(memoryview(data)[start:end], part.size - (end - start))  # type: ignore[arg-type]

    def _check_field_bytes(self, part: _Part) -> None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        # Django counts the field names too (as "&name=" in a urlencoded body).
        if limit is not None and self._field_bytes + len(part.name) + 2 > limit:
            raise RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE.")

    def _on_part_end(self) -> None:
        part = self._part
        if part.kind == "field":
            self._field_bytes += len(part.name) + 2
            self._check_field_bytes(part)
            self.post.appendlist(part.name, force_str(b"".join(part.field_data), self.encoding, errors="replace"))
        elif part.kind == "file" and not part.skip:
            uploaded = self.handler.file_complete(part.size)
            if uploaded is not None:
                self.files.appendlist(part.name, uploaded)

    def _on_end(self) -> None:
        self._ended = True
