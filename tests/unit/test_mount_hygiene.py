"""serving.engines.mounts: setuid/setgid bits a replica left are cleared, and nothing else is touched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from serving.engines.mounts import strip_setid_bits


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
