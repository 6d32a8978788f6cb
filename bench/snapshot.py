"""A node's snapshot of a model folder fetched from the real web server, against a local copy (issue 15).

Starts daphne (``config.asgi:application``) on a free loopback port with a throw-away SQLite database and
storage root, makes a model folder of ``SNAPSHOT_BENCH_MIB`` MiB (default 2048: 8 large files and 8 of
1 MiB) used by a service, registers a node, then in one run measures:

* a plain local copy of the folder (read + write in 1 MiB blocks),
* the node's first fetch of its snapshot (``serving.node.snapshots.fetch_snapshot`` in a node process of
  its own, with the node key; every byte verified by sha256), interleaved with the copies, each round
  into an empty cache; the web's hashes are warm (it hashes a file once per change, when the first node
  asks: that cost is printed on its own),
* after one 1 MiB file changed, a second fetch: the share of the folder's bytes that crossed the network,
* the node process's peak RSS growth while fetching (VmHWM).

Targets: first fetch >= 0.5x the local copy's throughput, the refetch < 1% of the bytes, RSS growth
< 64 MiB. Exits 1 when one is missed. The last line reads
``snapshot/local-copy ratio: R; refetch after one change %: C; node RSS growth MiB: M``.

    .venv/bin/python bench/snapshot.py            # SNAPSHOT_BENCH_MIB=256 for a quick run
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
BLOCK = 1024 * 1024
RSS_TARGET_MIB = 64
RATIO_TARGET = 0.5
REFETCH_TARGET_PCT = 1.0
SMALL_FILES = 8
LARGE_FILES = 8

# The node: a process of its own (its RSS is what is measured), fetching with its node key.
NODE_SCRIPT = """
import json, sys, time, django
django.setup()
from serving.node import snapshots

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0

before = hwm()
started = time.perf_counter()
result = snapshots.fetch_snapshot(sys.argv[1])
elapsed = time.perf_counter() - started
print(json.dumps({
    "seconds": elapsed, "manifest_seconds": result.manifest_seconds, "transferred": result.transferred,
    "total": result.total_bytes, "rss_growth_mib": (hwm() - before) / 1024, "path": str(result.path),
}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_file(path: Path, size: int) -> None:
    block = os.urandom(BLOCK)  # incompressible; one random MiB repeated per file
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left > 0:
            out.write(block[: min(BLOCK, left)])
            left -= BLOCK


def make_folder(root: Path, size: int) -> None:
    small = SMALL_FILES * BLOCK
    large = max(BLOCK, (size - small) // LARGE_FILES)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model-definition.yaml").write_text("models: []\n")
    for index in range(LARGE_FILES):
        write_file(root / "weights" / f"shard-{index:02d}.bin", large)
    for index in range(SMALL_FILES):
        write_file(root / "config" / f"part-{index:02d}.bin", BLOCK)


def local_copy(src: Path, dst: Path) -> float:
    started = time.perf_counter()
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with path.open("rb") as fin, target.open("wb") as fout:
            while data := fin.read(BLOCK):
                fout.write(data)
    elapsed = time.perf_counter() - started
    shutil.rmtree(dst)
    return elapsed


def run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def remove_cache(cache: Path) -> None:
    for dirpath, dirnames, _ in os.walk(cache):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o700)
    shutil.rmtree(cache, ignore_errors=True)


def main() -> int:
    size = int(os.environ.get("SNAPSHOT_BENCH_MIB", "2048")) * BLOCK
    rounds = int(os.environ.get("SNAPSHOT_BENCH_ROUNDS", "2"))
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "VAR_DIR": str(work / "var"),
            "STORAGE_ROOT": str(work / "storage"),
            "REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
            "LOG_LEVEL": "WARNING",
            "PYTHONDONTWRITEBYTECODE": "1",
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "SECRET_KEY": uuid.uuid4().hex * 2,
            "TMPDIR": str(work / "tmp"),
        }
    )
    (work / "tmp").mkdir()
    cache = work / "node-cache"
    node_env = {
        **env,
        "NODE_NAME": "bench-node",
        "NODE_CACHE_ROOT": str(cache),
        "NODE_WEB_URL": f"http://127.0.0.1:{port}",
        "STORAGE_ROOT": str(work / "node-storage"),  # not the web's: the node copies
    }
    server: subprocess.Popen[bytes] | None = None
    try:
        run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], env)
        folder_id = run(
            [
                PY,
                "manage.py",
                "shell",
                "-c",
                "from accounts.models import User; from storage.models import Folder; "
                "from serving.models import Endpoint, Node; "
                "u = User.objects.create_user('bench', password='bench-password-1'); "
                "f = Folder.objects.create(name='bench', owner=u, usage_mode='model'); "
                "Endpoint.objects.create(name='bench', owner=u, model_folder=f); "
                "Node.objects.create(name='bench-node'); print(f.pk)",
            ],
            env,
        ).split()[-1]
        source = work / "storage" / folder_id
        make_folder(source, size)
        total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())

        command = [str(Path(PY).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]
        log = (work / "server.log").open("wb")
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"daphne did not start:\n{(work / 'server.log').read_text()}") from None
                time.sleep(0.2)

        def fetch() -> dict[str, float]:
            return dict(json.loads(run([PY, "-c", NODE_SCRIPT, folder_id], node_env).splitlines()[-1]))

        print(f"folder {total / 2**20:.0f} MiB in {LARGE_FILES + SMALL_FILES + 1} files; {rounds} rounds")
        cold = fetch()  # the web hashes every file once (then only what changes)
        print(f"first manifest (the web hashes the folder): {cold['manifest_seconds']:.2f} s")
        remove_cache(cache)
        copies: list[float] = []
        fetches: list[float] = []
        growth: list[float] = []
        last: dict[str, float] = {}
        for index in range(rounds):
            copies.append(local_copy(source, work / "copy"))
            if index:
                remove_cache(cache)
            last = fetch()
            if last["transferred"] != total:
                raise SystemExit(f"the first fetch moved {last['transferred']} bytes, expected {total}")
            fetches.append(last["seconds"])
            growth.append(last["rss_growth_mib"])
        copy_seconds, fetch_seconds = statistics.median(copies), statistics.median(fetches)
        print(f"{'local copy':<28} {total / copy_seconds / 2**20:8.1f} MiB/s (median of {len(copies)})")
        print(
            f"{'first fetch (snapshot)':<28} {total / fetch_seconds / 2**20:8.1f} MiB/s (median of {len(fetches)}; "
            f"manifest {last['manifest_seconds']:.2f} s of it)"
        )

        # One 1 MiB file changes (a new inode, as an upload does): the refetch moves just it.
        changed = source / "config" / "part-00.bin"
        write_file(changed.with_suffix(".new"), BLOCK)
        changed.with_suffix(".new").replace(changed)
        refetch = fetch()
        if Path(str(refetch["path"])).joinpath("config", "part-00.bin").read_bytes() != changed.read_bytes():
            raise SystemExit("the refetched snapshot does not hold the changed file")
        refetch_pct = 100.0 * refetch["transferred"] / total
        growth.append(refetch["rss_growth_mib"])
        print(
            f"{'refetch after one change':<28} {refetch['transferred'] / 2**20:.1f} MiB moved in "
            f"{refetch['seconds']:.2f} s (manifest {refetch['manifest_seconds']:.2f} s)"
        )
        ratio = copy_seconds / fetch_seconds
        rss = max(growth)
        ok = ratio >= RATIO_TARGET and refetch_pct < REFETCH_TARGET_PCT and rss < RSS_TARGET_MIB
        print(
            f"targets: >= {RATIO_TARGET}x local copy, refetch < {REFETCH_TARGET_PCT}% of the bytes, "
            f"node RSS growth < {RSS_TARGET_MIB} MiB: " + ("met" if ok else "MISSED")
        )
        print(
            f"snapshot/local-copy ratio: {ratio:.2f}; refetch after one change %: {refetch_pct:.3f}; "
            f"node RSS growth MiB: {rss:.1f}"
        )
        return 0 if ok else 1
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        remove_cache(cache)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
