"""Commands that write under the model folder, which replicas see read-only (issue 18).

Published folders often download weights on first start into the model folder (``--download-dir
{model_path}``, ``HF_HOME={model_path}/hf``): here that fails with "Read-only file system" at run
time. These pure checks find such arguments in a start command or a ``run_command`` action, so the
validator can say so before anything starts: a warning (the file is still valid), naming the
argument, pointing at the writable cache ``/home/work/.cache``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence

CACHE_DIR = "/home/work/.cache"
# Options whose value is where a program writes.
WRITE_OPTIONS = frozenset(
    {
        "--download-dir",
        "--cache-dir",
        "--local-dir",
        "--output-dir",
        "--output",
        "-o",
        "--outdir",
        "--out-dir",
        "--log-dir",
    }
)
WRITE_PREFIXES = ("--save",)  # --save-dir, --save_path, --save-to ...
# Variables that tell libraries where to write their caches.
CACHE_VARIABLES = frozenset(
    {"HF_HOME", "TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "TORCH_HOME"}
)
_REDIRECT = re.compile(r"\A[0-9&]?>>?(?P<target>.*)\Z")
_ASSIGNMENT = re.compile(r"\A(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)\Z", re.S)


def under(path: str, root: str) -> bool:
    if not path.startswith("/") or not root.startswith("/"):
        return False
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _is_write_option(name: str) -> bool:
    name = name.replace("_", "-")
    return name in WRITE_OPTIONS or any(name.startswith(p) for p in WRITE_PREFIXES)


def _tokens(command: str | Sequence[str]) -> list[str]:
    if isinstance(command, str):
        try:
            return shlex.split(command, comments=True)
        except ValueError:  # an unbalanced quote: the words as they are
            return command.split()
    tokens: list[str] = []
    for part in command:
        # ["sh", "-c", "... > /models/x"]: a script's words, not the script as one word
        tokens += _tokens(part) if any(c.isspace() for c in part) else [part]
    return tokens


def command_writes(command: str | Sequence[str], root: str) -> list[str]:
    """The arguments of ``command`` that write under ``root``, as written (``--download-dir /models``)."""
    found: list[str] = []
    tokens = _tokens(command)
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        redirect = _REDIRECT.match(token)
        if redirect:
            target = redirect.group("target") or following
            if under(target, root):
                found.append(f"{token} {following}" if not redirect.group("target") else token)
            continue
        if token.startswith("-"):
            name, eq, value = token.partition("=")
            if _is_write_option(name):
                target = value if eq else following
                if under(target, root):
                    found.append(token if eq else f"{token} {following}")
            continue
        assignment = _ASSIGNMENT.match(token)
        if assignment and assignment.group("name") in CACHE_VARIABLES and under(assignment.group("value"), root):
            found.append(token)
    return list(dict.fromkeys(found))


def environ_writes(environ: Mapping[str, object], root: str) -> list[str]:
    """The cache variables of ``environ`` that point under ``root`` (``HF_HOME=/models/hf``)."""
    return [
        f"{name}={value}"
        for name, value in environ.items()
        if name in CACHE_VARIABLES and isinstance(value, str) and under(value, root)
    ]


def message(argument: str, root: str) -> str:
    return (
        f"writes under the model folder ({argument}), but the model folder is mounted read-only at {root}: "
        f"it fails with 'Read-only file system'. Write to {CACHE_DIR} instead (the service's persistent "
        f"cache on the node; HF_HOME points there already), e.g. {CACHE_DIR}/downloads."
    )


def warnings_for(arguments: Iterable[str], root: str) -> list[str]:
    return [message(a, root) for a in arguments]


def environ_warnings(environ: Mapping[str, object], root: str) -> list[str]:
    """``environ_writes`` in words: one warning per cache variable pointing under the read-only ``root``."""
    return [f"The environment variable {message(a, root)}" for a in environ_writes(environ, root)]
