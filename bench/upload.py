"""Upload a large file through the real web server and compare with a local copy (S1.2).

Starts daphne (or, with --server uvicorn, uvicorn) on a free loopback port (``config.asgi:application``
unless --app says otherwise) with a throw-away SQLite database and storage root, creates a user and an
API key, then in one run measures:

* a plain local copy of the same file (read + write in 1 MiB blocks, as the server does),
* ``PUT /api/v1/folders/{id}/files/{path}`` with the raw body,
* ``POST /api/v1/folders/{id}/upload/`` multipart (the browser's way),

and prints each upload's throughput as a ratio to the local copy, and the server's RSS growth while
uploading (peak VmRSS polled every 20 ms from /proc, and VmHWM). Targets: RSS growth under 64 MiB,
throughput at least 0.5x the local copy. Exits 1 when a target is missed.

    .venv/bin/python bench/upload.py [--size-mib 2048] [--app config.asgi:application]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
BLOCK = 1024 * 1024
RSS_TARGET_MIB = 64
RATIO_TARGET = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssPoller(threading.Thread):
    """Peak VmRSS of a process while running (VmHWM alone can not be reset between phases)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_kib(pid)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)


def make_source(path: Path, size: int) -> None:
    block = os.urandom(BLOCK)  # incompressible, and cheap to make: one random MiB repeated
    with path.open("wb") as out:
        left = size
        while left > 0:
            out.write(block[: min(BLOCK, left)])
            left -= BLOCK


def local_copy(src: Path, dst: Path) -> float:
    started = time.perf_counter()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while data := fin.read(BLOCK):
            fout.write(data)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


def run(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def request(port: int, method: str, path: str, key: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Token {key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if data else {})


def stream_upload(port: int, method: str, path: str, key: str, parts: list[bytes | Path], content_type: str) -> tuple:
    """Send bytes and files as one body with a Content-Length, 1 MiB at a time (never all in memory)."""
    length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in parts)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.putrequest(method, path)
    conn.putheader("Authorization", f"Token {key}")
    conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    for part in parts:
        if isinstance(part, Path):
            with part.open("rb") as handle:
                while data := handle.read(BLOCK):
                    conn.send(data)
        else:
            conn.send(part)
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    return response.status, body, elapsed


def measure(name: str, pid: int, upload: callable) -> tuple[float, float]:  # type: ignore[valid-type]
    """One upload: (seconds, peak RSS growth in MiB while it ran)."""
    before = rss_kib(pid)
    hwm_before = rss_kib(pid, "VmHWM")
    poller = RssPoller(pid)
    poller.start()
    status, body, elapsed = upload()
    poller.stop.set()
    poller.join()
    if status not in (200, 201):
        raise SystemExit(f"{name}: HTTP {status}: {body[:500]!r}")
    growth_mib = (poller.peak - before) / 1024
    hwm_growth_mib = (rss_kib(pid, "VmHWM") - hwm_before) / 1024
    return elapsed, max(growth_mib, hwm_growth_mib)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--app", default="config.asgi:application")
    parser.add_argument(
        "--server",
        choices=["daphne", "uvicorn"],
        default="daphne",
        help="the web server (uvicorn must be importable; it is not a project dependency)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are compared")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args()
    size = args.size_mib * BLOCK

    work = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "VAR_DIR": str(work / "var"),
            "STORAGE_ROOT": str(work / "storage"),
            "DEFAULT_FOLDER_QUOTA": str(size * 4),
            "REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
            "LOG_LEVEL": "WARNING",
            "PYTHONDONTWRITEBYTECODE": "1",
            # twisted spools request bodies to TMPDIR under daphne: keep it on the same disk as the data.
            "TMPDIR": str(work / "tmp"),
        }
    )
    (work / "tmp").mkdir()
    server: subprocess.Popen[bytes] | None = None
    try:
        run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], env)
        run(
            [
                PY,
                "manage.py",
                "shell",
                "-c",
                "from accounts.models import User; User.objects.create_user('bench', password='bench-password-1')",
            ],
            env,
        )
        key = run([PY, "manage.py", "issue_api_key", "bench"], env).split()[-1]
        port = free_port()
        if args.server == "daphne":
            command = [str(Path(PY).parent / "daphne"), "-b", "127.0.0.1", "-p", str(port), args.app]
        else:
            command = [PY, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
            command += ["--lifespan", "off", args.app]
        log = (work / "server.log").open("wb")
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = request(port, "GET", "/healthz", key)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"{args.server} did not start:\n{(work / 'server.log').read_text()}")
            time.sleep(0.2)
        status, folder = request(port, "POST", "/api/v1/folders/", key, json.dumps({"name": "bench"}).encode())
        if status != 201:
            raise SystemExit(f"creating the folder failed: {status} {folder}")
        folder_id = folder["id"]

        source = work / "source.bin"
        make_source(source, size)
        small = work / "small.bin"
        make_source(small, BLOCK)
        # Warm up: imports, DB connection, first-request allocations are not upload costs.
        stream_upload(port, "PUT", f"/api/v1/folders/{folder_id}/files/warmup.bin", key, [small], "x/y")
        local_copy(source, work / "copy.bin")  # warm the page cache the same way for both
        print(f"server: {args.server} {args.app} (pid {server.pid}); file {size / 2**20:.0f} MiB; {args.rounds} rounds")
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="model.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        uploads = {
            "PUT raw body": (
                "put/model.bin",
                lambda: stream_upload(
                    port, "PUT", f"/api/v1/folders/{folder_id}/files/put/model.bin", key, [source], "x/y"
                ),
            ),
            "POST multipart": (
                "multipart/model.bin",
                lambda: stream_upload(
                    port,
                    "POST",
                    f"/api/v1/folders/{folder_id}/upload/?path=multipart",
                    key,
                    [head, source, tail],
                    f"multipart/form-data; boundary={boundary}",
                ),
            ),
        }
        stored = work / "storage" / folder_id
        # Interleaved rounds: each upload is measured right after a local copy, so both see the same
        # page-cache and writeback state (this machine is noisy); medians are compared.
        copies: list[float] = []
        seconds: dict[str, list[float]] = {name: [] for name in uploads}
        growth: dict[str, list[float]] = {name: [] for name in uploads}
        for _ in range(args.rounds):
            for name, (relative, upload) in uploads.items():
                copies.append(local_copy(source, work / "copy.bin"))
                elapsed, rss = measure(name, server.pid, upload)
                got = (stored / relative).stat().st_size
                if got != size:
                    raise SystemExit(f"{relative}: stored {got} bytes, expected {size}")
                (stored / relative).unlink()
                seconds[name].append(elapsed)
                growth[name].append(rss)
        copy_seconds = statistics.median(copies)
        print(f"{'local copy':<22} {size / copy_seconds / 2**20:8.1f} MiB/s (median of {len(copies)})")
        results = []
        for name in uploads:
            elapsed = statistics.median(seconds[name])
            ratio = copy_seconds / elapsed
            rss = max(growth[name])
            print(
                f"{name:<22} {size / elapsed / 2**20:8.1f} MiB/s  ratio to local copy {ratio:4.2f}x  "
                f"peak RSS growth {rss:6.1f} MiB"
            )
            results.append({"ratio": ratio, "rss_growth_mib": rss})
        ok = all(r["rss_growth_mib"] < RSS_TARGET_MIB and r["ratio"] >= RATIO_TARGET for r in results)
        print(
            f"targets: RSS growth < {RSS_TARGET_MIB} MiB, throughput >= {RATIO_TARGET}x local copy: "
            + ("met" if ok else "MISSED")
        )
        return 0 if ok else 1
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    raise SystemExit(main())
