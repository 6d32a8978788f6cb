"""What a node that copies model folders fetches: a folder's manifest and its files (serving.core.snapshots).

Authorized by a node key (``Authorization: Node <name>:<key>``), never a user's session or API key: the
node must be registered (its worker heartbeats) and the folder must be the model folder of a live
service (or of one of its revisions), or of an unfinished dry run placed on that node
(``?validation=<id>``, serving.bus.dryrun). Files are streamed with Range support, so an interrupted
transfer resumes where it stopped.
"""

from __future__ import annotations

import uuid
from typing import Any, NoReturn

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.response import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import APIException, AuthenticationFailed, NotAuthenticated, NotFound, PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from serving.bus import dryrun
from serving.core import snapshots
from serving.models import Endpoint, Node, Revision
from storage import actions, fs, manifest
from storage.api import download_response
from storage.models import Folder

NEEDED = "A node key is needed: Authorization: Node <name>:<key> (manage.py node_key <name> prints it)."


class NodeKeyAuthentication(BaseAuthentication):
    """``Authorization: Node <name>:<key>``: ``request.auth`` is the node's name."""

    def authenticate(self, request: Request) -> tuple[Any, str] | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith(snapshots.NODE_AUTH_SCHEME + " "):
            return None
        name = snapshots.check_node_authorization(header, settings.SECRET_KEY)
        if name is None:
            raise AuthenticationFailed("This node key is not valid here: " + NEEDED)
        return AnonymousUser(), name

    def authenticate_header(self, request: Request) -> str:
        return snapshots.NODE_AUTH_SCHEME


class IsNode(BasePermission):
    message = NEEDED

    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.auth, str)


class _Conflict(APIException):
    status_code = 409


class NodeFolderView(APIView):
    authentication_classes = [NodeKeyAuthentication]
    permission_classes = [IsNode]

    def permission_denied(self, request: Request, message: str | None = None, code: str | None = None) -> NoReturn:
        raise NotAuthenticated(NEEDED)  # no node key (a user's session or key is none): say what is needed

    def folder_for_node(self, request: Request, folder_id: Any) -> Folder:
        name = str(request.auth)
        if not Node.objects.filter(name=name).exists():
            raise PermissionDenied(f"Node {name!r} is not registered; start its worker first.")
        folder = Folder.objects.filter(pk=folder_id).first()
        if folder is None:
            raise NotFound("No such folder.")
        live = Endpoint.objects.live()
        if live.filter(model_folder=folder).exists():
            return folder
        # A route of an earlier revision (a canary's stable side, a rollback) runs that revision's folder.
        if Revision.objects.filter(endpoint__in=live, config__model_folder=str(folder.pk)).exists():
            return folder
        try:
            validation = uuid.UUID(request.query_params.get("validation", "")).hex  # dry runs have hex ids
        except ValueError:
            validation = ""
        run = dryrun.load_request(validation) if validation else None
        if (
            run is not None
            and run.node == name
            and str(run.config.get("folder")) == str(folder.pk)
            and not dryrun.is_finished(validation)
        ):
            return folder
        raise NotFound("No live service (nor a dry run on this node) mounts this folder as its model folder.")


VALIDATION = OpenApiParameter("validation", str, description="a dry run's id, for a service not created yet")


class NodeManifestView(NodeFolderView):
    """A model folder's manifest, for a node that copies it: every regular file's path, size, mode, sha256."""

    @extend_schema(
        parameters=[VALIDATION],
        responses=inline_serializer(
            "NodeFolderManifest",
            {
                "files": serializers.ListField(
                    child=inline_serializer(
                        "NodeFolderManifestFile",
                        {
                            "path": serializers.CharField(),
                            "size": serializers.IntegerField(),
                            "mode": serializers.IntegerField(),
                            "sha256": serializers.CharField(),
                        },
                    )
                )
            },
        ),
    )
    def get(self, request: Request, folder_id: Any) -> Response:
        folder = self.folder_for_node(request, folder_id)
        try:
            return Response(manifest.folder_manifest(actions.folder_fs(folder), str(folder.pk)))
        except fs.FsError as exc:
            raise _Conflict(str(exc)) from None


class NodeFileView(NodeFolderView):
    """One file of a model folder, for a node that copies it (Range requests resume a transfer)."""

    @extend_schema(parameters=[VALIDATION], responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, folder_id: Any, path: str) -> HttpResponseBase:
        folder = self.folder_for_node(request, folder_id)
        try:
            handle = actions.folder_fs(folder).open_read(path)
        except fs.PathNotFound as exc:
            raise NotFound(str(exc)) from None
        except fs.FsError as exc:
            raise _Conflict(str(exc)) from None
        return download_response(request._request, handle, path)
