"""serving.core.snapshots: manifests, digests, fetch plans, node keys (pure)."""

from __future__ import annotations

import pytest

from serving.core import snapshots
from serving.core.snapshots import FileEntry, ManifestError

SHA_A = "a" * 64
SHA_B = "b" * 64


def entry(path: str, sha: str = SHA_A, size: int = 3, mode: int = 0o644) -> dict[str, object]:
    return {"path": path, "size": size, "mode": mode, "sha256": sha}


def test_parse_manifest_keeps_permission_bits_only() -> None:
    [parsed] = snapshots.parse_manifest({"files": [entry("a/b.txt", mode=0o100755)]})
    assert parsed == FileEntry("a/b.txt", 3, 0o755, SHA_A)
    assert parsed.executable and parsed.object_name == f"{SHA_A}.x"


@pytest.mark.parametrize("path", ["../etc/passwd", "/abs", "a/../b", "a//b", "./a", "a/", "", "a\x00b", "..", "a/./b"])
def test_parse_manifest_refuses_paths_outside_the_folder(path: str) -> None:
    with pytest.raises(ManifestError, match="not inside the folder"):
        snapshots.parse_manifest({"files": [entry(path)]})


@pytest.mark.parametrize(
    "bad",
    [
        {"files": "x"},
        {},
        {"files": [1]},
        {"files": [entry("a", sha="A" * 64)]},
        {"files": [entry("a", sha="a" * 63)]},
        {"files": [entry("a", size=-1)]},
        {"files": [{"path": "a", "size": "1", "mode": 0, "sha256": SHA_A}]},
        {"files": [entry("a"), entry("a")]},
        {"files": [entry("a"), entry("a/b")]},
    ],
)
def test_parse_manifest_refuses_malformed_entries(bad: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        snapshots.parse_manifest(bad)


def test_digest_is_of_what_a_replica_sees() -> None:
    one = snapshots.parse_manifest({"files": [entry("a"), entry("b", SHA_B)]})
    same_reordered = snapshots.parse_manifest({"files": [entry("b", SHA_B), entry("a", mode=0o600)]})
    changed = snapshots.parse_manifest({"files": [entry("a"), entry("b", SHA_A)]})
    now_executable = snapshots.parse_manifest({"files": [entry("a", mode=0o755), entry("b", SHA_B)]})
    digest = snapshots.manifest_digest(one)
    assert digest == snapshots.manifest_digest(same_reordered)  # read bits do not matter: all are readable
    assert digest != snapshots.manifest_digest(changed)
    assert digest != snapshots.manifest_digest(now_executable)


def test_plan_fetches_each_missing_content_once() -> None:
    entries = snapshots.parse_manifest(
        {
            "files": [
                entry("kept", SHA_A, size=10),
                entry("new", SHA_B, size=5),
                entry("copy-of-new", SHA_B, size=5),
                entry("kept-but-executable", SHA_A, size=10, mode=0o755),
            ]
        }
    )
    plan = snapshots.plan_fetch(entries, have={f"{SHA_A}.r"})
    assert [e.path for e in plan.fetch] == ["new", "kept-but-executable"]
    assert [e.path for e in plan.link] == ["kept", "copy-of-new"]
    assert (plan.fetch_bytes, plan.total_bytes) == (15, 30)


def test_node_key_checks() -> None:
    key = snapshots.node_key("secret", "gpu-1")
    header = snapshots.node_authorization("gpu-1", key)
    assert snapshots.check_node_authorization(header, "secret") == "gpu-1"
    assert snapshots.check_node_authorization(header, "other secret") is None
    # One node's key is not another's.
    assert snapshots.check_node_authorization(snapshots.node_authorization("gpu-2", key), "secret") is None
    for bad in ("", "Node", f"Bearer gpu-1:{key}", "Node gpu-1", f"Node gpu 1:{key}", f"Node gpu-1:{key[:-1]}"):
        assert snapshots.check_node_authorization(bad, "secret") is None


def test_format_bytes() -> None:
    assert snapshots.format_bytes(0) == "0 B"
    assert snapshots.format_bytes(1536) == "1.5 KiB"
    assert snapshots.format_bytes(2 * 1024**3) == "2.0 GiB"
    assert snapshots.format_bytes(5 * 1024**4) == "5120.0 GiB"
