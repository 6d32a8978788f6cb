"""The objects every URL of the access matrix needs, built the way the product builds them.

One ``World`` belongs to the ``owner`` persona and lives in the ``team`` project, so ``teammate``
(a member, not a manager) can see it and ``stranger`` can not. ``markers`` are strings that only
someone who may see the world can ever receive: a stranger's or an anonymous response holding one
is a leak, whatever the URL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.utils import timezone

from accounts.actions import do_issue_api_key
from accounts.models import ApiKey
from serving.actions import aliases as alias_actions
from serving.actions import gateway as gateway_actions
from serving.actions import rules as rule_actions
from serving.actions import services
from serving.actions import tokens as token_actions
from serving.bus import dryrun as validation
from serving.models import (
    AutoScalingRule,
    Endpoint,
    EndpointToken,
    GatewayKey,
    GatewayUsage,
    ModelAlias,
    Node,
    ResourcePreset,
    Route,
    ScalingEvent,
)
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"

[custom.resource_slots]
cpu = 1
mem = "256m"
"""


@dataclass
class World:
    owner: Any
    service: Endpoint
    folder: Folder
    file_path: str
    token: EndpointToken
    token_secret: str
    rule: AutoScalingRule
    route: Route
    api_key: ApiKey
    gateway_key: GatewayKey
    alias: ModelAlias
    api_key_secret: str
    validation_id: str
    markers: list[str] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        """A value for every URL keyword argument a route of the product takes."""
        return {
            "pk": self.service.pk,
            "service_id": self.service.pk,
            "folder_id": self.folder.pk,
            "token_id": self.token.pk,
            "rule_id": self.rule.pk,
            "route_id": self.route.pk,
            "key_id": self.api_key.pk,
            "gateway_key_id": self.gateway_key.pk,
            "alias_id": self.alias.pk,
            "path": self.file_path,
            "api_path": "models",
            "validation_id": self.validation_id,
            "schema": "model-definition.json",
            "number": 1,  # the service's first revision
        }

    def format(self, text: str) -> str:
        return text.format(
            service=self.service.pk, folder=self.folder.pk, file=self.file_path, rule=self.rule.pk, token=self.token.pk
        )

    def leaked(self, body: bytes | str, asked: str = "") -> list[str]:
        """The markers found in ``body`` (ids that were part of the request itself excepted)."""
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return [m for m in self.markers if m in text and m not in asked]


def build_world(owner: Any, project: Any, tag: str | None = None) -> World:
    tag = tag or uuid.uuid4().hex[:8]
    file_path = f"notes-{tag}.txt"
    folder = FolderFactory(
        owner=owner,
        project=project,
        name=f"fold{tag}",
        files={
            "model-definition.yaml": SIMPLE_DEFINITION,
            "service-definition.toml": SERVICE_DEFINITION,
            file_path: f"secret-content-{tag}\n",
        },
    )
    service = services.do_create_service(
        acting_user=owner, name=f"svc{tag}", folder=folder, project=project, replicas=1, runtime="custom"
    )
    node, _ = Node.objects.get_or_create(name="matrix-node", defaults={"heartbeat_at": timezone.now()})
    route = Route.objects.create(
        endpoint=service, node=None, status=Route.Status.HEALTHY, host="127.0.0.1", port=9, error={}
    )
    token, token_secret = token_actions.do_issue_token(
        service, acting_user=owner, expires_at=timezone.now() + timedelta(days=1)
    )
    rule = AutoScalingRule(endpoint=service)
    rule_actions.do_save_rule(
        rule,
        acting_user=owner,
        changes={
            "direction": "out",
            "source": "kernel",
            "metric": f"metric_{tag}",
            "comparator": "GREATER_THAN",
            "threshold": 0.5,
            "step": 1,
            "min_replicas": 1,
            "max_replicas": 3,
            "cooldown": 60,
        },
    )
    ScalingEvent.objects.create(
        endpoint=service, rule=rule, metric=f"kernel:metric_{tag}", observed=1.0, old_replicas=1, new_replicas=2
    )
    ResourcePreset.objects.get_or_create(name="matrix-small", defaults={"cpu": 1, "mem": 1024**3})
    api_key, api_key_secret = do_issue_api_key(owner, name=f"key{tag}")
    gateway_key, gateway_secret = gateway_actions.do_create_gateway_key(
        acting_user=owner, name=f"gw{tag}", expires_at=timezone.now() + timedelta(days=1), services=[service]
    )
    # Usage of the service by the key, so its usage answers (API, page) have rows a stranger must not see.
    GatewayUsage.objects.create(
        key=gateway_key, endpoint=service, day=timezone.now().date(), requests=3, prompt_tokens=30, latency={"0.01": 3}
    )
    alias = alias_actions.do_create_alias(
        acting_user=owner, name=f"alias{tag}", backends=[(service, 1)], project=project
    )
    validation_id = validation.new_id()
    validation.save_request(validation.ValidationRequest(id=validation_id, user_id=owner.pk, node=node.name, config={}))
    world = World(
        owner=owner,
        service=service,
        folder=folder,
        file_path=file_path,
        token=token,
        token_secret=token_secret,
        rule=rule,
        route=route,
        api_key=api_key,
        api_key_secret=api_key_secret,
        gateway_key=gateway_key,
        alias=alias,
        validation_id=validation_id,
    )
    world.markers = [
        f"svc{tag}",
        service.slug,
        str(service.pk),
        f"fold{tag}",
        str(folder.pk),
        file_path,
        f"secret-content-{tag}",
        f"metric_{tag}",
        token.lookup,
        str(token.pk),
        token_secret,
        str(route.pk),
        api_key.lookup,
        f"key{tag}",
        api_key_secret,
        validation_id,
        str(gateway_key.pk),
        f"gw{tag}",
        gateway_secret,
        str(alias.pk),
        f"alias{tag}",
    ]
    return world
