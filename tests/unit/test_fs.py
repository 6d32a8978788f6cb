"""storage/fs.py: every refused path one by one, symlinks never followed (also when swapped in mid-way),
uploads atomic and within the quota. Pure filesystem tests: no database."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import fs
from storage.fs import FolderFS


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "models").mkdir()
    (folder / "models" / "weights.bin").write_bytes(b"w" * 10)
    (folder / "README.md").write_text("hello\n")
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the folder that nothing may reach."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "secret.txt").write_text("top secret")
    return target


@pytest.fixture
def folder(root: Path) -> FolderFS:
    return FolderFS(root)


# --- split_path: each refused path, one by one ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a", ("a",)),
        ("a/b.txt", ("a", "b.txt")),
        ("models/", ("models",)),
        ("日本語/ファイル.txt", ("日本語", "ファイル.txt")),
        ("with space/..hidden...", ("with space", "..hidden...")),
        ("x" * 255, ("x" * 255,)),
    ],
)
def test_split_path_accepts(path: str, expected: tuple[str, ...]) -> None:
    assert fs.split_path(path) == expected


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("..", "'..'"),
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("a/..", "'..'"),
        (".", "'.'"),
        ("a/./b", "'.'"),
        ("/etc/passwd", "absolute path"),
        ("/", "absolute path"),
        ("a\x00b", "NUL byte"),
        ("", "empty"),
        ("a//b", "empty name"),
        ("//", "absolute"),
        ("x" * 256, "limit is 255 bytes"),
        ("あ" * 86, "limit is 255 bytes"),  # 258 bytes in UTF-8, 86 characters
        ("/".join(["y" * 200] * 21), "limit is 4096 bytes"),
        ("a\nb", "control character"),
        ("tab\there", "control character"),
        ("bad\udcffname", "not valid UTF-8"),
        (".modelserve-uploads/x.part", "reserved"),
        (".modelserve-uploads", "reserved"),
    ],
)
def test_split_path_refuses(path: str, words: str) -> None:
    with pytest.raises(fs.PathRefused) as info:
        fs.split_path(path)
    assert words in info.value.message
    assert info.value.status == 400


def test_root_only_where_allowed() -> None:
    assert fs.split_path("", allow_root=True) == ()
    with pytest.raises(fs.PathRefused):
        fs.split_path("")


def test_every_operation_refuses_traversal(folder: FolderFS, outside: Path) -> None:
    bad = "../outside/secret.txt"
    for call in (
        lambda: folder.list(bad),
        lambda: folder.stat(bad),
        lambda: folder.open_read(bad),
        lambda: folder.preview(bad),
        lambda: folder.mkdir(bad),
        lambda: folder.delete(bad),
        lambda: folder.move("README.md", bad),
        lambda: folder.move(bad, "x"),
        lambda: folder.begin_upload(bad, quota=100),
    ):
        with pytest.raises(fs.PathRefused):
            call()
    assert (outside / "secret.txt").read_text() == "top secret"


# --- listing -------------------------------------------------------------------------------------


def test_list_root_and_subdir(folder: FolderFS) -> None:
    entries = folder.list("")
    assert [(e.name, e.type, e.path) for e in entries] == [
        ("models", "dir", "models"),
        ("README.md", "file", "README.md"),
    ]
    (inner,) = folder.list("models")
    assert (inner.path, inner.size, inner.type) == ("models/weights.bin", 10, "file")
    assert inner.to_dict()["modified"].tzinfo is not None


def test_list_shows_symlinks_as_such_and_never_follows(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "escape")
    os.symlink(outside / "secret.txt", root / "secret-link")
    entries = {e.name: e for e in folder.list("")}
    assert entries["escape"].type == "symlink" and entries["escape"].size == 0
    assert entries["secret-link"].type == "symlink"
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.list("escape")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.stat("escape/secret.txt")


def test_list_hides_upload_dir_and_refuses_files(folder: FolderFS, root: Path) -> None:
    (root / fs.UPLOAD_DIR).mkdir()
    assert fs.UPLOAD_DIR not in [e.name for e in folder.list("")]
    with pytest.raises(fs.PathConflict, match="not a directory"):
        folder.list("README.md")
    with pytest.raises(fs.PathNotFound):
        folder.list("nope")


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(fs.StorageUnavailable, match="missing"):
        FolderFS(tmp_path / "gone").list("")


# --- reading -------------------------------------------------------------------------------------


def test_open_read(folder: FolderFS) -> None:
    with folder.open_read("models/weights.bin") as handle:
        assert handle.read() == b"w" * 10


def test_read_through_symlink_refused(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside / "secret.txt", root / "link.txt")
    os.symlink(outside, root / "models" / "deeper")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.open_read("link.txt")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.open_read("models/deeper/secret.txt")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.preview("link.txt")


def test_relative_symlink_inside_folder_also_refused(folder: FolderFS, root: Path) -> None:
    # Even a link that stays inside is refused: following links at all is what makes races possible.
    os.symlink("README.md", root / "alias")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.open_read("alias")


def test_read_special_files_refused_without_hanging(folder: FolderFS, root: Path) -> None:
    os.mkfifo(root / "pipe")
    with pytest.raises(fs.NotAFile, match="not a regular file"):
        folder.open_read("pipe")
    with pytest.raises(fs.NotAFile, match="is a directory"):
        folder.open_read("models")
    with pytest.raises(fs.PathNotFound):
        folder.open_read("missing.txt")
    with pytest.raises(fs.PathConflict, match="not a directory"):
        folder.open_read("README.md/x")


def test_preview(folder: FolderFS, root: Path) -> None:
    (root / "conf.toml").write_text('[custom.environment]\nimage = "x"\n')
    assert folder.preview("conf.toml") == ('[custom.environment]\nimage = "x"\n', 33, False)
    (root / "big.log").write_text("é" * 100)  # 200 bytes: a cut at 5 splits a character
    text, size, truncated = folder.preview("big.log", limit=5)
    assert (text, size, truncated) == ("éé", 200, True)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(fs.NotText, match="binary"):
        folder.preview("blob.bin")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(fs.NotText, match="UTF-8"):
        folder.preview("latin1.txt")


# --- writing -------------------------------------------------------------------------------------


def test_mkdir(folder: FolderFS, root: Path) -> None:
    assert folder.mkdir("new").type == "dir"
    with pytest.raises(fs.PathConflict, match="already exists"):
        folder.mkdir("new")
    with pytest.raises(fs.PathNotFound):
        folder.mkdir("a/b/c")
    assert folder.mkdir("a/b/c", parents=True).path == "a/b/c"
    assert (root / "a" / "b" / "c").is_dir()


def test_mkdir_through_symlinked_parent_refused(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "escape")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.mkdir("escape/planted")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.mkdir("escape/deep/planted", parents=True)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_delete_file_tree_and_link(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "escape")
    (root / "models" / "sub").mkdir()
    os.symlink(outside, root / "models" / "sub" / "inner-link")
    assert folder.delete("escape").type == "symlink"  # the link, not what it points to
    assert folder.delete("models").type == "dir"
    assert folder.delete("README.md").type == "file"
    assert [p.name for p in root.iterdir()] == []
    assert (outside / "secret.txt").read_text() == "top secret"
    with pytest.raises(fs.PathNotFound):
        folder.delete("README.md")
    with pytest.raises(fs.PathRefused):
        folder.delete("")


def test_delete_through_symlinked_parent_refused(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "escape")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.delete("escape/secret.txt")
    assert (outside / "secret.txt").exists()


def test_move(folder: FolderFS, root: Path) -> None:
    assert folder.move("README.md", "models/README.txt").path == "models/README.txt"
    assert (root / "models" / "README.txt").read_text() == "hello\n"
    folder.mkdir("other")
    folder.move("models", "other/models")
    assert (root / "other" / "models" / "weights.bin").exists()
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    with pytest.raises(fs.PathConflict, match="already exists"):
        folder.move("a.txt", "b.txt")
    assert (root / "b.txt").read_text() == "b"
    with pytest.raises(fs.PathRefused, match="into itself"):
        folder.move("other", "other/models/x")
    with pytest.raises(fs.PathNotFound):
        folder.move("nope", "x")
    with pytest.raises(fs.PathNotFound):
        folder.move("a.txt", "no-such-dir/a.txt")


def test_move_without_renameat2_still_refuses_overwrite(
    folder: FolderFS, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fs, "_LIBC", None)
    (root / "b.txt").write_text("b")
    with pytest.raises(fs.PathConflict):
        folder.move("README.md", "b.txt")
    folder.move("README.md", "c.txt")
    assert (root / "c.txt").read_text() == "hello\n"


def test_move_out_through_symlink_refused(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "escape")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.move("README.md", "escape/README.md")
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.move("escape/secret.txt", "stolen.txt")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


# --- the race: a component swapped for a symlink between check and use --------------------------------


def _swap_before_open(monkeypatch: pytest.MonkeyPatch, root: Path, component: str, target: Path) -> Callable[[], int]:
    """Interpose on the walk: just before `component` is opened, replace it with a link to `target`."""
    real = fs.open_dir_at
    calls = {"n": 0}

    def racing_open(dir_fd: int, name: str) -> int:
        if name == component and calls["n"] == 0:
            calls["n"] += 1
            victim = root / component
            victim.rename(root / f"{component}.moved-away")
            os.symlink(target, victim)
        return real(dir_fd, name)

    monkeypatch.setattr(fs, "open_dir_at", racing_open)
    return lambda: calls["n"]


@pytest.mark.parametrize("operation", ["read", "list", "upload", "mkdir", "delete", "move"])
def test_component_swapped_for_symlink_mid_operation_is_refused(
    folder: FolderFS, root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    (outside / "weights.bin").write_bytes(b"outside")
    swapped = _swap_before_open(monkeypatch, root, "models", outside)
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        if operation == "read":
            folder.open_read("models/weights.bin")
        elif operation == "list":
            folder.list("models")
        elif operation == "upload":
            with folder.begin_upload("models/planted.bin", quota=10**6) as upload:
                upload.write(b"evil")
                upload.commit()
        elif operation == "mkdir":
            folder.mkdir("models/planted")
        elif operation == "delete":
            folder.delete("models/weights.bin")
        else:
            folder.move("models/weights.bin", "stolen.bin")
    assert swapped() == 1
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt", "weights.bin"]
    assert (outside / "weights.bin").read_bytes() == b"outside"
    assert not (root / "stolen.bin").exists()
    assert not any((root / fs.UPLOAD_DIR).glob("*")) if (root / fs.UPLOAD_DIR).exists() else True


def test_swap_of_the_last_component_is_refused_when_reading(
    folder: FolderFS, root: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def racing(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if path == "README.md" and kwargs.get("dir_fd") is not None:
            (root / "README.md").unlink()
            os.symlink(outside / "secret.txt", root / "README.md")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fs.os, "open", racing)
    with pytest.raises(fs.PathRefused, match="symbolic link"):
        folder.open_read("README.md")


# --- uploads and the quota ---------------------------------------------------------------------------


def _upload(folder: FolderFS, path: str, chunks: list[bytes], quota: int = 10**6, length: int | None = None) -> None:
    with folder.begin_upload(path, quota=quota, content_length=length) as upload:
        for chunk in chunks:
            upload.write(chunk)
        upload.commit()


def _temp_files(root: Path) -> list[str]:
    updir = root / fs.UPLOAD_DIR
    return [p.name for p in updir.iterdir()] if updir.exists() else []


def test_upload_creates_parents_and_replaces(folder: FolderFS, root: Path) -> None:
    with folder.begin_upload("new/deep/file.bin", quota=1000, content_length=6) as upload:
        upload.write(b"abc")
        upload.write(b"def")
        entry, created = upload.commit()
    assert created and entry.size == 6 and entry.path == "new/deep/file.bin"
    assert (root / "new" / "deep" / "file.bin").read_bytes() == b"abcdef"
    with folder.begin_upload("new/deep/file.bin", quota=1000) as upload:
        upload.write(b"xyz")
        entry, created = upload.commit()
    assert not created and (root / "new" / "deep" / "file.bin").read_bytes() == b"xyz"
    assert _temp_files(root) == []


def test_file_is_invisible_until_complete(folder: FolderFS, root: Path) -> None:
    with folder.begin_upload("partial.bin", quota=1000) as upload:
        upload.write(b"half")
        assert not (root / "partial.bin").exists()
        assert "partial.bin" not in [e.name for e in folder.list("")]
        assert len(_temp_files(root)) == 1
    assert not (root / "partial.bin").exists()
    assert _temp_files(root) == []


def test_quota_checked_before_upload(folder: FolderFS, root: Path) -> None:
    used = folder.usage()
    assert used == 16  # weights.bin + README.md
    with pytest.raises(fs.QuotaExceeded) as info:
        folder.begin_upload("big.bin", quota=100, content_length=85)
    assert info.value.status == 413 and "quota" in info.value.message and "84 bytes is free" in info.value.message
    assert _temp_files(root) == [] and not (root / "big.bin").exists()
    _upload(folder, "fits.bin", [b"x" * 84], quota=100, length=84)
    assert folder.usage() == 100


def test_quota_counted_during_upload_without_length(folder: FolderFS, root: Path) -> None:
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with pytest.raises(fs.QuotaExceeded, match="not saved"):
        _upload(folder, "models/weights.bin.new", [b"x" * 50, b"x" * 50], quota=100)
    assert _temp_files(root) == []
    after = sorted(str(p.relative_to(root)) for p in root.rglob("*") if fs.UPLOAD_DIR not in str(p))
    assert after == before


def test_replacing_a_file_may_reuse_its_space(folder: FolderFS, root: Path) -> None:
    # 16 bytes used; replacing the 10-byte weights with 94 bytes ends at exactly 100.
    _upload(folder, "models/weights.bin", [b"n" * 94], quota=100, length=94)
    assert folder.usage() == 100


def test_quota_rechecked_at_commit_for_concurrent_uploads(folder: FolderFS, root: Path) -> None:
    first = folder.begin_upload("one.bin", quota=100)
    second = folder.begin_upload("two.bin", quota=100)
    first.write(b"1" * 60)
    second.write(b"2" * 60)
    first.commit()
    with pytest.raises(fs.QuotaExceeded):
        second.commit()
    assert not (root / "two.bin").exists() and _temp_files(root) == []


def test_disk_full_leaves_folder_unchanged(folder: FolderFS, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    written = {"n": 0}

    def filling_write(fd: int, data: bytes) -> int:
        written["n"] += 1
        if written["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(fs.os, "write", filling_write)
    with pytest.raises(fs.StorageFull) as info:
        _upload(folder, "README.md", [b"a", b"b"])
    assert info.value.status == 507 and "disk is full" in info.value.message
    assert (root / "README.md").read_text() == "hello\n"
    assert _temp_files(root) == []


def test_disk_free_checked_against_announced_length(folder: FolderFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FolderFS, "disk_free", lambda self: 10)
    with pytest.raises(fs.StorageFull, match="only 10 bytes free"):
        folder.begin_upload("x.bin", quota=10**6, content_length=11)


def test_short_body_is_not_saved(folder: FolderFS, root: Path) -> None:
    with pytest.raises(fs.FsError, match="ended after 3 of 10 bytes"):
        _upload(folder, "short.bin", [b"abc"], length=10)
    assert not (root / "short.bin").exists() and _temp_files(root) == []


def test_upload_onto_a_directory_is_refused(folder: FolderFS, root: Path) -> None:
    with pytest.raises(fs.PathConflict, match="is a directory"):
        _upload(folder, "models", [b"x"])
    with pytest.raises(fs.PathRefused, match="needs a file name"):
        folder.begin_upload("models/", quota=100)
    assert _temp_files(root) == []


def test_upload_replaces_a_symlink_without_following_it(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside / "secret.txt", root / "link.txt")
    _upload(folder, "link.txt", [b"new"])
    assert not (root / "link.txt").is_symlink() and (root / "link.txt").read_bytes() == b"new"
    assert (outside / "secret.txt").read_text() == "top secret"


def test_usage_does_not_follow_links_or_count_uploads(folder: FolderFS, root: Path, outside: Path) -> None:
    os.symlink(outside, root / "escape")
    (outside / "huge.bin").write_bytes(b"h" * 5000)
    with folder.begin_upload("pending.bin", quota=10**6) as upload:
        upload.write(b"p" * 300)
        assert folder.usage() == 16


def test_stale_temp_files_are_swept(folder: FolderFS, root: Path) -> None:
    updir = root / fs.UPLOAD_DIR
    updir.mkdir()
    stale = updir / "dead.part"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    live = folder.begin_upload("a.bin", quota=10**6)  # holds its lock
    os.utime(updir / live._tmp_name, (1, 1))
    with folder.begin_upload("b.bin", quota=10**6):
        names = _temp_files(root)
    assert "dead.part" not in names and live._tmp_name in names
    live.abort()


def test_concurrent_mkdir_parents_is_safe(folder: FolderFS, root: Path) -> None:
    errors: list[BaseException] = []

    def make(i: int) -> None:
        try:
            _upload(folder, f"shared/parent/file{i}.txt", [b"x"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list((root / "shared" / "parent").iterdir())) == 8


def test_many_files_commit_together_or_not_at_all(folder: FolderFS, root: Path) -> None:
    used = folder.usage()
    budget = fs.Budget(100 - used, used=used)  # 84 bytes free
    first = folder.begin_upload("a.bin", quota=100, budget=budget, used=used)
    second = folder.begin_upload("b.bin", quota=100, budget=budget, used=used)
    first.write(b"a" * 50)
    with pytest.raises(fs.QuotaExceeded):
        second.write(b"b" * 50)  # the shared budget: 100 > 84
    with pytest.raises(RuntimeError):
        fs.commit_uploads(folder, [first, second])
    assert not (root / "a.bin").exists() and _temp_files(root) == []


def test_commit_refuses_a_batch_that_names_a_directory(folder: FolderFS, root: Path) -> None:
    good = folder.begin_upload("fine.txt", quota=10**6)
    good.write(b"ok")
    bad = folder.begin_upload("models", quota=10**6)
    bad.write(b"x")
    with pytest.raises(fs.PathConflict, match="is a directory"):
        fs.commit_uploads(folder, [good, bad])
    assert not (root / "fine.txt").exists() and _temp_files(root) == []


def test_commit_refuses_the_same_path_twice(folder: FolderFS, root: Path) -> None:
    one = folder.begin_upload("same.txt", quota=10**6)
    two = folder.begin_upload("same.txt", quota=10**6)
    with pytest.raises(fs.PathConflict, match="twice"):
        fs.commit_uploads(folder, [one, two])
    assert _temp_files(root) == []


def test_retarget_checks_the_new_path(folder: FolderFS) -> None:
    upload = folder.begin_upload("x.txt", quota=10**6)
    with pytest.raises(fs.PathRefused):
        upload.retarget("../x.txt")
    upload.retarget("sub/x.txt")
    upload.write(b"x")
    entry, created = upload.commit()
    assert entry.path == "sub/x.txt" and created


def test_format_bytes() -> None:
    assert [fs.format_bytes(n) for n in (0, 1, 1023, 1024, 5 * 1024**3)] == [
        "0 bytes",
        "1 byte",
        "1023 bytes",
        "1.0 KiB",
        "5.0 GiB",
    ]
