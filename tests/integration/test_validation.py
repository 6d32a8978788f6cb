"""Validate before create (S4.2): the live log over a websocket until Finished, then nothing left."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings

from serving.web.consumers import websocket_urlpatterns
from tests.factories import FolderFactory
from tests.live import ROOT, LiveSystem, deadline_for

# The consumers behind the session middleware, with the user put in the scope as that middleware does.
application = URLRouter(websocket_urlpatterns)
BROKEN = (
    "models:\n  - name: x\n    model_path: /models\n    service:\n"
    "      start_command: [python3, -c, 'import sys; print(\"boom\"); sys.exit(3)']\n      port: 8000\n"
)


async def collect(validation_id: str, user: Any, timeout: float = 30) -> list[dict[str, Any]]:
    communicator = WebsocketCommunicator(application, f"/ws/validations/{validation_id}/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect(timeout=deadline_for(5))
    assert connected
    events: list[dict[str, Any]] = []
    try:
        while True:
            event = await communicator.receive_json_from(timeout=timeout)
            events.append(event)
            if event["kind"] == "finished":
                return events
    finally:
        await communicator.disconnect()


def validate(api: Any, folder: Any) -> str:
    response = api("owner").post(
        "/api/v1/services/validate/", {"name": "check", "folder": str(folder.pk)}, format="json"
    )
    assert response.status_code == 202, response.json()
    assert response.json()["websocket"].startswith("/ws/validations/")
    return str(response.json()["id"])


def engine_replicas() -> list[Any]:
    from serving.node.engines.local.engine import LocalEngine

    return LocalEngine(Path(settings.ENGINE_STATE_DIR) / "local-local").list()


def test_validation_streams_the_log_and_reports_healthy(
    live_system: LiveSystem, api: Any, personas: dict[str, Any]
) -> None:
    source = ROOT / "examples" / "llm-echo"
    folder = FolderFactory(
        owner=personas["owner"], name="echo", files={p.name: p.read_text() for p in source.iterdir() if p.is_file()}
    )
    validation_id = validate(api, folder)
    events = asyncio.run(collect(validation_id, personas["owner"]))
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))  # nothing twice, in order
    assert any(e["kind"] == "log" and "llm-echo serving model" in e["line"] for e in events), "\n".join(
        map(str, events)
    )
    assert events[-1]["outcome"] == "healthy"
    assert engine_replicas() == []  # the throwaway replica is gone


def test_validation_of_a_crashing_server_says_why(live_system: LiveSystem, api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(owner=personas["owner"], name="bad", files={"model-definition.yaml": BROKEN})
    validation_id = validate(api, folder)
    events = asyncio.run(collect(validation_id, personas["owner"]))
    assert events[-1]["outcome"] == "failed"
    assert "exited with code 3" in events[-1]["message"]
    assert any(e["kind"] == "log" and "boom" in e.get("line", "") for e in events)
    assert engine_replicas() == []


def test_a_stranger_can_not_watch(live_system: LiveSystem, api: Any, personas: dict[str, Any]) -> None:
    folder = FolderFactory(owner=personas["owner"], name="m2", files={"model-definition.yaml": BROKEN})
    validation_id = validate(api, folder)

    async def try_connect() -> bool:
        communicator = WebsocketCommunicator(application, f"/ws/validations/{validation_id}/")
        communicator.scope["user"] = personas["stranger"]
        connected, _ = await communicator.connect(timeout=deadline_for(5))
        await communicator.disconnect()
        return bool(connected)

    assert asyncio.run(try_connect()) is False


@pytest.mark.docker
def test_validation_on_docker_runs_until_healthy_and_leaves_no_container(
    live_factory: Callable[..., LiveSystem], api: Any, personas: dict[str, Any], settings: Any
) -> None:
    """On Docker a validation's container carries a route label too (its name); the node's orphan
    sweep must leave it to the validation, or every validation slower than one sync fails with
    "the replica does not exist (any more)"."""
    from serving.node.engines.base import LABEL_VALIDATION
    from tests.reliability.test_replica_faults import docker_engine_or_skip

    engine = docker_engine_or_skip(settings)
    live_factory(SERVING_ENGINE="docker")
    source = ROOT / "examples" / "simple-http-server"
    folder = FolderFactory(
        owner=personas["owner"], name="simple", files={p.name: p.read_text() for p in source.iterdir() if p.is_file()}
    )
    validation_id = validate(api, folder)
    events = asyncio.run(collect(validation_id, personas["owner"], timeout=60))
    assert events[-1]["outcome"] == "healthy", "\n".join(map(str, events))
    assert any(e["kind"] == "log" and "preparing /home/work" in e.get("line", "") for e in events)
    assert not [i for i in engine.list() if i.labels.get(LABEL_VALIDATION) == validation_id]
