"""A folder's manifest for the nodes that copy it (serving.core.snapshots): every regular file's
path, size, mode and sha256.

Hashing a large folder takes seconds, so each web process keeps the hashes it computed, keyed by the
file's (size, mtime, ctime, inode): an unchanged file is never read again, and any write (an upload
replaces the file: new inode) is noticed.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from storage.fs import FolderFS

CHUNK = 1024 * 1024
_cache: dict[tuple[str, str], tuple[tuple[int, int, int, int], str]] = {}
_cache_lock = threading.Lock()
_CACHE_LIMIT = 1_000_000  # entries; past it the cache starts over (a bound, not a policy)


def file_sha256(fs: FolderFS, path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with fs.open_read(path) as handle:
        while n := handle.readinto(buffer):  # type: ignore[attr-defined]
            digest.update(view[:n])
    return digest.hexdigest()


def folder_manifest(fs: FolderFS, cache_key: str) -> dict[str, Any]:
    """``{"files": [{"path", "size", "mode", "sha256"}, ...]}`` of the folder at ``fs``."""
    files: list[dict[str, Any]] = []
    for path, st in fs.regular_files():
        key = (cache_key, path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        cached = _cache.get(key)
        if cached is not None and cached[0] == stamp:
            sha = cached[1]
        else:
            sha = file_sha256(fs, path)
            with _cache_lock:
                if len(_cache) >= _CACHE_LIMIT:
                    _cache.clear()
                _cache[key] = (stamp, sha)
        files.append({"path": path, "size": st.st_size, "mode": st.st_mode & 0o777, "sha256": sha})
    return {"files": files}
