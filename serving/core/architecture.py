"""CPU architectures: the names nodes report and images are built for, spelt one way.

``service-definition.toml``'s ``[<runtime>.environment] architecture`` names the architecture the
image is built for; a node reports its own (``platform.machine()``); a replica is placed only on a
node of the same one. Docker, Go and Debian call them amd64/arm64, the kernel x86_64/aarch64:
both spellings mean the same machine.
"""

from __future__ import annotations

_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize(name: str) -> str:
    """``"AMD64"`` -> ``"x86_64"``, ``"arm64"`` -> ``"aarch64"``; an empty name stays empty (any)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def fits(wanted: str, node: str) -> bool:
    """Whether a node of architecture ``node`` runs an image built for ``wanted`` (empty: any)."""
    return not wanted.strip() or normalize(wanted) == normalize(node)
