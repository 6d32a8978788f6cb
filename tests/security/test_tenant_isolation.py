"""Tenant isolation (issue 13): attacks one tenant's replica could make on the host or on another
tenant, each tried for real and shown not to work.

* Local engine: a user's environment (``LD_PRELOAD`` of a shared object uploaded into the model
  folder, ``PATH``, ``BASH_ENV``, ...) must never reach the prelude that runs as uid 0 with
  CHOWN/SETUID/SETGID before the sandbox drops to ``nobody``: the shared object's constructor must
  never run as root, and no setuid-root file may appear on a read-write mount. Loader variables are
  refused where users set them (API, launcher, ``service-definition.toml``), as defence in depth.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.engines.base import Mount, PreStartActionSpec
from tests.integration import test_engine_local as local_tests

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


@pytest.fixture
def local_engine(tmp_path: Path) -> Iterator[Any]:
    from serving.engines.local import LocalEngine

    engine = LocalEngine(tmp_path / "state", netns_prefix=local_tests.PREFIX)
    yield engine
    for info in engine.list():
        engine.stop(info.replica_id, grace=0)
    engine.cleanup_orphans()


def build_evil_so(folder: Path, tmp_path: Path) -> Path:
    """Compile the attacker's shared object into the model folder, as an upload would put it."""
    source = tmp_path / "evil.c"
    source.write_text(EVIL_C)
    target = folder / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(target), str(source)], check=True, capture_output=True)
    target.chmod(0o644)
    return target


def setuid_root_files(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        info = path.lstat()
        if info.st_uid == 0 and info.st_mode & (stat.S_ISUID | stat.S_ISGID):
            found.append(path.name)
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
    assert setuid_root_files(data) == [], sorted(p.name for p in data.iterdir())
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


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_ld_preload_in_a_folders_service_definition_is_refused_with_a_sentence(name: str) -> None:
    from serving.definitions import DefinitionError, parse_service_definition

    toml = f"[custom.environment]\nimage = 'x'\narchitecture = 'x86_64'\n[custom.environ]\n{name} = '/models/evil.so'\n"
    with pytest.raises(DefinitionError) as info:
        parse_service_definition(toml)
    [problem] = info.value.problems
    assert problem.field == f"custom.environ.{name}" and problem.line == 5, problem
    assert problem.message.startswith(f"{name} is refused: it makes the dynamic loader"), problem.message
