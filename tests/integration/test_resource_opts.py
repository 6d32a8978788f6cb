"""``[<runtime>.resource_opts] shmem`` in service-definition.toml sizes the replica's /dev/shm (issue 18),
as Backend.AI's does; a size given with the service's own resources wins."""

from __future__ import annotations

from typing import Any

import pytest

from serving.core import slots
from serving.models import Endpoint, Route
from serving.node import replicas
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db

SERVICE = """\
[custom.resource_slots]
cpu = 1
mem = "4g"

[custom.resource_opts]
shmem = "2g"
"""


def create(api: Any, folder: Any, name: str, **extra: Any) -> Endpoint:
    body = {"name": name, "folder": str(folder.pk), "runtime": "custom", "replicas": 0, **extra}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    return Endpoint.objects.get(pk=created.json()["id"])


def test_shmem_becomes_the_replicas_shm(api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(
        owner=personas["owner"],
        name="shm-model",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE},
    )
    endpoint = create(api, folder, "with-shm")
    assert endpoint.resources["shm"] == 2 * 1024**3 and endpoint.resources["mem"] == 4 * 1024**3
    # The route carries what its placement asked for (the service's resources).
    spec, _ = replicas.build_spec(Route(endpoint=endpoint, resources=slots.replica_request(endpoint.resources)))
    assert spec.shm_bytes == 2 * 1024**3
    own = create(api, folder, "own-shm", resources={"cpu": 1, "mem": "4g", "shm": "1g"})
    assert own.resources["shm"] == 1024**3
