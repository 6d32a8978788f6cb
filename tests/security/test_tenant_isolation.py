"""Tenant isolation (issue 13): attacks one tenant's replica could make on the host or on another
tenant, each tried for real and shown not to work.

* Docker: replicas of different services share no network where they reach each other: a
  replica of service A can not reach service B's replica by its container address, nor by the
  port published on the node's address (that would skip the proxy's tokens); with
  ``SERVING_REPLICA_EGRESS=deny`` it reaches none of the host's addresses either, while the
  proxy's way in, the published port, still works, and cluster members still reach each other.
  The local engine's sandboxes, with deny, do not reach the host either.
* Docker: a replica runs as nobody, so what it writes on a read-write mount is not root's; the
  setuid bits it sets there are cleared when it stops (on both engines); what it wrote counts
  against the folder's quota at the next upload.
* Local engine: a user's environment (``LD_PRELOAD`` of a shared object uploaded into the model
  folder, ``PATH``, ``BASH_ENV``, ...) must never reach the prelude that runs as uid 0 with
  CHOWN/SETUID/SETGID before the sandbox drops to ``nobody``: the shared object's constructor must
  never run as root, and no setuid-root file may appear on a read-write mount. Loader variables are
  refused where users set them (API, launcher, ``service-definition.toml``), as defence in depth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.node.engines.base import LABEL_ENDPOINT, Mount, PreStartActionSpec
from tests.integration import test_engine_docker as docker_tests
from tests.integration import test_engine_local as local_tests
from tests.integration.test_engine_docker import bootstrap_path, docker_client  # noqa: F401  (fixtures)
from tests.security.test_confinement import PROBE

needs_local = pytest.mark.skipif(local_tests._why_not() is not None, reason=str(local_tests._why_not()))
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (apt-get install gcc)")

# The attacker's shared object: its constructor runs in every process that loads it. It records
# who it ran as, and then tries what root with CAP_CHOWN could do: leave a setuid-root file on the
# read-write mount, which stays on the host after the replica is gone.
EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

__attribute__((constructor)) static void evil(void) {
    char path[256];
    snprintf(path, sizeof path, "/data/ran-as-%d-pid-%d", (int)geteuid(), (int)getpid());
    int fd = open(path, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0)
        close(fd);
    snprintf(path, sizeof path, "/data/rootshell-%d", (int)getpid());
    fd = open(path, O_CREAT | O_WRONLY, 0755);
    if (fd >= 0) {
        fchown(fd, 0, 0);
        fchmod(fd, 04755);
        close(fd);
    }
}
"""


def build_evil_so(folder: Path, tmp_path: Path) -> Path:
    """Compile the attacker's shared object into the model folder, as an upload would put it."""
    source = tmp_path / "evil.c"
    source.write_text(EVIL_C)
    target = folder / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(target), str(source)], check=True, capture_output=True)
    target.chmod(0o644)
    return target


def setuid_files(folder: Path) -> list[str]:
    """Files under ``folder`` that would run with their owner's (root's, or nobody's) privileges."""
    found = []
    for path in folder.rglob("*"):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_mode & (stat.S_ISUID | stat.S_ISGID):
            found.append(f"{path.name} uid={info.st_uid}")
    return found


@needs_local
@needs_gcc
def test_ld_preload_from_the_model_folder_never_runs_as_root_in_the_sandbox_prelude(
    local_engine: Any, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "server.py").write_text(local_tests.SERVER)
    build_evil_so(model, tmp_path)
    data = tmp_path / "data"  # a read-write extra mount the replica's user may write
    data.mkdir()
    data.chmod(0o777)
    hostile = {
        "LD_PRELOAD": "/models/evil.so",
        "PATH": "/models:/usr/bin:/bin",  # a chown/cat/setpriv of the user's would come first
        "BASH_ENV": "/models/server.py",
        "ENV": "/models/server.py",
        "GCONV_PATH": "/models",
    }
    (model / "chown").write_text("#!/bin/sh\ntouch /data/fake-chown-ran-as-$(id -u)\n")
    (model / "chown").chmod(0o755)
    mounts = (Mount(str(model), "/models", read_only=True), Mount(str(data), "/data", read_only=False))
    for actions in ((), (PreStartActionSpec("log", {"message": "with the pre-start runner"}),)):
        info = local_engine.start(local_tests.spec(model, mounts=mounts, env=hostile, pre_start_actions=actions))
        assert local_tests.serving(local_engine, info.replica_id, "/pid")[0] == 200
        local_engine.stop(info.replica_id, grace=0)
    ran_as = {int(p.name.split("-")[2]) for p in data.glob("ran-as-*")}
    # The user's own process does load it (their business: it runs as nobody), the prelude never.
    assert ran_as == {65534}, sorted(p.name for p in data.iterdir())
    # Not root's (the prelude never ran it), and nobody's setuid bit cleared once the replica stopped.
    assert setuid_files(data) == [], sorted(p.name for p in data.iterdir())
    assert not list(data.glob("fake-chown-*")), sorted(p.name for p in data.iterdir())
    leftovers = [p for p in data.glob("rootshell-*") if p.stat().st_uid == 0]
    assert leftovers == []


@needs_local
def test_a_setuid_root_file_on_an_extra_mount_gives_the_replica_no_privileges(
    local_engine: Any, tmp_path: Path
) -> None:
    """Extra mounts are nosuid,nodev inside the sandbox (bwrap binds them so) and the replica has
    NoNewPrivs: a setuid-root program another tenant's root once left in a data folder stays inert."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "server.py").write_text(local_tests.SERVER)
    data = tmp_path / "data"
    data.mkdir()
    planted = data / "suid-id"
    shutil.copy("/usr/bin/id", planted)
    os.chown(planted, 0, 0)
    planted.chmod(0o4755)
    mounts = (Mount(str(model), "/models", read_only=True), Mount(str(data), "/data", read_only=False))
    actions = (PreStartActionSpec("run_command", {"command": ["/data/suid-id", "-u"]}),)
    info = local_engine.start(local_tests.spec(model, mounts=mounts, pre_start_actions=actions))
    status, mountinfo = local_tests.serving(local_engine, info.replica_id, "/read?path=/proc/self/mountinfo")
    assert status == 200
    data_mount = next(line for line in mountinfo.splitlines() if line.split()[4] == "/data")
    assert {"nosuid", "nodev"} <= set(data_mount.split()[5].split(",")), data_mount
    lines = list(local_engine.logs(info.replica_id))
    assert "[prestart] action 0 (run_command) out: 65534" in lines, lines


@pytest.mark.docker
def test_with_egress_denied_cluster_members_still_reach_each_other_and_not_the_host(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    import http.server

    from serving.node.engines.base import LABEL_ROLE, LABEL_ROUTE, ClusterPeering
    from serving.node.engines.docker.engine import DockerEngine

    address = host_address()
    if address is None:
        pytest.skip("this host has no address besides loopback to try")
    host_server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=host_server.serve_forever, daemon=True).start()
    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", egress="deny")
    model = tmp_path / "model"
    model.mkdir()
    (model / "peer.py").write_text(docker_tests.PEER_SERVER)
    key = str(uuid.uuid4())

    def member(host: str) -> Any:
        return docker_tests.make_spec(
            model,
            command=("python3", "/models/peer.py"),
            env={"BACKENDAI_CLUSTER_HOST": host},
            labels={
                LABEL_ROUTE: key,
                LABEL_ROLE: "main" if host == "main1" else host,
                docker_tests.TEST_LABEL: docker_tests.RUN_ID,
            },
            cluster=ClusterPeering(key=key, host=host, hosts=("main1", "sub1")),
        )

    started = []
    try:
        started.append(engine.start(member("main1")))
        started.append(engine.start(member("sub1")))
        main, sub = started
        for info in started:
            docker_tests.wait_until(lambda info=info: fetch("127.0.0.1", info.port, "/whoami"), 30, "a member")
        assert fetch("127.0.0.1", main.port, "/fetch?url=http://sub1:8000/whoami") == "sub1"
        assert fetch("127.0.0.1", sub.port, "/fetch?url=http://main1:8000/whoami") == "main1"
        host_url = f"http://{address}:{host_server.server_address[1]}/"
        assert urllib.request.urlopen(host_url, timeout=5).status == 200  # the host itself answers
        assert (fetch("127.0.0.1", main.port, f"/fetch?url={host_url}") or "").startswith("failed:")
    finally:
        for info in started:
            engine.stop(info.replica_id, grace=0)
        host_server.shutdown()
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
    assert engine._bridge_name(f"ms-cluster-{key}") not in rules  # gone with the cluster's network


@needs_local
def test_with_egress_denied_a_local_replica_reaches_none_of_the_hosts_addresses(tmp_path: Path) -> None:
    """A sandbox has no route past the host; with deny it does not reach the host itself either
    (a service listening on 0.0.0.0), while the host still reaches the replica."""
    import ipaddress

    from serving.node.engines.local.engine import LocalEngine

    model = probe_model(tmp_path)
    results = {}
    with host_listener() as port:
        for egress in ("allow", "deny"):
            engine = LocalEngine(tmp_path / f"state-{egress}", netns_prefix=local_tests.PREFIX, egress=egress)
            try:
                info = engine.start(local_tests.spec(model))
                host = str(ipaddress.ip_address(info.host) - 1)  # the host's end of the replica's veth
                targets = [f"{host}:{port}"]
                if address := host_address():
                    targets.append(f"{address}:{port}")  # no route there (either way): never reached
                query = urllib.parse.urlencode({"connect": targets}, doseq=True)
                url = (info.host, info.port, "/?" + query)
                body = local_tests.wait_until(lambda url=url: fetch(*url), 30, "the probe")
                results[egress] = json.loads(body)["connect"]
            finally:
                for replica in engine.list():
                    engine.stop(replica.replica_id, grace=0)
                engine.cleanup_orphans()
    veth = next(iter(results["allow"]))  # the host's end of the replica's veth
    assert results["allow"][veth].startswith("ok"), results  # so the refusals below mean it
    assert not any(result.startswith("ok") for result in results["deny"].values()), results
    rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
    assert f"modelserve-egress {local_tests.PREFIX}" not in rules  # gone with the last replica


@needs_local
def test_with_egress_denied_a_local_replica_reaches_no_host_service_over_ipv6_link_local(tmp_path: Path) -> None:
    """The deny rule is IPv4; a veth gets IPv6 link-local addresses (fe80::) by default, which
    would let a sandbox reach a host service listening on [::]. Neither end has IPv6."""
    if not Path("/proc/sys/net/ipv6").exists():
        pytest.skip("this kernel has no IPv6")
    from serving.node.engines.local.engine import LocalEngine

    model = probe_model(tmp_path)
    server = socket.create_server(("::", 0), family=socket.AF_INET6, backlog=16)
    engine = LocalEngine(tmp_path / "state", netns_prefix=local_tests.PREFIX, egress="deny")
    try:
        port = int(server.getsockname()[1])
        info = engine.start(local_tests.spec(model))
        host_if = engine._meta(info.replica_id)["network"]["host_if"]
        # The link-local address the kernel would have given the host's end (EUI-64 of its MAC).
        mac = bytearray(bytes.fromhex(Path(f"/sys/class/net/{host_if}/address").read_text().strip().replace(":", "")))
        mac[0] ^= 0x02
        eui = mac[:3] + b"\xff\xfe" + mac[3:]
        link_local = "fe80::" + ":".join(eui[i : i + 2].hex() for i in range(0, 8, 2))
        query = urllib.parse.urlencode(
            {"connect": [f"{link_local}%eth0:{port}", f"ff02::1%eth0:{port}"], "read": ["/proc/net/if_inet6"]},
            doseq=True,
        )
        url = (info.host, info.port, "/?" + query)
        facts = json.loads(local_tests.wait_until(lambda: fetch(*url), 30, "the probe"))
        # An address still in duplicate address detection can not be used yet (EADDRNOTAVAIL): an
        # attacker just waits the second, so does the test.
        deadline = time.monotonic() + 5
        while "Cannot assign requested address" in facts["connect"].values() and time.monotonic() < deadline:
            time.sleep(0.2)
            facts = json.loads(fetch(*url))
        assert not any(result.startswith("ok") for result in facts["connect"].values()), facts["connect"]
        assert Path(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6").read_text().strip() == "1"
        host_addresses = subprocess.run(
            ["ip", "-6", "addr", "show", "dev", host_if], capture_output=True, text=True, check=True
        ).stdout
        assert "inet6" not in host_addresses, host_addresses
        # Inside: only the sandbox's own loopback has an IPv6 address.
        inet6 = facts["read"]["/proc/net/if_inet6"]
        assert inet6.startswith("ok") and "eth0" not in inet6, inet6
    finally:
        for replica in engine.list():
            engine.stop(replica.replica_id, grace=0)
        engine.cleanup_orphans()
        server.close()


def test_egress_deny_without_root_is_refused_by_the_local_engine_with_a_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without root the sandbox's network is pasta's, an outbound NAT through the host's own sockets
    that no firewall rule sees: deny can not be kept, so the engine says so instead of ignoring it."""
    from serving.node.engines.base import EngineError
    from serving.node.engines.local import engine as local

    engine = local.LocalEngine(tmp_path / "state", egress="deny")
    engine._bwrap, engine._pasta = "/usr/bin/bwrap", "/usr/bin/pasta"
    monkeypatch.setattr(local.os, "geteuid", lambda: 1000)
    reason = engine.unavailable_reason()
    assert reason is not None and "SERVING_REPLICA_EGRESS=deny needs the node worker to run as root" in reason
    assert "set SERVING_REPLICA_EGRESS=allow" in reason
    with pytest.raises(EngineError, match=r"can not start replicas here: SERVING_REPLICA_EGRESS=deny"):
        engine.start(local_tests.spec(tmp_path))
    allowed = local.LocalEngine(tmp_path / "state2", egress="allow")
    allowed._bwrap, allowed._pasta = "/usr/bin/bwrap", "/usr/bin/pasta"
    assert allowed.unavailable_reason() is None  # allow without root still runs, through pasta


# --- refused where users set them (defence in depth) ------------------------------------------------

LOADER_NAMES = ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH"]


@pytest.mark.django_db
@pytest.mark.parametrize("name", LOADER_NAMES)
def test_ld_preload_in_a_services_environment_is_refused_with_a_sentence(api: Any, personas: Any, name: str) -> None:
    from tests.factories import SIMPLE_DEFINITION, FolderFactory

    folder = FolderFactory(owner=personas["owner"], name="evil", files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = {"name": "evil", "folder": str(folder.pk), "runtime": "custom", "environ": {name: "/models/evil.so"}}
    for url in ("/api/v1/services/", "/api/v1/services/validate/"):
        response = api("owner").post(url, body, format="json")
        assert response.status_code == 400, response.json()
        message = response.json()["environ"][0]
        assert message.startswith(f"{name} is refused: it makes the dynamic loader") and "start command" in message
    # Nor by modifying a service that was created without it.
    created = api("owner").post("/api/v1/services/", {**body, "environ": {"OK": "1"}}, format="json")
    assert created.status_code == 201, created.json()
    url = f"/api/v1/services/{created.json()['id']}/"
    response = api("owner").patch(url, {"environ": {name: "/models/evil.so"}}, format="json")
    assert response.status_code == 400 and response.json()["environ"][0].startswith(f"{name} is refused")
    # Variables that merely look alike stay allowed.
    for harmless in ("TMPDIR", "XLD_PRELOAD", "MY_LD_PRELOAD"):
        response = api("owner").patch(url, {"environ": {harmless: "x"}}, format="json")
        assert response.status_code == 200, response.json()


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["MODÈLE", "ÉTAPE", "1ABC", "A-B", "A B", "\uff21\uff22\uff23"])
def test_a_non_ascii_or_malformed_variable_name_is_refused_at_create_with_a_sentence(
    api: Any, personas: Any, name: str
) -> None:
    """The API took what str.isalpha() takes (MODÈLE), the local engine only ASCII names: the
    service was created, then failed at start. One rule (definitions.ENV_NAME) refuses it at once."""
    from tests.factories import SIMPLE_DEFINITION, FolderFactory

    folder = FolderFactory(owner=personas["owner"], name="env", files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = {"name": "envs", "folder": str(folder.pk), "runtime": "custom", "environ": {name: "x"}}
    for url in ("/api/v1/services/", "/api/v1/services/validate/"):
        response = api("owner").post(url, body, format="json")
        assert response.status_code == 400, response.json()
        message = response.json()["environ"][0]
        assert f"{name!r} is not a valid environment variable name" in message, message
        assert "ASCII letters, digits and _" in message, message
    created = api("owner").post(
        "/api/v1/services/", {**body, "environ": {"MODEL_NAME": "x", "_x1": "y"}}, format="json"
    )
    assert created.status_code == 201, created.json()


def test_the_api_the_folder_definition_and_the_local_engine_share_one_variable_name_rule() -> None:
    from serving.core import definitions
    from serving.node.engines.local import sandbox

    assert sandbox.ENV_NAME is definitions.ENV_NAME
    for good in ("MODEL_NAME", "_x", "a1"):
        assert definitions.ENV_NAME.match(good)
    for bad in ("MODÈLE", "1A", "A-B", "A\n", ""):
        assert not definitions.ENV_NAME.match(bad)


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_ld_preload_in_a_folders_service_definition_is_refused_with_a_sentence(name: str) -> None:
    from serving.core.definitions import DefinitionError, parse_service_definition

    toml = f"[custom.environment]\nimage = 'x'\narchitecture = 'x86_64'\n[custom.environ]\n{name} = '/models/evil.so'\n"
    with pytest.raises(DefinitionError) as info:
        parse_service_definition(toml)
    [problem] = info.value.problems
    assert problem.field == f"custom.environ.{name}" and problem.line == 5, problem
    assert problem.message.startswith(f"{name} is refused: it makes the dynamic loader"), problem.message


# --- Docker: networks ---------------------------------------------------------------------------------


def host_address() -> str | None:
    """The host's own address on its main network (not a loopback one), if it has one."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the route's source
        address = str(probe.getsockname()[0])
        return None if address.startswith("127.") else address
    return None


@contextlib.contextmanager
def host_listener(below_ephemeral: bool = False) -> Iterator[int]:
    """A TCP port the host answers on all its addresses: what a replica must not reach with deny.
    An ephemeral one (where Docker publishes replicas), or with ``below_ephemeral`` one under that
    range (where a shared service such as the proxy listens)."""
    if below_ephemeral:
        from serving.node.engines.firewall import ephemeral_port_range

        low = ephemeral_port_range()[0]
        for port in range(low - 1, max(low - 2000, 1024), -1):
            with contextlib.suppress(OSError):
                server = socket.create_server(("0.0.0.0", port), backlog=64)
                break
        else:
            pytest.skip("no free port below the ephemeral range")
    else:
        server = socket.create_server(("0.0.0.0", 0), backlog=64)
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                server.accept()[0].close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        server.close()


def fetch(host: str, port: int, path: str = "/") -> str | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=20) as answer:
            return str(answer.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def container_address(client: Any, replica_id: str) -> str:
    networks = client.api.inspect_container(replica_id)["NetworkSettings"]["Networks"]
    return str(next(n["IPAddress"] for n in networks.values() if n.get("IPAddress")))


def probe_model(tmp_path: Path) -> Path:
    folder = tmp_path / f"probe-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "server.py").write_text(PROBE)
    return folder


def service_replica(engine: Any, model: Path, service: str) -> Any:
    spec = docker_tests.make_spec(model)
    return engine.start(
        docker_tests.make_spec(model, labels={**spec.labels, LABEL_ENDPOINT: f"{service}-{docker_tests.RUN_ID}"})
    )


def connects(engine: Any, info: Any, targets: list[str]) -> dict[str, str]:
    """What the replica ``info`` gets when it opens a connection to each ``host:port``."""
    query = urllib.parse.urlencode({"connect": targets}, doseq=True)
    host = engine.publish_host
    body = docker_tests.wait_until(lambda: fetch(host, info.port, "/?" + query), 30, "the probe replica")
    return dict(json.loads(body)["connect"])


@pytest.mark.docker
def test_a_replica_of_one_service_can_not_reach_another_services_replica_on_docker(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from serving.node.engines.docker.engine import DockerEngine

    address = host_address()
    engine = DockerEngine(
        bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", publish_host=address or "127.0.0.1"
    )
    model = probe_model(tmp_path)
    started = []
    try:
        with host_listener() as port:
            a = service_replica(engine, model, "service-a")
            started.append(a)
            b = service_replica(engine, model, "service-b")
            started.append(b)
            b_inside = f"{container_address(docker_client, b.replica_id)}:8000"
            targets = [b_inside, f"GATEWAY:{port}"]
            if address:
                targets.append(f"{address}:{b.port}")  # B's published port on the node's address
            # B serves (the proxy's way in, its published port, works) before A tries it.
            b_answers = docker_tests.wait_until(lambda: fetch(engine.publish_host, b.port), 30, "service B")
            reached = connects(engine, a, targets)
    finally:
        for info in started:
            engine.stop(info.replica_id, grace=0)
    assert b_answers
    assert not reached[b_inside].startswith("ok"), reached
    if address:
        assert not reached[f"{address}:{b.port}"].startswith("ok"), reached
    # With egress allowed the host answers: the probe can connect, so the refusals above mean it.
    assert reached[f"GATEWAY:{port}"].startswith("ok"), reached


@pytest.mark.docker
def test_with_egress_denied_a_docker_replica_reaches_none_of_the_hosts_addresses(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from serving.node.engines.docker.engine import DockerEngine

    network = f"ms-replicas-t{docker_tests.RUN_ID}"
    engine = DockerEngine(
        bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", egress="deny", replica_network=network
    )
    model = probe_model(tmp_path)
    started = []
    try:
        with host_listener() as port:
            a = service_replica(engine, model, "service-a")
            started.append(a)
            targets = [f"GATEWAY:{port}", f"172.17.0.1:{port}"]  # docker0: another of the host's addresses
            if address := host_address():
                targets.append(f"{address}:{port}")
            reached = connects(engine, a, targets)  # the published port answers: the way in works
    finally:
        for info in started:
            engine.stop(info.replica_id, grace=0)
        assert engine.remove_replica_network()  # the engine keeps it; the test removes its own
    assert {target: result for target, result in reached.items() if result.startswith("ok")} == {}, reached
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
    assert engine._bridge_name(network) not in rules  # removed with its network


# --- Docker: what replicas leave on read-write mounts ------------------------------------------------

# Run by the replica: who am I, then a copy of a shell made setuid, then some bytes for the quota.
PLANT = (
    "id -u > /data/whoami; cp /bin/busybox /data/shell; chmod 6755 /data/shell; "
    "mkdir -p /data/sub && cp /data/shell /data/sub/shell2 && chmod 4755 /data/sub/shell2; "
    "head -c 65536 /dev/zero > /data/blob; touch /data/done; exec sleep 600"
)


def privileged_files(folder: Path) -> list[str]:
    """Files under ``folder`` that belong to root, or that would run with their owner's privileges."""
    found = []
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        if info.st_uid == 0 or info.st_gid == 0 or (stat.S_ISREG(info.st_mode) and info.st_mode & 0o6000):
            found.append(f"{path.relative_to(folder)} uid={info.st_uid} mode={oct(info.st_mode)}")
    return found


@pytest.mark.docker
def test_a_docker_replica_leaves_no_root_owned_or_setuid_file_on_a_read_write_mount(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from serving.node.engines.docker.engine import DockerEngine

    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 12345, 12345)  # a folder the replica's user may write, as an operator set it up
    data.chmod(0o777)
    spec = docker_tests.make_spec(command=("sh", "-c", PLANT), mounts=(Mount(str(data), "/data", read_only=False),))
    info = engine.start(spec)
    try:
        docker_tests.wait_until((data / "done").exists, 30, "the replica to write its files")
        assert (data / "whoami").read_text().strip() == "65534"
        # Home and /tmp are the replica's own, as on the local engine.
        done = docker_client.containers.get(info.replica_id).exec_run(["sh", "-c", "touch /home/work/x /tmp/x"])
        assert done.exit_code == 0, done.output
    finally:
        engine.stop(info.replica_id, grace=0)
    assert privileged_files(data) == [], privileged_files(data)
    assert (data / "blob").stat().st_size == 65536  # the data itself stays


@pytest.mark.docker
@pytest.mark.django_db
def test_what_a_docker_replica_writes_counts_against_the_folders_quota_and_refuses_uploads(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
    api: Any,
    personas: Any,
) -> None:
    """What is enforced: usage is measured from the folder's files at every upload and read-back,
    so a replica's 64 KiB in a 32 KiB folder show in ``used_bytes`` and refuse further uploads. Not
    enforced: a replica writing past the quota while it runs (that needs filesystem quotas)."""
    from serving.node.engines.docker.engine import DockerEngine
    from tests.factories import FolderFactory

    folder = FolderFactory(owner=personas["owner"], name="scratch", usage_mode="data", quota_bytes=32 * 1024)
    data = Path(folder.host_path)
    os.chown(data, 12345, 12345)  # writable by the replica's user, as an operator set it up
    data.chmod(0o777)
    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state")
    spec = docker_tests.make_spec(command=("sh", "-c", PLANT), mounts=(Mount(str(data), "/data", read_only=False),))
    info = engine.start(spec)
    try:
        docker_tests.wait_until((data / "done").exists, 30, "the replica to write its files")
    finally:
        engine.stop(info.replica_id, grace=0)
    used = api("owner").get(f"/api/v1/folders/{folder.pk}/").json()["used_bytes"]
    assert used >= 65536, used
    refused = api("owner").put(
        f"/api/v1/folders/{folder.pk}/files/more.bin", b"x" * 10, content_type="application/octet-stream"
    )
    assert refused.status_code == 413, refused.content
    assert "would exceed the folder's quota of 32.0 KiB" in refused.json()["detail"], refused.json()
    assert privileged_files(data) == [], privileged_files(data)


def test_egress_deny_without_firewall_rights_refuses_to_start_and_allow_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """deny is a promise: a node that can not keep it (no root, no iptables) starts no replica;
    allow's guard of NODE_ADDRESS is hardening, so a worker without root only says what it lacks."""
    from serving.node.engines.base import EngineError
    from serving.node.engines.docker.engine import DockerEngine

    denied = DockerEngine(state_dir=tmp_path, egress="deny")
    denied.networks.rules.iptables = None
    with pytest.raises(EngineError, match=r"SERVING_REPLICA_EGRESS=deny .* run the node worker as root with iptables"):
        denied._guard_bridge("msrtest")
    allowed = DockerEngine(state_dir=tmp_path, publish_host="10.0.0.5")
    allowed.networks.rules.iptables = None
    allowed._guard_bridge("msrtest")
    assert "can open connections to the published replica ports of the nodes' addresses 10.0.0.5" in caplog.text
    with pytest.raises(EngineError, match=r"SERVING_REPLICA_EGRESS='open' is not one of allow, deny"):
        DockerEngine(state_dir=tmp_path, egress="open")
    with pytest.raises(EngineError, match=r"set DOCKER_REPLICA_UID to a number"):
        DockerEngine(state_dir=tmp_path, uid=-1)


@contextlib.contextmanager
def fake_node_address() -> Iterator[str]:
    """Another node's address, played by an extra address of this host (on lo: no dummy interface
    module is needed): a replica reaches it the way it reaches a second node's published ports."""
    tag = uuid.uuid4().bytes
    address = f"10.254.{tag[0]}.{tag[1] % 250 + 2}"
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)


@pytest.mark.docker
def test_a_docker_replica_can_not_reach_another_nodes_published_ports(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With egress allowed a replica reaches what the host reaches, but not any node's address
    (the Node table's, refreshed at heartbeat): there the other nodes publish their replicas'
    ports, and calling one that way would skip the proxy's tokens."""
    if os.geteuid() != 0:
        pytest.skip("adding an address and firewall rules needs root")
    from serving.node.engines.docker.engine import DockerEngine

    network = f"ms-replicas-t{docker_tests.RUN_ID}-nodes"
    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", replica_network=network)
    # Another worker process of the same node: its engine was never told node B's address.
    worker = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state", replica_network=network)
    model = probe_model(tmp_path)
    started = []
    try:
        with host_listener() as port, host_listener(below_ephemeral=True) as shared, fake_node_address() as node_b:
            a = service_replica(engine, model, "service-a")
            started.append(a)
            target, service = f"{node_b}:{port}", f"{node_b}:{shared}"
            before = connects(engine, a, [target])[target]
            engine.set_node_addresses(["127.0.0.1", node_b])  # node B registered (loopback ignored)
            started.append(service_replica(worker, model, "service-b"))  # a start in the other worker
            during = connects(engine, a, [target, service])
            rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
            engine.set_node_addresses(["127.0.0.1"])  # node B left the table: its rules go
            after = connects(engine, a, [target])[target]
    finally:
        for info in started:
            engine.stop(info.replica_id, grace=0)
        engine.remove_replica_network()
    assert before.startswith("ok"), before  # the address answers: the refusal below means it
    # Still dropped after the other worker's start: that start left node B's rules in place.
    assert not during[target].startswith("ok"), during
    # A port outside the range Docker publishes on (a proxy, a shared service) stays reachable.
    assert during[service].startswith("ok"), during
    assert f"-d {node_b}/32" in rules and engine._bridge_name(network) in rules
    assert after.startswith("ok"), after


@pytest.mark.django_db
def test_the_node_agent_hands_the_engine_every_nodes_address_at_heartbeat(settings: Any) -> None:
    from serving.models import Node
    from serving.node import agent
    from serving.node import engine as node_engine

    class Engine:
        name = "docker"
        seen: list[list[str]] = []

        def set_node_addresses(self, addresses: list[str]) -> None:
            self.seen.append(sorted(addresses))

    Node.objects.create(name="other", address="10.0.0.7")
    Node.objects.create(name="no-address", address="")
    settings.NODE_ADDRESS = "10.0.0.5"
    engine = Engine()
    node_engine.set_engine(engine)  # type: ignore[arg-type]
    try:
        agent.heartbeat()
    finally:
        node_engine.set_engine(None)
    assert engine.seen == [["10.0.0.5", "10.0.0.7"]]


@pytest.mark.django_db
def test_a_start_in_any_worker_hands_the_engine_every_nodes_address_first(api: Any, personas: Any) -> None:
    """Starts run in forked workers, whose engine never saw a heartbeat: without the addresses a
    start could not keep the other nodes' rules, so the node side hands them over first."""
    from serving.models import Endpoint, Node, Route
    from serving.node import engine as node_engine
    from serving.node import routes
    from serving.node.engines.base import EngineError
    from tests.factories import SIMPLE_DEFINITION, FolderFactory

    folder = FolderFactory(owner=personas["owner"], name="addr", files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = {"name": "addresses", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    here = Node.objects.create(name=node_engine.node_name(), address="10.0.0.5")
    Node.objects.create(name="other", address="10.0.0.7")
    route = Route.objects.create(endpoint=Endpoint.objects.get(pk=created.json()["id"]), node=here)

    class Engine:
        name = "docker"
        calls: list[object] = []

        def set_node_addresses(self, addresses: list[str]) -> None:
            self.calls.append(sorted(addresses))

        def start(self, spec: object) -> None:
            self.calls.append("start")
            raise EngineError("no start in this test")

    engine = Engine()
    node_engine.set_engine(engine)  # type: ignore[arg-type]
    try:
        routes.start_route(str(route.pk))
    finally:
        node_engine.set_engine(None)
    assert engine.calls == [["10.0.0.5", "10.0.0.7"], "start"]


# --- a read-write mount the replica's user can not write: said, not silent ---------------------------


def unwritable_data(tmp_path: Path) -> Path:
    """A folder as storage makes them: 0755, owned by the web app's user (here the test's)."""
    data = tmp_path / f"outputs-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    data.chmod(0o755)
    return data


@needs_local
def test_a_local_replica_with_a_read_write_mount_it_can_not_write_starts_and_says_so(tmp_path: Path) -> None:
    from serving.node.engines.local.engine import LocalEngine

    if os.geteuid() != 0:
        pytest.skip("without root the replica runs as the worker's user, who owns the folder")
    data = unwritable_data(tmp_path)
    engine = LocalEngine(tmp_path / "state", netns_prefix=local_tests.PREFIX)
    model = probe_model(tmp_path)
    spec = local_tests.spec(model, mounts=(Mount(str(model), "/models"), Mount(str(data), "/data", read_only=False)))
    try:
        info = engine.start(spec)
        [warning] = info.warnings
        assert "The read-write mount /data is not writable by the replica's user (uid 65534" in warning
        assert "or mount it read-only" in warning and str(data) not in warning
        log = "\n".join(engine.logs(info.replica_id, tail=200))
        # The replica's log names the host path, for whoever fixes it on the node.
        assert f"[engine] warning: The read-write mount /data ({data}) is not writable" in log, log
        # It still starts, and what it meets is the EACCES the warning announced.
        query = urllib.parse.urlencode({"write": ["/data/out"]}, doseq=True)
        body = local_tests.wait_until(lambda: fetch(info.host, info.port, "/?" + query), 30, "the probe")
        assert json.loads(body)["write"]["/data/out"] == "Permission denied"
    finally:
        for replica in engine.list():
            engine.stop(replica.replica_id, grace=0)
        engine.cleanup_orphans()


@pytest.mark.docker
def test_a_docker_replica_with_a_read_write_mount_it_can_not_write_starts_and_says_so(
    docker_client: Any,  # noqa: F811
    bootstrap_path: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from serving.node.engines.docker.engine import DockerEngine

    data = unwritable_data(tmp_path)
    writable = unwritable_data(tmp_path)
    writable.chmod(0o777)
    engine = DockerEngine(bootstrap_path=bootstrap_path, state_dir=tmp_path / "state")
    model = probe_model(tmp_path)
    spec = docker_tests.make_spec(model)
    spec = dataclasses.replace(
        spec, mounts=(*spec.mounts, Mount(str(data), "/data", read_only=False), Mount(str(writable), "/out", False))
    )
    info = engine.start(spec)
    try:
        [warning] = info.warnings  # the 0777 folder is fine
        assert "The read-write mount /data is not writable by the replica's user (uid 65534" in warning
        assert str(data) not in warning
        assert engine.inspect(info.replica_id).state.value == "running"
        lines = list(engine.logs(info.replica_id, tail=50))
        assert lines[0].startswith(f"[engine] warning: The read-write mount /data ({data}) is not writable"), lines
        query = urllib.parse.urlencode({"write": ["/data/out", "/out/ok"]}, doseq=True)
        body = docker_tests.wait_until(lambda: fetch(engine.publish_host, info.port, "/?" + query), 30, "the probe")
        assert json.loads(body)["write"] == {"/data/out": "Permission denied", "/out/ok": "ok: None"}
    finally:
        engine.stop(info.replica_id, grace=0)
    assert not engine._notes_path(spec.name).exists()  # gone with the replica


@pytest.mark.django_db
def test_a_start_warning_is_recorded_on_the_services_log(api: Any, personas: Any) -> None:
    from serving.models import Endpoint, Route, ServiceEvent
    from serving.node.engine import record_start_warnings
    from serving.node.engines.base import ReplicaInfo, ReplicaState
    from tests.factories import SIMPLE_DEFINITION, FolderFactory

    folder = FolderFactory(owner=personas["owner"], name="warn", files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = {"name": "warns", "folder": str(folder.pk), "runtime": "custom", "replicas": 0}
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.json()
    route = Route(endpoint=Endpoint.objects.get(pk=created.json()["id"]))
    info = ReplicaInfo(
        "c1", "n", ReplicaState.RUNNING, "127.0.0.1", 1, {}, warnings=("The read-write mount /data ...",)
    )
    record_start_warnings(route, info, "Replica abcd1234")
    event = ServiceEvent.objects.get(endpoint=route.endpoint, kind="replica_warning")
    assert event.level == ServiceEvent.Level.WARNING
    assert event.message == "Replica abcd1234: The read-write mount /data ..."
    # Every replica of that version meets the same folder: said once, not at each start.
    record_start_warnings(route, info, "Replica ef567890")
    assert ServiceEvent.objects.filter(endpoint=route.endpoint, kind="replica_warning").count() == 1
    route.spec_version += 1  # a new version (the folder may have been changed meanwhile): said again
    record_start_warnings(route, info, "Replica 12345678")
    assert ServiceEvent.objects.filter(endpoint=route.endpoint, kind="replica_warning").count() == 2
