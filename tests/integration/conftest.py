from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.live import LiveSystem, wait_for


def _engine_ready() -> str | None:
    """Why the local engine can not run here, or None when it can."""
    import os

    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap; `make test` installs it as root)"
    if os.geteuid() != 0 and shutil.which("pasta") is None:
        return "the local engine needs root (network namespaces) or pasta (apt-get install passt)"
    return None


@pytest.fixture
def live_system(transactional_db: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveSystem]:
    """Control worker + node worker `local` + beat, as real processes; replicas cleaned up after."""
    reason = _engine_ready()
    if reason:
        pytest.skip(reason)
    from django.conf import settings

    from serving.models import Node

    system = LiveSystem(tmp_path)
    system.start_control()
    system.start_node("local")
    system.start_beat()
    try:
        wait_for(
            lambda: Node.objects.filter(name="local", heartbeat_at__isnull=False).exists(),
            timeout=30,
            what="node 'local' to register",
        )
        yield system
    finally:
        system.stop_all()
        from serving.node.engines.local.engine import LocalEngine

        for state_dir in Path(settings.ENGINE_STATE_DIR).glob("local-*"):
            engine = LocalEngine(state_dir=state_dir)
            for info in engine.list():
                engine.stop(info.replica_id, grace=1)
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(system.logs())


@pytest.fixture
def live_factory(
    transactional_db: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LiveSystem]]:
    """``live_factory(nodes={"a": {"NODE_CPU": "2"}, "b": {}}, **overrides)``: control + the given node
    workers (each its own NODE_NAME, queue and engine state dir) + beat, with settings overridden."""
    reason = _engine_ready()
    if reason:
        pytest.skip(reason)
    from serving.models import Node

    systems: list[LiveSystem] = []

    def start(nodes: dict[str, dict[str, str]] | None = None, **overrides: str) -> LiveSystem:
        system = LiveSystem(tmp_path, **overrides)
        systems.append(system)
        system.start_control()
        for name, env in (nodes or {"local": {}}).items():
            system.start_node(name, **env)
        system.start_beat()
        for name in nodes or {"local": {}}:
            wait_for(
                lambda name=name: Node.objects.filter(name=name, heartbeat_at__isnull=False).exists(),  # type: ignore[misc]
                timeout=30,
                what=f"node {name!r} to register",
            )
        return system

    try:
        yield start
    finally:
        for system in systems:
            system.stop_all()
        _stop_every_replica()
        failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
        if failed:
            for system in systems:
                print(system.logs())


def _stop_every_replica() -> None:
    from django.conf import settings

    from serving.node.engines.local.engine import LocalEngine

    for state_dir in Path(settings.ENGINE_STATE_DIR).glob("local-*"):
        engine = LocalEngine(state_dir=state_dir)
        for info in engine.list():
            engine.stop(info.replica_id, grace=1)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def browser(personas: dict[str, Any]) -> Callable[[str | None], Client]:
    """A page client logged in as a persona (None: anonymous); shared by the page tests."""

    def login(who: str | None) -> Client:
        client = Client()
        if who:
            client.force_login(personas[who])
        return client

    return login
