"""Folders REST API (DESIGN.md §7): ``/api/v1/folders/``."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import Project
from storage import actions
from storage.access import access_folder
from storage.models import Folder


class FolderSerializer(serializers.ModelSerializer[Folder]):
    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.IntegerField(source="project_id", required=False, allow_null=True)

    class Meta:
        model = Folder
        fields = ["id", "name", "usage_mode", "owner", "project", "quota_bytes", "created_at", "updated_at"]
        read_only_fields = ["id", "owner", "created_at", "updated_at"]

    def validate_project(self, value: int | None) -> Project | None:
        if value is None:
            return None
        user = self.context["request"].user
        project = Project.objects.of(user).filter(pk=value).first()
        if project is None:
            raise serializers.ValidationError("No such project, or you are not a member of it.")
        return project


class FolderListView(APIView):
    @extend_schema(responses=FolderSerializer(many=True))
    def get(self, request: Request) -> Response:
        folders = Folder.objects.visible_to(request.user).select_related("owner")
        mode = request.query_params.get("usage_mode")
        if mode:
            folders = folders.filter(usage_mode=mode)
        return Response(FolderSerializer(folders, many=True).data)

    @extend_schema(request=FolderSerializer, responses={201: FolderSerializer})
    def post(self, request: Request) -> Response:
        serializer = FolderSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(serializer.validated_data)
        project = data.pop("project_id", None)
        folder = actions.do_create_folder(acting_user=request.user, project=project, **data)  # type: ignore[arg-type]
        return Response(FolderSerializer(folder).data, status=status.HTTP_201_CREATED)


class FolderDetailView(APIView):
    @extend_schema(responses=FolderSerializer)
    def get(self, request: Request, folder_id: str) -> Response:
        return Response(FolderSerializer(access_folder(request.user, folder_id)).data)

    @extend_schema(request=FolderSerializer, responses=FolderSerializer)
    def patch(self, request: Request, folder_id: str) -> Response:
        folder = access_folder(request.user, folder_id, manage=True)
        serializer = FolderSerializer(folder, data=request.data, partial=True, context={"request": request})
        serializer.is_valid(raise_exception=True)
        changes = {k: v for k, v in serializer.validated_data.items() if k in ("name", "usage_mode", "quota_bytes")}
        folder = actions.do_update_folder(folder, acting_user=request.user, changes=changes)  # type: ignore[arg-type]
        return Response(FolderSerializer(folder).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, folder_id: str) -> Response:
        folder = access_folder(request.user, folder_id, manage=True)
        actions.do_delete_folder(folder, acting_user=request.user)  # type: ignore[arg-type]
        return Response(status=status.HTTP_204_NO_CONTENT)
