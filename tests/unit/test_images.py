"""serving.core.images: an image reference's registry as Docker reads it, the SERVING_REGISTRIES
allow-list, and a pull's bytes from the daemon's progress messages."""

from __future__ import annotations

import pytest

from serving.core.images import PullProgress, parse_registries, pull_refusal, registry_of, split_reference


@pytest.mark.parametrize(
    ("image", "registry", "path"),
    [
        ("python", "docker.io", "library/python"),
        ("python:3.11", "docker.io", "library/python"),
        ("modelserve/python:3.11", "docker.io", "modelserve/python"),
        ("docker.io/library/python:3.11", "docker.io", "library/python"),
        ("index.docker.io/acme/py", "docker.io", "acme/py"),
        ("registry-1.docker.io/acme/py", "docker.io", "acme/py"),
        ("ghcr.io/acme/serve:v1", "ghcr.io", "acme/serve"),
        ("GHCR.io/Acme/serve", "ghcr.io", "acme/serve"),
        ("localhost/team/py", "localhost", "team/py"),
        ("localhost:5000/team/py:2", "localhost:5000", "team/py"),
        ("127.0.0.1:5000/test/python:abc", "127.0.0.1:5000", "test/python"),
        ("10.0.0.5:5000/py@sha256:" + "a" * 64, "10.0.0.5:5000", "py"),
        ("team/py@sha256:" + "b" * 64, "docker.io", "team/py"),
        # A first component without '.', ':' or "localhost" is a Hub namespace, not a host.
        ("myregistry/py", "docker.io", "myregistry/py"),
    ],
)
def test_reference_registry_as_docker_reads_it(image: str, registry: str, path: str) -> None:
    assert split_reference(image) == (registry, path)
    assert registry_of(image) == registry


def test_registries_setting_is_normalised_and_urls_are_refused() -> None:
    assert parse_registries([" ghcr.io/Acme/ ", "index.docker.io", "", "docker.io", "127.0.0.1:5000"]) == (
        "ghcr.io/acme",
        "docker.io",
        "127.0.0.1:5000",
    )
    with pytest.raises(ValueError, match="is a URL; write the registry as Docker names it"):
        parse_registries(["https://ghcr.io"])


def test_pull_allowed_only_from_listed_registries_and_paths() -> None:
    allowed = parse_registries(["127.0.0.1:5000", "ghcr.io/acme", "docker.io"])
    assert pull_refusal("127.0.0.1:5000/test/python:1", allowed) == ""
    assert pull_refusal("ghcr.io/acme/serve:v1", allowed) == ""
    assert pull_refusal("ghcr.io/acme", allowed) == ""
    assert pull_refusal("python:3.11", allowed) == ""
    # Another port is another registry; a path prefix is matched at component boundaries.
    refused = pull_refusal("127.0.0.1:5001/test/python:1", allowed)
    assert refused.startswith("The image 127.0.0.1:5001/test/python:1 is not on this node and its registry ")
    assert "add 127.0.0.1:5001 to SERVING_REGISTRIES" in refused
    assert "ghcr.io/acme, docker.io" in refused
    assert pull_refusal("ghcr.io/acmeevil/serve", allowed) != ""
    assert pull_refusal("ghcr.io/other/serve", allowed) != ""


def test_nothing_listed_refuses_every_pull_saying_none_is_listed() -> None:
    refused = pull_refusal("python:3.11", ())
    assert "registry docker.io" in refused
    assert "(SERVING_REGISTRIES: none)" in refused


def test_progress_counts_downloaded_bytes_of_new_layers() -> None:
    tally = PullProgress()
    for message in [
        {"status": "Pulling from test/python", "id": "abc"},
        {"status": "Pulling fs layer", "id": "l1", "progressDetail": {}},
        {"status": "Already exists", "id": "l0", "progressDetail": {}},
        {"status": "Waiting", "id": "l2", "progressDetail": {}},
        {"status": "Downloading", "id": "l1", "progressDetail": {"current": 100, "total": 1000}},
        {"status": "Downloading", "id": "l2", "progressDetail": {"current": 50, "total": 500}},
    ]:
        tally.feed(message)
    assert tally.as_json() == {"done": 150, "total": 1500}
    tally.feed({"status": "Download complete", "id": "l1", "progressDetail": {}})
    tally.feed({"status": "Extracting", "id": "l1", "progressDetail": {"current": 10, "total": 4000}})
    assert tally.as_json() == {"done": 1050, "total": 1500}
    tally.feed({"status": "Pull complete", "id": "l2", "progressDetail": {}})
    tally.feed({"status": "Digest: sha256:" + "c" * 64})
    assert tally.as_json() == {"done": 1500, "total": 1500}
    assert tally.error == ""


def test_progress_keeps_the_daemons_error() -> None:
    tally = PullProgress()
    tally.feed({"error": "short", "errorDetail": {"message": "manifest unknown: manifest unknown"}})
    assert tally.error == "manifest unknown: manifest unknown"
    other = PullProgress()
    other.feed({"error": "denied: requested access to the resource is denied"})
    assert other.error == "denied: requested access to the resource is denied"
