from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        from serving.engines.local import LocalEngine

        for state_dir in Path(settings.ENGINE_STATE_DIR).glob("local-*"):
            engine = LocalEngine(state_dir=state_dir)
            for info in engine.list():
                engine.stop(info.replica_id, grace=1)
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(system.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
