"""Serializers of the public REST contract (docs/architecture.md). They parse and shape; actions decide."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.utils import timezone
from rest_framework import serializers

from accounts.models import Project
from serving.actions import validators
from serving.core.runtimes import RUNTIMES
from serving.models import (
    AutoScalingRule,
    Endpoint,
    EndpointToken,
    GatewayKey,
    ModelAlias,
    Node,
    ResourcePreset,
    RetryPolicy,
    Route,
    RouteMember,
    ScalingEvent,
    ServiceCache,
    ServiceEvent,
    endpoint_name_validator,
)
from storage.models import Folder


class RouteSerializer(serializers.ModelSerializer[Route]):
    node = serializers.CharField(source="node.name", default=None, read_only=True)
    error = serializers.CharField(source="error_message", read_only=True)
    error_detail = serializers.JSONField(source="error", read_only=True)
    members = serializers.SerializerMethodField()

    def get_members(self, obj: Route) -> list[dict[str, Any]]:
        """Every container of the replica (serving.core.cluster): main first (the route's own, the one
        that gets traffic), then its sub members; a plain replica is a cluster of one."""
        main = {
            "host_name": "main1",
            "role": "main",
            "idx": 1,
            "node": obj.node.name if obj.node else None,
            "status": obj.status,
            "address": obj.address,
            "error": obj.error_message,
            "devices": obj.devices or {},
        }
        subs = [
            {
                "host_name": m.host_name,
                "role": m.role,
                "idx": m.idx,
                "node": m.node.name if m.node else None,
                "status": m.status,
                "address": m.address,
                "devices": m.devices or {},
                "error": str(m.error.get("message", "")) if m.error else "",
            }
            for m in obj.members.all()
        ]
        return [main, *subs]

    class Meta:
        model = Route
        fields = [
            "id",
            "status",
            "node",
            "host",
            "port",
            "traffic_ratio",
            "error",
            "error_detail",
            "pull_progress",
            "devices",
            "members",
            "snapshot",
            "spec_version",
            "consecutive_failures",
            "last_probe_at",
            "started_at",
            "created_at",
        ]
        read_only_fields = fields


def with_routes(queryset: QuerySet[Endpoint]) -> QuerySet[Endpoint]:
    """The services with what ``ServiceSerializer`` reads of them, in a fixed number of queries."""
    return queryset.select_related("owner", "model_folder", "preset").prefetch_related(
        Prefetch("routes", queryset=Route.objects.select_related("node")),
        Prefetch("routes__members", queryset=RouteMember.objects.select_related("node")),
        Prefetch("caches", queryset=ServiceCache.objects.select_related("node")),
    )


class ServiceCacheSerializer(serializers.Serializer[ServiceCache]):
    """A service's writable cache (/home/work/.cache) on one node, as that node last measured it."""

    node = serializers.CharField(source="node.name", read_only=True)
    bytes = serializers.IntegerField(read_only=True)
    measured_at = serializers.DateTimeField(read_only=True)


class ServiceSerializer(serializers.ModelSerializer[Endpoint]):
    """A service as read back: its stable ``url``, computed ``status`` and ``routes``."""

    url = serializers.CharField(read_only=True)
    status = serializers.SerializerMethodField()
    routes = serializers.SerializerMethodField()
    caches = ServiceCacheSerializer(many=True, read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    folder = serializers.UUIDField(source="model_folder_id", read_only=True, allow_null=True)
    folder_name = serializers.CharField(source="model_folder.name", default=None, read_only=True)
    project = serializers.IntegerField(source="project_id", read_only=True, allow_null=True)
    preset = serializers.CharField(source="preset.name", default=None, read_only=True)
    replicas = serializers.IntegerField(source="desired_replicas", read_only=True)
    # Clients that wait for a service (the CLI's --wait) stop once it has stopped retrying.
    gave_up = serializers.BooleanField(
        read_only=True,
        help_text="True once starts failed MAX_START_FAILURES times in a row: nothing starts until clear-errors.",
    )

    class Meta:
        model = Endpoint
        fields = [
            "id",
            "name",
            "slug",
            "url",
            "status",
            "desired_replicas",
            "replicas",
            "routes",
            "caches",
            "runtime",
            "folder",
            "folder_name",
            "model_mount",
            "model_definition_path",
            "extra_mounts",
            "image",
            "architecture",
            "resources",
            "preset",
            "resource_group",
            "cluster_mode",
            "cluster_size",
            "environ",
            "open_to_public",
            "forward_cookies",
            "retry_policy",
            "model_names",
            "idle_timeout",
            "owner",
            "project",
            "lifecycle",
            "retries",
            "gave_up",
            "spec_version",
            "traffic",
            "scaling_cooldown",
            "last_scaled_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def _routes(self, obj: Endpoint) -> list[Route]:
        # Prefetched by the view; terminating routes are still shown until they are gone.
        return list(obj.routes.all())

    def get_status(self, obj: Endpoint) -> str:
        return obj.compute_status(self._routes(obj))

    def get_routes(self, obj: Endpoint) -> list[dict[str, Any]]:
        return RouteSerializer(self._routes(obj), many=True).data  # type: ignore[return-value]


class _ServiceInputFields(serializers.Serializer[Any]):
    """Fields shared by create, validate and modify; cross-field rules live in the actions."""

    # The model's own rule, here too: a bad name is reported with the other fields' errors, not
    # only once they are fixed.
    name = serializers.CharField(validators=[endpoint_name_validator])
    folder = serializers.UUIDField()
    runtime = serializers.ChoiceField(choices=list(RUNTIMES), default="custom")
    replicas = serializers.IntegerField(min_value=0, max_value=64, default=1)
    open_to_public = serializers.BooleanField(default=False)
    forward_cookies = serializers.BooleanField(
        default=False,
        help_text=(
            "Pass callers' cookies to the replicas and their Set-Cookie back (off: the proxy removes both). "
            "The web app's own session, CSRF and language cookies are removed even when on. "
            "Needs SERVING_DOMAIN (each service on its own host name; cookies pass only there); refused otherwise."
        ),
    )
    model_names = serializers.ListField(
        child=serializers.CharField(max_length=128),
        required=False,
        max_length=32,
        help_text=(
            "The model names this service answers to at the proxy's OpenAI-compatible root (<proxy>/v1/...), "
            "routed by the request body's model; empty: its MODEL_NAME environment variable, else its name. "
            "Unique per project."
        ),
    )
    retry_policy = serializers.ChoiceField(
        choices=RetryPolicy.values,
        default=RetryPolicy.INFERENCE,
        error_messages={
            "invalid_choice": "Unknown retry policy {input!r}; choose safe (only idempotent requests are re-sent "
            "to another replica), inference (also POSTs to inference paths such as /v1/chat/completions, "
            "the default) or all."
        },
        help_text=(
            "Which requests the proxy sends again to another replica when theirs closed without answering a byte: "
            "safe (idempotent methods only), inference (the default: also POSTs to /v1/chat/completions, "
            "/v1/completions, /v1/embeddings, /v1/responses and the other inference paths) or all. "
            "A request whose response has started is never re-sent."
        ),
    )
    idle_timeout = serializers.IntegerField(
        min_value=1,
        max_value=30 * 86400,
        required=False,
        allow_null=True,
        default=None,
        error_messages={
            "min_value": "The idle timeout is in seconds and must be at least {min_value}; leave it empty (null) "
            "for a service that never sleeps.",
            "max_value": "The idle timeout must be at most {max_value} seconds (30 days); leave it empty (null) "
            "for a service that never sleeps.",
            "invalid": "The idle timeout must be a whole number of seconds, or null for a service that never sleeps.",
        },
        help_text=(
            "Scale to zero: seconds without a request after which the service sleeps at 0 replicas "
            "(null, the default: never). A request to a sleeping service wakes it; the proxy holds it meanwhile."
        ),
    )
    image = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    resources = serializers.DictField(required=False, default=dict)
    environ = serializers.DictField(required=False, default=dict)
    model_mount = serializers.CharField(max_length=255, default="/models")
    model_definition_path = serializers.CharField(max_length=255, default="model-definition.yaml")
    extra_mounts = serializers.ListField(child=serializers.DictField(), required=False, default=list)
    cluster_mode = serializers.ChoiceField(
        choices=Endpoint.ClusterMode.choices, default=Endpoint.ClusterMode.SINGLE_NODE
    )
    cluster_size = serializers.IntegerField(min_value=1, max_value=16, default=1)
    resource_group = serializers.CharField(max_length=64, default="default")
    preset = serializers.CharField(max_length=64, required=False, allow_null=True, default=None)
    project = serializers.IntegerField(required=False, allow_null=True, default=None)

    def _user(self) -> Any:
        return self.context["request"].user

    @staticmethod
    def _on_its_own(field: str, value: Any) -> Any:
        problems = validators.field_problems(field, value)
        if problems:
            raise serializers.ValidationError(problems)
        return value

    def validate_environ(self, value: Any) -> Any:
        return self._on_its_own("environ", value)

    def validate_forward_cookies(self, value: bool) -> bool:
        return bool(self._on_its_own("forward_cookies", value))

    def validate_resources(self, value: Any) -> Any:
        return self._on_its_own("resources", value)

    def validate_model_mount(self, value: str) -> str:
        return str(self._on_its_own("model_mount", value))

    def validate_model_definition_path(self, value: str) -> str:
        return str(self._on_its_own("model_definition_path", value))

    def validate_folder(self, value: Any) -> Folder:
        folder = Folder.objects.visible_to(self._user()).filter(pk=value).first()
        if folder is None:
            raise serializers.ValidationError("No such folder, or you can not use it.")
        return folder

    def validate_preset(self, value: str | None) -> ResourcePreset | None:
        if not value:
            return None
        preset = ResourcePreset.objects.filter(name=value).first()
        if preset is None and value.isdigit():
            preset = ResourcePreset.objects.filter(pk=int(value)).first()
        if preset is None:
            names = ", ".join(ResourcePreset.objects.values_list("name", flat=True)) or "none defined"
            raise serializers.ValidationError(f"No resource preset {value!r}; available: {names}.")
        return preset

    def validate_project(self, value: int | None) -> Project | None:
        if value is None:
            return None
        user = self._user()
        project = Project.objects.of(user).filter(pk=value).first()
        if project is None:
            raise serializers.ValidationError("No such project, or you are not a member of it.")
        return project


class ServiceCreateSerializer(_ServiceInputFields):
    pass


class ServiceModifySerializer(_ServiceInputFields):
    """PATCH: every field optional; ``desired_replicas`` is accepted as a synonym of ``replicas``."""

    desired_replicas = serializers.IntegerField(min_value=0, max_value=64, required=False)
    scaling_cooldown = serializers.IntegerField(
        min_value=0,
        max_value=86400,
        required=False,
        allow_null=True,
        help_text=(
            "Seconds after a scaling by the autoscaling rules before they may scale this service again; "
            "null: scale-in waits the longest cooldown of its rules, scale-out the longest of its "
            "scale-out rules (fast up, slow down)."
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["partial"] = True
        super().__init__(*args, **kwargs)
        for name, field in self.fields.items():
            field.required = False
            if name != "desired_replicas":
                field.default = serializers.empty

    rollout = serializers.JSONField(
        required=False,
        help_text=(
            'How a change of what the replicas run replaces them: {"strategy": "rolling"} (the default), '
            '{"strategy": "canary", "percent": P} or {"strategy": "blue_green"}.'
        ),
    )

    def rollout_value(self) -> Any:
        return self.validated_data.get("rollout")

    def changes(self) -> dict[str, Any]:
        data = {k: v for k, v in self.validated_data.items() if k != "rollout"}
        mapping = {"replicas": "desired_replicas", "folder": "model_folder"}
        out = {mapping.get(str(k), str(k)): v for k, v in data.items() if k != "project"}
        if "project" in data:
            raise serializers.ValidationError({"project": "A service can not move to another project."})
        return out


class TokenSerializer(serializers.ModelSerializer[EndpointToken]):
    prefix = serializers.CharField(read_only=True)
    active = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", default=None, read_only=True)

    class Meta:
        model = EndpointToken
        fields = ["id", "prefix", "created_by", "created_at", "expires_at", "last_used_at", "revoked_at", "active"]
        read_only_fields = fields

    def get_active(self, obj: EndpointToken) -> bool:
        return obj.is_active()


class TokenCreateSerializer(serializers.Serializer[Any]):
    expires_at = serializers.DateTimeField(required=False)

    def validate_expires_at(self, value: Any) -> Any:
        if value <= timezone.now():
            raise serializers.ValidationError("The expiry date must be in the future.")
        if value > timezone.now() + timedelta(days=3650):
            raise serializers.ValidationError("The expiry date must be within 10 years.")
        return value


RULE_DOC = """An autoscaling rule (S6.1): when the metric, aggregated over the window, compares true
against the threshold, the desired replicas change by ``step``.

* ``source``: ``kernel`` (per replica ``cpu_percent``, 100 = one core; ``mem_bytes``; ``mem_percent``
  of its limit), ``inference`` (any sample name of the replicas' ``/metrics``, label sets summed, e.g.
  ``vllm:num_requests_waiting`` or ``llm_echo_requests_waiting``) or ``proxy`` (``rps``, ``in_flight``,
  ``p95_ms``, ``errors_per_s``, ``throttled_per_s`` of the whole endpoint, over every proxy).
* ``aggregation`` (``avg``, ``max``, ``min``) is over every replica's samples in the last ``window``
  seconds (the original read one sample, averaged over replicas). No sample in the window: the rule
  does not fire, and its ``last_decision`` says "no data".
* **Bounds, unlike the original**: the original skipped a rule whose result left
  ``min_replicas``..``max_replicas``; here the result is **clamped** into the range (current 4,
  step +3, max 5 -> 5), as long as the current count is inside it. A count already at the bound, or
  outside the range (set by hand), is left alone and the decision says why.
* Several rules: scale-out beats scale-in in the same tick, the largest scale-out wins; scale-in
  happens only when every enabled scale-in rule agrees, by the smallest step asked. ``cooldown`` is
  the rule's own; the service waits its ``scaling_cooldown`` (default: the longest cooldown of its
  rules before a scale-in, of its scale-out rules before a scale-out) after any scaling.
* ``enabled: false`` keeps the rule without acting; when its condition holds the decision log says so.
* ``last_decision``: the rule's state at the last tick ("not matched", "no data ...", "rule
  cooldown", "already at the rule's maximum", the action taken ...). Every decision is in
  ``GET /api/v1/services/{id}/scaling-events/``.
"""


class RuleSerializer(serializers.ModelSerializer[AutoScalingRule]):
    __doc__ = RULE_DOC
    threshold = serializers.FloatField(help_text="The value the aggregated metric is compared with.")
    step = serializers.IntegerField(
        min_value=-64, max_value=64, help_text="Replicas to add (positive) or remove (negative); never 0."
    )
    window = serializers.IntegerField(
        min_value=1, max_value=600, default=60, help_text="Seconds of samples aggregated (at most 600, kept 10 min)."
    )
    cooldown = serializers.IntegerField(
        min_value=0, max_value=86400, default=300, help_text="Seconds after this rule acted before it acts again."
    )

    class Meta:
        model = AutoScalingRule
        fields = [
            "id",
            *AutoScalingRule.SETTINGS,
            "enabled",
            "last_triggered_at",
            "last_decision",
            "created_at",
        ]
        read_only_fields = ["id", "last_triggered_at", "last_decision", "created_at"]

    def validate_step(self, value: int) -> int:
        if value == 0:
            raise serializers.ValidationError("The step must not be 0; use a positive or negative number.")
        return value

    def validate_metric(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("Name the metric, e.g. vllm:num_requests_waiting.")
        return value.strip()

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance = self.instance
        low = attrs.get("min_replicas", getattr(instance, "min_replicas", 0))
        high = attrs.get("max_replicas", getattr(instance, "max_replicas", 10))
        if low > high:
            raise serializers.ValidationError({"min_replicas": "The minimum must not exceed the maximum replicas."})
        if attrs.get("window", 60) <= 0:
            raise serializers.ValidationError({"window": "The window must be at least 1 second."})
        return attrs


class MetricsQuerySerializer(serializers.Serializer[Any]):
    source = serializers.ChoiceField(  # type: ignore[assignment]  # a field named like Field.source
        choices=["proxy", "kernel", "inference"],
        required=False,
        help_text="One source; all three when left out.",
    )
    window = serializers.IntegerField(
        min_value=1, max_value=600, default=600, help_text="Seconds back from now (the last 10 minutes are kept)."
    )


class MetricsSerializer(serializers.Serializer[Any]):
    series = serializers.DictField(
        child=serializers.ListField(child=serializers.ListField(child=serializers.FloatField())),
        help_text=(
            '{"<source>:<metric>": [[t, value], ...]}: t in Unix seconds (float), oldest first. Per-replica '
            "sources (kernel, inference) give the average over the replicas of each sampling round."
        ),
    )


class ScalingEventSerializer(serializers.ModelSerializer[ScalingEvent]):
    rule = RuleSerializer(read_only=True)

    class Meta:
        model = ScalingEvent
        fields = [
            "id",
            "rule",
            "metric",
            "observed",
            "window",
            "old_replicas",
            "new_replicas",
            "acted",
            "reason",
            "created_at",
        ]
        read_only_fields = fields


class ServiceEventSerializer(serializers.ModelSerializer[ServiceEvent]):
    actor = serializers.CharField(source="actor.username", default=None, read_only=True)

    class Meta:
        model = ServiceEvent
        fields = ["id", "kind", "level", "message", "data", "route_id", "request_id", "actor", "created_at"]
        read_only_fields = fields


class NodeSerializer(serializers.ModelSerializer[Node]):
    alive = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = [
            "name",
            "address",
            "engine",
            "resource_group",
            "architecture",
            "capacity",
            "devices",
            "schedulable",
            "unavailable",
            "unavailable_since",
            "heartbeat_at",
            "alive",
        ]
        read_only_fields = fields

    def get_alive(self, obj: Node) -> bool:
        return obj.is_alive()


class PresetSerializer(serializers.ModelSerializer[ResourcePreset]):
    class Meta:
        model = ResourcePreset
        fields = ["id", "name", "cpu", "mem", "accelerators", "resource_group"]
        read_only_fields = fields


class RouteLogsSerializer(serializers.Serializer[dict[str, Any]]):
    """The answer of the per-route logs API (for the schema; the view returns plain data)."""

    route = serializers.UUIDField()
    member = serializers.CharField(help_text="Whose log: main1, or a cluster's sub1, sub2, ...")
    node = serializers.CharField(allow_null=True)
    lines = serializers.ListField(child=serializers.CharField())
    truncated = serializers.BooleanField()


def revision_share(endpoint: Endpoint, number: int) -> int:
    """The revision's traffic share in percent. Rolling (no shares): the revision the service stands
    on is shown with all of it (older ones serve only while they are replaced)."""
    if endpoint.traffic:
        return int(endpoint.traffic.get(str(number), 0))
    return 100 if number == endpoint.spec_version else 0


class RevisionSerializer(serializers.Serializer[Any]):
    """A revision: its configuration, author, time, one-line diff, replicas and traffic share."""

    number = serializers.IntegerField()
    summary = serializers.CharField()
    config = serializers.JSONField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    created_at = serializers.DateTimeField()
    current = serializers.SerializerMethodField()
    share = serializers.SerializerMethodField()
    replicas = serializers.SerializerMethodField()

    def get_current(self, obj: Any) -> bool:
        return bool(obj.number == obj.endpoint.spec_version)

    def get_share(self, obj: Any) -> int:
        return revision_share(obj.endpoint, obj.number)

    def get_replicas(self, obj: Any) -> list[dict[str, Any]]:
        routes = [r for r in self.context.get("routes", []) if r.spec_version == obj.number]
        return [{"id": str(r.pk), "status": r.status, "address": r.address} for r in routes]


class TrafficSerializer(serializers.Serializer[Any]):
    """PATCH .../revisions/traffic/: {"<revision>": percent, ...}, whole percents adding up to 100."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise serializers.ValidationError(
                {"traffic": 'Send {"<revision>": percent, ...}, e.g. {"1": 90, "2": 10}.'}
            )
        return data


class GatewayUsageSerializer(serializers.Serializer[Any]):
    """One usage row of a gateway key: a service on a UTC day, p50/p95 from its latency histogram."""

    day = serializers.DateField()
    service = serializers.CharField()
    service_name = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    errors = serializers.IntegerField()  # type: ignore[assignment]  # (a field named as Serializer.errors)
    p50_ms = serializers.FloatField(allow_null=True)
    p95_ms = serializers.FloatField(allow_null=True)


class ServiceUsageQuerySerializer(serializers.Serializer[Any]):
    """``GET /api/v1/services/{id}/usage/``: the window and how the rows are cut."""

    days = serializers.IntegerField(
        min_value=1,
        max_value=366,
        default=14,
        help_text="How many UTC days, today included (1-366; default 14).",
        error_messages={
            "invalid": "days must be a whole number of days, e.g. ?days=30.",
            "min_value": "days must be at least 1 (today only), e.g. ?days=1.",
            "max_value": "days can be at most 366 (a year), e.g. ?days=90.",
        },
    )
    by = serializers.ChoiceField(
        choices=["day", "key"],
        default="day",
        help_text="day: one row per UTC day, newest first (days without requests as zeros); "
        "key: one row per gateway key that called the service, the busiest first.",
        error_messages={"invalid_choice": "by must be day or key, e.g. ?by=key."},
    )


class ServiceUsageDaySerializer(serializers.Serializer[Any]):
    """A service's gateway usage on one UTC day, summed over every key."""

    day = serializers.DateField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    errors = serializers.IntegerField()  # type: ignore[assignment]  # (a field named as Serializer.errors)
    p50_ms = serializers.FloatField(allow_null=True)
    p95_ms = serializers.FloatField(allow_null=True)


class ServiceUsageKeySerializer(serializers.Serializer[Any]):
    """One gateway key's use of a service over the window: its name and prefix, never its secret."""

    key = serializers.CharField()
    key_name = serializers.CharField()
    key_prefix = serializers.CharField()
    owner = serializers.CharField()
    project = serializers.CharField(allow_null=True)
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    errors = serializers.IntegerField()  # type: ignore[assignment]  # (a field named as Serializer.errors)


class GatewayKeySerializer(serializers.ModelSerializer[GatewayKey]):
    """A gateway key as listed: never the key itself (only in the creation response)."""

    prefix = serializers.CharField(read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.IntegerField(source="project_id", read_only=True, allow_null=True)
    services = serializers.SerializerMethodField()
    active = serializers.SerializerMethodField()

    class Meta:
        model = GatewayKey
        fields = [
            "id",
            "name",
            "prefix",
            "owner",
            "project",
            "services",
            "expires_at",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrency",
            "created_at",
            "last_used_at",
            "revoked_at",
            "active",
        ]
        read_only_fields = fields

    def get_services(self, obj: GatewayKey) -> list[str]:
        return [str(pk) for pk in obj.services.values_list("pk", flat=True)]

    def get_active(self, obj: GatewayKey) -> bool:
        return obj.is_active()


class GatewayKeyCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=64)
    services = serializers.ListField(
        child=serializers.UUIDField(),
        required=False,
        help_text="Service ids the key may call; empty or absent: every service of its scope (the project, or yours).",
    )
    project = serializers.IntegerField(required=False, allow_null=True, help_text="Make it the project's key.")
    expires_at = serializers.DateTimeField(required=False, help_text="Default: 90 days from now.")
    requests_per_minute = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    tokens_per_minute = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    max_concurrency = serializers.IntegerField(min_value=1, required=False, allow_null=True)

    def validate_project(self, value: int | None) -> Project | None:
        if value is None:
            return None
        project = Project.objects.of(self.context["request"].user).filter(pk=value).first()
        if project is None:
            raise serializers.ValidationError("No such project, or you are not a member of it.")
        return project

    def validate_services(self, value: list[Any]) -> list[Endpoint]:
        user = self.context["request"].user
        found = {str(e.pk): e for e in Endpoint.objects.visible_to(user).live().filter(pk__in=value)}
        missing = [str(v) for v in value if str(v) not in found]
        if missing:
            raise serializers.ValidationError(
                f"No such service, or you may not call it: {', '.join(missing)}. Use ids from /api/v1/services/."
            )
        return list(found.values())


class ModelAliasSerializer(serializers.ModelSerializer[ModelAlias]):
    """A model alias: one gateway model name over several services with weights."""

    owner = serializers.CharField(source="owner.username", read_only=True)
    project = serializers.IntegerField(source="project_id", read_only=True, allow_null=True)
    backends = serializers.SerializerMethodField()

    class Meta:
        model = ModelAlias
        fields = ["id", "name", "owner", "project", "backends", "created_at"]
        read_only_fields = fields

    def get_backends(self, obj: ModelAlias) -> list[dict[str, Any]]:
        return [{"service": str(b.endpoint_id), "weight": b.weight} for b in obj.backends.all()]


class AliasBackendSerializer(serializers.Serializer[Any]):
    service = serializers.UUIDField()
    weight = serializers.IntegerField(min_value=1, max_value=1000, default=1)


class ModelAliasWriteSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=128, required=False)
    backends = AliasBackendSerializer(
        many=True,
        required=False,
        help_text="The services behind the alias, in order: [{service: id, weight: n}] (weight 1-1000, default 1).",
    )
    project = serializers.IntegerField(required=False, allow_null=True, help_text="Make it the project's alias.")

    def validate_project(self, value: int | None) -> Project | None:
        if value is None:
            return None
        project = Project.objects.of(self.context["request"].user).filter(pk=value).first()
        if project is None:
            raise serializers.ValidationError("No such project, or you are not a member of it.")
        return project

    def validate_backends(self, value: list[dict[str, Any]]) -> list[tuple[Endpoint, int]]:
        user = self.context["request"].user
        ids = [str(b["service"]) for b in value]
        found = {str(e.pk): e for e in Endpoint.objects.visible_to(user).live().filter(pk__in=ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise serializers.ValidationError(
                f"No such service, or you may not see it: {', '.join(missing)}. Use ids from /api/v1/services/."
            )
        return [(found[str(b["service"])], int(b["weight"])) for b in value]
