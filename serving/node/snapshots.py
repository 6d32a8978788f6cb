"""A node's copies of model folders: immutable snapshots fetched from the web app (serving.core.snapshots).

A node that does not see the web app's storage (``NODE_SHARED_STORAGE`` false) copies a replica's model
folder into ``NODE_CACHE_ROOT`` before it starts the replica, and mounts the copy read-only:

    objects/<sha[:2]>/<sha256>.<x|r>   each content once, read-only; an unchanged file is never fetched again
    incoming/<object>.part             a transfer under way (resumed from its length after an interruption)
    snapshots/<folder>/<digest>/       the tree of one manifest: hard links into objects/, read-only
    locks/                             one lock per folder (one transfer for replicas that start together)
                                       and the collector's (fetches share it, collection takes it alone)

A snapshot is named by its manifest's digest: two replicas of the same content share it, and an upload
after a replica started changes nothing it sees (the next start takes a new snapshot). Snapshots no
route of this node uses and unused for ``NODE_SNAPSHOT_KEEP`` are collected, and with them the objects
no snapshot links.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from django.conf import settings
from django.db import connections
from django.db.models import Q

from serving.bus import telemetry
from serving.core import snapshots
from serving.core.snapshots import FileEntry, format_bytes
from serving.models import Route

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
TIMEOUT = 30.0
RETRIES = 3  # an interrupted transfer is resumed this many times before the start fails
PROGRESS_EVERY = 0.5  # seconds between two writes of a route's progress
FETCH_CONNECTIONS = 2  # files fetched at once


class SnapshotError(Exception):
    """The folder could not be copied; the message names the file and the cause."""


@dataclass
class SnapshotResult:
    path: Path
    digest: str
    files: int
    total_bytes: int
    fetched_files: int
    fetched_bytes: int
    manifest_seconds: float
    fetch_seconds: float
    reused: bool  # the snapshot existed already (another replica's)
    transferred: int = 0  # bytes that crossed the network (less than fetched_bytes after a resume)

    def describe(self, folder_name: str) -> str:
        if self.reused:
            return (
                f"model folder {folder_name!r}: snapshot {self.digest[:12]} already on this node "
                f"({self.files} files, {format_bytes(self.total_bytes)}; manifest {self.manifest_seconds:.1f} s)."
            )
        return (
            f"model folder {folder_name!r} copied to this node as snapshot {self.digest[:12]}: "
            f"{self.files} files, {format_bytes(self.total_bytes)}; manifest {self.manifest_seconds:.1f} s, "
            f"{self.fetched_files} files ({format_bytes(self.fetched_bytes)}) fetched in {self.fetch_seconds:.1f} s, "
            f"{self.files - self.fetched_files} unchanged linked."
        )


def cache_root() -> Path:
    root = settings.NODE_CACHE_ROOT or str(Path(settings.ENGINE_STATE_DIR) / "node-cache")
    return Path(root)


def node_key() -> str:
    return settings.NODE_KEY or snapshots.node_key(settings.SECRET_KEY, settings.NODE_NAME)


# --- HTTP ---------------------------------------------------------------------------------------------


class _Client:
    """One keep-alive connection to the web app, reopened after a failure."""

    def __init__(self, base_url: str, query: str = "") -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SnapshotError(f"NODE_WEB_URL {base_url!r} is not an http(s) address of the web app.")
        self.base_url, self.query = base_url, query
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.auth = snapshots.node_authorization(settings.NODE_NAME, node_key())
        self.conn: http.client.HTTPConnection | None = None
        self.received = 0  # bytes of file bodies, resumed transfers counted once

    def request(self, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        if self.conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self.conn = cls(self.host, self.port, timeout=TIMEOUT)
        try:
            self.conn.request(
                "GET", self.prefix + path + self.query, headers={"Authorization": self.auth, **(headers or {})}
            )
            return self.conn.getresponse()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _refusal(response: http.client.HTTPResponse) -> str:
    body = response.read(4096)
    try:
        detail = json.loads(body).get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    return f"HTTP {response.status}" + (f": {detail}" if detail else "")


# --- the cache ----------------------------------------------------------------------------------------


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def _object_path(root: Path, entry: FileEntry) -> Path:
    return root / "objects" / entry.sha256[:2] / entry.object_name


def _remove_tree(path: Path) -> None:
    """Remove a read-only snapshot tree (its directories are made writable first)."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            with suppress(OSError):
                os.chmod(os.path.join(dirpath, name), 0o700)
    with suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


class _Progress:
    """The route's ``snapshot`` field, written at most every PROGRESS_EVERY seconds."""

    def __init__(self, route_id: str | None, base: dict[str, Any], notify: Callable[[], None] | None) -> None:
        self.route_id, self.base, self.notify = route_id, base, notify
        self.done = 0
        self.last = 0.0
        self.lock = threading.Lock()  # the fetching threads share it

    def write(self, state: str, force: bool = False, **extra: Any) -> None:
        now = time.monotonic()
        if self.route_id is None or (not force and now - self.last < PROGRESS_EVERY):
            return
        self.last = now
        Route.objects.filter(pk=self.route_id).update(
            snapshot={**self.base, "done": self.done, "state": state, **extra}
        )
        if self.notify is not None:
            self.notify()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            due = time.monotonic() - self.last >= PROGRESS_EVERY
        if due:
            self.write("fetching")


def _fetch_object(client: _Client, root: Path, folder_id: str, entry: FileEntry, progress: _Progress) -> None:
    """Download one file into the object store, resuming a partial one, verified by its sha256."""
    incoming = root / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    part = incoming / f"{entry.object_name}.part"
    url = f"/api/v1/node/folders/{folder_id}/files/{quote(entry.path)}"
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    target = _object_path(root, entry)
    attempt = 0
    while True:
        digest = hashlib.sha256()
        with open(part, "a+b") as out:
            # One writer per content: another folder's fetch may want the same object at the same time.
            fcntl.flock(out, fcntl.LOCK_EX)
            if target.exists():  # it finished it meanwhile (and its part is gone: this one is empty)
                part.unlink(missing_ok=True)
                return
            out.seek(0)
            have = 0
            while n := out.readinto(buffer):  # type: ignore[attr-defined]
                if have + n > entry.size:
                    break
                digest.update(view[:n])
                have += n
            if have > entry.size or out.tell() != have:
                out.truncate(0)
                digest, have = hashlib.sha256(), 0
            out.seek(have)
            progress.add(have)
            try:
                if have < entry.size:
                    headers = {"Range": f"bytes={have}-"} if have else {}
                    response = client.request(url, headers)
                    if response.status == 200 and have:
                        out.truncate(0)  # the server ignored the range: start over
                        progress.add(-have)
                        digest, have = hashlib.sha256(), 0
                    elif response.status not in (200, 206):
                        raise SnapshotError(f"The file {entry.path!r} could not be fetched: {_refusal(response)}.")
                    while n := response.readinto(view):
                        digest.update(view[:n])
                        out.write(view[:n])
                        client.received += n
                        have += n
                        progress.add(n)
                        if have > entry.size:
                            break
            except (OSError, http.client.HTTPException) as exc:
                client.close()
                attempt += 1
                if attempt > RETRIES:
                    raise SnapshotError(
                        f"The file {entry.path!r} could not be fetched from {settings.NODE_WEB_URL}: "
                        f"{exc or exc.__class__.__name__} (the part fetched is kept; a retry resumes it)."
                    ) from None
                progress.add(-have)
                log.warning("fetching %s: %s; resuming (attempt %d)", entry.path, exc, attempt)
                continue
            if have != entry.size or digest.hexdigest() != entry.sha256:
                part.unlink(missing_ok=True)
                raise SnapshotError(
                    f"The file {entry.path!r} changed while it was copied to this node "
                    f"({have} bytes, expected {entry.size} with sha256 {entry.sha256[:12]}); start the replica again."
                )
            os.chmod(part, 0o555 if entry.executable else 0o444)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, target)  # under the lock: a waiting writer then finds the object
            return


def _fetch_all(client: _Client, root: Path, folder_id: str, entries: list[FileEntry], progress: _Progress) -> int:
    """Fetch ``entries`` over FETCH_CONNECTIONS connections (one file at a time each, largest first:
    the network, the hashing and the disk overlap); returns the bytes received. The first failure stops
    the rest and is raised."""
    queue = sorted(entries, key=lambda e: e.size, reverse=True)
    clients = [client] + [_Client(client.base_url, client.query) for _ in range(min(FETCH_CONNECTIONS, len(queue)) - 1)]
    failed = threading.Event()

    def worker(own: _Client) -> None:
        while not failed.is_set():
            with progress.lock:
                if not queue:
                    return
                entry = queue.pop(0)
            try:
                _fetch_object(own, root, folder_id, entry, progress)
            except BaseException:
                failed.set()
                raise

    def run(own: _Client) -> None:
        try:
            worker(own)
        finally:
            connections.close_all()  # this pool thread's connection (progress writes) ends with it

    try:
        with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="snapshot") as pool:
            futures = [pool.submit(run, own) for own in clients]
            for future in futures:
                error = future.exception()
                if error is not None:
                    raise error
    finally:
        for own in clients[1:]:
            own.close()
    return sum(own.received for own in clients)


def _build_tree(root: Path, entries: list[FileEntry], building: Path) -> None:
    if building.exists():
        _remove_tree(building)
    building.mkdir(parents=True)
    dirs: set[Path] = set()
    for entry in entries:
        target = building / entry.path
        if target.parent not in dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
            dirs.add(target.parent)
        os.link(_object_path(root, entry), target)
    for directory in sorted(dirs | {building}, key=lambda p: len(p.parts), reverse=True):
        os.chmod(directory, 0o555)  # noqa: S103  (read and traversed by the replica's unprivileged user)


def fetch_snapshot(
    folder_id: str,
    route_id: str | None = None,
    notify: Callable[[], None] | None = None,
    base_url: str | None = None,
    validation: str | None = None,
) -> SnapshotResult:
    """The snapshot of the folder's current content on this node, fetched if needed (for a dry run:
    ``validation``, its id). Raises SnapshotError."""
    root = cache_root()
    started = time.monotonic()
    client = _Client(base_url or settings.NODE_WEB_URL, f"?validation={validation}" if validation else "")
    try:
        try:
            response = client.request(f"/api/v1/node/folders/{folder_id}/manifest/")
            if response.status != 200:
                raise SnapshotError(f"The web app refused the model folder's manifest: {_refusal(response)}.")
            entries = snapshots.parse_manifest(json.loads(response.read()))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise SnapshotError(
                f"The model folder's manifest could not be fetched from {settings.NODE_WEB_URL}: {exc}"
            ) from None
        manifest_seconds = time.monotonic() - started
        digest = snapshots.manifest_digest(entries)
        total = sum(e.size for e in entries)
        final = root / "snapshots" / str(folder_id) / digest
        base = {"folder": str(folder_id), "digest": digest}
        progress = _Progress(route_id, base, notify)

        def reused() -> SnapshotResult:
            os.utime(final, follow_symlinks=False)
            progress.write("ready", force=True, total=total, fetched=0)
            return SnapshotResult(final, digest, len(entries), total, 0, 0, manifest_seconds, 0.0, True)

        if final.is_dir():
            return reused()
        progress.write("waiting", force=True, total=total)
        with (
            _flock(root / "locks" / "collect.lock", fcntl.LOCK_SH),
            _flock(root / "locks" / f"{folder_id}.lock", fcntl.LOCK_EX),
        ):
            if final.is_dir():  # another replica's start fetched it while this one waited
                return reused()
            have = {e.object_name for e in entries if _object_path(root, e).exists()}
            plan = snapshots.plan_fetch(entries, have)
            fetch_started = time.monotonic()
            progress.base = {**base, "total": plan.fetch_bytes}
            progress.write("fetching", force=True)
            received = _fetch_all(client, root, str(folder_id), plan.fetch, progress)
            building = final.parent / f".build-{digest}"
            _build_tree(root, entries, building)
            os.rename(building, final)
            fetch_seconds = time.monotonic() - fetch_started
            progress.write("ready", force=True, fetched=plan.fetch_bytes)
            telemetry.count_snapshot(settings.NODE_NAME, plan.fetch_bytes, fetch_seconds)
        return SnapshotResult(
            final,
            digest,
            len(entries),
            total,
            len(plan.fetch),
            plan.fetch_bytes,
            manifest_seconds,
            fetch_seconds,
            False,
            received,
        )
    except snapshots.ManifestError as exc:
        raise SnapshotError(f"The model folder's manifest can not be used: {exc}") from None
    finally:
        client.close()


def collect(in_use: set[str], keep: float | None = None) -> int:
    """Remove snapshots whose digest is not ``in_use`` and unused for ``keep`` seconds, then the objects
    and stale partial transfers nothing needs. Returns how many snapshots were removed."""
    root = cache_root()
    keep = settings.NODE_SNAPSHOT_KEEP if keep is None else keep
    if not (root / "snapshots").is_dir():
        return 0
    now = time.time()
    removed = 0
    with _flock(root / "locks" / "collect.lock", fcntl.LOCK_EX):
        for folder_dir in (root / "snapshots").iterdir():
            for snap in folder_dir.iterdir():
                if snap.name in in_use:
                    continue
                if snap.name.startswith(".build-") or now - snap.lstat().st_mtime >= keep:
                    _remove_tree(snap)
                    removed += snap.name[:1] != "."
            with suppress(OSError):
                folder_dir.rmdir()  # empty: the folder has no snapshot left
        objects = root / "objects"
        if objects.is_dir():
            for prefix in objects.iterdir():
                for obj in prefix.iterdir():
                    st = obj.lstat()
                    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                        obj.unlink()
        incoming = root / "incoming"
        if incoming.is_dir():
            for part in incoming.iterdir():
                if now - part.lstat().st_mtime >= max(keep, 3600.0):
                    part.unlink()
    return removed


def collect_unused() -> int:
    """``collect`` with the snapshots this node's routes use (from the database)."""
    if settings.NODE_SHARED_STORAGE:
        return 0
    me = settings.NODE_NAME
    digests = Route.objects.filter(Q(node__name=me) | Q(members__node__name=me)).values_list(
        "snapshot__digest", flat=True
    )
    return collect({d for d in digests if isinstance(d, str)})
