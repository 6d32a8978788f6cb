"""The local engine with real bubblewrap sandboxes, network namespaces and cgroups (no Django).

Needs root and bwrap; skipped with the reason otherwise. Run alone with
``.venv/bin/python -m pytest tests/integration/test_engine_local.py -q -p no:django``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.node.engines.base import ClusterPeering, EngineError, Mount, PreStartActionSpec, ReplicaSpec, ReplicaState
from serving.node.engines.local.cgroups import CGROUP_PARENT, CGROUP_ROOT
from serving.node.engines.local.engine import LocalEngine
from serving.node.engines.local.network import NET_REGISTRY, PEER_CHAIN
from tests.live import deadline_for, wait_for

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "mt"  # not the platform's "ms": cleanup_orphans() here never touches a running installation


def _why_not() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if os.geteuid() != 0:
        return "the local engine's network namespaces and cgroups need root"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))

# A tiny server for the model folder: answers questions about the sandbox it runs in.
SERVER = r"""
import http.server, json, os, subprocess, sys, urllib.parse, urllib.request

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        status, body = 200, ""
        try:
            if url.path == "/pid":
                body = str(os.getpid())
            elif url.path == "/env":
                body = json.dumps(dict(os.environ))
            elif url.path == "/stat":  # owner uid, gid of a path, and who is asking, and from where
                found = os.stat(q["path"])
                body = json.dumps([found.st_uid, found.st_gid, os.getuid(), os.getgid(), os.getcwd()])
            elif url.path == "/read":
                with open(q["path"]) as f:
                    body = f.read()
            elif url.path == "/write":
                with open(q["path"], "w") as f:
                    f.write("x")
                body = "written"
            elif url.path == "/fetch":  # what this sandbox gets from another address (cluster peers)
                # Shorter than the test's own 2 s wait for this answer: a firewalled address drops the
                # SYN silently, and both timing out together read as "the replica did not answer".
                with urllib.request.urlopen(q["url"], timeout=1) as answer:
                    body = answer.read().decode()
            elif url.path == "/spawn":
                child = subprocess.Popen(["sleep", q["seconds"]])
                body = str(child.pid)
            else:
                body = "ok"
        except Exception as exc:
            status, body = 500, "%s: %s" % (type(exc).__name__, exc)
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
print("server listening on", port, flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"""


@pytest.fixture
def settings() -> types.SimpleNamespace:
    """Stands in for pytest-django's fixture (the root conftest asks for it) when run with -p no:django."""
    return types.SimpleNamespace()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    return wait_for(condition, timeout=timeout, interval=interval, what=what)


def fetch(host: str, port: int, path: str = "/") -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


@pytest.fixture(scope="module", autouse=True)
def _sweep_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A failed test may leave a namespace or cgroup behind; sweep ours (prefix "mt") at the end."""
    yield
    LocalEngine(tmp_path_factory.mktemp("sweep"), netns_prefix=PREFIX).cleanup_orphans()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "server.py").write_text(SERVER)
    (folder / "index.html").write_text("hello from the model folder")
    return folder


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[LocalEngine]:
    local = LocalEngine(tmp_path / "state", netns_prefix=PREFIX)
    yield local
    for info in local.list():
        local.stop(info.replica_id, grace=0)


def spec(model: Path, command: tuple[str, ...] = ("python3", "/models/server.py"), **extra: Any) -> ReplicaSpec:
    values: dict[str, Any] = {
        "name": "ms-test",
        "image": "unused",
        "command": command,
        "port": 8000,
        "mounts": (Mount(str(model), "/models", read_only=True),),
        "mem_bytes": 256 << 20,
        "labels": {"serving.route": "r1"},
    }
    values.update(extra)
    return ReplicaSpec(**values)


def serving(engine: LocalEngine, replica_id: str, path: str = "/") -> tuple[int, str]:
    info = engine.inspect(replica_id)
    return wait_until(lambda: fetch(info.host, info.port, path), 10, f"replica {replica_id} to answer {path}")


def exited(engine: LocalEngine, replica_id: str, timeout: float = 10) -> Any:
    return wait_until(
        lambda: (i := engine.inspect(replica_id)).state is ReplicaState.EXITED and i, timeout, "the replica to exit"
    )


def host_pids_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(name))
    return found


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# --- tests ------------------------------------------------------------------------------------------


def test_two_replicas_share_the_port_each_at_its_own_address(engine: LocalEngine, model: Path) -> None:
    command = ("python3", "-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory", "/models")
    began = time.monotonic()
    first = engine.start(spec(model, command))
    started = time.monotonic()
    answer = wait_until(lambda: fetch(first.host, 8000, "/index.html"), 10, "the first replica")
    answering = time.monotonic()
    second = engine.start(spec(model, command))
    assert first.state is ReplicaState.RUNNING
    assert (first.port, second.port) == (8000, 8000)
    assert first.host != second.host
    assert answer == (200, "hello from the model folder")
    assert wait_until(lambda: fetch(second.host, 8000, "/index.html"), 10, "the second replica") == answer
    print(
        f"\nlocal engine: start() {1000 * (started - began):.0f} ms, "
        f"python http.server answering {1000 * (answering - began):.0f} ms after start() was called"
    )


def test_sandbox_shows_only_what_is_mounted(engine: LocalEngine, model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-folder"
    other.mkdir()
    (other / "secret.txt").write_text("not for replicas")
    os.environ["MODELSERVE_TEST_WORKER_SECRET"] = "worker-only"
    try:
        info = engine.start(spec(model, env={"MODEL_NAME": "demo", "GREETING": "hi there"}))
    finally:
        del os.environ["MODELSERVE_TEST_WORKER_SECRET"]
    replica = info.replica_id
    # Its own PID namespace: bwrap's init is 1, the server right after it.
    status, pid = serving(engine, replica, "/pid")
    assert status == 200 and int(pid) <= 3
    # The model folder is there, read-only.
    assert serving(engine, replica, "/read?path=/models/index.html") == (200, "hello from the model folder")
    status, body = serving(engine, replica, "/write?path=/models/new.txt")
    assert status == 500 and "Read-only file system" in body, body
    assert not (model / "new.txt").exists()
    # The platform's files and other folders are not.
    for hidden in (ROOT / "pyproject.toml", other / "secret.txt", Path(engine.state_dir) / replica / "spec.json"):
        status, body = serving(engine, replica, f"/read?path={hidden}")
        assert status == 500 and "No such file or directory" in body, (hidden, body)
    status, body = serving(engine, replica, "/read?path=/etc/shadow")
    assert body == "" or "Permission denied" in body
    # Private, writable home.
    assert serving(engine, replica, "/write?path=/home/work/scratch.txt") == (200, "written")
    # The environment is the spec's plus a sane base, nothing of the worker's.
    env = json.loads(serving(engine, replica, "/env")[1])
    assert env["MODEL_NAME"] == "demo" and env["GREETING"] == "hi there"
    assert env["HOME"] == "/home/work" and "/usr/bin" in env["PATH"]
    assert "MODELSERVE_TEST_WORKER_SECRET" not in env


def test_pre_start_actions_run_in_order_then_the_shell_command(engine: LocalEngine, model: Path) -> None:
    actions = (
        PreStartActionSpec("mkdir", {"path": "/home/work/conf"}),
        PreStartActionSpec("write_file", {"filename": "/home/work/conf/greeting.txt", "body": "hello", "mode": "600"}),
        PreStartActionSpec(
            "write_file", {"filename": "/home/work/conf/greeting.txt", "body": " again", "append": True}
        ),
        PreStartActionSpec("write_tempfile", {"body": "print('temp')\n"}),
        PreStartActionSpec("run_command", {"command": ["sh", "-c", "echo to-out; echo to-err >&2"]}),
        PreStartActionSpec("log", {"message": "about to start", "debug": True}),
    )
    command = ('echo "shell sees $GREETING and $BACKEND_TEMPFILE"; exec python3 /models/server.py',)
    info = engine.start(spec(model, command, command_is_shell=True, pre_start_actions=actions, env={"GREETING": "hi"}))
    assert serving(engine, info.replica_id, "/read?path=/home/work/conf/greeting.txt") == (200, "hello again")
    lines = list(engine.logs(info.replica_id))
    prestart = [line for line in lines if line.startswith("[prestart] action")]
    assert [line.split(" ", 3)[2] for line in prestart if "failed" not in line][:2] == ["0", "1"]
    indices = [int(line.split()[2]) for line in prestart]
    assert indices == sorted(indices) and set(indices) == {0, 1, 2, 3, 4, 5}
    text = "\n".join(lines)
    assert "[prestart] action 4 (run_command) out: to-out" in text
    assert "[prestart] action 4 (run_command) err: to-err" in text
    assert "[prestart] action 5 (log, debug): about to start" in text
    tempfile_line = next(line for line in lines if "(write_tempfile)" in line)
    temp_path = tempfile_line.split("wrote ", 1)[1].split()[0]
    assert temp_path.endswith(".py")
    assert f"shell sees hi and {temp_path}" in text
    assert serving(engine, info.replica_id, f"/read?path={temp_path}") == (200, "print('temp')\n")


def test_pre_start_actions_and_server_run_as_the_unprivileged_user(
    engine: LocalEngine, model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    actions = (
        PreStartActionSpec("run_command", {"command": ["id", "-u"]}),
        PreStartActionSpec("write_file", {"filename": "/home/work/app/run/config.txt", "body": "made by prestart"}),
        PreStartActionSpec("write_file", {"filename": "/tmp/prestart.txt", "body": "tmp"}),
    )
    mounts = (Mount(str(model), "/models", read_only=True), Mount(str(data), "/home/work/data", read_only=False))
    umask = os.umask(0o077)  # a worker with a strict umask: the files the replica reads stay readable
    try:
        info = engine.start(spec(model, mounts=mounts, pre_start_actions=actions, workdir="/home/work/app/run"))
    finally:
        os.umask(umask)
    assert serving(engine, info.replica_id, "/read?path=config.txt") == (200, "made by prestart")
    lines = list(engine.logs(info.replica_id))
    assert "[prestart] action 0 (run_command) out: 65534" in lines, lines
    assert "[engine] runs as uid 65534, gid 65534" in lines, lines
    for path in ("/home/work/app/run/config.txt", "/tmp/prestart.txt", "/home/work/app"):
        status, body = serving(engine, info.replica_id, f"/stat?path={path}")
        assert status == 200 and json.loads(body) == [65534, 65534, 65534, 65534, "/home/work/app/run"], (path, body)
    # A host folder mounted inside the home keeps its owner: the engine hands over only its own tmpfs.
    assert (data.stat().st_uid, data.stat().st_gid) == (0, 0)
    status, body = serving(engine, info.replica_id, "/write?path=/home/work/data/x")
    assert status == 500 and "Permission denied" in body, body


def test_replicas_stay_root_without_capabilities_when_configured_so(tmp_path: Path, model: Path) -> None:
    local = LocalEngine(tmp_path / "state", netns_prefix=PREFIX, uid=0, gid=0)
    try:
        info = local.start(spec(model))
        status, body = serving(local, info.replica_id, "/stat?path=/home/work")
        assert status == 200 and json.loads(body)[:4] == [0, 0, 0, 0], body
    finally:
        for replica in local.list():
            local.stop(replica.replica_id, grace=0)


def test_a_replica_user_that_is_no_id_is_refused_with_the_setting_to_fix(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"LOCAL_ENGINE_UID to a number from 0 to 4294967294"):
        LocalEngine(tmp_path / "state", netns_prefix=PREFIX, uid=-1)
    with pytest.raises(EngineError, match=r"set LOCAL_ENGINE_GID"):
        LocalEngine(tmp_path / "state", netns_prefix=PREFIX, gid=1 << 32)


def test_failing_pre_start_action_is_reported_with_its_index(engine: LocalEngine, model: Path) -> None:
    actions = (
        PreStartActionSpec("log", {"message": "first"}),
        PreStartActionSpec("run_command", {"command": ["sh", "-c", "echo boom >&2; exit 3"], "check": True}),
        PreStartActionSpec("log", {"message": "never"}),
    )
    info = engine.start(spec(model, ("sleep", "60"), pre_start_actions=actions))
    gone = exited(engine, info.replica_id)
    assert gone.exit_code == 97
    assert gone.error == "pre-start action 1 (run_command) failed: sh exited with code 3", gone.error
    text = "\n".join(engine.logs(info.replica_id))
    assert "err: boom" in text and "never" not in text


def test_shell_command_falls_back_to_sh(engine: LocalEngine, model: Path) -> None:
    info = engine.start(
        spec(model, ("exec python3 /models/server.py",), command_is_shell=True, shell="/usr/bin/no-such-shell")
    )
    assert serving(engine, info.replica_id) == (200, "ok")
    assert any("no-such-shell is not installed" in line for line in engine.logs(info.replica_id))


def test_memory_limit_kills_the_replica_and_says_so(engine: LocalEngine, model: Path) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 << 20))\n"
    info = engine.start(spec(model, ("python3", "-c", hog), mem_bytes=48 << 20))
    gone = exited(engine, info.replica_id, timeout=15)
    assert gone.error == "killed: out of memory (limit 48 MiB)", gone.error
    assert gone.exit_code == 137
    # The engine and the host carry on.
    healthy = engine.start(spec(model))
    assert serving(engine, healthy.replica_id) == (200, "ok")


def test_stop_kills_the_whole_tree_and_removes_network_and_cgroups(engine: LocalEngine, model: Path) -> None:
    info = engine.start(spec(model))
    replica_dir = Path(engine.state_dir) / info.replica_id
    meta = json.loads((replica_dir / "spec.json").read_text())
    serving(engine, info.replica_id, "/spawn?seconds=313.25")
    assert wait_until(lambda: host_pids_with("sleep 313.25"), 5, "the spawned child")
    netns, host_if = meta["network"]["netns"], meta["network"]["host_if"]
    assert netns in netns_names() and Path(f"/sys/class/net/{host_if}").exists()
    cgroups = list(meta["cgroups"].values())
    assert cgroups and all(Path(c).is_dir() for c in cgroups)
    assert (Path(meta["cgroups"]["memory"]) / "memory.limit_in_bytes").read_text().strip() == str(256 << 20)

    began = time.monotonic()
    engine.stop(info.replica_id, grace=30)
    assert time.monotonic() - began < deadline_for(2)  # http.server ends on SIGTERM; no waiting for the grace
    assert host_pids_with("sleep 313.25") == []
    assert netns not in netns_names()
    assert not Path(f"/sys/class/net/{host_if}").exists()
    assert not any(Path(c).exists() for c in cgroups)
    assert not replica_dir.exists()
    engine.stop(info.replica_id)  # idempotent
    with pytest.raises(Exception, match="No replica"):
        engine.inspect(info.replica_id)


def test_stop_kills_after_the_grace_when_sigterm_is_ignored(engine: LocalEngine, model: Path) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
    stubborn += "time.sleep(300)\n"
    info = engine.start(spec(model, ("python3", "-c", stubborn)))
    wait_until(lambda: "up" in list(engine.logs(info.replica_id)), 10, "the replica to run")
    began = time.monotonic()
    engine.stop(info.replica_id, grace=0.5)
    assert 0.4 < time.monotonic() - began < deadline_for(3)
    assert engine.list() == []


def test_replicas_outlive_the_worker_and_a_new_engine_finds_them(engine: LocalEngine, model: Path) -> None:
    # Start from another process that then exits, as a node worker restart would.
    script = (
        "import sys\nfrom pathlib import Path\nroot, state, prefix, model = sys.argv[1:]\nsys.path.insert(0, root)\n"
        "from serving.node.engines.local.engine import LocalEngine\n"
        "from serving.node.engines.base import ReplicaSpec, Mount\n"
        "e = LocalEngine(Path(state), netns_prefix=prefix)\n"
        "for route in ('r1', 'r2'):\n"
        "    e.start(ReplicaSpec(name='w', image='x', command=('python3', '/models/server.py'), port=8000,\n"
        "        mounts=(Mount(model, '/models'),), labels={'serving.route': route}))\n"
    )
    worker = [sys.executable, "-c", script, str(ROOT), str(engine.state_dir), PREFIX, str(model)]
    subprocess.run(worker, check=True, timeout=30)

    again = LocalEngine(engine.state_dir, netns_prefix=PREFIX)
    found = again.list()
    assert sorted(info.labels["serving.route"] for info in found) == ["r1", "r2"]
    assert all(info.state is ReplicaState.RUNNING for info in found)
    for info in found:
        assert serving(again, info.replica_id) == (200, "ok")
    (only,) = again.list({"serving.route": "r2"})
    assert only.labels == {"serving.route": "r2"}
    assert again.list({"serving.route": "r3"}) == []


def test_concurrent_starts_get_distinct_addresses(engine: LocalEngine, model: Path) -> None:
    results: list[Any] = []

    def start() -> None:
        results.append(engine.start(spec(model, ("sleep", "60"))))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({info.host for info in results}) == 4


def test_freed_address_blocks_are_reused(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    local = LocalEngine(tmp_path / "state", netns_prefix=PREFIX)
    owners = [tmp_path / f"r{i}" for i in range(3)]
    for owner in owners:
        owner.mkdir()
    assert [local._allocate_index(registry, owner) for owner in owners] == [1, 2, 3]
    owners[1].rmdir()  # that replica is gone
    assert local._allocate_index(registry, tmp_path / "r4") == 2
    assert local._addresses(2) == ("10.213.0.9", "10.213.0.10")


def test_external_kill_shows_exited_and_leaves_no_zombie(engine: LocalEngine, model: Path) -> None:
    info = engine.start(spec(model))
    serving(engine, info.replica_id)
    replica_dir = Path(engine.state_dir) / info.replica_id
    init = int((replica_dir / "pid").read_text().split()[0])
    outer_bwrap = int(Path(f"/proc/{init}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(init, signal.SIGKILL)
    gone = exited(engine, info.replica_id)
    assert gone.exit_code == 137 and "SIGKILL" in gone.error, gone
    # The sandbox and bwrap were reaped (by bwrap and by the supervisor), not left as zombies.
    wait_until(lambda: not Path(f"/proc/{init}").exists(), 5, "the sandbox to be reaped")
    wait_until(lambda: not Path(f"/proc/{outer_bwrap}").exists(), 5, "bwrap to be reaped")
    # The log stays readable until stop().
    assert any("server listening" in line for line in engine.logs(info.replica_id))
    engine.stop(info.replica_id)
    assert engine.list() == []


def test_logs_follow_until_the_replica_exits(engine: LocalEngine, model: Path) -> None:
    command = ("sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.1; done")
    info = engine.start(spec(model, command))
    began = time.monotonic()
    lines = list(engine.logs(info.replica_id, follow=True))
    assert time.monotonic() - began < deadline_for(5)
    assert [line for line in lines if line.startswith("line")] == ["line1", "line2", "line3"]
    done = exited(engine, info.replica_id)
    assert done.exit_code == 0


def test_a_follow_of_a_quiet_replica_ends_when_stopped(engine: LocalEngine, model: Path) -> None:
    """Nobody reads any more (serving.bus.logfollow): the follow ends although no line comes."""
    info = engine.start(spec(model, ("sh", "-c", "echo only-line; sleep 60")))
    stop = threading.Event()
    lines = engine.logs(info.replica_id, follow=True, stop=stop)
    assert "only-line" in (next(lines) for _ in range(5))  # after the engine's own lines
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(lines), daemon=True)
    reader.start()
    reader.join(timeout=0.3)
    assert reader.is_alive(), "the follow waits for the next line"
    stop.set()
    reader.join(timeout=2)
    assert not reader.is_alive() and rest == []


def test_stats_report_cpu_and_memory(engine: LocalEngine, model: Path) -> None:
    busy = engine.start(spec(model, ("python3", "-c", "while True: pass"), cpu=0.5))
    idle = engine.start(spec(model))
    serving(engine, idle.replica_id)
    wait_until(lambda: engine.stats(busy.replica_id).cpu_percent > 10, 5, "the busy replica to use CPU")
    time.sleep(0.3)  # a measurement window; the previous sample is on disk
    stats = engine.stats(busy.replica_id)
    assert 10 < stats.cpu_percent <= 65, stats  # the 0.5-core quota holds
    assert stats.mem_limit_bytes == 256 << 20 and 0 < stats.mem_bytes < 256 << 20
    quiet = engine.stats(idle.replica_id)
    assert quiet.cpu_percent < 20 and quiet.mem_bytes > 1 << 20, quiet


def test_cleanup_orphans_removes_what_a_crash_left(engine: LocalEngine, model: Path, tmp_path: Path) -> None:
    survivor = engine.start(spec(model))
    crashed_engine = LocalEngine(tmp_path / "crashed-state", netns_prefix=PREFIX)
    # A duration no other test uses: the check below looks at every process on the host.
    crashed = crashed_engine.start(spec(model, ("sleep", "3017")))
    crashed_dir = Path(crashed_engine.state_dir) / crashed.replica_id
    meta = json.loads((crashed_dir / "spec.json").read_text())
    # The machine "crashed": the state is lost, the namespace, link, cgroups (and process) remain.
    shutil.rmtree(crashed_engine.state_dir)
    assert meta["network"]["netns"] in netns_names()

    assert engine.cleanup_orphans() >= 3
    assert meta["network"]["netns"] not in netns_names()
    assert not Path(f"/sys/class/net/{meta['network']['host_if']}").exists()
    assert not any(Path(c).exists() for c in meta["cgroups"].values())
    wait_until(lambda: not host_pids_with("sleep 3017"), 15, "the orphaned process to be killed")
    # The live replica is untouched.
    assert serving(engine, survivor.replica_id) == (200, "ok")
    leftovers = [p.name for p in (CGROUP_ROOT / "memory" / CGROUP_PARENT).iterdir() if p.name.startswith(PREFIX)]
    assert leftovers == [f"{PREFIX}-{survivor.replica_id}"]


# --- cluster peering (S4.1) -------------------------------------------------------------------------


def peer_rules(key: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if key in line]


def drop_packets() -> int:
    """Packets the chain's DROP (other traffic between sandboxes) has dropped so far."""
    listed = subprocess.run(
        ["iptables", "-w", "5", "-L", PEER_CHAIN, "-v", "-x", "-n"], capture_output=True, text=True, check=False
    ).stdout
    return sum(int(line.split()[0]) for line in listed.splitlines() if " DROP " in f" {line} ")


def member(model: Path, key: str, host: str) -> ReplicaSpec:
    return spec(model, name=f"ms-{key}-{host}", cluster=ClusterPeering(key=key, host=host, hosts=("main1", "sub1")))


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed (apt-get install iptables)")
def test_cluster_members_on_two_nodes_reach_each_other_by_name_and_nothing_else_reaches_them(
    model: Path, tmp_path: Path
) -> None:
    key = f"k{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
    node_a = LocalEngine(tmp_path / "a", netns_prefix=PREFIX)
    node_b = LocalEngine(tmp_path / "b", netns_prefix=PREFIX)
    started: list[tuple[LocalEngine, str]] = []
    try:
        main = node_a.start(member(model, key, "main1"))
        started.append((node_a, main.replica_id))
        serving(node_a, main.replica_id)
        sub = node_b.start(member(model, key, "sub1"))
        started.append((node_b, sub.replica_id))
        outsider = node_b.start(spec(model, name="ms-outsider"))
        started.append((node_b, outsider.replica_id))
        serving(node_b, outsider.replica_id)

        # By name (the generated /etc/hosts) and by address, both ways; main started alone and
        # learnt sub1 when it joined.
        main_pid = serving(node_a, main.replica_id, "/pid")[1]
        assert serving(node_b, sub.replica_id, "/fetch?url=http://main1:8000/pid") == (200, main_pid)
        assert serving(node_b, sub.replica_id, f"/fetch?url=http://{main.host}:8000/pid") == (200, main_pid)
        sub_pid = serving(node_b, sub.replica_id, "/pid")[1]
        assert serving(node_a, main.replica_id, "/fetch?url=http://sub1:8000/pid") == (200, sub_pid)
        assert serving(node_a, main.replica_id, "/read?path=/etc/hosts")[1].endswith(
            f"{main.host}\tmain1\n{sub.host}\tsub1\n"
        )

        # A replica of another service has no route to the members...
        status, body = serving(node_b, outsider.replica_id, f"/fetch?url=http://{main.host}:8000/pid")
        assert status == 500 and "unreachable" in body
        # ...and with one forged (as if it could), the host's firewall drops what it sends.
        outsider_meta = json.loads((tmp_path / "b" / outsider.replica_id / "spec.json").read_text())
        gateway = node_b._addresses(outsider_meta["network"]["index"])[0]
        subprocess.run(
            ["ip", "-n", outsider_meta["network"]["netns"], "route", "add", "10.213.0.0/16", "via", gateway],
            check=True,
        )
        dropped = drop_packets()
        status, body = serving(node_b, outsider.replica_id, f"/fetch?url=http://{main.host}:8000/pid")
        assert status == 500 and main_pid not in body
        forwarding = Path(f"/proc/sys/net/ipv4/conf/{outsider_meta['network']['host_if']}/forwarding").read_text()
        if forwarding.strip() == "1":  # else the kernel did not even forward it
            assert drop_packets() > dropped
        assert len(peer_rules(key)) == 2  # main1 -> sub1 and sub1 -> main1

        # A member stopping takes its peering with it; the last one leaves no rule, route or entry.
        node_b.stop(sub.replica_id, grace=0)
        assert peer_rules(key) == []
        main_meta = json.loads((tmp_path / "a" / main.replica_id / "spec.json").read_text())
        routes = subprocess.run(
            ["ip", "-n", main_meta["network"]["netns"], "route", "show", "proto", "static"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert routes.strip() == ""
        assert "sub1" not in serving(node_a, main.replica_id, "/read?path=/etc/hosts")[1]
        node_a.stop(main.replica_id, grace=0)
        assert not (NET_REGISTRY / "clusters" / key).exists()
        assert main_meta["network"]["netns"] not in netns_names()
    finally:
        for engine, replica_id in started:
            engine.stop(replica_id, grace=0)
    assert peer_rules(key) == []


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed (apt-get install iptables)")
def test_cleanup_orphans_removes_the_peering_of_a_crashed_cluster(model: Path, tmp_path: Path) -> None:
    key = f"c{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
    crashed = LocalEngine(tmp_path / "crashed", netns_prefix=PREFIX)
    crashed.start(member(model, key, "main1"))
    crashed.start(member(model, key, "sub1"))
    assert len(peer_rules(key)) == 2
    shutil.rmtree(crashed.state_dir)  # the worker's state is lost; rules, namespaces and processes remain

    assert LocalEngine(tmp_path / "other", netns_prefix=PREFIX).cleanup_orphans() >= 2
    assert peer_rules(key) == []
    assert not (NET_REGISTRY / "clusters" / key).exists()
