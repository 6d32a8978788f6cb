"""Folders and files REST API (docs/architecture.md): ``/api/v1/folders/``.

Views parse, authorize (storage.access) and call one action (storage.actions). Large bodies never pass
through here in production: ``PUT .../files/{path}`` and ``POST .../upload/`` are answered by the raw
ASGI handler in storage.asgi, which streams the body straight into the folder. The views below are the
same operations for every other way in (the test client, WSGI) and share the actions with it.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, BinaryIO

from django.core.handlers.asgi import ASGIRequest
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.utils.http import content_disposition_header, http_date, quote_etag, url_has_allowed_host_and_scheme
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import Project
from config.api import JSONParser
from storage import actions, fs, modelstore
from storage.access import access_folder
from storage.models import Folder

CHUNK = 1024 * 1024


class FolderSerializer(serializers.ModelSerializer[Folder]):
    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.IntegerField(source="project_id", required=False, allow_null=True)
    effective_quota = serializers.IntegerField(read_only=True)
    runnable = serializers.SerializerMethodField()

    class Meta:
        model = Folder
        fields = [
            "id",
            "name",
            "usage_mode",
            "owner",
            "project",
            "quota_bytes",
            "effective_quota",
            "runnable",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "owner", "created_at", "updated_at"]

    def get_runnable(self, folder: Folder) -> bool:
        """Model store (S1.3): a model folder with both definition files can be run."""
        return folder.usage_mode == Folder.UsageMode.MODEL and modelstore.store_info(folder).runnable

    def validate_project(self, value: int | None) -> Project | None:
        if value is None:
            return None
        user = self.context["request"].user
        project = Project.objects.of(user).filter(pk=value).first()
        if project is None:
            raise serializers.ValidationError("No such project, or you are not a member of it.")
        return project


class FolderDetailSerializer(FolderSerializer):
    used_bytes = serializers.SerializerMethodField()

    class Meta(FolderSerializer.Meta):
        fields = [*FolderSerializer.Meta.fields, "used_bytes"]

    def get_used_bytes(self, folder: Folder) -> int | None:
        try:
            return actions.folder_fs(folder).usage()
        except fs.FsError:
            return None


class EntrySerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField()
    path = serializers.CharField()
    type = serializers.ChoiceField(choices=["file", "dir", "symlink", "other"])
    size = serializers.IntegerField()
    modified = serializers.DateTimeField()


class FolderListView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("usage_mode", str, enum=["general", "data", "model"], required=False)],
        responses=FolderSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        folders = Folder.objects.visible_to(request.user).select_related("owner")
        mode = request.query_params.get("usage_mode")
        if mode:
            folders = folders.filter(usage_mode=mode)
        return Response(FolderSerializer(folders, many=True).data)

    @extend_schema(request=FolderSerializer, responses={201: FolderDetailSerializer})
    def post(self, request: Request) -> Response:
        serializer = FolderSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(serializer.validated_data)
        project = data.pop("project_id", None)
        folder = actions.do_create_folder(acting_user=request.user, project=project, **data)  # type: ignore[arg-type]
        return Response(FolderDetailSerializer(folder).data, status=status.HTTP_201_CREATED)


class FolderDetailView(APIView):
    @extend_schema(responses=FolderDetailSerializer)
    def get(self, request: Request, folder_id: str) -> Response:
        return Response(FolderDetailSerializer(access_folder(request.user, folder_id)).data)

    @extend_schema(request=FolderSerializer, responses=FolderDetailSerializer)
    def patch(self, request: Request, folder_id: str) -> Response:
        folder = access_folder(request.user, folder_id, manage=True)
        serializer = FolderSerializer(folder, data=request.data, partial=True, context={"request": request})
        serializer.is_valid(raise_exception=True)
        changes = {k: v for k, v in serializer.validated_data.items() if k in ("name", "usage_mode", "quota_bytes")}
        folder = actions.do_update_folder(folder, acting_user=request.user, changes=changes)  # type: ignore[arg-type]
        return Response(FolderDetailSerializer(folder).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, folder_id: str) -> Response:
        folder = access_folder(request.user, folder_id, manage=True)
        actions.do_delete_folder(folder, acting_user=request.user)  # type: ignore[arg-type]
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- files -------------------------------------------------------------------------------------------


def fs_error_response(exc: fs.FsError) -> Response:
    return Response({"detail": exc.message, "path": exc.path, "code": exc.code}, status=exc.status)


class FilesAPIView(APIView):
    """Base for the file views: a path a user got wrong is a sentence with its status, never a 500."""

    parser_classes = [JSONParser, FormParser]

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, fs.FsError):
            return fs_error_response(exc)
        return super().handle_exception(exc)


PATH_PARAM = OpenApiParameter("path", str, description="A directory or file inside the folder; '' is the root.")


class FileListView(FilesAPIView):
    @extend_schema(parameters=[PATH_PARAM], responses=EntrySerializer(many=True))
    def get(self, request: Request, folder_id: str) -> Response:
        """List a directory: directories first; symlinks are shown as ``symlink`` and never followed."""
        folder = access_folder(request.user, folder_id)
        entries = actions.folder_fs(folder).list(request.query_params.get("path", ""))
        return Response([e.to_dict() for e in entries])


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range as (start, length), or None to send the whole file; raises when unsatisfiable."""
    match = _RANGE_RE.match(header.strip())
    if not match:
        return None  # several ranges or another unit: RFC 9110 lets us answer with the whole file
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable
        start = max(size - suffix, 0)
        return start, size - start
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable
    return start, end - start + 1


def _etag(st: os.stat_result) -> str:
    return quote_etag(f"{st.st_mtime_ns:x}-{st.st_size:x}")


def _sync_chunks(handle: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    try:
        fd, offset, remaining = handle.fileno(), start, length
        while remaining > 0:
            data = os.pread(fd, min(CHUNK, remaining), offset)
            if not data:
                break
            offset += len(data)
            remaining -= len(data)
            yield data
    finally:
        handle.close()


async def _async_chunks(handle: BinaryIO, start: int, length: int) -> AsyncIterator[bytes]:
    # An async iterator: for a sync one, Django's ASGI handler first reads the WHOLE file into a list.
    try:
        fd, offset, remaining = handle.fileno(), start, length
        while remaining > 0:
            data = await asyncio.to_thread(os.pread, fd, min(CHUNK, remaining), offset)
            if not data:
                break
            offset += len(data)
            remaining -= len(data)
            yield data
    finally:
        handle.close()


def download_response(request: HttpRequest, handle: BinaryIO, path: str) -> HttpResponseBase:
    """Stream a file with Range (one range) and If-Range support; always as an attachment.

    Attachment, never inline: the file comes from our own origin, and a user's HTML must not run there.
    """
    st = os.fstat(handle.fileno())
    size = st.st_size
    etag = _etag(st)
    start, length, status_code = 0, size, 200
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if range_header and (not if_range or if_range == etag):
        try:
            wanted = parse_range(range_header, size)
        except RangeNotSatisfiable:
            handle.close()
            refused = HttpResponse(status=416)
            refused["Content-Range"] = f"bytes */{size}"
            return refused
        if wanted is not None:
            start, length = wanted
            status_code = 206
    chunks: Iterator[bytes] | AsyncIterator[bytes]
    if isinstance(request, ASGIRequest):
        chunks = _async_chunks(handle, start, length)
    else:
        chunks = _sync_chunks(handle, start, length)
    content_type, encoding = mimetypes.guess_type(path)
    response = StreamingHttpResponse(chunks, status=status_code)
    response["Content-Type"] = "application/octet-stream" if encoding or not content_type else content_type
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = etag
    response["Last-Modified"] = http_date(st.st_mtime)
    response["Content-Disposition"] = content_disposition_header(True, path.rsplit("/", 1)[-1]) or "attachment"
    if status_code == 206:
        response["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    return response


def body_chunks(request: HttpRequest) -> Iterator[bytes]:
    while True:
        data = request.read(CHUNK)
        if not data:
            return
        yield data


def content_length(meta_value: str | None) -> int | None:
    try:
        value = int(meta_value or "")
    except ValueError:
        return None
    return value if value >= 0 else None


class FileView(FilesAPIView):
    """One file: download (GET, HEAD), upload with the raw body (PUT), delete (DELETE, trees too)."""

    parser_classes: list[Any] = []  # the body is the file: DRF must not try to parse it

    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, folder_id: str, path: str) -> HttpResponseBase:
        folder = access_folder(request.user, folder_id)
        handle = actions.folder_fs(folder).open_read(path)
        return download_response(request._request, handle, path)

    @extend_schema(
        request={"application/octet-stream": OpenApiTypes.BINARY},
        responses={201: EntrySerializer, 200: EntrySerializer},
    )
    def put(self, request: Request, folder_id: str, path: str) -> Response:
        """Upload (create or replace) a file from the raw body; missing parent directories are created."""
        folder = access_folder(request.user, folder_id, write=True)
        django_request = request._request
        entry, created = actions.do_upload_file(
            folder,
            path,
            body_chunks(django_request),
            acting_user=request.user,  # type: ignore[arg-type]
            content_length=content_length(django_request.META.get("CONTENT_LENGTH")),
        )
        return Response(entry.to_dict(), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, folder_id: str, path: str) -> Response:
        """Delete a file, a symlink (not what it points to) or a directory with everything in it."""
        folder = access_folder(request.user, folder_id, write=True)
        actions.do_delete_path(folder, path, acting_user=request.user)  # type: ignore[arg-type]
        return Response(status=status.HTTP_204_NO_CONTENT)


class MkdirView(FilesAPIView):
    @extend_schema(
        request=inline_serializer("Mkdir", {"path": serializers.CharField(), "parents": serializers.BooleanField()}),
        responses={201: EntrySerializer},
    )
    def post(self, request: Request, folder_id: str) -> Response:
        """Create a directory (``parents``: and the missing ones above it)."""
        folder = access_folder(request.user, folder_id, write=True)
        path = _string_field(request, "path")
        entry = actions.do_make_directory(
            folder,
            path,
            acting_user=request.user,  # type: ignore[arg-type]
            parents=bool(request.data.get("parents", False)),
        )
        return Response(entry.to_dict(), status=status.HTTP_201_CREATED)


class MoveView(FilesAPIView):
    @extend_schema(
        request=inline_serializer("Move", {"src": serializers.CharField(), "dst": serializers.CharField()}),
        responses=EntrySerializer,
    )
    def post(self, request: Request, folder_id: str) -> Response:
        """Rename or move a file or directory; an existing ``dst`` is never replaced (409)."""
        folder = access_folder(request.user, folder_id, write=True)
        src, dst = _string_field(request, "src"), _string_field(request, "dst")
        entry = actions.do_move_path(folder, src, dst, acting_user=request.user)  # type: ignore[arg-type]
        return Response(entry.to_dict())


class PreviewView(FilesAPIView):
    @extend_schema(
        parameters=[PATH_PARAM],
        responses=inline_serializer(
            "Preview",
            {
                "path": serializers.CharField(),
                "size": serializers.IntegerField(),
                "truncated": serializers.BooleanField(),
                "text": serializers.CharField(),
            },
        ),
    )
    def get(self, request: Request, folder_id: str) -> Response:
        """The text of a small text file (YAML, TOML, JSON, logs...): the first 256 KiB, UTF-8 only."""
        folder = access_folder(request.user, folder_id)
        path = request.query_params.get("path", "")
        text, size, truncated = actions.folder_fs(folder).preview(path)
        return Response({"path": "/".join(fs.split_path(path)), "size": size, "truncated": truncated, "text": text})


class UploadView(FilesAPIView):
    """Multipart upload for the browser: many files (field ``files``) into one directory (``path``)."""

    parser_classes = [MultiPartParser]

    @extend_schema(
        parameters=[PATH_PARAM],
        request={
            "multipart/form-data": inline_serializer(
                "MultipartUpload",
                {
                    "path": serializers.CharField(required=False),
                    "files": serializers.ListField(child=serializers.FileField()),
                },
            )
        },
        responses={201: inline_serializer("Uploaded", {"uploaded": EntrySerializer(many=True)})},
    )
    def post(self, request: Request, folder_id: str) -> Response:
        from storage.uploads import FolderUploadHandler

        folder = access_folder(request.user, folder_id, write=True)
        directory = request.query_params.get("path", "")
        handler = FolderUploadHandler(folder, directory, django_request=request._request)
        request._request.upload_handlers = [handler]
        try:
            target = request.data.get("path", directory) or directory
            files = request.FILES.getlist("files")
            if not files:
                raise fs.FsError("Choose at least one file to upload (form field 'files').")
            if not handler.uploads:  # parsed before our handler was installed (a CSRF check read the form)
                for uploaded in files:
                    handler.add_existing(uploaded)
            uploads = handler.finish(target)
            results = actions.do_commit_uploads(folder, uploads, acting_user=request.user)  # type: ignore[arg-type]
        finally:
            handler.abort_all()
        after = request.query_params.get("next", "")
        if after and url_has_allowed_host_and_scheme(after, allowed_hosts={request.get_host()}):
            return HttpResponseRedirect(after, status=303)  # type: ignore[return-value]
        return Response({"uploaded": [e.to_dict() for e, _ in results]}, status=status.HTTP_201_CREATED)


class LauncherView(FilesAPIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("runtime", str, required=False, description="custom (default), vllm, nim, cmd, ..."),
            OpenApiParameter("model_definition_path", str, required=False),
        ],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request: Request, folder_id: str) -> Response:
        """The service launcher's values pre-filled from the folder (S1.3, S3.2) and every problem found."""
        folder = access_folder(request.user, folder_id)
        # No runtime asked for: the runtime the folder describes ([vllm.*] in service-definition.toml).
        runtime = request.query_params.get("runtime") or None
        definition_path = request.query_params.get("model_definition_path") or None
        return Response(modelstore.launcher_values(folder, runtime, definition_path))


def _string_field(request: Request, name: str) -> str:
    value = request.data.get(name) if hasattr(request.data, "get") else None
    if not isinstance(value, str):
        raise fs.FsError(f"'{name}' is required: a path inside the folder, such as 'models/weights.bin'.")
    return value
