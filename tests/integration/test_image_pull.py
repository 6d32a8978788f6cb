"""Images reach every node (issue 15): the Docker engine pulls a missing image from a real registry
(Debian's ``docker-registry``, started and stopped here on a free loopback port) when
``SERVING_IMAGE_PULL=missing`` and the registry is in ``SERVING_REGISTRIES``; refuses any other
registry with a sentence; keeps today's sentence with ``never``; uses the node's Docker config's
credentials; and a node's start shows the pull on the route and in the event log.

Skipped, saying why, without a Docker engine or without the registry package (scripts/system-deps.sh
installs it). Docker allows plain-HTTP registries on 127.0.0.0/8, so no daemon setting is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from serving.node.engines.base import ImageNotFound, ReplicaState
from serving.node.engines.docker.engine import DockerEngine
from tests.integration.test_engine_docker import BOOTSTRAP, IMAGE, RUN_ID, TEST_LABEL, make_spec
from tests.live import wait_for

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "puller", "s3cret-" + uuid.uuid4().hex[:8]

pytestmark = pytest.mark.docker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    address: str  # host:port, as an image reference names it
    process: subprocess.Popen[bytes]
    log: Path


def start_registry(root: Path, htpasswd: str = "") -> Registry:
    if not Path(REGISTRY_BIN).exists():
        pytest.skip(f"no {REGISTRY_BIN}: install the docker-registry package (scripts/system-deps.sh)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if htpasswd:
        (root / "htpasswd").write_text(htpasswd)
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    log = root / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # up, and asking for credentials
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"the registry exited: {log.read_text()[-2000:]}") from None
            return False
        return True

    wait_for(answers, timeout=15, what="the registry to answer")
    return Registry(f"127.0.0.1:{port}", process, log)


def stop_registry(registry: Registry) -> None:
    registry.process.terminate()
    try:
        registry.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        registry.process.kill()
        registry.process.wait()


def push(client: Any, reference: str, auth_config: dict[str, str] | None = None) -> None:
    """The local image with a layer of its own (2 MiB, random: a pull has bytes to fetch) as
    ``reference``, pushed, then removed: the node no longer has it."""
    repository, tag = reference.rsplit(":", 1)
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "blob").write_bytes(os.urandom(2 << 20))
        (Path(context) / "Dockerfile").write_text(f"FROM {IMAGE}\nCOPY blob /opt/blob\n")
        client.images.build(path=context, tag=reference, pull=False, rm=True, labels={TEST_LABEL: RUN_ID})
    try:
        for message in client.api.push(repository, tag, stream=True, decode=True, auth_config=auth_config):
            assert "error" not in message, message
    finally:
        client.images.remove(reference)


def forget(client: Any, reference: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(reference, force=True)


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"the image {IMAGE} is not built here (scripts/build-image.sh)")
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc} (start one with scripts/docker-up.sh as root)")
    yield client
    client.close()


@pytest.fixture(scope="module")
def registry(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    started = start_registry(tmp_path_factory.mktemp("registry"))
    yield started
    stop_registry(started)


def engine_for(tmp_path: Path, **kwargs: Any) -> DockerEngine:
    return DockerEngine(bootstrap_path=BOOTSTRAP, state_dir=tmp_path / "state", **kwargs)


def test_a_missing_image_is_pulled_from_an_allowed_registry_and_started(
    docker_client: Any,
    registry: Registry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.address}/test/python:{RUN_ID}-{uuid.uuid4().hex[:6]}"
    push(docker_client, reference)
    engine = engine_for(tmp_path, image_pull="missing", registries=[registry.address])
    reports: list[tuple[int, int]] = []
    info = None
    try:
        seconds = engine.ensure_image(reference, lambda done, total: reports.append((done, total)))
        assert seconds is not None and seconds > 0
        assert docker_client.images.get(reference)  # pulled
        assert reports, "no progress was reported"
        done, total = reports[-1]
        assert total > 1 << 20 and done == total
        assert all(d <= t for d, t in reports)
        assert engine.ensure_image(reference) is None  # there now: no second pull

        info = engine.start(make_spec(image=reference, command=("sleep", "60")))
        assert info.state is ReplicaState.RUNNING
        assert docker_client.containers.get(info.replica_id).attrs["Config"]["Image"] == reference
    finally:
        if info is not None:
            engine.stop(info.replica_id, grace=1)
        forget(docker_client, reference)


def test_start_pulls_by_itself_and_a_failed_pull_names_image_and_cause(
    docker_client: Any,
    registry: Registry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.address}/test/python:{RUN_ID}-start"
    push(docker_client, reference)
    engine = engine_for(tmp_path, image_pull="missing", registries=[registry.address])
    info = None
    try:
        # A cluster member's start goes straight to start(): the pull happens there too.
        info = engine.start(make_spec(image=reference, command=("sleep", "60")))
        assert info.state is ReplicaState.RUNNING
    finally:
        if info is not None:
            engine.stop(info.replica_id, grace=1)
        forget(docker_client, reference)

    absent = f"{registry.address}/test/python:never-pushed-{RUN_ID}"
    with pytest.raises(ImageNotFound) as raised:
        engine.start(make_spec(image=absent, command=("sleep", "60")))
    message = str(raised.value)
    assert message.startswith(f"Pulling the image {absent} failed: ")
    assert "manifest unknown" in message or "not found" in message
    assert docker_client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN_ID}"}) == []


def test_a_registry_not_listed_is_refused_with_a_sentence(
    docker_client: Any,
    registry: Registry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.address}/test/python:{RUN_ID}-refused"
    push(docker_client, reference)
    try:
        for listed in ([], ["ghcr.io", "127.0.0.1:1"]):
            engine = engine_for(tmp_path, image_pull="missing", registries=listed)
            with pytest.raises(ImageNotFound) as raised:
                engine.start(make_spec(image=reference, command=("sleep", "60")))
            message = str(raised.value)
            assert f"its registry {registry.address} is not one this node may pull from" in message
            assert f"add {registry.address} to SERVING_REGISTRIES" in message
            with pytest.raises(docker.errors.ImageNotFound):
                docker_client.images.get(reference)  # never pulled
    finally:
        forget(docker_client, reference)


def test_never_keeps_the_sentence_of_an_image_to_load_by_hand(
    docker_client: Any,
    registry: Registry,
    tmp_path: Path,
) -> None:
    reference = f"{registry.address}/test/python:{RUN_ID}-never"
    push(docker_client, reference)
    try:
        engine = engine_for(tmp_path, registries=[registry.address])  # image_pull="never", the default
        with pytest.raises(ImageNotFound) as raised:
            engine.start(make_spec(image=reference, command=("sleep", "60")))
        message = str(raised.value)
        assert message.startswith(f"The image {reference} is not on this node; build it on this node")
        assert "SERVING_IMAGE_PULL=missing" in message
        assert not docker_client.images.list(name=reference)
    finally:
        forget(docker_client, reference)


def bcrypt_htpasswd(user: str, password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # only here: the stdlib's bcrypt (libxcrypt), deprecated and gone in 3.13
        except ImportError:
            pytest.skip("no crypt module to write the registry's htpasswd (bcrypt) with")
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    if not hashed or not hashed.startswith("$2"):
        pytest.skip("this libc's crypt does not do bcrypt, which the registry's htpasswd needs")
    return f"{user}:{hashed}\n"


def test_credentials_come_from_the_nodes_docker_config(
    docker_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = start_registry(tmp_path / "private", htpasswd=bcrypt_htpasswd(USER, PASSWORD))
    reference = f"{private.address}/team/python:{RUN_ID}"
    try:
        push(docker_client, reference, auth_config={"username": USER, "password": PASSWORD})

        # Without credentials the registry says no, and the sentence says so.
        empty = tmp_path / "no-auth"
        empty.mkdir()
        (empty / "config.json").write_text("{}")
        monkeypatch.setenv("DOCKER_CONFIG", str(empty))
        engine = engine_for(tmp_path / "a", image_pull="missing", registries=[private.address])
        with pytest.raises(ImageNotFound, match=rf"^Pulling the image {reference} failed: .*(auth|unauthorized)"):
            engine.ensure_image(reference)

        # The node's Docker config (what `docker login` writes) is what a pull uses.
        config = tmp_path / "docker-config"
        config.mkdir()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (config / "config.json").write_text(json.dumps({"auths": {private.address: {"auth": token}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
        engine = engine_for(tmp_path / "b", image_pull="missing", registries=[private.address])
        assert engine.ensure_image(reference) is not None
        assert docker_client.images.get(reference)
    finally:
        forget(docker_client, reference)
        stop_registry(private)


# --- the node side: a start shows the pull on the route and says how long it took -------------------


class Observed(DockerEngine):
    """The real engine; each progress report is followed by a look at what the API shows then."""

    seen: list[Any]
    look: Any

    def ensure_image(self, image: str, progress: Any = None) -> float | None:
        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            self.seen.append(self.look())

        return super().ensure_image(image, report)


@pytest.mark.django_db
def test_a_nodes_start_shows_pull_progress_on_the_route_and_the_pull_time_in_the_log(
    docker_client: Any, registry: Registry, tmp_path: Path, api: Any, personas: Any
) -> None:
    from serving.models import Endpoint, Node, Route, ServiceEvent
    from serving.node import engine as node_engine
    from serving.node import routes
    from tests.factories import SIMPLE_DEFINITION, FolderFactory

    reference = f"{registry.address}/test/python:{RUN_ID}-node"
    push(docker_client, reference)
    folder = FolderFactory(owner=personas["owner"], name="pull", files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = {"name": "pulls", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    endpoint = Endpoint.objects.get(pk=created.json()["id"])
    Endpoint.objects.filter(pk=endpoint.pk).update(image=reference)
    here = Node.objects.create(name=node_engine.node_name(), address="127.0.0.1")
    route = Route.objects.create(endpoint=endpoint, node=here)
    url = f"/api/v1/services/{endpoint.pk}/"

    def look() -> Any:
        shown = api("owner").get(url).json()["routes"]
        return next(r for r in shown if r["id"] == str(route.pk))["pull_progress"]

    engine = Observed(
        bootstrap_path=BOOTSTRAP, state_dir=tmp_path / "state", image_pull="missing", registries=[registry.address]
    )
    engine.seen, engine.look = [], look
    node_engine.set_engine(engine)
    try:
        routes.start_route(str(route.pk))
        route.refresh_from_db()
        assert route.status == Route.Status.DEGRADED, route.error
        # Written at the first report (then at most every 0.5 s), shown by the API as {done, total}.
        assert engine.seen and engine.seen[0].keys() == {"done", "total"}
        assert all(0 <= p["done"] <= p["total"] for p in engine.seen if p)
        assert route.pull_progress == {}  # gone once started
        pulled = ServiceEvent.objects.get(endpoint=endpoint, kind="image_pulled")
        assert f"pulled the image {reference} in " in pulled.message and pulled.data["seconds"] > 0
        # Strangers see nothing of it.
        assert api("stranger").get(url).status_code == 404
    finally:
        node_engine.set_engine(None)
        route.refresh_from_db()
        if route.container_id:
            engine.stop(route.container_id, grace=1)
        forget(docker_client, reference)

    # A registry the node may not use: a failed start whose sentence names the image and the fix.
    refused = Route.objects.create(endpoint=endpoint, node=here)
    node_engine.set_engine(engine_for(tmp_path, image_pull="missing", registries=["ghcr.io"]))
    try:
        routes.start_route(str(refused.pk))
    finally:
        node_engine.set_engine(None)
    refused.refresh_from_db()
    assert refused.status == Route.Status.FAILED_TO_START
    assert refused.error["kind"] == "image"
    assert f"add {registry.address} to SERVING_REGISTRIES" in refused.error["message"]
    shown = api("owner").get(url).json()["routes"]
    assert next(r for r in shown if r["id"] == str(refused.pk))["error"].startswith(f"The image {reference} is not")
