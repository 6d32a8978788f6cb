"""serving.node.engines.mounts: setuid/setgid bits a replica left are cleared, and nothing else is touched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from serving.node.engines.mounts import strip_setid_bits


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_setuid_and_setgid_bits_are_cleared_at_any_depth_and_other_modes_kept(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    files = {tmp_path / "top": 0o4755, tmp_path / "a" / "g": 0o2750, tmp_path / "a" / "b" / "both": 0o6711}
    for path, bits in files.items():
        path.write_text("x")
        path.chmod(bits)
    plain = tmp_path / "plain"
    plain.write_text("x")
    plain.chmod(0o640)
    (tmp_path / "a").chmod(0o2775)  # a setgid directory only makes new files inherit its group
    assert strip_setid_bits(str(tmp_path)) == 3
    assert [mode(p) for p in files] == [0o755, 0o750, 0o711]
    assert mode(plain) == 0o640 and mode(tmp_path / "a") == 0o2775


def test_a_symlink_is_not_followed_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o4755)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "link").symlink_to(outside)
    (folder / "dirlink").symlink_to(tmp_path)
    assert strip_setid_bits(str(folder)) == 0
    assert mode(outside) == 0o4755


def test_a_single_file_mount_and_a_missing_one(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.write_text("x")
    os.chmod(single, 0o4700)
    assert strip_setid_bits(str(single)) == 1 and mode(single) == 0o700
    assert strip_setid_bits(str(tmp_path / "gone")) == 0


DEPTH = 3000  # past the old limit of 256, past PATH_MAX as a path, past Python's recursion limit


def _descend(top: Path, depth: int) -> int:
    """A descriptor of the directory ``depth`` levels of "d" below ``top`` (no path that long works)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def _remove_chain(top: Path) -> None:
    """rmtree recurses (and would overflow here): pull the chain up one level at a time."""
    spare = top.parent / "spare"
    while top.exists():
        if (top / "d").exists():
            os.rename(top / "d", spare)
        for child in top.iterdir():
            child.unlink()
        top.rmdir()
        if spare.exists():
            os.rename(spare, top)


def test_a_setuid_file_thousands_of_levels_deep_is_cleared(tmp_path: Path) -> None:
    top = tmp_path / "mount"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(DEPTH):
            os.mkdir("d", dir_fd=fd)
            if level % 700 == 0:  # a few on the way down, and one at the bottom
                made = os.open("mid", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)
                os.fchmod(made, 0o4755)
                os.close(made)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        made = os.open("deep", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)
        os.fchmod(made, 0o6755)
        os.close(made)
    finally:
        os.close(fd)
    try:
        assert strip_setid_bits(str(top)) == 1 + len(range(0, DEPTH, 700))
        bottom = _descend(top, DEPTH)
        try:
            assert stat.S_IMODE(os.stat("deep", dir_fd=bottom).st_mode) == 0o755
        finally:
            os.close(bottom)
        middle = _descend(top, 700)
        try:
            assert stat.S_IMODE(os.stat("mid", dir_fd=middle).st_mode) == 0o755
        finally:
            os.close(middle)
    finally:
        _remove_chain(top)


def test_the_walk_goes_back_up_through_branches_without_losing_its_place(tmp_path: Path) -> None:
    """Depth first with one descriptor at a time: after a deep branch it must come back to the
    right directory for the next one."""
    expected = []
    for branch in ("a", "b", "c"):
        path = tmp_path / branch / "x" / "y"
        path.mkdir(parents=True)
        for where in (tmp_path / branch, path):
            target = where / f"s-{branch}"
            target.write_text("x")
            target.chmod(0o4755)
            expected.append(target)
    assert strip_setid_bits(str(tmp_path)) == len(expected)
    assert {mode(p) for p in expected} == {0o755}


def test_a_read_write_mount_its_user_can_not_write_is_named_with_the_fix(tmp_path: Path) -> None:
    from serving.node.engines.base import Mount
    from serving.node.engines.mounts import unwritable_mounts

    owner = os.getuid()
    folders = {}
    for name, bits in {"private": 0o755, "open": 0o777, "sticky": 0o1777, "group": 0o775}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        folders[name].chmod(bits)
    mounts = [Mount(str(path), f"/{name}", read_only=False) for name, path in folders.items()]
    mounts.append(Mount(str(folders["private"]), "/ro", read_only=True))  # read-only: never a problem
    gid = os.stat(folders["group"]).st_gid
    [(warning, public)] = unwritable_mounts(mounts, 65534, 65534 if gid != 65534 else 65533)[:1]
    assert warning.startswith(f"The read-write mount /private ({folders['private']}) is not writable by the replica's")
    assert f"uid {owner}" in warning and "mode 0755" in warning
    assert "writable by uid 65534" in warning and "or mount it read-only" in warning
    # What the service's members read names the mount, never the node's host path.
    assert public.startswith("The read-write mount /private is not writable by the replica's user (uid 65534")
    assert f"uid {owner}" in public and "writable by uid 65534" in public and "or mount it read-only" in public
    assert str(tmp_path) not in public
    names = [w.log.split()[3] for w in unwritable_mounts(mounts, 65534, 65534 if gid != 65534 else 65533)]
    assert names == ["/private", "/group"]  # others may write /open and /sticky
    assert [w.log.split()[3] for w in unwritable_mounts(mounts, 65534, gid)] == ["/private"]  # its group may
    assert unwritable_mounts(mounts, owner, -1) == []  # its owner may write them all
