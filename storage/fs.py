"""Every operation on the files inside a folder goes through here (S1.2). Nothing else opens a user path.

Safety model:

* A user path is split and checked by ``split_path`` before anything touches the disk: no absolute
  paths, no ``.``/``..``, no empty components, no NUL or control characters, no invalid UTF-8, at most
  255 bytes a component and 4096 bytes in all, and never the reserved upload directory.
* The disk is then reached *component by component* from a directory fd of the folder's root, each
  directory opened with ``O_NOFOLLOW | O_DIRECTORY`` and the last component used with ``dir_fd=`` calls
  (openat, mkdirat, unlinkat, renameat, fstatat without following). A symlink — whether it was there
  all along or swapped in between a check and a use — is never followed: opening it fails and the
  request is refused. There is no separate "check" step that a race could invalidate.
* Listing shows symlinks as symlinks (``lstat``), reading through one is refused.
* Uploads are written to a temp file in the folder's own reserved directory (same filesystem, so the
  final ``rename`` is atomic) and moved into place only when complete and within the quota; on any
  error the temp file is removed and the folder is exactly as it was.

One module, past the ~800 lines the others keep to, on purpose: it is the whole boundary between a
user's path and the disk, and a reviewer checks that boundary in one read, with every ``*at`` call,
flag and error mapping in view.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

MAX_NAME_BYTES = 255  # NAME_MAX on Linux filesystems
MAX_PATH_BYTES = 4096  # PATH_MAX
# In-progress uploads live here, inside the folder (same filesystem: the final rename is atomic).
# Hidden from listings and refused as a user path, so nobody can read or clobber a half-written file.
UPLOAD_DIR = ".modelserve-uploads"
# A temp file left behind by a crashed server is removed once nobody holds its lock; this age is a
# second guard, so a file created an instant ago and not yet locked is never swept.
STALE_UPLOAD_SECONDS = 60.0
PREVIEW_LIMIT = 256 * 1024
# An upload of undeclared length holds this much beyond what it wrote (Budget.take, storage/quota.py).
STREAM_AHEAD = 4 * 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted by a container must not hang the server; regular files ignore it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_RENAME_NOREPLACE = 1


# --- errors a user can cause: each carries a sentence and an HTTP status ---------------------------


class FsError(Exception):
    status = 400
    code = "invalid_path"

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class PathRefused(FsError):
    """The path itself is not acceptable (traversal, symlink, bad name)."""


class SymlinkRefused(PathRefused):
    """``path`` (the file asked for, or a directory on its way) is a symbolic link: never followed."""


class PathNotFound(FsError):
    status = 404
    code = "not_found"


class PathConflict(FsError):
    """The path is acceptable but the folder's state does not allow the operation (exists, not a dir)."""

    status = 409
    code = "conflict"


class NotAFile(FsError):
    status = 400
    code = "not_a_file"


class NotText(FsError):
    status = 415
    code = "not_text"


class QuotaExceeded(FsError):
    status = 413
    code = "quota_exceeded"


class StorageFull(FsError):
    status = 507
    code = "storage_full"


class StorageUnavailable(FsError):
    status = 503
    code = "storage_unavailable"


# --- path checking (pure) ------------------------------------------------------------------------


def split_path(path: str, *, allow_root: bool = False) -> tuple[str, ...]:
    """Check a user path and return its components; ``""`` (and ``"/"``-free forms of it) is the root.

    One trailing ``/`` is tolerated (``models/`` names the directory ``models``); every other empty
    component is refused, because ``a//b`` usually means a client bug, not a wish.
    """
    shown = path if len(path) <= 200 else path[:200] + "…"
    if "\x00" in path:
        raise PathRefused("The path contains a NUL byte, which no file name may contain.", shown)
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRefused("The path is not valid UTF-8; rename the file with a UTF-8 name.", shown) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathRefused(f"The path is {len(encoded)} bytes long; the limit is {MAX_PATH_BYTES} bytes.", shown)
    if path.startswith("/"):
        raise PathRefused(
            f"'{shown}' is an absolute path; give a path relative to the folder, such as 'models/weights.bin'.",
            shown,
        )
    trimmed = path[:-1] if path.endswith("/") else path
    if trimmed == "":
        if allow_root:
            return ()
        raise PathRefused("The path is empty; name a file or directory inside the folder.", shown)
    parts = tuple(trimmed.split("/"))
    for part in parts:
        check_name(part, shown)
    if parts[0] == UPLOAD_DIR:
        raise PathRefused(f"'{UPLOAD_DIR}' is reserved for uploads in progress; choose another name.", shown)
    return parts


def check_name(name: str, shown: str | None = None) -> str:
    """One path component: a valid, safe file name on a Linux filesystem."""
    where = shown if shown is not None else name
    if name == "":
        raise PathRefused(f"'{where}' has an empty name in it (two '/' in a row); remove the extra '/'.", where)
    if name in (".", ".."):
        raise PathRefused(
            f"'{where}' contains '{name}'; paths must stay inside the folder, so '.' and '..' are not allowed.",
            where,
        )
    if "/" in name:
        raise PathRefused(f"'{where}': a file name can not contain '/'.", where)
    if "\x00" in name:
        raise PathRefused("The name contains a NUL byte, which no file name may contain.", where)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise PathRefused(f"'{where}' contains a control character (such as a newline); rename it.", where)
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise PathRefused("The name is not valid UTF-8; rename the file with a UTF-8 name.", where) from None
    if size > MAX_NAME_BYTES:
        raise PathRefused(f"A name in '{where}' is {size} bytes long; the limit is {MAX_NAME_BYTES} bytes.", where)
    return name


def join(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


# --- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    path: str
    type: str  # "file", "dir", "symlink" or "other" (fifo, socket, device: planted by a container)
    size: int
    modified: datetime

    @classmethod
    def from_stat(cls, path: str, st: os.stat_result) -> Entry:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            kind = "symlink"
        elif stat.S_ISDIR(mode):
            kind = "dir"
        elif stat.S_ISREG(mode):
            kind = "file"
        else:
            kind = "other"
        return cls(
            name=path.rsplit("/", 1)[-1],
            path=path,
            type=kind,
            size=st.st_size if kind == "file" else 0,
            modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
        )

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "type": self.type, "size": self.size, "modified": self.modified}


# --- low-level openat helpers (module functions so a test can interpose a race) ---------------------


def _translate(exc: OSError, shown: str, dir_fd: int | None = None, name: str | None = None) -> FsError:
    """An OSError from a *at() call on a user path as a sentence for the user."""
    code = exc.errno
    if code == errno.ELOOP:
        return SymlinkRefused(
            f"'{shown}' is a symbolic link. Links are never followed, so nothing outside the folder can be "
            "reached through one.",
            shown,
        )
    if code == errno.ENOTDIR:
        # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR on Linux: tell the two cases apart.
        if dir_fd is not None and name is not None:
            with suppress(OSError):
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    return _translate(OSError(errno.ELOOP, "link"), shown)
        return PathConflict(f"'{shown}' is not a directory.", shown)
    if code == errno.ENOENT:
        return PathNotFound(f"'{shown}' does not exist in this folder.", shown)
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        return PathConflict(f"'{shown}' already exists; choose another name or delete it first.", shown)
    if code == errno.EISDIR:
        return PathConflict(f"'{shown}' is a directory.", shown)
    if code in (errno.EACCES, errno.EPERM):
        return PathRefused(f"The server is not allowed to access '{shown}' (permission denied).", shown)
    if code == errno.ENAMETOOLONG:
        return PathRefused(f"'{shown}' is too long for the filesystem.", shown)
    if code == errno.EINVAL:
        return PathRefused(f"'{shown}' is not valid here (a directory can not be moved into itself).", shown)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(_DISK_FULL, shown)
    if code == errno.EROFS:
        return StorageUnavailable("The storage is read-only at the moment; ask an operator.", shown)
    return FsError(f"'{shown}': {exc.strerror or exc}.", shown)


_DISK_FULL = (
    "The server's disk is full, so the upload was not saved and the folder is unchanged. "
    "Free some space or ask an operator."
)


def open_dir_at(dir_fd: int, name: str) -> int:
    """Open one directory component without following a symlink (the single choke point for walking)."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _lstat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _renameat2_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> bool:
    """rename that fails with EEXIST instead of replacing; False when the kernel/filesystem lacks it."""
    func = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if func is None:
        return False
    if func(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    # ENOSYS: old kernel. EINVAL: this filesystem lacks the flag, or a dir moved into itself: either way
    # the caller's plain rename (after its own existence check) reports the right thing.
    if code in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code))


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no libc symbols (static python): the fallback still works
    _LIBC = None


# --- the folder ------------------------------------------------------------------------------------


class FolderFS:
    """The files of one folder, rooted at its directory (``Folder.host_path``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- walking --

    def _open_root(self) -> int:
        try:
            return os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            raise StorageUnavailable(
                "The folder's directory is missing on the server; ask an operator to restore it."
            ) from None
        except OSError as exc:
            raise _translate(exc, "/") from None

    def _walk(self, parts: tuple[str, ...], *, create: bool = False) -> int:
        """An fd of the directory ``parts`` (caller closes); each component opened without following links."""
        fd = self._open_root()
        try:
            for index, name in enumerate(parts):
                shown = join(parts[: index + 1])
                try:
                    next_fd = open_dir_at(fd, name)
                except FileNotFoundError:
                    if not create:
                        raise PathNotFound(f"The directory '{shown}' does not exist in this folder.", shown) from None
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass  # created meanwhile by another request: open it below (still without following)
                    except OSError as exc:
                        raise _translate(exc, shown, fd, name) from None
                    try:
                        next_fd = open_dir_at(fd, name)
                    except OSError as exc:
                        raise _translate(exc, shown, fd, name) from None
                except OSError as exc:
                    raise _translate(exc, shown, fd, name) from None
                os.close(fd)
                fd = next_fd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def _dir(self, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        fd = self._walk(parts, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    # -- reading --

    def stat(self, path: str) -> Entry:
        parts = split_path(path, allow_root=True)
        if not parts:
            with self._dir(()) as fd:
                return Entry.from_stat("", os.fstat(fd))
        with self._dir(parts[:-1]) as parent:
            try:
                return Entry.from_stat(join(parts), _lstat_at(parent, parts[-1]))
            except OSError as exc:
                raise _translate(exc, join(parts)) from None

    def list(self, path: str = "") -> list[Entry]:
        """The entries of a directory, directories first; symlinks are shown as such, never followed."""
        parts = split_path(path, allow_root=True)
        prefix = join(parts)
        entries: list[Entry] = []
        with self._dir(parts) as fd, os.scandir(fd) as it:
            for item in it:
                if not parts and item.name == UPLOAD_DIR:
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we were listing
                name = _display_name(item.name)
                entries.append(Entry.from_stat(f"{prefix}/{name}" if prefix else name, st))
        entries.sort(key=lambda e: (e.type != "dir", e.name.lower(), e.name))
        return entries

    def regular_files(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every regular file in the folder, recursively, with its stat: symlinks and special files
        are skipped (never followed), as are the uploads in progress and names that are not UTF-8."""

        def walk(fd: int, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
            with os.scandir(fd) as it:
                items = sorted(it, key=lambda i: i.name)
            for item in items:
                if (not prefix and item.name == UPLOAD_DIR) or _display_name(item.name) != item.name:
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we were walking
                path = f"{prefix}/{item.name}" if prefix else item.name
                if stat.S_ISREG(st.st_mode):
                    yield path, st
                elif stat.S_ISDIR(st.st_mode):
                    try:
                        child = open_dir_at(fd, item.name)
                    except OSError:
                        continue  # replaced by a symlink or removed meanwhile
                    try:
                        yield from walk(child, path)
                    finally:
                        os.close(child)

        with self._dir(()) as root:
            yield from walk(root, "")

    def open_read(self, path: str) -> BinaryIO:
        """A regular file opened for reading; symlinks, directories and special files are refused."""
        parts = split_path(path)
        shown = join(parts)
        with self._dir(parts[:-1]) as parent:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno == errno.EISDIR:
                    raise NotAFile(f"'{shown}' is a directory; list it instead of downloading it.", shown) from None
                raise _translate(exc, shown, parent, parts[-1]) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise NotAFile(f"'{shown}' is a directory; list it instead of downloading it.", shown)
            if not stat.S_ISREG(st.st_mode):
                raise NotAFile(
                    f"'{shown}' is not a regular file (a pipe, socket or device) and can not be read.", shown
                )
            # Regular files never block, but clear O_NONBLOCK so reads behave normally everywhere.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def preview(self, path: str, limit: int = PREVIEW_LIMIT) -> tuple[str, int, bool]:
        """(text, size, truncated) of a small text file: UTF-8, no NUL bytes; binary files are refused."""
        with self.open_read(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(limit)
        truncated = size > len(data)
        if b"\x00" in data:
            raise NotText(f"'{path}' looks like a binary file; download it instead.", path)
        # A cut at the limit may split a multi-byte character: drop at most 3 trailing bytes for it.
        for cut in range(4 if truncated else 1):
            try:
                return data[: len(data) - cut].decode("utf-8"), size, truncated
            except UnicodeDecodeError:
                continue
        raise NotText(f"'{path}' is not UTF-8 text; download it instead.", path)

    def usage(self) -> int:
        """Bytes used by the folder's files (what the quota counts); uploads in progress are not counted
        here: they are held in Redis while they stream (storage/quota.py)."""
        with self._dir(()) as fd:
            return _tree_size(fd, skip_root_name=UPLOAD_DIR)

    def disk_free(self) -> int:
        with self._dir(()) as fd:
            st = os.fstatvfs(fd)
            return st.f_bavail * st.f_frsize

    # -- writing --

    def mkdir(self, path: str, *, parents: bool = False) -> Entry:
        parts = split_path(path)
        shown = join(parts)
        with self._dir(parts[:-1], create=parents) as parent:
            try:
                os.mkdir(parts[-1], 0o777, dir_fd=parent)
            except FileExistsError:
                raise PathConflict(f"'{shown}' already exists.", shown) from None
            except OSError as exc:
                raise _translate(exc, shown, parent, parts[-1]) from None
            return Entry.from_stat(shown, _lstat_at(parent, parts[-1]))

    def delete(self, path: str) -> Entry:
        """Delete a file, a symlink (the link itself) or a whole directory tree."""
        parts = split_path(path)
        shown = join(parts)
        with self._dir(parts[:-1]) as parent:
            name = parts[-1]
            try:
                st = _lstat_at(parent, name)
            except OSError as exc:
                raise _translate(exc, shown) from None
            entry = Entry.from_stat(shown, st)
            try:
                if stat.S_ISDIR(st.st_mode):
                    # rmtree with dir_fd walks by fds too (avoids_symlink_attacks is True on Linux).
                    shutil.rmtree(name, dir_fd=parent)
                else:
                    os.unlink(name, dir_fd=parent)
            except OSError as exc:
                raise _translate(exc, shown, parent, name) from None
            return entry

    def move(self, src: str, dst: str) -> Entry:
        """Rename or move a file or directory; an existing destination is never replaced."""
        src_parts = split_path(src)
        dst_parts = split_path(dst)
        src_shown, dst_shown = join(src_parts), join(dst_parts)
        if src_parts == dst_parts:
            raise PathConflict(f"'{src_shown}' is already called that.", src_shown)
        if dst_parts[: len(src_parts)] == src_parts:
            raise PathRefused(f"'{src_shown}' can not be moved into itself ('{dst_shown}').", dst_shown)
        with self._dir(src_parts[:-1]) as src_dir, self._dir(dst_parts[:-1]) as dst_dir:
            try:
                _lstat_at(src_dir, src_parts[-1])
            except OSError as exc:
                raise _translate(exc, src_shown) from None
            try:
                if not _renameat2_noreplace(src_dir, src_parts[-1], dst_dir, dst_parts[-1]):
                    try:
                        _lstat_at(dst_dir, dst_parts[-1])
                    except FileNotFoundError:
                        pass
                    else:
                        raise OSError(errno.EEXIST, "exists")
                    os.rename(src_parts[-1], dst_parts[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            except OSError as exc:
                which = dst_shown if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL) else src_shown
                raise _translate(exc, which) from None
            return Entry.from_stat(dst_shown, _lstat_at(dst_dir, dst_parts[-1]))

    def begin_upload(
        self,
        path: str,
        *,
        quota: int,
        content_length: int | None = None,
        budget: Budget | None = None,
        used: int | None = None,
        holder: Holder | None = None,
    ) -> Upload:
        """Start writing ``path``: checks the path and the quota now, counts bytes as they come."""
        parts = split_path(path)
        if path.endswith("/"):
            raise PathRefused(f"'{path}' ends with '/'; an upload needs a file name.", path)
        return Upload(self, parts, quota=quota, content_length=content_length, budget=budget, used=used, holder=holder)

    @contextmanager
    def _upload_dir(self) -> Iterator[int]:
        with self._dir(()) as root:
            try:
                os.mkdir(UPLOAD_DIR, 0o700, dir_fd=root)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _translate(exc, UPLOAD_DIR) from None
            try:
                fd = open_dir_at(root, UPLOAD_DIR)
            except OSError as exc:
                raise _translate(exc, UPLOAD_DIR, root, UPLOAD_DIR) from None
        try:
            yield fd
        finally:
            os.close(fd)


def _display_name(name: str) -> str:
    """A name from disk that is not UTF-8 (written by a container) shown with replacement characters."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", errors="replace")


def _tree_size(dir_fd: int, skip_root_name: str | None = None) -> int:
    total = 0
    with os.scandir(dir_fd) as it:
        children = list(it)
    for item in children:
        if skip_root_name is not None and item.name == skip_root_name:
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        elif stat.S_ISDIR(st.st_mode):
            try:
                child = open_dir_at(dir_fd, item.name)
            except OSError:
                continue  # swapped for a link or removed meanwhile: not ours to count
            try:
                total += _tree_size(child)
            finally:
                os.close(child)
    return total


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "bytes":
                return "1 byte" if size == 1 else f"{size} bytes"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


class Holder(Protocol):
    """Bytes held for uploads in progress, shared by every process (storage/quota.py): without it,
    parallel uploads would each see the whole free quota while they stream."""

    def hold(self, total: int, allowed: int, want: int) -> int:
        """Hold at least ``total`` bytes for this request, up to ``want`` (so the next chunks need no
        round trip), of ``allowed`` free in the folder; returns the bytes now held. Raises
        QuotaExceeded with a sentence when the other uploads in progress leave too little."""

    def touch(self) -> None:
        """Keep the bytes held while the upload lives (a crashed one's hold expires)."""

    def check_commit(self, added: int) -> None:
        """Just before files are moved into place: raises QuotaExceeded when ``added`` bytes more
        would pass a limit wider than the folder (its owner's storage limit)."""

    def release(self) -> None:
        """The request is over (saved or not): its bytes are no longer held."""


class Budget:
    """Bytes an upload request may still write: shared by the files of one multipart request."""

    def __init__(self, allowed: int, used: int | None = None, holder: Holder | None = None) -> None:
        self.allowed = max(allowed, 0)
        self.taken = 0
        self.used = used  # the folder's usage when the request began, if measured
        self.holder = holder
        self.held = 0  # bytes the holder holds for this request

    def hold(self, size: int, ahead: int = 0) -> None:
        """Hold ``size`` more bytes than taken so far (a declared length, or the next chunk and
        ``ahead`` more); raises QuotaExceeded when uploads in progress elsewhere leave too little."""
        holder = self.holder
        if holder is None:
            return
        need = self.taken + size
        if need > self.held:
            self.held = holder.hold(need, self.allowed, max(min(need + ahead, self.allowed), need))
        else:
            holder.touch()

    def take(self, size: int) -> bool:
        if self.taken + size > self.allowed:
            return False
        # A stream of unknown length holds a little ahead: one round trip per STREAM_AHEAD bytes.
        self.hold(size, STREAM_AHEAD)
        self.taken += size
        return True

    def release(self) -> None:
        if self.holder is not None:
            self.holder.release()
            self.held = 0


class Upload:
    """One file being written: a temp file in the folder's upload directory, moved into place on commit.

    Use as a context manager (or call ``abort``): leaving it without ``commit`` removes the temp file, so
    an error of any kind — quota, disk full, client gone — leaves the folder exactly as it was.
    """

    def __init__(
        self,
        fs: FolderFS,
        parts: tuple[str, ...],
        *,
        quota: int,
        content_length: int | None,
        budget: Budget | None = None,
        used: int | None = None,
        holder: Holder | None = None,
    ) -> None:
        self.fs = fs
        self.parts = parts
        self.quota = quota
        self.content_length = content_length
        self.written = 0
        self._fd: int | None = None
        self._tmp_name = f"{uuid.uuid4().hex}.part"
        self._done = False
        # A multipart request measures the folder once for all its files (a walk of the whole tree).
        self.used_at_start = fs.usage() if used is None else used
        # Replacing a file frees its old size: the new one may use it.
        replaced = self._existing_size()
        if budget is None:
            budget = Budget(quota - self.used_at_start + replaced, holder=holder)
        else:
            budget.allowed += replaced
        self.budget = budget
        if content_length is not None:
            if content_length > budget.allowed - budget.taken:
                raise QuotaExceeded(self._quota_message(content_length), self.path)
            free = fs.disk_free()
            if content_length > free:
                raise StorageFull(
                    f"'{self.path}' is {format_bytes(content_length)} but the server's disk has only "
                    f"{format_bytes(free)} free; the folder is unchanged. Ask an operator.",
                    self.path,
                )
            # The declared size is held at once, before a byte is written: a parallel upload then
            # sees it as taken.
            self._hold(content_length)
        self._open_temp()

    def _hold(self, size: int) -> None:
        try:
            self.budget.hold(size)
        except QuotaExceeded as exc:
            raise QuotaExceeded(f"'{self.path}' was not saved: {exc.message}", self.path) from None

    @property
    def path(self) -> str:
        return join(self.parts)

    def retarget(self, path: str) -> None:
        """Write to another path (a multipart request may name its directory after the files)."""
        self.parts = split_path(path)

    def _quota_message(self, size: int, used: int | None = None) -> str:
        used = self.used_at_start if used is None else used
        free = max(self.quota - used, 0)
        return (
            f"Uploading '{self.path}' ({format_bytes(size)}) would exceed the folder's quota of "
            f"{format_bytes(self.quota)}: {format_bytes(used)} is used and {format_bytes(free)} is free. "
            "The upload was not saved; delete some files or ask for a larger quota."
        )

    def _existing_size(self) -> int:
        try:
            with self.fs._dir(self.parts[:-1]) as parent:
                st = _lstat_at(parent, self.parts[-1])
        except (PathNotFound, FileNotFoundError):
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def _open_temp(self) -> None:
        with self.fs._upload_dir() as updir:
            _sweep_stale_uploads(updir)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(self._tmp_name, flags, 0o666, dir_fd=updir)
            except OSError as exc:
                raise _translate(exc, self.path) from None
        # Held until the upload ends: a sweeper in another process sees the file is in use.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append a chunk; past the quota the upload is aborted (temp file removed)."""
        if self._fd is None:
            raise RuntimeError("upload already finished")
        size = len(data)
        try:
            fits = self.budget.take(size)
        except QuotaExceeded as exc:  # uploads in progress elsewhere hold the rest
            self.abort()
            raise QuotaExceeded(f"'{self.path}' was not saved: {exc.message}", self.path) from None
        if not fits:
            self.abort()
            raise QuotaExceeded(self._quota_message(self.written + size), self.path)
        view = memoryview(data)
        try:
            while view:
                count = os.write(self._fd, view)
                view = view[count:]
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(_DISK_FULL, self.path) from None
            raise _translate(exc, self.path) from None
        self.written += size

    def commit(self) -> tuple[Entry, bool]:
        """Move the complete file into place (parents created); returns (entry, created)."""
        return commit_uploads(self.fs, [self])[0]

    def abort(self) -> None:
        """Close and remove the temp file (no-op after commit)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self._done:
                with suppress(OSError, FsError), self.fs._upload_dir() as updir:
                    os.unlink(self._tmp_name, dir_fd=updir)
        finally:
            os.close(fd)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def commit_uploads(fs: FolderFS, uploads: list[Upload]) -> list[tuple[Entry, bool]]:
    """Move complete uploads into place, all or none (short of a race with another writer).

    Under a per-folder lock, so two requests can not both squeeze under the quota: the quota is checked
    for all files together first, and only then are parent directories created and the files renamed.
    On any refusal every temp file is removed and the folder is unchanged.
    """
    try:
        if not uploads:
            return []
        quota = uploads[0].quota
        seen: set[tuple[str, ...]] = set()
        for upload in uploads:
            if upload._fd is None:
                raise RuntimeError("upload already finished")
            if upload.content_length is not None and upload.written != upload.content_length:
                raise FsError(
                    f"The upload of '{upload.path}' ended after {upload.written} of {upload.content_length} "
                    "bytes; nothing was saved. Try again.",
                    upload.path,
                )
            if upload.parts in seen:
                raise PathConflict(f"'{upload.path}' is uploaded twice in one request.", upload.path)
            seen.add(upload.parts)
        results: list[tuple[Entry, bool]] = []
        with fs._upload_dir() as updir:
            fcntl.flock(updir, fcntl.LOCK_EX)
            replaced_total = 0
            for upload in uploads:
                try:
                    with fs._dir(upload.parts[:-1]) as parent:
                        st = _lstat_at(parent, upload.parts[-1])
                except (PathNotFound, FileNotFoundError):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    raise PathConflict(f"'{upload.path}' is a directory; choose another file name.", upload.path)
                replaced_total += st.st_size if stat.S_ISREG(st.st_mode) else 0
            used = fs.usage()
            total = sum(u.written for u in uploads)
            if used - replaced_total + total > quota:
                raise QuotaExceeded(uploads[0]._quota_message(total, used), uploads[0].path)
            holder = uploads[0].budget.holder
            if holder is not None:
                try:
                    holder.check_commit(total - replaced_total)
                except QuotaExceeded as exc:
                    raise QuotaExceeded(f"'{uploads[0].path}' was not saved: {exc.message}", uploads[0].path) from None
            for upload in uploads:
                with fs._dir(upload.parts[:-1], create=True) as parent:
                    name = upload.parts[-1]
                    created = True
                    with suppress(FileNotFoundError):
                        _lstat_at(parent, name)
                        created = False
                    try:
                        os.rename(upload._tmp_name, name, src_dir_fd=updir, dst_dir_fd=parent)
                    except OSError as exc:
                        raise _translate(exc, upload.path, parent, name) from None
                    upload._done = True
                    results.append((Entry.from_stat(upload.path, _lstat_at(parent, name)), created))
        return results
    finally:
        for upload in uploads:
            upload.abort()


def _sweep_stale_uploads(updir: int) -> None:
    """Remove temp files of uploads whose process died (nobody holds their lock)."""
    now = time.time()
    with os.scandir(updir) as it:
        names = [e.name for e in it]
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=updir)
        except OSError:
            with suppress(OSError):
                os.unlink(name, dir_fd=updir)  # a link or special file has no business here
            continue
        try:
            if now - os.fstat(fd).st_mtime < STALE_UPLOAD_SECONDS:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an upload in progress
            with suppress(OSError):
                os.unlink(name, dir_fd=updir)
        finally:
            os.close(fd)
