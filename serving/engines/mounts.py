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

import logging
import os
import stat

log = logging.getLogger(__name__)

SETID_BITS = stat.S_ISUID | stat.S_ISGID
MAX_DEPTH = 256  # deeper trees are left alone (and logged): a replica may nest without limit


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
    try:
        return _strip(fd, 0, root)
    finally:
        os.close(fd)


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


def _strip(dir_fd: int, depth: int, shown: str) -> int:
    if depth > MAX_DEPTH:
        log.warning("not clearing setuid bits below %s: deeper than %d levels", shown, MAX_DEPTH)
        return 0
    cleared = 0
    try:
        with os.scandir(dir_fd) as entries:
            names = [entry.name for entry in entries]
    except OSError:
        return 0
    for name in names:
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_mode & SETID_BITS:
            cleared += _clear(dir_fd, name)
        elif stat.S_ISDIR(info.st_mode):
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                cleared += _strip(child, depth + 1, f"{shown}/{name}")
            finally:
                os.close(child)
    return cleared
