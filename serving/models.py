"""The serving data model (S4-S7, S9). Rows are written only by ``serving.actions`` and the loops.

Endpoint = a model service with one stable address; Route = one replica of it on a node;
EndpointToken = a revocable credential for a private endpoint; AutoScalingRule + ScalingEvent = the
rules and every decision taken on them; Node = a host that runs replicas; ResourcePreset = a named
slot bundle; ServiceEvent = the audit and lifecycle log.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify
from django.utils.translation import gettext_lazy as _

from accounts.models import shared_with
from serving.core.planning import EndpointLifecycle, RouteStatus
from serving.core.revisions import CONFIG_FIELDS
from serving.core.snapshots import format_bytes
from storage.models import Folder

endpoint_name_validator = RegexValidator(
    r"^[A-Za-z0-9_.-]{4,24}$",
    _("A service name is 4 to 24 characters: letters, digits, '_', '.' or '-'."),
)


class EndpointStatus(models.TextChoices):
    """What a user sees for a service, computed from its routes (S4.4, docs/architecture.md)."""

    PROVISIONING = "PROVISIONING", _("provisioning")
    READY = "READY", _("ready")  # routes running, none checked yet, or no replicas asked
    HEALTHY = "HEALTHY", _("healthy")
    DEGRADED = "DEGRADED", _("degraded")
    UNHEALTHY = "UNHEALTHY", _("unhealthy")
    TERMINATING = "TERMINATING", _("terminating")
    DESTROYED = "DESTROYED", _("destroyed")
    SLEEPING = "SLEEPING", _("sleeping")  # at 0 replicas while idle; a request wakes it


class RetryPolicy(models.TextChoices):
    """Which requests the proxy re-sends after the replica they reached closed without answering."""

    SAFE = "safe", _("safe: idempotent requests only")
    INFERENCE = "inference", _("inference: also POSTs to inference paths")
    ALL = "all", _("all requests")


class EndpointQuerySet(models.QuerySet["Endpoint"]):
    def live(self) -> EndpointQuerySet:
        return self.exclude(lifecycle=Endpoint.Lifecycle.DESTROYED)

    def visible_to(self, user: Any) -> EndpointQuerySet:
        """Services a user may see: their own and their projects'; operators see all."""
        if getattr(user, "is_superuser", False):
            return self
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(shared_with(user)).distinct()


def _new_slug(name: str) -> str:
    # DNS-label safe so that host routing (<slug>.<SERVING_DOMAIN>) works too.
    base = slugify(name.replace("_", "-").replace(".", "-"))[:24].strip("-") or "svc"
    return f"{base}-{secrets.token_hex(3)}"


class Endpoint(models.Model):
    """A model service: desired replicas of one model behind one address that never changes."""

    class Lifecycle(models.TextChoices):
        # The values are the pure planner's (serving.core.planning), which compares them.
        CREATED = EndpointLifecycle.CREATED, _("created")
        DESTROYING = EndpointLifecycle.DESTROYING, _("destroying")
        DESTROYED = EndpointLifecycle.DESTROYED, _("destroyed")

    class ClusterMode(models.TextChoices):
        SINGLE_NODE = "single-node", _("single node")
        MULTI_NODE = "multi-node", _("multi node")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=24, validators=[endpoint_name_validator])
    slug = models.SlugField(max_length=40, unique=True, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="endpoints")
    project = models.ForeignKey(
        "accounts.Project", on_delete=models.PROTECT, null=True, blank=True, related_name="endpoints"
    )
    model_folder = models.ForeignKey("storage.Folder", on_delete=models.SET_NULL, null=True, related_name="endpoints")
    # A key of serving.core.runtimes.RUNTIMES (checked by the actions, not by a DB choice list, so that
    # adding a runtime variant needs no migration).
    runtime = models.CharField(max_length=32, default="custom")
    model_mount = models.CharField(max_length=255, default="/models")
    model_definition_path = models.CharField(max_length=255, default="model-definition.yaml")
    # [{"folder": "<uuid>", "target": "/home/work/data"}]; general/data folders only (S4.1).
    extra_mounts = models.JSONField(default=list, blank=True)
    desired_replicas = models.PositiveIntegerField(default=1, validators=[MaxValueValidator(64)])
    image = models.CharField(max_length=255, blank=True)
    # Normalised slots: {"cpu": 1.0, "mem": <bytes>, "cuda.shares": 0.5}.
    resources = models.JSONField(default=dict, blank=True)
    preset = models.ForeignKey("ResourcePreset", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    resource_group = models.CharField(max_length=64, default="default")
    # The CPU architecture its image is built for (service-definition.toml's [runtime.environment]
    # architecture); empty: any node. Replicas are placed only on nodes of that architecture.
    architecture = models.CharField(max_length=32, blank=True)
    cluster_mode = models.CharField(max_length=16, choices=ClusterMode.choices, default=ClusterMode.SINGLE_NODE)
    cluster_size = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(16)])
    environ = models.JSONField(default=dict, blank=True)
    open_to_public = models.BooleanField(default=False)
    # The proxy strips Cookie from requests and Set-Cookie from answers unless this is on (for an
    # app that keeps its own session); the platform's own cookies are removed even then, so the
    # web app's session never reaches a replica (proxy/exchange.py, README "Security model").
    forward_cookies = models.BooleanField(
        default=False,
        help_text=_(
            "Pass the caller's cookies to the replicas and their Set-Cookie back (the platform's own "
            "session, CSRF and language cookies never pass)."
        ),
    )
    # Which requests the proxy sends again to another replica when theirs closed without answering a
    # byte (proxy/exchange.py): a POST that reached a replica may have been processed, but inference
    # (a completion, an embedding) has no side effect, so by default those are re-sent too.
    retry_policy = models.CharField(
        max_length=16,
        choices=RetryPolicy.choices,
        default=RetryPolicy.INFERENCE,
        help_text=_(
            "safe: only idempotent requests are re-sent to another replica; inference: also POSTs to the "
            "OpenAI-style inference paths; all: every request (never once a response byte came back)."
        ),
    )
    # Scale to zero: seconds without a request after which the service sleeps at 0 replicas (empty:
    # never); a request wakes it (the proxy holds it meanwhile). ``slept_at``: when it went to sleep,
    # empty while awake; its status reads SLEEPING then.
    idle_timeout = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(30 * 86400)],
        help_text=_("seconds without a request before the service sleeps at 0 replicas; empty: never"),
    )
    slept_at = models.DateTimeField(null=True, blank=True)
    # The model names it answers to at the proxy's OpenAI-compatible root (issue 17, proxy/gateway.py);
    # empty: its MODEL_NAME environment variable, else its name. Unique per project (or per owner).
    model_names = models.JSONField(default=list, blank=True)
    wake_replicas = models.PositiveIntegerField(default=1)  # the count a wake restores
    # When a request woke it; cleared when its first replica is healthy (the cold start is logged).
    woke_at = models.DateTimeField(null=True, blank=True)
    lifecycle = models.CharField(max_length=16, choices=Lifecycle.choices, default=Lifecycle.CREATED)
    # Bumped whenever a change needs new replicas (image, definition, resources, environment):
    # routes of an older version are replaced one at a time (rolling update, S4.5).
    spec_version = models.PositiveIntegerField(default=1)
    # Revision shares (issue 16): {"<revision>": percent}; empty: rolling (every healthy replica
    # serves, older revisions replaced one at a time). ``rollout``: the strategy in progress, e.g.
    # {"strategy": "canary", "revision": 3, "stable": 2, "since": <iso>} or blue_green's staging.
    traffic = models.JSONField(default=dict, blank=True)
    rollout = models.JSONField(default=dict, blank=True)
    # Consecutive failed starts; at MAX_START_FAILURES the endpoint stops retrying (S4.4).
    retries = models.PositiveIntegerField(default=0)
    # Autoscaling (S6): seconds after a scaling by the rules before they may scale this service again
    # (empty: the longest cooldown of its rules), and when the rules last changed its count.
    scaling_cooldown = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("seconds; empty: the longest cooldown of its rules")
    )
    last_scaled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    destroyed_at = models.DateTimeField(null=True, blank=True)

    objects = EndpointQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Names are unique per owner among live services; a destroyed one frees its name.
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=~Q(lifecycle="destroyed"),
                name="endpoint_name_unique_per_owner",
            ),
        ]
        indexes = [models.Index(fields=["lifecycle"])]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.slug:
            self.slug = _new_slug(self.name)
        super().save(*args, **kwargs)

    @property
    def url(self) -> str:
        """The stable address clients call (S4.3, S7.3)."""
        if settings.SERVING_DOMAIN:
            scheme = settings.SERVING_PROXY_URL.split("://", 1)[0]
            return f"{scheme}://{self.slug}.{settings.SERVING_DOMAIN}/"
        return f"{settings.SERVING_PROXY_URL}/e/{self.slug}/"

    @property
    def gave_up(self) -> bool:
        """True when starts failed too often in a row; only "clear errors and retry" resumes."""
        return self.retries >= settings.MAX_START_FAILURES

    def shared_definition_problem(self, *, name_folders: bool = True) -> str | None:
        """Why this service may not run as configured, or None (issue 13, "project folders").

        A service that mounts private folders (extra mounts that belong to a user, not a project)
        may only use a model folder that the owner of those folders alone can write: a private
        model folder of that same user (in practice, the service's owner's own). Whoever can write
        the model folder decides what the replica runs (its model definition's start command and
        pre-start actions), and the replica can read and write every mount; so a project-shared
        model folder would let any member of the project read the owner's private folders through
        the owner's service, and another user's model folder would let that user read them.

        The sentence names the mounts' owner, not "you": who reads it may be a project manager
        changing a teammate's service. ``name_folders=False`` leaves out the private folders'
        names, for a replica's error, which every member of the project sees.
        """
        folder = self.model_folder
        if folder is None:
            return None
        ids = [str(m.get("folder")) for m in self.extra_mounts or [] if isinstance(m, dict)]
        private = list(Folder.objects.filter(pk__in=ids, project__isnull=True).select_related("owner").order_by("name"))
        if not private or (folder.project_id is None and all(m.owner_id == folder.owner_id for m in private)):
            return None
        by_owner: dict[str, list[str]] = {}
        for mount in private:
            by_owner.setdefault(mount.owner.username, []).append(repr(mount.name))
        owners = sorted(by_owner)
        if name_folders:
            mounted = " and ".join(f"{', '.join(by_owner[o])} of {o!r}" for o in owners)
        else:
            mounted = "of " + " and ".join(repr(o) for o in owners)
        writers = (
            f"every member of project {folder.project.name!r}"
            if folder.project is not None
            else f"its owner {folder.owner.username!r}"
        )
        fix = (
            f"Use a model folder only {owners[0]!r} can write (e.g. a private copy of this one)"
            if len(owners) == 1
            else "Mount the private folders of one user only, with a model folder only that user can write"
        )
        return (
            f"Model folder {folder.name!r} can be changed by {writers}, and so can what this service runs next "
            f"to the private folders {mounted} it mounts. {fix}, or mount project folders instead."
        )

    def count_failed_start(self) -> None:
        """One more consecutive failed start (S4.4); atomic, so concurrent failures all count."""
        Endpoint.objects.filter(pk=self.pk).update(retries=models.F("retries") + 1)
        self.retries += 1

    def compute_status(self, routes: list[Route] | None = None) -> str:
        """The service status from its routes (docs/architecture.md), a pure function of the rows."""
        if self.lifecycle == self.Lifecycle.DESTROYED:
            return EndpointStatus.DESTROYED
        if self.lifecycle == self.Lifecycle.DESTROYING:
            return EndpointStatus.TERMINATING
        if routes is None:
            routes = list(self.routes.all())
        live = [r for r in routes if r.status != Route.Status.TERMINATING]
        healthy = sum(1 for r in live if r.status == Route.Status.HEALTHY)
        if self.desired_replicas == 0 and not live:
            return EndpointStatus.SLEEPING if self.slept_at is not None else EndpointStatus.READY
        if healthy >= self.desired_replicas and healthy > 0:
            return EndpointStatus.HEALTHY
        if healthy > 0:
            return EndpointStatus.DEGRADED
        failing = self.gave_up or any(r.status in (Route.Status.UNHEALTHY, Route.Status.FAILED_TO_START) for r in live)
        starting = any(r.status in (Route.Status.PROVISIONING, Route.Status.DEGRADED) for r in live)
        if failing and not starting:
            return EndpointStatus.UNHEALTHY
        if any(r.status == Route.Status.DEGRADED for r in live):
            return EndpointStatus.READY  # running, waiting for the first health check
        return EndpointStatus.PROVISIONING


# A route's (or a cluster member's) ``container_id`` while a node worker starts its replica: the
# compare-and-set claim that makes exactly one delivery of a start task start a container.
STARTING_MARK = "starting"


class Route(models.Model):
    """One replica of an endpoint: a container (or sandbox) on a node, and its health."""

    class Status(models.TextChoices):
        # The values are the pure planner's (serving.core.planning), which compares them.
        PROVISIONING = RouteStatus.PROVISIONING, _("provisioning")
        HEALTHY = RouteStatus.HEALTHY, _("healthy")
        UNHEALTHY = RouteStatus.UNHEALTHY, _("unhealthy")
        DEGRADED = RouteStatus.DEGRADED, _("degraded")  # started, inside initial_delay or not yet checked
        TERMINATING = RouteStatus.TERMINATING, _("terminating")
        FAILED_TO_START = RouteStatus.FAILED_TO_START, _("failed to start")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="routes")
    node = models.ForeignKey("Node", on_delete=models.SET_NULL, null=True, blank=True, related_name="routes")
    spec_version = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PROVISIONING)
    # The main member's container in cluster mode (its sub members are RouteMember rows).
    container_id = models.CharField(max_length=128, blank=True)
    host = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    traffic_ratio = models.FloatField(default=1.0, validators=[MinValueValidator(0.0)])
    # Slots reserved on the node for this route (what the scheduler subtracts).
    resources = models.JSONField(default=dict, blank=True)
    # The GPU devices assigned to it on its node and its share of each (serving.core.devices),
    # e.g. {"cuda:0": 0.5}; chosen with the node, in the placement's transaction.
    devices = models.JSONField(default=dict, blank=True)
    # {"kind": "definition"|"image"|"resources"|"exited"|..., "message": "...", ...} (S4.4).
    error = models.JSONField(default=dict, blank=True)
    # While its node pulls its image (SERVING_IMAGE_PULL=missing): {"done": bytes, "total": bytes},
    # written by the node at most every 0.5 s; {} otherwise.
    pull_progress = models.JSONField(default=dict, blank=True)
    # The effective health check (S5.1) resolved from the definition when the replica started.
    health_check = models.JSONField(default=dict, blank=True)
    # The node's copy of the model folder (serving/node/snapshots.py), on a node that copies folders:
    # {"digest", "folder", "done", "total", "state": "fetching" | "ready"}; {} on shared storage.
    snapshot = models.JSONField(default=dict, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_probe_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    healthy_since = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["status"])]

    def __str__(self) -> str:
        return f"{self.endpoint.name}/{str(self.id)[:8]}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.host and self.port else ""

    @property
    def error_message(self) -> str:
        return str(self.error.get("message", "")) if self.error else ""

    @property
    def snapshot_progress(self) -> dict[str, str] | None:
        """While its node copies the model folder: the bytes done and to do, for the service page."""
        snap = self.snapshot or {}
        if self.status != Route.Status.PROVISIONING or snap.get("state") not in ("waiting", "fetching"):
            return None
        return {
            "done": format_bytes(int(snap.get("done") or 0)),
            "total": format_bytes(int(snap.get("total") or 0)),
        }


class Revision(models.Model):
    """An immutable revision ``number`` of a service (issue 16): the configuration its replicas run
    (``serving.core.revisions.CONFIG_FIELDS``), who made it and when, and what changed. Routes
    belong to the revision whose number is their ``spec_version``."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    config = models.JSONField(default=dict)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    summary = models.CharField(max_length=255, blank=True)  # one line: the diff against the previous one

    class Meta:
        ordering = ["endpoint", "number"]
        constraints = [models.UniqueConstraint(fields=["endpoint", "number"], name="revision_number_unique")]

    def __str__(self) -> str:
        return f"{self.endpoint.name} r{self.number}"

    @staticmethod
    def snapshot(endpoint: Endpoint) -> dict[str, Any]:
        """The configuration ``endpoint`` holds now, as plain JSON (foreign keys by primary key)."""
        config: dict[str, Any] = {}
        for field in CONFIG_FIELDS:
            if field in ("model_folder", "preset"):
                pk = getattr(endpoint, f"{field}_id")
                config[field] = str(pk) if isinstance(pk, uuid.UUID) else pk
            else:
                config[field] = getattr(endpoint, field)
        return config

    def apply(self, endpoint: Endpoint) -> None:
        """Set this revision's configuration on ``endpoint`` (in memory)."""
        for field, value in self.config.items():
            if field in ("model_folder", "preset"):
                setattr(endpoint, f"{field}_id", value)
            else:
                setattr(endpoint, field, value)


class RouteMember(models.Model):
    """A sub member of a cluster-mode replica (S4.1, ``serving.core.cluster``): one more container of the
    route, on its own node in multi-node mode. The main member is the route itself."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")  # waits for the main member to run
        STARTING = "starting", _("starting")  # claimed by its node
        RUNNING = "running", _("running")
        FAILED = "failed", _("failed")
        EXITED = "exited", _("exited")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    route = models.ForeignKey(Route, on_delete=models.CASCADE, related_name="members")
    idx = models.PositiveSmallIntegerField()  # 1-based among the subs: sub1, sub2, ...
    node = models.ForeignKey("Node", on_delete=models.SET_NULL, null=True, blank=True, related_name="members")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    container_id = models.CharField(max_length=128, blank=True)
    host = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    # Slots reserved on its node (what the scheduler subtracts there).
    resources = models.JSONField(default=dict, blank=True)
    devices = models.JSONField(default=dict, blank=True)  # as Route.devices, on its own node
    error = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["idx"]
        constraints = [models.UniqueConstraint(fields=["route", "idx"], name="route_member_idx_unique")]

    def __str__(self) -> str:
        return f"{self.route_id}/{self.host_name}"

    role = "sub"

    @property
    def host_name(self) -> str:
        return f"sub{self.idx}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.host and self.port else ""


class ResourcePreset(models.Model):
    """A named bundle of slots offered in the launcher ("small", "gpu-half")."""

    name = models.CharField(max_length=64, unique=True)
    cpu = models.FloatField(validators=[MinValueValidator(0.0)])
    mem = models.BigIntegerField(validators=[MinValueValidator(0)], help_text=_("bytes"))
    accelerators = models.JSONField(default=dict, blank=True)  # {"cuda.shares": 0.5}
    resource_group = models.CharField(max_length=64, blank=True, help_text=_("empty: offered in every group"))

    class Meta:
        ordering = ["cpu", "mem"]

    def __str__(self) -> str:
        return self.name

    def slots(self) -> dict[str, float]:
        return {"cpu": self.cpu, "mem": float(self.mem), **{k: float(v) for k, v in self.accelerators.items()}}


class Node(models.Model):
    """A host that runs replicas; its worker consumes the Celery queue ``node.<name>``."""

    name = models.CharField(max_length=64, unique=True)
    address = models.CharField(max_length=255, blank=True)
    engine = models.CharField(max_length=16, blank=True)
    resource_group = models.CharField(max_length=64, default="default")
    # platform.machine() of the node worker, written at every heartbeat (serving.core.architecture).
    architecture = models.CharField(max_length=32, blank=True)
    capacity = models.JSONField(default=dict, blank=True)  # {"cpu": 2, "mem": <bytes>, "cuda.shares": 4}
    # The GPU devices it advertises (heartbeat): [{"id": "cuda:0", "name": "...", "memory": <bytes>}].
    devices = models.JSONField(default=list, blank=True)
    schedulable = models.BooleanField(default=True)  # the operator's word (admin, cordon); engines never write it
    # The engine's word, sent with every heartbeat: why the node can take no new replica now, as a
    # sentence ("the Swarm node worker-2 is drained"), and since when; "" when it can. The
    # scheduler skips such a node like an unschedulable one, and the mark clears by itself.
    unavailable = models.TextField(blank=True)
    unavailable_since = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    lost_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"node.{self.name}"

    def is_alive(self, now: Any = None) -> bool:
        now = now or timezone.now()
        if self.heartbeat_at is None or self.lost_at is not None:
            return False
        return (now - self.heartbeat_at).total_seconds() < settings.NODE_LOST_AFTER


def served_model_names(endpoint: Endpoint) -> list[str]:
    """The names a service answers to at the gateway: its own list, else MODEL_NAME, else its name."""
    if endpoint.model_names:
        return [str(n) for n in endpoint.model_names]
    named = str((endpoint.environ or {}).get("MODEL_NAME") or "").strip()
    return [named or endpoint.name]


class GatewayKey(models.Model):
    """A key for the proxy's OpenAI-compatible root (issue 17): a user's or a project's, for chosen
    services (none chosen: every service of its scope). Only its HMAC digest is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=64)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="gateway_keys")
    # Set: the project's key (its services, its managers keep it); empty: the owner's own key.
    project = models.ForeignKey(
        "accounts.Project", on_delete=models.CASCADE, null=True, blank=True, related_name="gateway_keys"
    )
    services = models.ManyToManyField(Endpoint, blank=True, related_name="gateway_keys")
    lookup = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    expires_at = models.DateTimeField()
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_concurrency = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}_…"

    @property
    def prefix(self) -> str:
        return f"msg_{self.lookup}"

    def is_active(self, now: Any = None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and self.expires_at > now


class GatewayUsage(models.Model):
    """A gateway key's use of one service on one UTC day (issue 17), folded from the proxies' counters
    in Redis (serving.control.usage). ``latency`` counts requests per latency bucket: upper bound in
    seconds ("inf" last) -> count, from which p50/p95 are read (serving.core.usage)."""

    key = models.ForeignKey(GatewayKey, on_delete=models.CASCADE, related_name="usage")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="gateway_usage")
    day = models.DateField()
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    latency = models.JSONField(default=dict)

    class Meta:
        ordering = ["-day", "endpoint__name"]
        constraints = [models.UniqueConstraint(fields=["key", "endpoint", "day"], name="gateway_usage_unique_day")]

    def __str__(self) -> str:
        return f"{self.key_id} {self.endpoint_id} {self.day}"


class ModelAlias(models.Model):
    """A model name at the gateway that points at several services with weights (issue 17): e.g. a
    self-hosted model with a spill-over. The proxy picks a backend by weight among those with a
    healthy replica, and tries the next when one has none. Names are unique per project (or, without
    a project, per owner) together with the services' model names."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=128)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="model_aliases")
    project = models.ForeignKey(
        "accounts.Project", on_delete=models.CASCADE, null=True, blank=True, related_name="model_aliases"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelAliasBackend(models.Model):
    """One service behind an alias, with its weight (its share among the backends that are up)."""

    alias = models.ForeignKey(ModelAlias, on_delete=models.CASCADE, related_name="backends")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="alias_backends")
    weight = models.PositiveIntegerField(default=1)
    position = models.PositiveIntegerField(default=0)  # the order given: ties and failover follow it

    class Meta:
        ordering = ["position"]
        constraints = [models.UniqueConstraint(fields=["alias", "endpoint"], name="alias_backend_unique")]

    def __str__(self) -> str:
        return f"{self.alias_id} -> {self.endpoint_id} ({self.weight})"


class ServiceCache(models.Model):
    """A service's writable cache on one node (its /home/work/.cache), as that node last measured it.

    Written by the node's sync (serving/node/caches.py); its bytes count against the service owner's
    storage limit (storage/quota.py). Deleted with the directory once the service is destroyed."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="caches")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="caches")
    bytes = models.BigIntegerField(default=0)
    measured_at = models.DateTimeField(default=timezone.now)
    # Set once the cache passed SERVICE_CACHE_LIMIT and the event log said so; cleared below it.
    over_limit = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["endpoint", "node"], name="service_cache_unique_per_node")]
        ordering = ["node__name"]

    def __str__(self) -> str:
        return f"{self.endpoint_id} on {self.node_id}: {self.bytes} bytes"


class EndpointToken(models.Model):
    """A credential for one private endpoint (S7.1); only its HMAC digest is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="tokens")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    lookup = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"mst_{self.lookup}_…"

    @property
    def prefix(self) -> str:
        return f"mst_{self.lookup}"

    def is_active(self, now: Any = None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and self.expires_at > now


class AutoScalingRule(models.Model):
    """When a metric crosses a threshold, change the desired replicas by ``step`` (S6.1)."""

    # What a user sets on a rule (besides ``enabled``): the admin, the API and the service page all
    # offer these, so a new setting can not be forgotten in one of them.
    SETTINGS = (
        "direction",
        "source",
        "metric",
        "comparator",
        "threshold",
        "step",
        "min_replicas",
        "max_replicas",
        "cooldown",
        "aggregation",
        "window",
    )

    class Direction(models.TextChoices):
        OUT = "out", _("scale out")
        IN = "in", _("scale in")

    class Source(models.TextChoices):
        KERNEL = "kernel", _("kernel")
        INFERENCE = "inference", _("inference framework")
        PROXY = "proxy", _("proxy")

    class Comparator(models.TextChoices):
        LESS_THAN = "LESS_THAN", "<"
        LESS_THAN_OR_EQUAL = "LESS_THAN_OR_EQUAL", "<="
        GREATER_THAN = "GREATER_THAN", ">"
        GREATER_THAN_OR_EQUAL = "GREATER_THAN_OR_EQUAL", ">="

    class Aggregation(models.TextChoices):
        AVG = "avg", _("average")
        MAX = "max", _("maximum")
        MIN = "min", _("minimum")

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="rules")
    direction = models.CharField(max_length=4, choices=Direction.choices)
    source = models.CharField(max_length=16, choices=Source.choices)
    metric = models.CharField(max_length=128)
    comparator = models.CharField(max_length=24, choices=Comparator.choices)
    threshold = models.FloatField()
    step = models.IntegerField()
    min_replicas = models.PositiveIntegerField(default=0)
    max_replicas = models.PositiveIntegerField(default=10)
    cooldown = models.PositiveIntegerField(default=300, help_text=_("seconds"))
    aggregation = models.CharField(max_length=4, choices=Aggregation.choices, default=Aggregation.AVG)
    window = models.PositiveIntegerField(default=60, help_text=_("seconds"))
    enabled = models.BooleanField(default=True)
    last_triggered_at = models.DateTimeField(null=True, blank=True)
    # The rule's last decision in words ("no data for in_flight in the last 60 s", "acted: 1 -> 2"):
    # what the API shows as its state, and how the tick records a repeated decision only once.
    last_decision = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(min_replicas__lte=models.F("max_replicas")), name="rule_min_le_max"),
            models.CheckConstraint(condition=~Q(step=0), name="rule_step_nonzero"),
        ]

    def __str__(self) -> str:
        return f"{self.direction} {self.source}:{self.metric} {self.get_comparator_display()} {self.threshold}"


class ScalingEvent(models.Model):
    """One autoscaling decision, acted on or not, with the reason (the audit trail of S6)."""

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="scaling_events")
    rule = models.ForeignKey(AutoScalingRule, on_delete=models.SET_NULL, null=True, blank=True, related_name="events")
    metric = models.CharField(max_length=160, blank=True)  # "<source>:<name>", kept if the rule goes
    observed = models.FloatField(null=True, blank=True)
    window = models.PositiveIntegerField(null=True, blank=True)
    old_replicas = models.PositiveIntegerField()
    new_replicas = models.PositiveIntegerField()
    acted = models.BooleanField(default=False)
    reason = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.endpoint.name}: {self.old_replicas} -> {self.new_replicas} ({self.reason})"


class ServiceEvent(models.Model):
    """The audit and lifecycle log of a service: who did what, and what the platform did."""

    class Level(models.TextChoices):
        INFO = "info", _("info")
        WARNING = "warning", _("warning")
        ERROR = "error", _("error")

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, null=True, blank=True, related_name="events")
    route_id = models.UUIDField(null=True, blank=True)  # kept after the route row is gone
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    kind = models.CharField(max_length=48)
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    # The id of the request the event stems from (the proxy's X-Request-ID of a request that found a
    # replica down or woke the service; the web request's of an API call), so that a client holding
    # the id of a failed call finds the event: ``?request_id=`` on the events API. Blank for the
    # platform's own doings (ticks, probes on schedule).
    request_id = models.CharField(max_length=128, blank=True, default="", db_index=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["endpoint", "-created_at"])]

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"
