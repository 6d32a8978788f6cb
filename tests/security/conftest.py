"""Fixtures of the security suite: the owner's world in the team project, and a stranger's own."""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.world import World, build_world


@pytest.fixture
def world(personas: dict[str, Any]) -> World:
    return build_world(personas["owner"], personas["project"])


@pytest.fixture
def stranger_world(personas: dict[str, Any]) -> World:
    """The stranger's own service and folder: listings are not empty, and must show only these."""
    return build_world(personas["stranger"], None)
