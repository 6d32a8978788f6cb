"""REST views: parse, authorize (serving.web.access), call one action, shape the answer."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.db.models import Q
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from serving.actions import aliases as alias_actions
from serving.actions import gateway as gateway_actions
from serving.actions import revisions as revision_actions
from serving.actions import rules as rule_actions
from serving.actions import services
from serving.actions import tokens as token_actions
from serving.bus import logfollow, metrics, nodebus
from serving.control import usage
from serving.core import logs, schemas
from serving.core.runtimes import RUNTIMES
from serving.models import (
    STARTING_MARK,
    AutoScalingRule,
    Endpoint,
    EndpointToken,
    ModelAlias,
    Node,
    ResourcePreset,
    Route,
)
from serving.web.access import ReadGrant, access_endpoint, can_write_endpoint, gateway_keys_of
from serving.web.api import serializers as s

UUID_RE = r"[0-9a-fA-F-]{36}"


class ServiceViewSet(viewsets.ViewSet):
    """Model services (endpoints): create, read, modify (PATCH), terminate (DELETE)."""

    lookup_value_regex = UUID_RE

    @extend_schema(responses=s.ServiceSerializer(many=True))
    def list(self, request: Request) -> Response:
        queryset = s.with_routes(Endpoint.objects.visible_to(request.user).live())
        return Response(s.ServiceSerializer(queryset, many=True).data)

    @extend_schema(request=s.ServiceCreateSerializer, responses={201: s.ServiceSerializer})
    def create(self, request: Request) -> Response:
        serializer = s.ServiceCreateSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        created = services.do_create_service(acting_user=request.user, **data)  # type: ignore[arg-type]
        endpoint = s.with_routes(Endpoint.objects.all()).get(pk=created.pk)
        # What is valid but will fail at run time (HF_HOME under the read-only model folder): also in
        # the service's event log.
        body = {**s.ServiceSerializer(endpoint).data, "warnings": getattr(created, "warnings", [])}
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.ServiceCreateSerializer, responses={202: dict})
    @action(detail=False, methods=["post"])
    def validate(self, request: Request) -> Response:
        """Run the configuration once as a throwaway replica (S4.2); watch its websocket."""
        serializer = s.ServiceCreateSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        validation_id = services.do_validate_service(acting_user=request.user, **serializer.validated_data)  # type: ignore[arg-type]
        return Response(
            {"id": validation_id, "websocket": f"/ws/validations/{validation_id}/"},
            status=status.HTTP_202_ACCEPTED,
        )

    @extend_schema(responses=s.ServiceSerializer)
    def retrieve(self, request: Request, pk: str) -> Response:
        endpoint = access_endpoint(request.user, pk)
        endpoint = s.with_routes(Endpoint.objects.all()).get(pk=endpoint.pk)
        return Response(s.ServiceSerializer(endpoint).data)

    @extend_schema(request=s.ServiceModifySerializer, responses=s.ServiceSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        endpoint = access_endpoint(request.user, pk, write=True)
        serializer = s.ServiceModifySerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        services.do_modify_service(
            endpoint,
            acting_user=request.user,  # type: ignore[arg-type]
            changes=serializer.changes(),
            rollout=serializer.rollout_value(),
        )
        endpoint = s.with_routes(Endpoint.objects.all()).get(pk=endpoint.pk)
        return Response(s.ServiceSerializer(endpoint).data)

    @extend_schema(responses={202: s.ServiceSerializer})
    def destroy(self, request: Request, pk: str) -> Response:
        """Terminate the service (S4.6): every replica is stopped, then it leaves the list."""
        endpoint = access_endpoint(request.user, pk, write=True)
        services.do_terminate_service(endpoint, acting_user=request.user)  # type: ignore[arg-type]
        endpoint = s.with_routes(Endpoint.objects.all()).get(pk=endpoint.pk)
        return Response(s.ServiceSerializer(endpoint).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: s.ServiceSerializer})
    @action(detail=True, methods=["post"], url_path="clear-errors")
    def clear_errors(self, request: Request, pk: str) -> Response:
        """Clear errors and retry (S4.4)."""
        endpoint = access_endpoint(request.user, pk, write=True)
        services.do_clear_errors(endpoint, acting_user=request.user)  # type: ignore[arg-type]
        endpoint = s.with_routes(Endpoint.objects.all()).get(pk=endpoint.pk)
        return Response(s.ServiceSerializer(endpoint).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "request_id",
                str,
                description=(
                    "Only the events that stem from this request: the X-Request-ID the proxy or the web app "
                    "answered it with (a replica the request found down, a wake, an API call)."
                ),
            )
        ],
        responses=s.ServiceEventSerializer(many=True),
    )
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str) -> Response:
        """The service's audit and lifecycle log, newest first (at most 500)."""
        endpoint = access_endpoint(request.user, pk)
        events = endpoint.events.select_related("actor")
        request_id = request.query_params.get("request_id", "").strip()
        if request_id:
            if not logs.REQUEST_ID.fullmatch(request_id):
                raise ValidationError(
                    {
                        "request_id": [
                            "request_id is not a request id: give the X-Request-ID header's value as the "
                            "response showed it (up to 128 visible characters, no spaces)."
                        ]
                    }
                )
            events = events.filter(request_id=request_id)
        return Response(s.ServiceEventSerializer(events[:500], many=True).data)

    @extend_schema(responses=s.ScalingEventSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="scaling-events")
    def scaling_events(self, request: Request, pk: str) -> Response:
        """Every autoscaling decision, acted on or not, with the reason (newest first, at most 500)."""
        endpoint = access_endpoint(request.user, pk)
        events = endpoint.scaling_events.select_related("rule")[:500]
        return Response(s.ScalingEventSerializer(events, many=True).data)

    @extend_schema(
        parameters=[s.MetricsQuerySerializer],
        responses=s.MetricsSerializer,
        description=(
            "Short time series of the service's metrics for charts (and what its autoscaling rules "
            "read): proxy (rps, in_flight, p95_ms, errors_per_s, throttled_per_s), kernel (cpu_percent, "
            "mem_bytes, mem_percent per replica) and inference (the replicas' /metrics). Kept 10 minutes."
        ),
    )
    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str) -> Response:
        """Metrics time series: ``{"series": {"<source>:<metric>": [[t, value], ...]}}``."""
        endpoint = access_endpoint(request.user, pk)
        query = s.MetricsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        source = query.validated_data.get("source")
        series = metrics.chart(
            str(endpoint.pk), [source] if source else metrics.SOURCES, float(query.validated_data["window"])
        )
        return Response({"series": series})


class TokenListView(APIView):
    """Tokens of a private service (S7.1). The token itself is only in the creation response."""

    @extend_schema(responses=s.TokenSerializer(many=True))
    def get(self, request: Request, service_id: str) -> Response:
        endpoint = access_endpoint(request.user, service_id)
        return Response(s.TokenSerializer(endpoint.tokens.select_related("created_by"), many=True).data)

    @extend_schema(request=s.TokenCreateSerializer, responses={201: s.TokenSerializer})
    def post(self, request: Request, service_id: str) -> Response:
        endpoint = access_endpoint(request.user, service_id)
        serializer = s.TokenCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        expires_at = serializer.validated_data.get("expires_at") or timezone.now() + timedelta(days=30)
        token, secret = token_actions.do_issue_token(endpoint, acting_user=request.user, expires_at=expires_at)  # type: ignore[arg-type]
        body = dict(s.TokenSerializer(token).data)
        body["token"] = secret
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailView(APIView):
    @extend_schema(responses=s.TokenSerializer)
    def get(self, request: Request, service_id: str, token_id: str) -> Response:
        endpoint = access_endpoint(request.user, service_id)
        token = get_object_or_404(EndpointToken, pk=token_id, endpoint=endpoint)
        return Response(s.TokenSerializer(token).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, service_id: str, token_id: str) -> Response:
        """Revoke a token: refused by every proxy within a second."""
        endpoint = access_endpoint(request.user, service_id)
        token = get_object_or_404(EndpointToken, pk=token_id, endpoint=endpoint)
        if not (token.created_by_id == request.user.pk or can_write_endpoint(request.user, endpoint)):
            raise Http404("No such token.")
        token_actions.do_revoke_token(token, acting_user=request.user)  # type: ignore[arg-type]
        return Response(status=status.HTTP_204_NO_CONTENT)


class RuleListView(APIView):
    """Autoscaling rules of a service (S6.1); see the Rule schema for how they are evaluated."""

    @extend_schema(responses=s.RuleSerializer(many=True))
    def get(self, request: Request, service_id: str) -> Response:
        endpoint = access_endpoint(request.user, service_id)
        return Response(s.RuleSerializer(endpoint.rules.all(), many=True).data)

    @extend_schema(request=s.RuleSerializer, responses={201: s.RuleSerializer})
    def post(self, request: Request, service_id: str) -> Response:
        endpoint = access_endpoint(request.user, service_id, write=True)
        serializer = s.RuleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rule = AutoScalingRule(endpoint=endpoint)
        rule_actions.do_save_rule(rule, acting_user=request.user, changes=serializer.validated_data)  # type: ignore[arg-type]
        return Response(s.RuleSerializer(rule).data, status=status.HTTP_201_CREATED)


class RuleDetailView(APIView):
    def _rule(self, request: Request, service_id: str, rule_id: int, write: bool) -> AutoScalingRule:
        endpoint = access_endpoint(request.user, service_id, write=write)
        return get_object_or_404(AutoScalingRule, pk=rule_id, endpoint=endpoint)

    @extend_schema(responses=s.RuleSerializer)
    def get(self, request: Request, service_id: str, rule_id: int) -> Response:
        return Response(s.RuleSerializer(self._rule(request, service_id, rule_id, False)).data)

    @extend_schema(request=s.RuleSerializer, responses=s.RuleSerializer)
    def patch(self, request: Request, service_id: str, rule_id: int) -> Response:
        rule = self._rule(request, service_id, rule_id, True)
        serializer = s.RuleSerializer(rule, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        rule_actions.do_save_rule(rule, acting_user=request.user, changes=serializer.validated_data)  # type: ignore[arg-type]
        return Response(s.RuleSerializer(rule).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, service_id: str, rule_id: int) -> Response:
        rule = self._rule(request, service_id, rule_id, True)
        rule_actions.do_delete_rule(rule, acting_user=request.user)  # type: ignore[arg-type]
        return Response(status=status.HTTP_204_NO_CONTENT)


class NodeNotAnswering(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The replica's node is not answering; try again in a moment."
    default_code = "node_unavailable"


class RouteLogsView(APIView):
    """The last lines of one replica's log (start-up, pre-start actions and the server's output).

    Read from the route's node at request time (``serving.bus.nodebus``); ``truncated`` says whether the
    log holds more lines than returned. A node that does not answer gives a 503 saying so.

    With ``follow=1`` the answer is ``text/plain`` streamed as the log grows (for ``curl -N``): the
    last ``tail`` lines, then every new line, until the client leaves or the replica is gone; the
    last line then starts with ``-- `` and says why the stream ended (``serving.bus.logfollow``). The page
    follows the same log over ``/ws/services/<id>/routes/<route_id>/logs/``.
    """

    @extend_schema(
        parameters=[
            OpenApiParameter("tail", int, description="How many of the last lines (1-5000, default 200)."),
            OpenApiParameter(
                "member",
                str,
                description="A cluster-mode replica's container: main1 (default) or sub1, sub2, ... (see `members`).",
            ),
            OpenApiParameter(
                "follow",
                bool,
                description="Stream the log as text/plain as it grows, until the replica is gone (default no).",
            ),
        ],
        responses={200: s.RouteLogsSerializer, 404: dict, 503: dict},
    )
    def get(self, request: Request, service_id: str, route_id: str) -> Response | StreamingHttpResponse:
        endpoint = access_endpoint(request.user, service_id)
        route = get_object_or_404(Route.objects.select_related("node"), pk=route_id, endpoint=endpoint)
        raw = request.query_params.get("tail", "200")
        try:
            tail = logfollow.parse_tail(raw)
        except ValueError as exc:
            raise ValidationError({"tail": str(exc)}) from None
        member = request.query_params.get("member")
        try:
            source = logfollow.log_source(route, member)
        except ValueError as exc:
            raise ValidationError({"member": str(exc)}) from None
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        if request.query_params.get("follow", "").lower() in ("1", "true", "yes"):
            return _follow_response(logfollow.RouteRef.of(source), tail, ReadGrant.of_request(request, endpoint))
        try:
            answer = nodebus.route_logs(source, tail)
            answer["route"] = str(route.pk)
            answer["member"] = "main1" if source is route else source.host_name
            return Response(answer)
        except nodebus.NodeUnavailable as exc:
            raise NodeNotAnswering(str(exc)) from None


def _follow_response(route: logfollow.RouteRef, tail: int, grant: ReadGrant) -> StreamingHttpResponse:
    if route.node and route.container_id not in ("", STARTING_MARK) and not logfollow.node_listens(route.node):
        # Known before the stream starts, so it is a 503 like the tail's, not a 200 that ends at once.
        raise NodeNotAnswering(
            f"Node {route.node} is not answering (its worker is not running or not connected to Redis); "
            "the replica's log can not be followed now. Try again when the node is back."
        )

    async def lines() -> AsyncIterator[bytes]:
        # Re-checked while the log streams: removed from the project, or the service terminated,
        # and the stream ends within logfollow.ACCESS_CHECK seconds.
        events = logfollow.follow(route, tail, access_lost=database_sync_to_async(grant.lost))
        try:
            async for event in events:
                if isinstance(event, logfollow.Lines):
                    yield "".join(f"{line}\n" for line in event.lines).encode()
                elif isinstance(event, logfollow.End):
                    yield f"-- {event.message}\n".encode()
        finally:
            await events.aclose()  # deletes the lease when the client went away

    response = StreamingHttpResponse(lines(), content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the lines back
    return response


class RuntimeListView(APIView):
    """The inference runtime variants a service can use (S4.1)."""

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response(
            [
                {
                    "name": key,
                    "label": variant.label,
                    "port": variant.port,
                    "needs_definition_file": variant.needs_definition_file,
                }
                for key, variant in RUNTIMES.items()
            ]
        )


class DefinitionSchemaView(APIView):
    """The JSON Schema of a definition file, for editors (``serving.core.schemas``). Public: an editor
    fetches it without a key, and it holds nothing but the file format."""

    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    @extend_schema(responses={200: dict})
    def get(self, request: Request, schema: str) -> Response:
        make = schemas.SCHEMAS.get(schema)
        if make is None:
            raise NotFound(f"No schema {schema!r}; there are {', '.join(schemas.SCHEMAS)}.")
        response = Response(make(), content_type="application/schema+json")
        response["Cache-Control"] = "public, max-age=3600"
        return response


class NodeListView(APIView):
    @extend_schema(responses=s.NodeSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(s.NodeSerializer(Node.objects.all(), many=True).data)


class PresetListView(APIView):
    @extend_schema(responses=s.PresetSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(s.PresetSerializer(ResourcePreset.objects.all(), many=True).data)


def _revisions_body(endpoint: Endpoint, queryset: Any) -> Any:
    routes = list(endpoint.routes.exclude(status=Route.Status.TERMINATING))
    return s.RevisionSerializer(queryset, many=True, context={"routes": routes}).data


class RevisionListView(APIView):
    """The service's revisions (issue 16), oldest first, each with its replicas and traffic share."""

    @extend_schema(responses=s.RevisionSerializer(many=True))
    def get(self, request: Request, service_id: str) -> Response:
        endpoint = access_endpoint(request.user, service_id)
        return Response(_revisions_body(endpoint, endpoint.revisions.select_related("created_by", "endpoint")))


class RevisionDetailView(APIView):
    @extend_schema(responses=s.RevisionSerializer)
    def get(self, request: Request, service_id: str, number: int) -> Response:
        endpoint = access_endpoint(request.user, service_id)
        revision = get_object_or_404(endpoint.revisions.select_related("created_by", "endpoint"), number=number)
        routes = list(endpoint.routes.exclude(status=Route.Status.TERMINATING))
        return Response(s.RevisionSerializer(revision, context={"routes": routes}).data)


class RevisionPromoteView(APIView):
    @extend_schema(request=None, responses={202: s.RevisionSerializer(many=True)})
    def post(self, request: Request, service_id: str, number: int) -> Response:
        """Move all traffic to this revision; the others are drained once it has its replicas."""
        endpoint = access_endpoint(request.user, service_id, write=True)
        get_object_or_404(endpoint.revisions, number=number)
        endpoint = revision_actions.do_promote(endpoint, number, acting_user=request.user)  # type: ignore[arg-type]
        return Response(
            _revisions_body(endpoint, endpoint.revisions.select_related("created_by", "endpoint")), status=202
        )


class RevisionRollbackView(APIView):
    @extend_schema(request=None, responses={202: s.RevisionSerializer(many=True)})
    def post(self, request: Request, service_id: str) -> Response:
        """Return to the previous revision (its replicas restarted with its configuration if gone)."""
        endpoint = access_endpoint(request.user, service_id, write=True)
        endpoint = revision_actions.do_rollback(endpoint, acting_user=request.user)  # type: ignore[arg-type]
        return Response(
            _revisions_body(endpoint, endpoint.revisions.select_related("created_by", "endpoint")), status=202
        )


class RevisionTrafficView(APIView):
    @extend_schema(request=s.TrafficSerializer, responses={200: s.RevisionSerializer(many=True)})
    def patch(self, request: Request, service_id: str) -> Response:
        """Set the shares by hand: ``{"<n>": 90, "<m>": 10}``, whole percents adding up to 100."""
        endpoint = access_endpoint(request.user, service_id, write=True)
        serializer = s.TrafficSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        endpoint = revision_actions.do_set_traffic(endpoint, serializer.validated_data, acting_user=request.user)  # type: ignore[arg-type]
        return Response(_revisions_body(endpoint, endpoint.revisions.select_related("created_by", "endpoint")))


class GatewayKeyListView(APIView):
    """Keys for the proxy's OpenAI-compatible root (<proxy>/v1/...; issue 17)."""

    @extend_schema(responses=s.GatewayKeySerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(s.GatewayKeySerializer(gateway_keys_of(request.user), many=True).data)

    @extend_schema(request=s.GatewayKeyCreateSerializer, responses={201: s.GatewayKeySerializer})
    def post(self, request: Request) -> Response:
        """Create a key; the answer's ``key`` is shown this once (send it as ``Authorization: Bearer``)."""
        serializer = s.GatewayKeyCreateSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        data["expires_at"] = data.get("expires_at") or timezone.now() + timedelta(days=90)
        key, secret = gateway_actions.do_create_gateway_key(acting_user=request.user, **data)  # type: ignore[arg-type]
        body = dict(s.GatewayKeySerializer(key).data)
        body["key"] = secret
        return Response(body, status=status.HTTP_201_CREATED)


class GatewayKeyDetailView(APIView):
    @extend_schema(responses=s.GatewayKeySerializer)
    def get(self, request: Request, gateway_key_id: str) -> Response:
        key = get_object_or_404(gateway_keys_of(request.user), pk=gateway_key_id)
        return Response(s.GatewayKeySerializer(key).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, gateway_key_id: str) -> Response:
        """Revoke a key: every proxy refuses it within a second."""
        key = get_object_or_404(gateway_keys_of(request.user), pk=gateway_key_id)
        gateway_actions.do_revoke_gateway_key(key)
        return Response(status=status.HTTP_204_NO_CONTENT)


class CSVRenderer(BaseRenderer):
    """``?format=csv``: a list of flat rows as CSV, the first row's keys as the header."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        out = io.StringIO()
        if isinstance(data, list) and data:
            writer = csv.DictWriter(out, fieldnames=list(data[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(data)
        elif isinstance(data, dict):  # an error: its sentence on one line
            out.write(str(data.get("detail", data)) + "\n")
        return out.getvalue().encode()


class GatewayKeyUsageView(APIView):
    renderer_classes = [JSONRenderer, CSVRenderer]

    @extend_schema(
        responses=s.GatewayUsageSerializer(many=True),
        parameters=[OpenApiParameter("format", str, enum=["json", "csv"], description="csv: the rows as CSV")],
    )
    def get(self, request: Request, gateway_key_id: str, format: str | None = None) -> Response:
        """The key's usage per UTC day and service, newest day first (folded from the proxies every
        GATEWAY_USAGE_INTERVAL seconds)."""
        key = get_object_or_404(gateway_keys_of(request.user), pk=gateway_key_id)
        rows = usage.rows_of(key)
        return Response(s.GatewayUsageSerializer(rows, many=True).data)


class ServiceUsageView(APIView):
    renderer_classes = [JSONRenderer, CSVRenderer]

    @extend_schema(
        parameters=[
            s.ServiceUsageQuerySerializer,
            OpenApiParameter("format", str, enum=["json", "csv"], description="csv: the rows as CSV"),
        ],
        responses=s.ServiceUsageDaySerializer(many=True),
        description=(
            "The service's gateway usage (calls through <proxy>/v1/... with a gateway key) over the last "
            "``days`` UTC days: per day summed over every key (``by=day``, the default), or per key "
            "(``by=key``, with ServiceUsageKey's fields). Whoever may read the service sees it."
        ),
    )
    def get(self, request: Request, service_id: str, format: str | None = None) -> Response:
        """Per UTC day (or per key) requests, tokens, errors and, per day, p50/p95 latency."""
        endpoint = access_endpoint(request.user, service_id, include_destroyed=True)
        query = s.ServiceUsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        days = query.validated_data["days"]
        if query.validated_data["by"] == "key":
            keys = usage.service_keys(endpoint, days=days)
            return Response(s.ServiceUsageKeySerializer(keys, many=True).data)
        return Response(s.ServiceUsageDaySerializer(usage.service_days(endpoint, days=days), many=True).data)


def _aliases(user: Any) -> Any:
    """The aliases a user may see: their own and their projects'; operators all."""
    aliases = ModelAlias.objects.select_related("owner").prefetch_related("backends")
    if getattr(user, "is_superuser", False):
        return aliases
    return aliases.filter(Q(owner=user) | Q(project_id__in=user.project_ids())).distinct()


def _may_change_alias(user: Any, alias: ModelAlias) -> bool:
    if user.is_superuser or alias.owner_id == user.pk:
        return True
    return alias.project_id is not None and alias.project_id in user.managed_project_ids()


class ModelAliasListView(APIView):
    """Model aliases at the proxy's gateway (issue 17): one name, several services by weight."""

    @extend_schema(responses=s.ModelAliasSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(s.ModelAliasSerializer(_aliases(request.user), many=True).data)

    @extend_schema(request=s.ModelAliasWriteSerializer, responses={201: s.ModelAliasSerializer})
    def post(self, request: Request) -> Response:
        serializer = s.ModelAliasWriteSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if "name" not in data or "backends" not in data:
            raise ValidationError(
                {"name": 'Give a name and backends: {"name": "chat", "backends": [{"service": "<id>", "weight": 1}]}.'}
            )
        project = data.get("project")
        if project is not None and not (
            request.user.is_superuser or project.pk in request.user.managed_project_ids()  # type: ignore[union-attr]
        ):
            raise PermissionDenied("Only the project's managers (or an operator) can add an alias to the project.")
        alias = alias_actions.do_create_alias(
            acting_user=request.user,  # type: ignore[arg-type]
            name=data["name"],
            backends=data["backends"],
            project=project,
        )
        return Response(s.ModelAliasSerializer(_aliases(request.user).get(pk=alias.pk)).data, status=201)


class ModelAliasDetailView(APIView):
    @extend_schema(responses=s.ModelAliasSerializer)
    def get(self, request: Request, alias_id: str) -> Response:
        alias = get_object_or_404(_aliases(request.user), pk=alias_id)
        return Response(s.ModelAliasSerializer(alias).data)

    @extend_schema(request=s.ModelAliasWriteSerializer, responses=s.ModelAliasSerializer)
    def patch(self, request: Request, alias_id: str) -> Response:
        alias = get_object_or_404(_aliases(request.user), pk=alias_id)
        if not _may_change_alias(request.user, alias):
            raise PermissionDenied("Only the alias's owner, a project manager or an operator can change it.")
        serializer = s.ModelAliasWriteSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if "project" in data:
            raise ValidationError({"project": "An alias stays in its project; create a new one elsewhere."})
        alias_actions.do_modify_alias(alias, name=data.get("name"), backends=data.get("backends"))
        return Response(s.ModelAliasSerializer(_aliases(request.user).get(pk=alias.pk)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, alias_id: str) -> Response:
        alias = get_object_or_404(_aliases(request.user), pk=alias_id)
        if not _may_change_alias(request.user, alias):
            raise PermissionDenied("Only the alias's owner, a project manager or an operator can delete it.")
        alias_actions.do_delete_alias(alias)
        return Response(status=status.HTTP_204_NO_CONTENT)
