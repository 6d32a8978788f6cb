"""The Swarm engine honours SERVING_IMAGE_PULL and SERVING_REGISTRIES as the Docker engine does
(issue 15), against the real one-node swarm and a real ``docker-registry`` started here on a free
loopback port (test_image_pull.py's helpers; Docker allows plain HTTP on 127.0.0.0/8).

The engine pulls a missing image onto the manager (progress reported, the Docker engine's
sentences for a refused registry, ``never`` and a failed pull), and creates the service pinned to
the digest it got, with the Docker config's credentials for the registry: the task's Swarm node
pulls that image itself. That node's side is tested with an engine that takes the manager's own
image for the look it needs (``ManagerHasIt``), so the one node of the test swarm has to pull the
service's image as another node would: with the credentials it succeeds; without, the start fails
at once with a sentence naming the image and the registry.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from serving.node.engines.base import ImageNotFound, ReplicaState
from serving.node.engines.swarm.engine import SwarmEngine
from tests.integration.test_engine_swarm import (
    IMAGE,
    RUN_ID,
    TEST_LABEL,
    http_get,
    make_spec,
    replica_network,
    swarm_client,  # noqa: F401 - the module's fixture: a real swarm manager
)
from tests.integration.test_image_pull import (
    Registry,
    bcrypt_htpasswd,
    forget,
    push,
    start_registry,
    stop_registry,
)
from tests.live import wait_for

pytestmark = pytest.mark.docker

REPO = "ms-swarm-pull/python"  # this file's images, in its own registries
SERVE = ("python3", "-m", "http.server", "8000")
USER, PASSWORD = "swarm-puller", "s3cret-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def registry(swarm_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:  # noqa: F811
    started = start_registry(tmp_path_factory.mktemp("swarm-registry"))
    yield started
    stop_registry(started)


def engine_for(tmp_path: Path, cls: type[SwarmEngine] = SwarmEngine, **kwargs: Any) -> SwarmEngine:
    return cls(state_dir=tmp_path / "state", stop_grace=2.0, replica_network=replica_network(""), **kwargs)


def ours(client: Any) -> list[Any]:
    return list(client.services.list(filters={"label": f"{TEST_LABEL}={RUN_ID}"}))


def test_a_missing_image_is_pulled_onto_the_manager_and_the_service_pinned_to_its_digest(
    swarm_client: Any,  # noqa: F811
    registry: Registry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.address}/{REPO}:{RUN_ID}-pinned"
    push(swarm_client, reference)
    engine = engine_for(tmp_path, image_pull="missing", registries=[registry.address])
    reports: list[tuple[int, int]] = []
    info = None
    try:
        seconds = engine.ensure_image(reference, lambda done, total: reports.append((done, total)))
        assert seconds is not None and seconds > 0
        assert reports and reports[-1][1] > 1 << 20 and reports[-1][0] == reports[-1][1]
        assert engine.ensure_image(reference) is None  # on the manager now

        info = engine.start(make_spec(image=reference, command=SERVE))
        assert info.state is ReplicaState.RUNNING
        digest = swarm_client.images.get(reference).attrs["RepoDigests"][0].partition("@")[2]
        service = swarm_client.services.get(info.replica_id)
        assert service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == f"{reference}@{digest}"
        wait_for(lambda: http_get(info.host, info.port), timeout=30, what="the pulled image's replica answers")
    finally:
        if info is not None:
            engine.stop(info.replica_id)
        forget(swarm_client, reference)

    # start() pulls by itself (a cluster member's start goes straight there).
    reference = f"{registry.address}/{REPO}:{RUN_ID}-start"
    push(swarm_client, reference)
    info = None
    try:
        info = engine.start(make_spec(image=reference, command=SERVE))
        assert info.state is ReplicaState.RUNNING
    finally:
        if info is not None:
            engine.stop(info.replica_id)
        forget(swarm_client, reference)


def test_refusals_and_a_failed_pull_are_the_docker_engines_sentences(
    swarm_client: Any,  # noqa: F811
    registry: Registry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.address}/{REPO}:{RUN_ID}-refused"
    push(swarm_client, reference)
    try:
        for listed in ([], ["ghcr.io", "127.0.0.1:1"]):
            engine = engine_for(tmp_path, image_pull="missing", registries=listed)
            with pytest.raises(ImageNotFound) as raised:
                engine.start(make_spec(image=reference, command=SERVE))
            message = str(raised.value)
            assert message.startswith(f"The image {reference} is not on this node and its registry {registry.address}")
            assert f"add {registry.address} to SERVING_REGISTRIES" in message

        never = engine_for(tmp_path, registries=[registry.address])  # image_pull="never", the default
        with pytest.raises(ImageNotFound) as raised:
            never.start(make_spec(image=reference, command=SERVE))
        assert str(raised.value).startswith(f"The image {reference} is not on this node; build it on this node")
        assert "SERVING_IMAGE_PULL=missing" in str(raised.value)
        with pytest.raises(docker.errors.ImageNotFound):
            swarm_client.images.get(reference)  # never pulled
    finally:
        forget(swarm_client, reference)

    absent = f"{registry.address}/{REPO}:never-pushed-{RUN_ID}"
    engine = engine_for(tmp_path, image_pull="missing", registries=[registry.address])
    with pytest.raises(ImageNotFound) as raised:
        engine.start(make_spec(image=absent, command=SERVE))
    assert str(raised.value).startswith(f"Pulling the image {absent} failed: ")
    assert ours(swarm_client) == []


class ManagerHasIt(SwarmEngine):
    """The real engine, but the look at the image before the service is made is at the manager's
    own test image: the task's Swarm node (the test swarm's only one) must then pull the service's
    image itself, as a node other than the manager does."""

    def _image(self, client: Any, image: str) -> Any:
        return client.images.get(IMAGE)


def test_the_tasks_node_pulls_with_the_docker_configs_credentials_or_the_start_says_why(
    swarm_client: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = start_registry(tmp_path / "private", htpasswd=bcrypt_htpasswd(USER, PASSWORD))
    reference = f"{private.address}/{REPO}:{RUN_ID}-private"
    info = None
    engine: SwarmEngine | None = None
    try:
        push(swarm_client, reference, auth_config={"username": USER, "password": PASSWORD})

        # No credentials: Swarm rejects the task ("No such image"); the start fails at once, saying so.
        empty = tmp_path / "no-auth"
        empty.mkdir()
        (empty / "config.json").write_text("{}")
        monkeypatch.setenv("DOCKER_CONFIG", str(empty))
        engine = engine_for(tmp_path / "a", ManagerHasIt, image_pull="missing", registries=[private.address])
        began = time.monotonic()
        with pytest.raises(ImageNotFound) as raised:
            engine.start(make_spec(image=reference, command=SERVE))
        assert time.monotonic() - began < engine.timeout  # not the engine's wait running out
        message = str(raised.value)
        assert message.startswith(
            f"The Swarm node {engine.placement_node} has not the image {reference} and could not pull it "
            f"from its registry {private.address} (Swarm: No such image"
        ), message
        assert f"`docker login {private.address}`" in message
        assert ours(swarm_client) == []  # the rejected service is gone

        # The node worker's Docker config has them: sent with the service, the node pulls and runs it.
        config = tmp_path / "docker-config"
        config.mkdir()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (config / "config.json").write_text(json.dumps({"auths": {private.address: {"auth": token}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
        engine = engine_for(tmp_path / "b", ManagerHasIt, image_pull="missing", registries=[private.address])
        info = engine.start(make_spec(image=reference, command=SERVE))
        assert info.state is ReplicaState.RUNNING
        assert swarm_client.images.get(reference)  # pulled by Swarm for the task, not by the engine
        wait_for(lambda: http_get(info.host, info.port), timeout=30, what="the replica Swarm pulled answers")
    finally:
        if info is not None and engine is not None:
            engine.stop(info.replica_id)
        forget(swarm_client, reference)
        stop_registry(private)
