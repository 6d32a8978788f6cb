"""Shared fixtures: personas (owner, teammate, stranger, admin), API clients, a private Redis prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Every test session gets its own Redis key prefix and storage root, so the suite never touches a
# running installation's data and two suites (SQLite and PostgreSQL) can run side by side.
_SESSION = uuid.uuid4().hex[:8]
os.environ.setdefault("REDIS_PREFIX", f"mstest-{_SESSION}")


@pytest.fixture(autouse=True)
def _isolated_dirs(settings: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp()
    settings.STORAGE_ROOT = Path(root) / "storage"  # type: ignore[attr-defined]
    settings.ENGINE_STATE_DIR = Path(root) / "engine"  # type: ignore[attr-defined]
    # Hashing passwords properly costs ~100 ms a user; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # type: ignore[attr-defined]


@pytest.fixture
def personas(db: None) -> dict[str, object]:
    from tests.factories import make_personas

    return make_personas()


@pytest.fixture
def owner(personas: dict[str, object]) -> object:
    return personas["owner"]


@pytest.fixture
def api(personas: dict[str, object]) -> Iterator[object]:
    """``api("owner")`` -> an APIClient authenticated as that persona (``api(None)``: anonymous)."""
    from rest_framework.test import APIClient

    def client_for(name: str | None) -> APIClient:
        client = APIClient()
        if name is not None:
            client.force_authenticate(user=personas[name])  # type: ignore[arg-type]
        return client

    yield client_for
