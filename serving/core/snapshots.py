"""Pure maths of folder snapshots: manifests, their digests, node keys (docs/architecture.md).

A node that does not see the web app's storage copies a model folder into its cache before it starts a
replica: an immutable *snapshot*, described by a *manifest* (every regular file's path, size, mode and
sha256). The snapshot's name is the manifest's digest, so two replicas of the same content share one,
and a file is kept once per content (its sha256) on a node, so an unchanged file is linked, never
fetched again. A node proves who it is with a *node key*: an HMAC of its name under an installation
secret (the web app derives it to check; an operator prints it for a node on another host).
No Django, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NODE_AUTH_SCHEME = "Node"
MAX_MANIFEST_FILES = 200_000
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class ManifestError(ValueError):
    """A manifest the node must not trust (a path that leaves the folder, a malformed entry)."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, "/"-separated, no "." or ".." parts
    size: int
    mode: int  # the permission bits; only the executable bit survives into a snapshot
    sha256: str

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o111)

    @property
    def object_name(self) -> str:
        """The name of this content in a node's object store: one file per (content, executable bit),
        because hard links share their mode."""
        return f"{self.sha256}.{'x' if self.executable else 'r'}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": self.mode, "sha256": self.sha256}


def check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in path:
        raise ManifestError(f"The manifest names a path that is not inside the folder: {path!r}.")
    return path


def parse_manifest(data: Mapping[str, Any]) -> list[FileEntry]:
    """The entries of a manifest the web app sent, each checked; raises ManifestError."""
    files = data.get("files")
    if not isinstance(files, list) or len(files) > MAX_MANIFEST_FILES:
        raise ManifestError("The manifest has no list of files (or too many).")
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for item in files:
        if not isinstance(item, dict):
            raise ManifestError("A manifest entry is not an object.")
        path, size, mode, sha = item.get("path"), item.get("size"), item.get("mode"), item.get("sha256")
        if not isinstance(path, str) or not isinstance(size, int) or not isinstance(mode, int):
            raise ManifestError(f"The manifest entry {item!r} lacks a path, size or mode.")
        if size < 0 or not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ManifestError(f"The manifest entry for {path!r} has a bad size or sha256.")
        check_path(path)
        if path in seen:
            raise ManifestError(f"The manifest names {path!r} twice.")
        seen.add(path)
        entries.append(FileEntry(path=path, size=size, mode=mode & 0o777, sha256=sha))
    # A file and a directory of the same name can not both exist.
    dirs = {"/".join(e.path.split("/")[:i]) for e in entries for i in range(1, e.path.count("/") + 1)}
    clash = seen & dirs
    if clash:
        raise ManifestError(f"The manifest names {sorted(clash)[0]!r} both as a file and as a directory.")
    return entries


def manifest_digest(entries: Iterable[FileEntry]) -> str:
    """The snapshot's name: a digest of what a replica sees (paths, contents, executable bits)."""
    canonical = sorted((e.path, e.size, e.executable, e.sha256) for e in entries)
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class FetchPlan:
    fetch: list[FileEntry]  # contents the node lacks, one entry per object
    link: list[FileEntry]  # entries whose object the node already has
    fetch_bytes: int
    total_bytes: int


def plan_fetch(entries: Iterable[FileEntry], have: set[str]) -> FetchPlan:
    """What to transfer given the object names the node already holds: each missing content once."""
    fetch: list[FileEntry] = []
    link: list[FileEntry] = []
    wanted: set[str] = set()
    total = 0
    for entry in entries:
        total += entry.size
        if entry.object_name in have or entry.object_name in wanted:
            link.append(entry)
        else:
            wanted.add(entry.object_name)
            fetch.append(entry)
    return FetchPlan(fetch=fetch, link=link, fetch_bytes=sum(e.size for e in fetch), total_bytes=total)


def node_key(secret: str, node_name: str) -> str:
    """The credential of node ``node_name``: HMAC-SHA256 of its name under the installation secret."""
    return hmac.new(secret.encode(), f"modelserve.node-key:{node_name}".encode(), hashlib.sha256).hexdigest()


def node_authorization(node_name: str, key: str) -> str:
    return f"{NODE_AUTH_SCHEME} {node_name}:{key}"


def check_node_authorization(header: str, secret: str) -> str | None:
    """The node's name when ``header`` carries a valid node key, else None (constant-time compare)."""
    scheme, _, credential = header.partition(" ")
    if scheme != NODE_AUTH_SCHEME:
        return None
    name, _, key = credential.strip().partition(":")
    if not _NODE_NAME_RE.match(name) or len(key) != 64:
        return None
    return name if hmac.compare_digest(node_key(secret, name), key) else None


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover
