"""Shared fixtures: personas (owner, teammate, stranger, admin), API clients, a private Redis prefix."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.layers import channel_layers

# The Redis key prefix of the session is set by tests/redis_isolation.py, before settings load.


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: object) -> Iterator[None]:
    """pytest-django's, plus: on PostgreSQL, end every other session of the test database before it
    is dropped. A connection opened by one of asgiref's or a sampler's threads is never closed by
    the test runner, and PostgreSQL refuses to drop a database in use, so each run left one behind."""
    yield
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Iterator[None]:
    """Each test gets its own channel layer. Tests drive consumers from event loops of their own
    (a thread's asyncio.run); a consumer a test left receiving in a loop that has ended keeps
    channels_redis's receive lock bound to that loop, and every later receive on the shared layer
    then fails ("bound to a different event loop"). A server has one loop per process; a test
    session has many."""
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def _isolated_dirs(settings: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp()
    settings.STORAGE_ROOT = Path(root) / "storage"  # type: ignore[attr-defined]
    settings.ENGINE_STATE_DIR = Path(root) / "engine"  # type: ignore[attr-defined]
    settings.SERVICE_CACHE_ROOT = Path(root) / "service-caches"  # type: ignore[attr-defined]
    # Hashing passwords properly costs ~100 ms a user; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # type: ignore[attr-defined]
    # Failed-login and failed-API-key counters live in Redis for the whole session and every test
    # client is 127.0.0.1: without this, one test's refusals would throttle another's. The limiter
    # itself is tested with small limits in tests/security/test_web_app.py.
    settings.LOGIN_FAILURE_LIMIT = settings.API_KEY_FAILURE_LIMIT = 10**9  # type: ignore[attr-defined]
    settings.LOGIN_USERNAME_FAILURE_LIMIT = 10**9  # type: ignore[attr-defined]


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


def _replica_networks() -> set[str] | None:
    """The names of the daemon's replica networks (None without a Docker engine)."""
    try:
        import docker

        from serving.node.engines.docker.networks import REPLICA_NETWORK
        from serving.node.engines.swarm.networks import REPLICA_NETWORK as SWARM_REPLICA_NETWORK

        found = docker.from_env(timeout=5).networks.list(names=[REPLICA_NETWORK, SWARM_REPLICA_NETWORK])
        return {n.name for n in found}
    except Exception:
        return None


# The fixtures through which a test reaches the database (pytest-django blocks every other way).
_DATABASE_FIXTURES = frozenset({"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback"})


def uses_the_database(item: pytest.Item) -> bool:
    """Whether a test reaches the database: the ``django_db`` mark, or a database fixture anywhere
    in its fixtures' closure (e.g. ``live_system`` asks for ``transactional_db``)."""
    return item.get_closest_marker("django_db") is not None or bool(
        _DATABASE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``ONLY_DATABASE_TESTS=1`` (CI's PostgreSQL part) keeps only the tests that reach the
    database: the others (the proxy, the engines, the pure modules) do the same on any database
    and ran on SQLite already."""
    if os.environ.get("ONLY_DATABASE_TESTS", "") not in ("1", "true", "yes"):
        return
    kept = [item for item in items if uses_the_database(item)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not uses_the_database(item)])
        items[:] = kept


_NETWORKS_BEFORE: set[str] | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _NETWORKS_BEFORE
    _NETWORKS_BEFORE = _replica_networks()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The Docker engine keeps an installation's replica network (removing it with its last replica
    raced with starts), with its firewall rules. This run's installation (its REDIS_PREFIX) is made
    up, and engine tests that name no installation use the default one's network (``ms-replicas``,
    that of a `make run` on this host): whatever of these the run made goes now, or every run would
    hold one of the daemon's ~30 address pools, and leave rules on the host, for ever."""
    import contextlib
    import os

    prefix = os.environ.get("REDIS_PREFIX", "")
    if not prefix.startswith("mstest-") or _NETWORKS_BEFORE is None:
        return
    with contextlib.suppress(Exception):
        import docker

        from serving.node.engines.docker.engine import DockerEngine
        from serving.node.engines.docker.networks import REPLICA_NETWORK
        from serving.node.engines.swarm.engine import SwarmEngine
        from serving.node.engines.swarm.networks import REPLICA_NETWORK as SWARM_REPLICA_NETWORK

        client = docker.from_env(timeout=5)
        made = (_replica_networks() or set()) - _NETWORKS_BEFORE
        for installation in (prefix, ""):
            name = f"{REPLICA_NETWORK}-{installation}" if installation else REPLICA_NETWORK
            if name in made:
                DockerEngine(client_factory=lambda **_: client, installation=installation).remove_replica_network()
            # The Swarm engine's (a swarm-scoped bridge and the config-only network it is made from).
            name = f"{SWARM_REPLICA_NETWORK}-{installation}" if installation else SWARM_REPLICA_NETWORK
            if name in made:
                SwarmEngine(client_factory=lambda **_: client, installation=installation).remove_replica_network()
