"""What a replica leaves on the host's read-write mounts, made harmless once it stops (issue 13).

A replica's files on a read-write mount are host files. Running as an unprivileged user it can
not make them root's, but it can still mark its own files setuid or setgid, and a host user who
ran one would get that user's identity: the identity every tenant's replicas run as. Inside a
replica that does nothing (no-new-privileges, nosuid binds), so the bits serve no purpose but an
attack: the engines clear them on every read-write mount when the replica stops.

The walk goes by file descriptors and never follows a symlink, so a replica can not turn it on a
file outside the folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable
from typing import NamedTuple

from serving.node.engines.base import Mount

log = logging.getLogger(__name__)

SETID_BITS = stat.S_ISUID | stat.S_ISGID


def strip_setid_bits(root: str) -> int:
    """Clear setuid/setgid bits of the regular files under ``root``; returns how many were cleared."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(root, flags)
    except NotADirectoryError:
        # A single file mounted read-write.
        parent, name = os.path.split(os.path.normpath(root))
        try:
            parent_fd = os.open(parent or "/", flags)
        except OSError:
            return 0
        try:
            return _clear(parent_fd, name)
        finally:
            os.close(parent_fd)
    except OSError:
        return 0  # gone
    return _strip(fd, root)


class MountWarning(NamedTuple):
    """One warning in two wordings: ``log`` for the replica's log (with the node's host path, for
    whoever fixes it there), ``public`` for the service's events, which every member of the
    project reads (the mount by its target only: the node's paths are not theirs to see)."""

    log: str
    public: str


def unwritable_mounts(mounts: Iterable[Mount], uid: int, gid: int) -> list[MountWarning]:
    """A warning for each read-write mount whose folder the replica's user can not write (by its
    root directory's owner, group and mode; ACLs aside): the replica still starts, but a server
    writing its outputs there gets EACCES and nothing says why. Folders are not made writable for
    it: that is the owner's call."""
    found = []
    for mount in mounts:
        if mount.read_only:
            continue
        try:
            info = os.stat(mount.source)
        except OSError:
            continue
        if info.st_uid == uid:
            bits = stat.S_IWUSR | stat.S_IXUSR
        elif info.st_gid == gid:
            bits = stat.S_IWGRP | stat.S_IXGRP
        else:
            bits = stat.S_IWOTH | stat.S_IXOTH
        if stat.S_ISDIR(info.st_mode) and info.st_mode & bits == bits:
            continue
        if not stat.S_ISDIR(info.st_mode) and info.st_mode & (bits & ~stat.S_IXUSR & ~stat.S_IXGRP & ~stat.S_IXOTH):
            continue
        what = (
            f"is not writable by the replica's user (uid {uid}, gid {gid}): it belongs to uid {info.st_uid}, "
            f'gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o}, so writing there fails with "Permission '
            'denied".'
        )
        found.append(
            MountWarning(
                log=(
                    f"The read-write mount {mount.target} ({mount.source}) {what} Make the folder writable by "
                    f"uid {uid} (e.g. `chown {uid}:{gid} {mount.source}` on the node), or mount it read-only."
                ),
                public=(
                    f"The read-write mount {mount.target} {what} Have the folder made writable by uid {uid} on "
                    "the node, or mount it read-only."
                ),
            )
        )
    return found


def _clear(dir_fd: int, name: str) -> int:
    """Clear the bits of one regular file, opened without following a link, changed by descriptor:
    a file swapped for a symlink meanwhile is not followed out of the folder."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return 0
    try:
        now = os.fstat(fd)
        if stat.S_ISREG(now.st_mode) and now.st_mode & SETID_BITS:
            os.fchmod(fd, stat.S_IMODE(now.st_mode) & ~SETID_BITS)
            return 1
    except OSError:
        pass
    finally:
        os.close(fd)
    return 0


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _scan(dir_fd: int) -> tuple[int, list[str]]:
    """Clear the bits of the files right in ``dir_fd``; returns how many, and its subdirectories."""
    cleared, subdirs = 0, []
    try:
        with os.scandir(dir_fd) as entries:
            names = [entry.name for entry in entries]
    except OSError:
        return 0, []
    for name in names:
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mode & SETID_BITS:
            cleared += _clear(dir_fd, name)
        elif stat.S_ISDIR(info.st_mode):
            subdirs.append(name)
    return cleared, subdirs


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _strip(root_fd: int, shown: str) -> int:
    """Depth-first, iteratively and with no depth limit (a replica may nest directories as deep as
    it likes), holding one directory descriptor at a time, so no depth runs out of descriptors
    either: down by opening a child without following a link, back up by "..", checked against the
    directory we came from (a replica of the same folder still running may move directories; then
    the way back is opened again from the root, component by component, still following no link).
    Takes ownership of ``root_fd``."""
    cleared, subdirs = _scan(root_fd)
    # One frame per directory on the way down: its identity, its name, the subdirectories left.
    stack: list[tuple[tuple[int, int], str, list[str]]] = [(_identity(root_fd), "", subdirs)]
    root = os.dup(root_fd)
    fd = root_fd
    try:
        while stack:
            _, _, pending = stack[-1]
            if pending:
                name = pending.pop()
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                os.close(fd)
                fd = child
                found, below = _scan(fd)
                cleared += found
                stack.append((_identity(fd), name, below))
                continue
            stack.pop()
            if not stack:
                break
            up = _open_parent(fd, root, stack)
            os.close(fd)
            fd = -1
            if up is None:
                log.warning("stopped clearing setuid bits under %s: a directory moved while it was walked", shown)
                return cleared
            fd = up
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(root)
    return cleared


def _open_parent(fd: int, root: int, stack: list[tuple[tuple[int, int], str, list[str]]]) -> int | None:
    """The directory of ``stack[-1]``, reached by ".." from its child ``fd`` or, if that is not
    it any more, from the root by name; None if it can not be found again."""
    wanted = stack[-1][0]
    with contextlib.suppress(OSError):
        up = os.open("..", DIR_FLAGS, dir_fd=fd)
        if _identity(up) == wanted:
            return up
        os.close(up)
    current = os.dup(root)
    try:
        for _, name, _ in stack[1:]:
            following = os.open(name, DIR_FLAGS, dir_fd=current)
            os.close(current)
            current = following
        if _identity(current) == wanted:
            return current
    except OSError:
        pass
    os.close(current)
    return None
