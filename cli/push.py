"""``folder push``: upload a local directory's new and changed files into a folder.

What "changed" means. The folder listing gives each file's size and the time the server stored it,
no content hash, and downloading every file to hash it would cost as much as uploading it. So the
client keeps, per web app and folder, the sha256 of every file it pushed with the size and the
server's ``modified`` its upload answer gave (``<cache>/modelserve/push/``). A file is skipped only
when all three still agree: the folder has a file at that path with the recorded size and
``modified`` (nobody replaced it since: every upload sets a new ``modified``), and the local file's
sha256 (computed now, every push: mtimes are not trusted) is the one recorded. Anything else (a
first push, another machine's push, an edit in the browser, a new local content) is uploaded. A
lost or foreign cache only costs a full upload, never a skipped change.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from cli.client import Client
from cli.config import cache_dir

HASH_CHUNK = 1024 * 1024


@dataclass
class LocalFile:
    path: str  # relative, "/"-separated
    absolute: Path
    size: int
    sha256: str


@dataclass
class Plan:
    upload: list[LocalFile] = field(default_factory=list)
    unchanged: list[LocalFile] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # local entries that are not regular files

    @property
    def bytes_to_upload(self) -> int:
        return sum(f.size for f in self.upload)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(root: Path, skipped: list[str]) -> Iterator[LocalFile]:
    """Every regular file under ``root``, sorted; symlinks and special files are reported, not followed."""
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(directory)
        for name in list(dirs):
            if (base / name).is_symlink():
                dirs.remove(name)
                skipped.append((base / name).relative_to(root).as_posix())
        for name in sorted(files):
            absolute = base / name
            relative = absolute.relative_to(root).as_posix()
            st = absolute.lstat()
            if not stat.S_ISREG(st.st_mode):
                skipped.append(relative)
                continue
            yield LocalFile(relative, absolute, st.st_size, sha256_of(absolute))


def remote_files(client: Client, folder_id: str, directory: str = "") -> dict[str, dict[str, Any]]:
    """Every file of the folder by path (the listing is one directory at a time)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in client.get(f"folders/{folder_id}/files/", path=directory):
        if entry["type"] == "dir":
            found.update(remote_files(client, folder_id, entry["path"]))
        elif entry["type"] == "file":
            found[entry["path"]] = entry
    return found


def _instant(value: Any) -> float | None:
    """The server's ``modified`` as a number, whatever ISO 8601 spelling it came in."""
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


class PushCache:
    """sha256, size and server ``modified`` of what this machine last pushed into one folder."""

    def __init__(self, url: str, folder_id: str) -> None:
        key = hashlib.sha256(f"{url}\n{folder_id}".encode()).hexdigest()[:32]
        self.path = cache_dir() / "push" / f"{key}.json"
        self.entries: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.entries = loaded

    def unchanged(self, local: LocalFile, remote: dict[str, Any] | None) -> bool:
        known = self.entries.get(local.path)
        if remote is None or not isinstance(known, dict):
            return False
        modified = _instant(remote.get("modified"))
        return (
            known.get("sha256") == local.sha256
            and known.get("size") == local.size == remote.get("size")
            and modified is not None
            and known.get("modified") == modified
        )

    def record(self, local: LocalFile, stored: dict[str, Any]) -> None:
        self.entries[local.path] = {
            "sha256": local.sha256,
            "size": stored.get("size"),
            "modified": _instant(stored.get("modified")),
        }

    def save(self) -> None:
        """Written after every file, atomically: an interrupted push keeps what it did upload."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.entries, sort_keys=True))
        temporary.replace(self.path)


def plan(client: Client, folder_id: str, root: Path, cache: PushCache) -> Plan:
    result = Plan()
    remote = remote_files(client, folder_id)
    for local in local_files(root, result.skipped):
        (result.unchanged if cache.unchanged(local, remote.get(local.path)) else result.upload).append(local)
    return result


def push(
    client: Client,
    folder_id: str,
    result: Plan,
    cache: PushCache,
    progress: Callable[[LocalFile, int], None],
) -> list[dict[str, Any]]:
    """Upload the plan's files one by one, streamed; ``progress(file, bytes_just_sent)``."""
    stored_entries = []
    for local in result.upload:
        with local.absolute.open("rb") as handle:
            reader = _HashingReader(handle)
            size = os.fstat(handle.fileno()).st_size
            stored = client.upload(folder_id, local.path, reader, size, functools.partial(progress, local))
        # What was sent, hashed as it was read: a file edited during the push is recorded with the
        # content the folder got, so the next push sees the edit.
        cache.record(LocalFile(local.path, local.absolute, size, reader.digest.hexdigest()), stored)
        cache.save()
        stored_entries.append(stored)
    return stored_entries


class _HashingReader:
    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data
