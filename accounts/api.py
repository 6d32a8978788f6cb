"""Who am I, and my API keys."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.actions import do_issue_api_key, do_revoke_api_key
from accounts.models import ApiKey


class MeSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    username = serializers.CharField()
    email = serializers.CharField()
    is_superuser = serializers.BooleanField()
    projects = serializers.ListField(child=serializers.DictField())


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    prefix = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "created_at", "last_used_at", "revoked_at"]

    def get_prefix(self, obj: ApiKey) -> str:
        return f"msk_{obj.lookup}"


class MeView(APIView):
    @extend_schema(responses=MeSerializer)
    def get(self, request: Request) -> Response:
        user = request.user
        projects = [
            {"id": m.project_id, "name": m.project.name, "role": m.role}
            for m in user.memberships.select_related("project")  # type: ignore[union-attr]
        ]
        return Response(
            {
                "id": user.pk,
                "username": user.get_username(),
                "email": getattr(user, "email", ""),
                "is_superuser": user.is_superuser,
                "projects": projects,
            }
        )


class ApiKeyListView(APIView):
    @extend_schema(responses=ApiKeySerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(ApiKeySerializer(ApiKey.objects.filter(user=request.user.pk), many=True).data)

    @extend_schema(request=ApiKeySerializer, responses={201: ApiKeySerializer})
    def post(self, request: Request) -> Response:
        serializer = ApiKeySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key, secret = do_issue_api_key(
            request.user,  # type: ignore[arg-type]
            name=serializer.validated_data.get("name", ""),
            expires_at=serializer.validated_data.get("expires_at"),
        )
        body = dict(ApiKeySerializer(key).data)
        body["key"] = secret
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, key_id: int) -> Response:
        key = ApiKey.objects.filter(user=request.user.pk, pk=key_id).first()
        if key is None:
            return Response({"detail": "No such API key."}, status=status.HTTP_404_NOT_FOUND)
        do_revoke_api_key(key)
        return Response(status=status.HTTP_204_NO_CONTENT)
