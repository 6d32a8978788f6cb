"""A replica runs only on a node of the architecture its image is built for (issue 18): the folder's
``service-definition.toml`` names it, nodes report theirs, and a service with no such node waits
with a sentence that names the architectures there are."""

from __future__ import annotations

import platform
from typing import Any

import pytest
from django.utils import timezone

from serving.control import lifecycle
from serving.core import architecture
from serving.models import Endpoint, Node, Route, ServiceEvent
from serving.node import agent
from serving.node import engine as node_engine
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db

ARM_SERVICE = """\
[custom.environment]
image = "example.com/server:arm"
architecture = "arm64"
"""


def test_architecture_names_are_spelt_one_way() -> None:
    assert architecture.normalize(" AMD64 ") == "x86_64" and architecture.normalize("arm64") == "aarch64"
    assert architecture.fits("", "x86_64") and architecture.fits("amd64", "x86_64")
    assert not architecture.fits("aarch64", "x86_64") and not architecture.fits("aarch64", "")


def test_a_node_reports_its_architecture_at_heartbeat(settings: Any) -> None:
    class Engine:
        name = "local"

    settings.NODE_NAME = "arch-node"
    node_engine.set_engine(Engine())  # type: ignore[arg-type]
    try:
        node = agent.heartbeat()
    finally:
        node_engine.set_engine(None)
    assert node.architecture == architecture.normalize(platform.machine()) != ""


def test_replicas_wait_for_a_node_of_their_architecture_and_go_there(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"],
        name="arm-model",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": ARM_SERVICE},
    )
    body = {"name": "on-arm", "folder": str(folder.pk), "runtime": "custom", "replicas": 1}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["architecture"] == "aarch64"
    endpoint = Endpoint.objects.get(pk=created.json()["id"])
    now = timezone.now()
    Node.objects.create(name="x86", architecture="x86_64", capacity={"cpu": 8.0, "mem": 2.0**34}, heartbeat_at=now)
    lifecycle.reconcile(str(endpoint.pk), now=now)
    assert not Route.objects.filter(endpoint=endpoint).exists()  # waits: no failed start is counted
    said = ServiceEvent.objects.get(endpoint=endpoint, kind="waiting_for_node").message
    assert "No node runs aarch64 images" in said and "x86 (x86_64)" in said
    endpoint.refresh_from_db()
    assert endpoint.retries == 0
    Node.objects.create(name="arm", architecture="aarch64", capacity={"cpu": 8.0, "mem": 2.0**34}, heartbeat_at=now)
    lifecycle.reconcile(str(endpoint.pk), now=now)
    [route] = Route.objects.filter(endpoint=endpoint)
    assert route.node is not None and route.node.name == "arm"
    nodes = {n["name"]: n["architecture"] for n in api("teammate").get("/api/v1/nodes/").json()}
    assert nodes == {"x86": "x86_64", "arm": "aarch64"}


def test_an_image_given_at_create_is_not_held_to_the_folders_architecture(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"],
        name="arm-model-2",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": ARM_SERVICE},
    )
    body = {"name": "own-image", "folder": str(folder.pk), "runtime": "custom", "replicas": 0, "image": "mine:1"}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["architecture"] == ""
