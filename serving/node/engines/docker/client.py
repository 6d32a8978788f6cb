"""One Docker client per engine, made on first use (the Docker and Swarm engines share this).

Made lazily so that an engine object can exist (settings checked, a node worker starting) while no
daemon answers yet; behind a lock, because an engine is called from the node worker's threads and
docker-py's client (its connection pool) is meant to be shared, not made per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import docker

from serving.node.engines.docker.errors import docker_errors

ClientFactory = Callable[..., docker.DockerClient]


class LazyClient:
    """``client()`` returns the engine's one client, made by ``factory(timeout=...)`` on first use;
    a failure to make it is an ``EngineError`` sentence (``docker_errors``), tried again next call."""

    def __init__(self, factory: ClientFactory, timeout: float) -> None:
        self.factory = factory
        self.timeout = timeout
        self._lock = threading.Lock()
        self._client: docker.DockerClient | None = None

    def __call__(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                with docker_errors("connect to the engine", timeout=self.timeout):
                    self._client = self.factory(timeout=self.timeout)
            return self._client
