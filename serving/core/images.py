"""Pure image-reference logic for pulls (issue 15): which registry an image reference names, whether
``SERVING_REGISTRIES`` lets a node pull it, and the bytes done/total of a pull from Docker's
progress messages.

A reference's registry is read the way Docker reads it: the first path component is a registry
when it holds a ``.`` or a ``:`` or is ``localhost``; otherwise the image is on Docker Hub
(``docker.io``, whose other names ``index.docker.io`` and ``registry-1.docker.io`` are the same).

No ORM, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
PULL_CHOICES = ("never", "missing")


def _normal_registry(host: str) -> str:
    host = host.lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def split_reference(image: str) -> tuple[str, str]:
    """``image`` -> (registry, repository path), e.g. ``"127.0.0.1:5000/team/py:1"`` ->
    ``("127.0.0.1:5000", "team/py")`` and ``"python:3.11"`` -> ``("docker.io", "library/python")``."""
    name = image.strip().split("@", 1)[0]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = _normal_registry(first), rest
    else:
        registry, path = DOCKER_HUB, name
    # The tag follows the last ':' of the last component (a registry's port is not a tag).
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path = path[: len(path) - len(last)] + last.split(":", 1)[0]
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return registry, path.lower()


def registry_of(image: str) -> str:
    return split_reference(image)[0]


def parse_registries(entries: Iterable[str]) -> tuple[str, ...]:
    """``SERVING_REGISTRIES`` entries, normalised: a registry (``ghcr.io``, ``10.0.0.5:5000``,
    ``docker.io``), optionally followed by a path that pulls must be under (``ghcr.io/acme``)."""
    out: list[str] = []
    for entry in entries:
        entry = entry.strip().strip("/")
        if not entry:
            continue
        if "://" in entry:
            raise ValueError(
                f"SERVING_REGISTRIES entry {entry!r} is a URL; write the registry as Docker names it, "
                "e.g. ghcr.io or 10.0.0.5:5000."
            )
        host, _, path = entry.partition("/")
        normal = _normal_registry(host) + (f"/{path.lower()}" if path else "")
        if normal not in out:
            out.append(normal)
    return tuple(out)


def pull_refusal(image: str, registries: Iterable[str]) -> str:
    """ "" when ``registries`` (``parse_registries``'s) allows pulling ``image``, else a sentence
    saying why not and what to set."""
    registry, path = split_reference(image)
    allowed = tuple(registries)
    for entry in allowed:
        host, _, prefix = entry.partition("/")
        if host == registry and (not prefix or path == prefix or path.startswith(prefix + "/")):
            return ""
    listed = ", ".join(allowed) if allowed else "none"
    return (
        f"The image {image} is not on this node and its registry {registry} is not one this node may pull "
        f"from (SERVING_REGISTRIES: {listed}); add {registry} to SERVING_REGISTRIES on the node, "
        "or load the image on the node by hand."
    )


# --- progress --------------------------------------------------------------------------------------


@dataclass
class PullProgress:
    """Bytes of a pull from the messages of Docker's ``/images/create`` stream (one per layer
    event: ``{"id": layer, "status": "Downloading", "progressDetail": {"current", "total"}}``).
    ``total`` grows as layers are announced; a layer already on the node counts for nothing."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (done, total)
    error: str = ""

    def feed(self, message: Mapping[str, Any]) -> None:
        if message.get("error"):
            detail = message.get("errorDetail")
            text = detail.get("message") if isinstance(detail, Mapping) else None
            self.error = str(text or message["error"])
            return
        layer = message.get("id")
        status = str(message.get("status") or "")
        if not layer or not isinstance(layer, str):
            return
        done, total = self.layers.get(layer, (0, 0))
        detail = message.get("progressDetail") or {}
        if status == "Downloading" and isinstance(detail, Mapping):
            total = int(detail.get("total") or total or 0)
            done = min(int(detail.get("current") or 0), total) if total else 0
        elif status in ("Download complete", "Verifying Checksum", "Extracting", "Pull complete"):
            done = total
        elif status == "Already exists":
            done = total = 0
        else:
            if layer not in self.layers and status in ("Pulling fs layer", "Waiting"):
                self.layers[layer] = (0, 0)
            return
        self.layers[layer] = (done, total)

    @property
    def done(self) -> int:
        return sum(d for d, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.layers.values())

    def as_json(self) -> dict[str, int]:
        return {"done": self.done, "total": self.total}
