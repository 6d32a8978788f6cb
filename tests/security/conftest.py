"""Fixtures of the security suite: the owner's world in the team project, and a stranger's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_engine_local as local_tests
from tests.security.world import World, build_world


@pytest.fixture
def world(personas: dict[str, Any]) -> World:
    return build_world(personas["owner"], personas["project"])


@pytest.fixture
def stranger_world(personas: dict[str, Any]) -> World:
    """The stranger's own service and folder: listings are not empty, and must show only these."""
    return build_world(personas["stranger"], None)


@pytest.fixture
def local_engine(tmp_path: Path) -> Iterator[Any]:
    """A local engine whose replicas and network namespaces the test leaves behind are removed."""
    from serving.node.engines.local.engine import LocalEngine

    engine = LocalEngine(tmp_path / "state", netns_prefix=local_tests.PREFIX)
    yield engine
    for info in engine.list():
        engine.stop(info.replica_id, grace=0)
    engine.cleanup_orphans()
