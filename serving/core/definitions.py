"""Parse and validate ``model-definition.yaml`` (S2) and ``service-definition.toml`` (S3).

Pure: no Django, no I/O except the size-capped ``load_*`` helpers, ``read_folder_file``, ``folder_entry`` and
``validate_model_folder``, which read files and hand their bytes to the pure parsers. Every one of
them reads through ``storage.fs`` (each path component opened without following a symlink): a
folder's content is written by users and by replicas, and a symlink planted there must never make
the platform read a host file (issue 13). The parsers return frozen dataclasses or
raise one ``DefinitionError`` that lists *every* problem found, each with the file, the field path
(``models[0].service.port``), the line and column where known, and a sentence that says what is
wrong and how to fix it.

Hostile input is refused quickly and safely: files over 1 MiB, YAML anchors and aliases (no
"billion laughs"), every non-standard tag (``!!python/object`` and friends), nesting deeper than
``MAX_DEPTH``, more than ``MAX_NODES`` values, invalid UTF-8, NUL characters, and wrong types at every
level. YAML is *composed* (never constructed) with the safe loader, and the Python values are built
here from the node tree, which also gives every field its line and column.

What the original accepts, we accept (``port: "8000"``, numeric strings for the health-check
numbers, ``body`` as a list of lines, ``run_command``'s ``echo``, ``metadata`` with its aliases).
Our own additions, beyond the original, are marked "extension" below:

* ``health_check.headers``: a mapping of header names to values sent with every probe, for
  runtimes that check a token on every path.
* ``{model_path}`` in ``start_command`` and in the string arguments of pre-start actions is replaced
  by the model's ``model_path`` (or by the mount point given to the parser).
* Limits the original does not state: health-check times at most one day, ``max_retries`` at most
  10000, ``expected_status_code`` 100..599, ``model_path`` and ``health_check.path`` absolute.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import tomli
import yaml
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

if TYPE_CHECKING:
    from serving.core.runtimes import EffectiveService
    from storage.fs import FolderFS

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64  # nested mappings/lists; a real definition file uses about 6
MAX_NODES = 20_000  # values in one YAML document; a real definition file has a few hundred at most
MAX_PROBLEMS = 100  # reported in one error; the rest are counted
MAX_SECONDS = 86_400.0  # upper bound of every health-check time (extension)
MODEL_DEFINITION_NAMES = ("model-definition.yaml", "model-definition.yml")
DEFAULT_MODEL_DEFINITION_PATH = MODEL_DEFINITION_NAMES[0]
SERVICE_DEFINITION_NAME = "service-definition.toml"
PRE_START_ACTIONS = ("write_file", "write_tempfile", "run_command", "mkdir", "log")
SERVICE_SECTIONS = ("environment", "resource_slots", "environ")
MODEL_PATH_PLACEHOLDER = "{model_path}"

# A variable name both engines can hand on: ASCII only (str.isalpha() would take "MODÈLE", which
# the local engine's sandbox refuses at start). One rule for the API, the launcher, the folder's
# service-definition.toml and the engines.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ENV_NAME_RULE = "ASCII letters, digits and _, not starting with a digit"
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
# glibc's "unsecure" variables (sysdeps/generic/unsecvars.h) that make the dynamic loader or libc
# load code, or read or write files, named by whoever set them: in a privileged process that is
# the user's code running as root. The engines hand users' variables only to the replica's own,
# unprivileged process; refusing these where users set them is defence in depth (issue 13). Left
# out on purpose: TMPDIR and TZDIR (no code is loaded; servers legitimately set them) and the
# MALLOC_* tunables other than MALLOC_TRACE (which writes a file).
LOADER_VARIABLES = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
    }
)
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}\Z")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?\Z")
_ACCELERATOR_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}\.[a-z][a-z0-9_-]{0,31}\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")  # an RFC 9110 token
_MEM_TEXT = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?|\.[0-9]{1,20})\s*(?:([kmgtpe])(?:i?b|i)?|b)?\s*\Z", re.I)
_MEM_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5, "e": 1024**6}
_MAX_MEM = 2**63 - 1
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)")
_LAST_SEGMENT = re.compile(r'(?:^|\.)(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")\Z|\[[0-9]+\]\Z')

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{name}" for name in ("str", "int", "float", "bool", "null", "timestamp", "value", "merge")}


# --- problems ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a definition file. ``field`` is empty for file-level problems."""

    file: str
    field: str
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        return f"{where + ': ' if where else ''}{self.field + ': ' if self.field else ''}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "field": self.field,
            "line": self.line,
            "column": self.column,
            "message": self.message,
        }


class DefinitionError(ValueError):
    """One or more problems in definition files; ``str()`` lists them, one per line."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "the definition file is not valid")


class MemSizeError(ValueError):
    """A memory size that ``parse_mem`` can not read; ``str()`` says how to write one."""


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any) -> str:
    """A short, safe rendering of a value a user wrote, for messages (never huge, never recursive)."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return repr(_clip(value))
    if isinstance(value, int | float):
        return _clip(repr(value), 40)
    return f"a {type(value).__name__} value"


def field_path(parent: str, key: str) -> str:
    """``field_path("models[0]", "port")`` -> ``models[0].port``; odd keys are quoted and shortened."""
    part = key if len(key) <= 40 and _PLAIN_KEY.match(key) else json.dumps(_clip(key, 40), ensure_ascii=False)
    return f"{parent}.{part}" if parent else part


def _parent_path(path: str) -> str | None:
    match = _LAST_SEGMENT.search(path)
    if match is None or (match.start() == 0 and not path.startswith("[")):
        return "" if path else None
    return path[: match.start()]


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


class _Collector:
    """Collects problems while validating; ``marks`` maps field paths to (line, column)."""

    def __init__(self, file: str, marks: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.file = file
        self.marks = dict(marks or {})
        self.problems: list[Problem] = []
        self.dropped = 0

    def add(self, path: str, message: str, at: tuple[int, int] | None = None) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            self.dropped += 1
            return
        line, column = at if at is not None else self._mark(path)
        self.problems.append(Problem(self.file, path, message, line, column))

    def _mark(self, path: str) -> tuple[int | None, int | None]:
        probe: str | None = path
        for _ in range(MAX_DEPTH * 2):
            if probe is None:
                break
            if probe in self.marks:
                return self.marks[probe]
            if not probe:
                break
            probe = _parent_path(probe)
        return (None, None)

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        # In the order of the file, so a reader can go through it top to bottom.
        problems = sorted(self.problems, key=lambda p: (p.line is None, p.line or 0, p.column or 0))
        if self.dropped:
            problems.append(
                Problem(self.file, "", f"{self.dropped} more problem(s) not shown; fix the ones above first")
            )
        raise DefinitionError(problems)


def _fail(file: str, message: str, line: int | None = None, column: int | None = None) -> DefinitionError:
    return DefinitionError([Problem(file, "", message, line, column)])


# --- small shared parsers ------------------------------------------------------------------------


# Less than this can not start a Python server (Docker itself refuses under 6 MB): a `mem = 1`
# meant a gigabyte, and a bare number is bytes.
MIN_REPLICA_MEM = 16 * 1024 * 1024


def replica_mem_problem(mem: float) -> str | None:
    """Why ``mem`` bytes is too little for one replica, or None; 0 means "not limited"."""
    if 0 < mem < MIN_REPLICA_MEM:
        return (
            f"{int(mem):,} byte{'' if int(mem) == 1 else 's'} is too little memory for a replica (at least "
            "16 MiB); write a size with "
            'its unit such as "512mb" or "8gb": a bare number is bytes'
        )
    return None


def parse_mem(value: str | int | float) -> int:
    """A memory size -> bytes. Binary units: ``"8gb"``, ``"8g"``, ``"8GiB"``, ``"512m"``,
    ``"512MiB"``, ``"512Mi"``, ``"1.5g"``, ``"64k"``; a plain number (or digits) is bytes.

    Raises ``MemSizeError`` (a ``ValueError``) with a sentence saying how to write the size.
    """
    if isinstance(value, bool):
        raise MemSizeError("a memory size must be a number of bytes or a string such as '8g', not true/false")
    number: float
    if isinstance(value, int):
        if value < 0:
            raise MemSizeError(f"a memory size can not be negative, got {value}")
        if value > _MAX_MEM:
            raise MemSizeError(f"a memory size of {_show(value)} bytes is too large")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise MemSizeError(f"a memory size must be a finite number of at least 0, got {_show(value)}")
        number = value
    elif isinstance(value, str):
        match = _MEM_TEXT.match(value) if len(value) <= 64 else None
        if match is None:
            raise MemSizeError(
                f"{_show(value)} is not a memory size; write a number with a unit such as '512m', '8g' or '8gb'"
            )
        digits, unit = match.group(1), (match.group(2) or "").lower()
        number = float(digits) * _MEM_FACTORS[unit]
    else:
        raise MemSizeError(f"a memory size must be a number or a string such as '8g', got {_show(value)}")
    if number > _MAX_MEM:
        raise MemSizeError(f"the memory size {_show(value)} is too large")
    return int(number)


# --- decoding ------------------------------------------------------------------------------------


def _decode(data: bytes | str, file: str) -> str:
    """Bytes or text -> text, refusing what no definition file contains (size, encoding, NUL)."""
    if not isinstance(data, bytes | str):
        raise _fail(file, f"expected the text of the file, got {type(data).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise _fail(file, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; a definition file is small text")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            prefix = data[: exc.start].decode("utf-8", "replace")
            line, column = _line_column(prefix, len(prefix))
            raise _fail(
                file, f"the file is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8", line, column
            ) from None
    else:
        text = data
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            line, column = _line_column(text, exc.start)
            raise _fail(file, "the text contains an invalid character (a lone surrogate)", line, column) from None
    nul = text.find("\x00")
    if nul >= 0:
        line, column = _line_column(text, nul)
        raise _fail(file, "the file contains NUL bytes; is it a binary file? Save it as plain text", line, column)
    return text.removeprefix("\ufeff")


# --- YAML: compose safely, build values from the nodes -------------------------------------------


class _Refused(Exception):
    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _SafeComposer(yaml.SafeLoader):
    """The safe loader's composer, refusing anchors/aliases and capping depth and size."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event: Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            raise _Refused(
                "YAML aliases (*name) are not allowed in definition files; write the value out in full",
                event.start_mark,
            )
        if getattr(event, "anchor", None) is not None:
            raise _Refused(
                "YAML anchors (&name) are not allowed in definition files; remove the anchor and write values out",
                event.start_mark,
            )
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(
                f"the document has more than {MAX_NODES} values; a definition file is much smaller",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"the document is nested deeper than {MAX_DEPTH} levels", event.start_mark)
            node: Node | None = super().compose_node(parent, index)
            return node
        finally:
            self._depth -= 1


def _mark_of(mark: Any) -> tuple[int | None, int | None]:
    if mark is None:
        return (None, None)
    return (mark.line + 1, mark.column + 1)


def _compose(text: str, file: str) -> Node | None:
    loader: _SafeComposer | None = None
    try:
        loader = _SafeComposer(text)  # the reader checks every character here
        node: Node | None = loader.get_single_node()
        return node
    except _Refused as exc:
        raise _fail(file, exc.message, *_mark_of(exc.mark)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "the text is not valid YAML"
        if exc.context and exc.context.startswith("while"):
            problem = f"{problem} ({exc.context})"
        elif exc.context:
            problem = f"{exc.context}, {problem}"
        raise _fail(file, f"YAML syntax error: {problem}", *_mark_of(mark)) from None
    except ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise _fail(
            file,
            f"the character #x{exc.character:04x} is not allowed in YAML; remove it or write it as an escape",
            line,
            column,
        ) from None
    except yaml.YAMLError as exc:
        raise _fail(file, f"YAML error: {_clip(str(exc), 200)}") from None
    except RecursionError:
        raise _fail(file, f"the document is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()


class _YamlTree:
    """Plain Python values from a composed node tree, with the position of every field."""

    def __init__(self, file: str) -> None:
        self.collector = _Collector(file)
        self.marks: dict[str, tuple[int, int]] = {}
        self.int_texts: dict[str, str] = {}  # what the user wrote for integers (``mode: 0644``)
        self._constructor = SafeConstructor()

    def _problem(self, node: Node, path: str, message: str) -> None:
        self.collector.add(path, message, (node.start_mark.line + 1, node.start_mark.column + 1))

    def convert(self, node: Node, path: str) -> Any:
        self.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != f"{_TAG}seq":
                self._problem(node, path, f"the tag {_clip(node.tag, 60)!r} is not allowed; use a plain YAML list")
                return None
            return [self.convert(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != f"{_TAG}map":
                self._problem(node, path, f"the tag {_clip(node.tag, 60)!r} is not allowed; use a plain YAML mapping")
                return None
            return self._mapping(node, path)
        self._problem(node, path, "this kind of YAML value is not supported")
        return None

    def _mapping(self, node: MappingNode, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self._problem(key_node, path, "a key must be a plain name, not a list or a mapping")
                continue
            if key_node.tag == f"{_TAG}merge":
                self._problem(key_node, path, "merge keys (<<) are not supported; write the keys out")
                continue
            if key_node.tag not in _SCALAR_TAGS:
                self._problem(key_node, path, f"the tag {_clip(key_node.tag, 60)!r} is not allowed on a key")
                continue
            key = str(key_node.value)
            if "\x00" in key:
                self._problem(key_node, path, "a key contains a NUL character; remove it")
                continue
            child = field_path(path, key)
            if key in out:
                self._problem(key_node, child, "this key appears twice in the same mapping; keep only one")
                continue
            self.marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.convert(value_node, child)
        return out

    def _scalar(self, node: ScalarNode, path: str) -> Any:
        tag = node.tag
        text = str(node.value)
        if tag not in _SCALAR_TAGS:
            self._problem(node, path, f"the tag {_clip(tag, 60)!r} is not allowed; use plain YAML values")
            return None
        if tag in (f"{_TAG}str", f"{_TAG}value", f"{_TAG}merge", f"{_TAG}timestamp"):
            # Timestamps stay the text the user wrote (metadata.created); "=" and "<<" are text too.
            if "\x00" in text:
                self._problem(node, path, "the text contains a NUL character (\\0); remove it")
                return None
            return text
        try:
            if tag == f"{_TAG}null":
                return None
            if tag == f"{_TAG}bool":
                return bool(self._constructor.construct_yaml_bool(node))
            if tag == f"{_TAG}int":
                self.int_texts[path] = text
                return int(self._constructor.construct_yaml_int(node))
            return float(self._constructor.construct_yaml_float(node))
        except (ValueError, OverflowError, TypeError, yaml.YAMLError):
            self._problem(node, path, f"the number {_show(text)} can not be read; write a smaller, plain number")
            return None


def _yaml_values(text: str, file: str) -> tuple[Any, _YamlTree]:
    node = _compose(text, file)
    tree = _YamlTree(file)
    if node is None:
        return None, tree
    try:
        value = tree.convert(node, "")
    except RecursionError:
        raise _fail(file, f"the document is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    tree.collector.raise_if_any()
    return value, tree


# --- model-definition.yaml: the dataclasses ------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """``service.health_check`` (S2.2, S5): how and when a replica is probed."""

    path: str
    interval: float = 10.0
    max_retries: int = 10
    max_wait_time: float = 15.0
    expected_status_code: int = 200
    initial_delay: float = 60.0
    # Extension (not in the original): headers sent with each probe, e.g. for a runtime that
    # checks its own API key on every path.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreStartAction:
    """One ``pre_start_actions`` entry (S2.3), its ``args`` checked and completed with defaults.

    ``args`` by action (all strings have ``{model_path}`` replaced):

    * ``write_file``: ``filename`` str, ``body`` str, ``mode`` str of octal digits (default
      ``"644"``), ``append`` bool (default false)
    * ``write_tempfile``: ``body`` str, ``mode`` (default ``"644"``)
    * ``run_command``: ``command`` tuple of str, ``echo`` bool (default false)
    * ``mkdir``: ``path`` str
    * ``log``: ``message`` str, ``debug`` bool (default false)

    A ``body`` written as a list of lines becomes one string as the original writes it: each line
    followed by a newline for ``write_file``, the lines joined as they are for ``write_tempfile``.
    """

    action: str
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Service:
    """``models[i].service``: how the inference server starts, listens and is checked."""

    start_command: str | tuple[str, ...]  # a string runs as ``shell -c start_command``
    port: int
    pre_start_actions: tuple[PreStartAction, ...] = ()
    shell: str = "/bin/bash"
    health_check: HealthCheck | None = None


@dataclass(frozen=True)
class ModelMetadata:
    """``models[i].metadata`` as the original knows it; unknown keys are kept in ``extra``."""

    author: str | None = None
    title: str | None = None
    version: int | str | None = None
    created: str | None = None  # also read from ``created_at``
    last_modified: str | None = None  # also read from ``modified_at``
    description: str | None = None
    task: str | None = None
    category: str | None = None
    architecture: str | None = None
    framework: tuple[str, ...] | None = None
    label: tuple[str, ...] | None = None
    license: str | None = None
    min_resource: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Model:
    name: str
    model_path: str
    service: Service | None = None
    metadata: ModelMetadata | None = None


@dataclass(frozen=True)
class ModelDefinition:
    models: tuple[Model, ...]

    @property
    def primary(self) -> Model:
        """The model that is served: the first, as in the original."""
        return self.models[0]


# The names the issue uses, for readers who look for them.
ModelConfig = Model
ServiceConfig = Service
HealthCheckConfig = HealthCheck

_MODEL_KEYS = ("name", "model_path", "service", "metadata")
_SERVICE_KEYS = ("pre_start_actions", "start_command", "shell", "port", "health_check")
_HEALTH_KEYS = (
    "path",
    "interval",
    "max_retries",
    "max_wait_time",
    "expected_status_code",
    "initial_delay",
    "headers",
)
_ACTION_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # action -> (required, optional)
    "write_file": (("filename", "body"), ("mode", "append")),
    "write_tempfile": (("body",), ("mode",)),
    "run_command": (("command",), ("echo",)),
    "mkdir": (("path",), ()),
    "log": (("message",), ("debug",)),
}
_ACTION_EXAMPLES = {
    "write_file": "args: {filename: /home/work/config.json, body: '...'}",
    "write_tempfile": "args: {body: 'print(1)'}",
    "run_command": "args: {command: [python3, -m, pip, list]}",
    "mkdir": "args: {path: /home/work/data}",
    "log": "args: {message: starting}",
}
_METADATA_STRINGS = ("author", "title", "description", "task", "category", "architecture", "license")
_METADATA_ALIASES = {"created": ("created", "created_at"), "last_modified": ("last_modified", "modified_at")}


# --- model-definition.yaml: validation -----------------------------------------------------------


class _Model:
    """Validates the plain values of a model definition into the dataclasses."""

    def __init__(self, c: _Collector, int_texts: Mapping[str, str], model_mount: str | None) -> None:
        self.c = c
        self.int_texts = int_texts
        self.model_mount = model_mount

    # generic checks

    def mapping(self, value: Any, path: str, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.c.add(path, f"must be a mapping ({what}), got {_show(value)}")
        return None

    def unknown(self, data: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
        for key in data:
            if key not in allowed:
                self.c.add(
                    field_path(path, key),
                    f"unknown key; remove it or use one of: {', '.join(allowed)}",
                )

    def text(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        *,
        required: bool,
        what: str,
        single_line: bool = True,
        allow_empty: bool = False,
    ) -> str | None:
        where = field_path(path, key)
        value = data.get(key)
        if value is None:
            if required:
                self.c.add(where, f"is required: {what}")
            return None
        if not isinstance(value, str):
            self.c.add(where, f"must be a string ({what}), got {_show(value)}; put it in quotes")
            return None
        if not allow_empty and not value.strip():
            self.c.add(where, f"must not be empty: {what}")
            return None
        if single_line and any(ch in value for ch in "\r\n"):
            self.c.add(where, "must be a single line")
            return None
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int | None:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _INT_TEXT.match(value.strip()):
            number = int(value.strip())
        if number is None or not low <= number <= high:
            self.c.add(path, f"must be an integer between {low} and {high}, got {_show(value)}")
            return None
        return number

    def seconds(self, value: Any, path: str, *, positive: bool) -> float | None:
        number: float | None = None
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
                number = float(value.strip())
        except OverflowError:
            number = None
        valid = number is not None and math.isfinite(number) and 0 <= number <= MAX_SECONDS
        if number is not None and positive and number == 0:
            valid = False
        if not valid or number is None:
            low = "greater than 0" if positive else "at least 0"
            self.c.add(path, f"must be a number of seconds, {low} and at most {MAX_SECONDS:g}, got {_show(value)}")
            return None
        return number

    def flag(self, value: Any, path: str) -> bool:
        if isinstance(value, bool):
            return value
        self.c.add(path, f"must be true or false, got {_show(value)}")
        return False

    def sub(self, text: str, model_path: str) -> str:
        return text.replace(MODEL_PATH_PLACEHOLDER, self.model_mount or model_path)

    # the file

    def definition(self, tree: Any) -> ModelDefinition | None:
        c = self.c
        if tree is None:
            c.add("", "the file is empty; it needs a 'models' list (see the manual's example)")
            return None
        if not isinstance(tree, dict):
            c.add("", f"the top level must be a mapping with a 'models' list, got {_show(tree)}")
            return None
        self.unknown(tree, ("models",), "")
        raw_models = tree.get("models")
        if raw_models is None:
            c.add("models", "is required: a list with at least one model (name, model_path, service)")
            return None
        if not isinstance(raw_models, list):
            c.add("models", f"must be a list of models, got {_show(raw_models)}; start each model with '- name:'")
            return None
        if not raw_models:
            c.add("models", "must list at least one model; the first one is served")
            return None
        models = [self.model(raw, f"models[{i}]") for i, raw in enumerate(raw_models)]
        if any(m is None for m in models):
            return None
        return ModelDefinition(models=tuple(m for m in models if m is not None))

    def model(self, raw: Any, path: str) -> Model | None:
        data = self.mapping(raw, path, "with name, model_path and service")
        if data is None:
            return None
        self.unknown(data, _MODEL_KEYS, path)
        name = self.text(data, "name", path, required=True, what="the name of the model")
        model_path = self.text(data, "model_path", path, required=True, what="where the model is, such as /models")
        if model_path is not None and not model_path.startswith("/"):
            self.c.add(
                field_path(path, "model_path"), f"must be an absolute path such as /models, got {_show(model_path)}"
            )
            model_path = None
        service = None
        if data.get("service") is not None:
            service = self.service(data["service"], field_path(path, "service"), model_path or "")
        metadata = None
        if data.get("metadata") is not None:
            metadata = self.metadata(data["metadata"], field_path(path, "metadata"))
        if name is None or model_path is None:
            return None
        return Model(name=name, model_path=model_path, service=service, metadata=metadata)

    def service(self, raw: Any, path: str, model_path: str) -> Service | None:
        data = self.mapping(raw, path, "with start_command and port")
        if data is None:
            return None
        self.unknown(data, _SERVICE_KEYS, path)
        command = self.start_command(data.get("start_command"), field_path(path, "start_command"), model_path)
        port: int | None = None
        if data.get("port") is None:
            self.c.add(field_path(path, "port"), "is required: the port the server listens on inside the container")
        else:
            port = self.integer(data["port"], field_path(path, "port"), 1, 65535)
        shell = "/bin/bash"
        if "shell" in data:
            shell = self.text(data, "shell", path, required=True, what="the shell for a string start_command") or shell
        actions: list[PreStartAction] = []
        raw_actions = data.get("pre_start_actions")
        actions_path = field_path(path, "pre_start_actions")
        if raw_actions is not None and not isinstance(raw_actions, list):
            self.c.add(actions_path, f"must be a list of actions ('- action: ...'), got {_show(raw_actions)}")
        elif raw_actions is not None:
            for i, item in enumerate(raw_actions):
                action = self.action(item, f"{actions_path}[{i}]", model_path)
                if action is not None:
                    actions.append(action)
        health = None
        if data.get("health_check") is not None:
            health = self.health(data["health_check"], field_path(path, "health_check"))
        if command is None or port is None:
            return None
        return Service(
            start_command=command, port=port, pre_start_actions=tuple(actions), shell=shell, health_check=health
        )

    def start_command(self, value: Any, path: str, model_path: str) -> str | tuple[str, ...] | None:
        if value is None:
            self.c.add(path, "is required: the command that starts the inference server (a string or a list)")
            return None
        if isinstance(value, str):
            if not value.strip():
                self.c.add(path, "must not be empty: the command that starts the inference server")
                return None
            return self.sub(value, model_path)
        if isinstance(value, list):
            if not value:
                self.c.add(path, "must be a non-empty list of strings, such as [python3, -m, http.server]")
                return None
            parts: list[str] = []
            for i, part in enumerate(value):
                if not isinstance(part, str):
                    hint = (
                        f'; quote it: "{part}"' if isinstance(part, int | float) and not isinstance(part, bool) else ""
                    )
                    self.c.add(f"{path}[{i}]", f"must be a string, got {_show(part)}{hint}")
                    continue
                parts.append(self.sub(part, model_path))
            if len(parts) != len(value):
                return None
            if not parts[0].strip():
                self.c.add(f"{path}[0]", "must name the program to run; it is empty")
                return None
            return tuple(parts)
        self.c.add(path, f"must be a string or a list of strings, got {_show(value)}")
        return None

    def health(self, raw: Any, path: str) -> HealthCheck | None:
        data = self.mapping(raw, path, "with at least a path")
        if data is None:
            return None
        self.unknown(data, _HEALTH_KEYS, path)
        probe = self.text(data, "path", path, required=True, what="the HTTP path to probe, such as /health")
        if probe is not None and (not probe.startswith("/") or any(ch.isspace() or ord(ch) < 32 for ch in probe)):
            self.c.add(
                field_path(path, "path"), f"must be a URL path starting with '/', such as /health, got {_show(probe)}"
            )
            probe = None
        values: dict[str, Any] = {}
        for key, positive in (("interval", True), ("max_wait_time", True), ("initial_delay", False)):
            if data.get(key) is not None:
                values[key] = self.seconds(data[key], field_path(path, key), positive=positive)
        if data.get("max_retries") is not None:
            values["max_retries"] = self.integer(data["max_retries"], field_path(path, "max_retries"), 0, 10_000)
        if data.get("expected_status_code") is not None:
            code_path = field_path(path, "expected_status_code")
            values["expected_status_code"] = self.integer(data["expected_status_code"], code_path, 100, 599)
        headers = self.headers(data.get("headers"), field_path(path, "headers"))
        if probe is None or headers is None or any(v is None for v in values.values()):
            return None
        return HealthCheck(path=probe, headers=headers, **values)

    def headers(self, raw: Any, path: str) -> dict[str, str] | None:
        if raw is None:
            return {}
        data = self.mapping(raw, path, "of header names to values, such as {Authorization: Bearer xyz}")
        if data is None:
            return None
        out: dict[str, str] = {}
        for name, value in data.items():
            where = field_path(path, name)
            if not _HEADER_NAME.match(name):
                self.c.add(where, "is not a valid HTTP header name (letters, digits and - only)")
            elif isinstance(value, bool) or not isinstance(value, str | int | float):
                self.c.add(where, f"must be a string, got {_show(value)}")
            elif any((ord(ch) < 32 and ch != "\t") or ch == "\x7f" for ch in str(value)):
                self.c.add(where, "must be a single line without control characters (no line breaks)")
            else:
                out[name] = str(value)
        return out if len(out) == len(data) else None

    def action(self, raw: Any, path: str, model_path: str) -> PreStartAction | None:
        data = self.mapping(raw, path, "with 'action' and 'args'")
        if data is None:
            return None
        self.unknown(data, ("action", "args"), path)
        kind = data.get("action")
        if kind is None:
            self.c.add(field_path(path, "action"), f"is required: one of {', '.join(PRE_START_ACTIONS)}")
            return None
        if not isinstance(kind, str) or kind not in _ACTION_ARGS:
            self.c.add(
                field_path(path, "action"), f"unknown action {_show(kind)}; use one of {', '.join(PRE_START_ACTIONS)}"
            )
            return None
        apath = field_path(path, "args")
        if data.get("args") is None:
            self.c.add(apath, f"is required for the {kind} action, e.g. {_ACTION_EXAMPLES[kind]}")
            return None
        args = self.mapping(data["args"], apath, f"the arguments of the {kind} action")
        if args is None:
            return None
        required, optional = _ACTION_ARGS[kind]
        self.unknown(args, required + optional, apath)
        for name in required:
            if args.get(name) is None:
                self.c.add(field_path(apath, name), f"is required for the {kind} action, e.g. {_ACTION_EXAMPLES[kind]}")
        before = len(self.c.problems) + self.c.dropped
        out: dict[str, Any] = {}
        for name in ("filename", "path", "message"):
            if name in args and args[name] is not None:
                value = self.text(
                    args, name, apath, required=True, what=f"the {name} for {kind}", single_line=name != "message"
                )
                if value is not None:
                    out[name] = self.sub(value, model_path)
        if args.get("body") is not None:
            body = self.body(args["body"], field_path(apath, "body"), kind)
            if body is not None:
                out["body"] = self.sub(body, model_path)
        if kind in ("write_file", "write_tempfile"):
            out["mode"] = self.mode(args.get("mode"), field_path(apath, "mode"))
        if kind == "write_file":
            out["append"] = (
                self.flag(args["append"], field_path(apath, "append")) if args.get("append") is not None else False
            )
        if kind == "log":
            out["debug"] = (
                self.flag(args["debug"], field_path(apath, "debug")) if args.get("debug") is not None else False
            )
        if kind == "run_command":
            if args.get("command") is not None:
                command = self.command(args["command"], field_path(apath, "command"), model_path)
                if command is not None:
                    out["command"] = command
            out["echo"] = self.flag(args["echo"], field_path(apath, "echo")) if args.get("echo") is not None else False
        if len(self.c.problems) + self.c.dropped != before or any(args.get(n) is None for n in required):
            return None
        return PreStartAction(action=kind, args=out)

    def body(self, value: Any, path: str, kind: str) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(line, str) for line in value):
            # The original writes each line of a list followed by a newline (write_tempfile: as is).
            return "".join(f"{line}\n" for line in value) if kind == "write_file" else "".join(value)
        self.c.add(path, f"must be a string (use '|' for several lines) or a list of lines, got {_show(value)}")
        return None

    def mode(self, value: Any, path: str) -> str:
        if value is None:
            return "644"
        text: str | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML reads 0644 as the octal number 420; take the digits the user wrote.
            text = self.int_texts.get(path, str(value))
        elif isinstance(value, str):
            text = value.strip()
        if text is not None:
            digits = text[2:] if text[:2].lower() == "0o" else text
            if 1 <= len(digits) <= 5 and all(ch in "01234567" for ch in digits) and int(digits, 8) <= 0o7777:
                return format(int(digits, 8), "03o")
        self.c.add(path, f'must be an octal file mode such as "644" or "755", got {_show(value)}')
        return "644"

    def command(self, value: Any, path: str, model_path: str) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not value:
            hint = f"; write it as a list, e.g. {json.dumps(value.split()[:4])}" if isinstance(value, str) else ""
            self.c.add(path, f"must be a non-empty list of strings such as [python3, -m, pip, list]{hint}")
            return None
        parts: list[str] = []
        for i, part in enumerate(value):
            if isinstance(part, bool) or not isinstance(part, str | int | float):
                self.c.add(f"{path}[{i}]", f"must be a string, got {_show(part)}")
            else:
                parts.append(self.sub(str(part), model_path))  # the original runs str(piece)
        return tuple(parts) if len(parts) == len(value) else None

    def metadata(self, raw: Any, path: str) -> ModelMetadata | None:
        data = self.mapping(raw, path, "such as {author: ..., title: ...}")
        if data is None:
            return None
        known: dict[str, Any] = {}
        for name in _METADATA_STRINGS:
            if data.get(name) is not None:
                known[name] = self.text(
                    data, name, path, required=False, what=name, single_line=False, allow_empty=True
                )
        for name, aliases in _METADATA_ALIASES.items():
            given = [alias for alias in aliases if data.get(alias) is not None]
            if len(given) > 1:
                self.c.add(field_path(path, given[1]), f"is the same as {given[0]}; keep only one of them")
            elif given:
                known[name] = self.text(data, given[0], path, required=False, what=name, allow_empty=True)
        version = data.get("version")
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int | str):
                self.c.add(field_path(path, "version"), f"must be a number or a string, got {_show(version)}")
            else:
                known["version"] = version
        for name in ("framework", "label"):
            value = data.get(name)
            if value is None:
                continue
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                known[name] = tuple(value)
            else:
                self.c.add(field_path(path, name), f"must be a list of strings, got {_show(value)}")
        min_resource = data.get("min_resource")
        if min_resource is not None:
            known["min_resource"] = self.mapping(min_resource, field_path(path, "min_resource"), "of resource slots")
        handled = {*_METADATA_STRINGS, "version", "framework", "label", "min_resource"}
        handled.update(alias for aliases in _METADATA_ALIASES.values() for alias in aliases)
        extra = {k: v for k, v in data.items() if k not in handled}
        return ModelMetadata(**{k: v for k, v in known.items() if v is not None}, extra=extra)


def parse_model_definition(
    data: bytes | str, file: str = DEFAULT_MODEL_DEFINITION_PATH, *, model_mount: str | None = None
) -> ModelDefinition:
    """Parse the text of a model definition file (S2); raises ``DefinitionError`` listing every problem.

    ``{model_path}`` in the start command and in pre-start action arguments becomes ``model_mount``
    when given (where the platform mounts the folder), else each model's own ``model_path``.
    """
    text = _decode(data, file)
    tree, yaml_tree = _yaml_values(text, file)
    c = _Collector(file, yaml_tree.marks)
    definition = _Model(c, yaml_tree.int_texts, model_mount).definition(tree)
    c.raise_if_any()
    if definition is None:  # pragma: no cover - every path to None adds a problem
        raise _fail(file, "the model definition is not valid")
    return definition


# --- service-definition.toml ---------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeSection:
    """One ``[{runtime}.*]`` group of the service definition (S3.1)."""

    image: str | None = None
    architecture: str | None = None
    # cpu (cores), mem (bytes, an int), accelerators such as cuda.shares
    resources: Mapping[str, float] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceDefinition:
    runtimes: Mapping[str, RuntimeSection]

    def section(self, runtime: str) -> RuntimeSection | None:
        return self.runtimes.get(runtime)


@dataclass(frozen=True)
class LauncherDefaults:
    """What the service launcher is pre-filled with for one runtime variant (S3.2)."""

    image: str  # "" when the section has no [runtime.environment]
    architecture: str
    resources: Mapping[str, float]
    environ: Mapping[str, str]


def _split_dotted(key: str) -> list[str]:
    """``vllm."cuda.shares"`` -> ``["vllm", "cuda.shares"]`` (a linear scan, no backtracking)."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    for char in key:
        if quote:
            if char == quote:
                quote = ""
            else:
                current.append(char)
        elif char in "\"'":
            quote = char
        elif char == ".":
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return parts


def _toml_path(parts: list[str]) -> str:
    path = ""
    for part in parts:
        path = field_path(path, part)
    return path


def _toml_marks(text: str) -> dict[str, tuple[int, int]]:
    """Cheap positions for TOML fields: table headers and the keys written under them."""
    marks: dict[str, tuple[int, int]] = {}
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[") and "]" in stripped:
            table = _split_dotted(stripped.lstrip("[").split("]", 1)[0])
            marks.setdefault(_toml_path(table), (number, line.find("[") + 1))
            continue
        name, equals, _ = stripped.partition("=")
        if equals and name.strip() and not name.lstrip().startswith("#"):
            keys = _split_dotted(name.strip())
            column = line.find(name.strip()[:1]) + 1
            marks.setdefault(_toml_path([*table, *keys]), (number, column))
            if len(keys) > 1:  # cuda.shares = 1 unquoted: also under the joined name
                marks.setdefault(_toml_path([*table, ".".join(keys)]), (number, column))
    return marks


def _flatten_slots(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``cuda.shares = 1`` written unquoted is a nested table in TOML: read it as the dotted key."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and not prefix:
            out.extend(_flatten_slots(value, name))
        else:
            out.append((name, value))
    return out


def _slot_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            number = float(value.strip())
        else:
            return None
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


class _Service:
    def __init__(self, c: _Collector) -> None:
        self.c = c

    def text(self, data: Mapping[str, Any], key: str, path: str, what: str) -> str | None:
        where = field_path(path, key)
        value = data.get(key)
        if value is None:
            self.c.add(where, f"is required: {what}")
        elif not isinstance(value, str):
            self.c.add(where, f"must be a string ({what}), got {_show(value)}; put it in quotes")
        elif not value.strip() or any(ch.isspace() or ord(ch) < 32 for ch in value.strip()) or "\x00" in value:
            self.c.add(where, f"must be one word without spaces ({what}), got {_show(value)}")
        else:
            return value.strip()
        return None

    def section(self, runtime: str, raw: Any) -> RuntimeSection | None:
        c = self.c
        path = field_path("", runtime)
        if not isinstance(raw, dict):
            c.add(path, f"must be a group of tables such as [{_clip(runtime, 40)}.environment], got {_show(raw)}")
            return None
        for key in raw:
            if key not in SERVICE_SECTIONS:
                c.add(
                    field_path(path, key),
                    f"unknown section; use [{_clip(runtime, 40)}.environment], "
                    f"[{_clip(runtime, 40)}.resource_slots] or [{_clip(runtime, 40)}.environ]",
                )
        image = architecture = None
        if "environment" in raw:
            epath = field_path(path, "environment")
            environment = raw["environment"]
            if not isinstance(environment, dict):
                c.add(epath, f"must be a table with image and architecture, got {_show(environment)}")
            else:
                for key in environment:
                    if key not in ("image", "architecture"):
                        c.add(field_path(epath, key), "unknown key; use image and architecture")
                image = self.text(environment, "image", epath, "the container image, such as example.com/server:1.0")
                architecture = self.text(
                    environment, "architecture", epath, "the image's CPU architecture, such as x86_64"
                )
        resources: dict[str, float] = {}
        if "resource_slots" in raw:
            resources = self.slots(raw["resource_slots"], field_path(path, "resource_slots"))
        environ: dict[str, str] = {}
        if "environ" in raw:
            environ = self.environ(raw["environ"], field_path(path, "environ"))
        return RuntimeSection(image=image, architecture=architecture, resources=resources, environ=environ)

    def slots(self, raw: Any, path: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if not isinstance(raw, dict):
            self.c.add(path, f'must be a table such as cpu = 1, mem = "8gb", got {_show(raw)}')
            return out
        for key, value in _flatten_slots(raw):
            where = field_path(path, key)
            if key == "mem":
                if not isinstance(value, str | int | float):
                    self.c.add(where, f'must be a memory size such as "8gb" or a number of bytes, got {_show(value)}')
                    continue
                try:
                    out["mem"] = parse_mem(value)
                except MemSizeError as exc:
                    self.c.add(where, str(exc))
                    continue
                too_little = replica_mem_problem(out["mem"])
                if too_little:
                    self.c.add(where, too_little)
                    del out["mem"]
                continue
            if key != "cpu" and not _ACCELERATOR_KEY.match(key):
                self.c.add(where, 'unknown resource; use cpu, mem or an accelerator such as "cuda.shares"')
                continue
            number = _slot_number(value)
            if number is None:
                self.c.add(
                    where, f'must be a number of at least 0 (or a numeric string such as "0.5"), got {_show(value)}'
                )
                continue
            out[key] = number
        return out

    def environ(self, raw: Any, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        if not isinstance(raw, dict):
            self.c.add(path, f'must be a table of variables such as MODEL_NAME = "name", got {_show(raw)}')
            return out
        for key, value in raw.items():
            where = field_path(path, key)
            if not ENV_NAME.match(key):
                self.c.add(where, f"is not a valid environment variable name; use {ENV_NAME_RULE}")
            elif problem := loader_variable_problem(key):
                self.c.add(where, problem)
            elif isinstance(value, bool):
                out[key] = "true" if value else "false"
            elif isinstance(value, str):
                if "\x00" in value:
                    self.c.add(where, "contains a NUL character; remove it")
                else:
                    out[key] = value
            elif isinstance(value, int | float):
                out[key] = str(value)
            else:
                self.c.add(where, f"must be a string, number or true/false, got {_show(value)}; put it in quotes")
        return out


def loader_variable_problem(name: str) -> str | None:
    """Why the environment variable ``name`` is refused in a service's environment, as a sentence
    that names it, or None. ``LD_*`` (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...) and glibc's other
    loader variables would make every program of the replica, the platform's own privileged
    start-up steps included, load code or files the user chose."""
    if not (name.startswith("LD_") or name in LOADER_VARIABLES):
        return None
    return (
        f"{name} is refused: it makes the dynamic loader or the C library load code or files it names "
        "into every program of the replica, the platform's own start-up steps included. Set it inside "
        f"the start command instead (for example `env {name}=... python3 server.py`), where it reaches "
        "only your server."
    )


def parse_service_definition(data: bytes | str, file: str = SERVICE_DEFINITION_NAME) -> ServiceDefinition:
    """Parse the text of a service definition file (S3); raises ``DefinitionError`` listing every problem."""
    text = _decode(data, file)
    try:
        tree = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        message = str(getattr(exc, "msg", "") or exc)
        position = _TOML_POSITION.search(str(exc))
        if line is None and position:
            line, column = int(position.group(1)), int(position.group(2))
        message = _TOML_POSITION.sub("", message).strip() or "the text is not valid TOML"
        raise _fail(file, f"TOML syntax error: {_clip(message, 200)}", line, column) from None
    except RecursionError:
        raise _fail(file, "the document is nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer with thousands of digits
        raise _fail(file, f"the file can not be read as TOML: {_clip(str(exc), 120)}") from None
    c = _Collector(file, _toml_marks(text))
    checker = _Service(c)
    runtimes: dict[str, RuntimeSection] = {}
    for runtime, raw in tree.items():
        section = checker.section(runtime, raw)
        if section is not None:
            runtimes[runtime] = section
    c.raise_if_any()
    return ServiceDefinition(runtimes=runtimes)


def resolve_service_defaults(definition: ServiceDefinition, runtime: str) -> LauncherDefaults | None:
    """The launcher defaults for a runtime variant (S3.2), or None when the file has no section for it."""
    section = definition.runtimes.get(runtime)
    if section is None:
        return None
    return LauncherDefaults(
        image=section.image or "",
        architecture=section.architecture or "",
        resources=dict(section.resources),
        environ=dict(section.environ),
    )


# --- files on disk -------------------------------------------------------------------------------


SYMLINK_PROBLEM = "is a symbolic link; upload the file itself into the model folder"


def _fs_problem(exc: Exception, relative: str) -> str:
    """What a storage.fs refusal means for a definition file, as a sentence for its Problem."""
    from storage import fs

    if isinstance(exc, fs.SymlinkRefused):
        if exc.path and exc.path != relative:
            return (
                f"is outside the model folder: {exc.path!r} on its path is a symbolic link, and links are never "
                "followed; upload the directory itself"
            )
        return SYMLINK_PROBLEM
    if isinstance(exc, fs.PathNotFound):
        return "can not be read: No such file or directory"
    if isinstance(exc, fs.NotAFile | fs.PathConflict):
        return "is not a regular file"
    return f"can not be read: {getattr(exc, 'message', exc)}"


def read_folder_file(folder_fs: FolderFS, relative: str, file: str | None = None) -> bytes | None:
    """A definition file's bytes read through storage.fs, size-capped; None when it is absent.

    A symlink (the file, or a directory on its path), a directory, a pipe or a file over
    MAX_FILE_BYTES is a DefinitionError naming ``file`` (default ``relative``); nothing is followed,
    and the size is checked on the opened file before a byte is read."""
    from storage import fs

    name = file or relative
    try:
        with folder_fs.open_read(relative) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise _fail(
                    name, f"the file is {size} bytes; a definition file must be at most {MAX_FILE_BYTES // 1024} KiB"
                )
            data = handle.read(MAX_FILE_BYTES + 1)
    except fs.PathNotFound:
        return None
    except fs.FsError as exc:
        # Chained (not ``from None``): a replica start tells a node without the folder's data
        # (StorageUnavailable) from a bad file.
        raise _fail(name, _fs_problem(exc, relative)) from exc
    except OSError as exc:
        raise _fail(name, f"can not be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _fail(name, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; a definition file is small text")
    return data


def _read_capped(path: Path, file: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES. The directory is the caller's (an
    operator's path, or a folder's root); the file in it is opened without following a symlink."""
    from storage.fs import FolderFS

    data = read_folder_file(FolderFS(os.path.realpath(path.parent)), path.name, file)
    if data is None:
        raise _fail(file, "can not be read: No such file or directory")
    return data


def load_model_definition(
    path: Path | str, file: str | None = None, *, model_mount: str | None = None
) -> ModelDefinition:
    """Read (size-capped) and parse a model definition file; problems name it ``file`` (default: its name)."""
    path = Path(path)
    name = file or path.name
    return parse_model_definition(_read_capped(path, name), name, model_mount=model_mount)


def load_service_definition(path: Path | str, file: str | None = None) -> ServiceDefinition:
    """Read (size-capped) and parse a service definition file."""
    path = Path(path)
    name = file or path.name
    return parse_service_definition(_read_capped(path, name), name)


def _as_plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _as_plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class FolderValidation:
    """Everything ``validate_model_folder`` found: the problems, or what the platform would run."""

    problems: tuple[Problem, ...]
    model_definition: ModelDefinition | None
    service_definition: ServiceDefinition | None
    defaults: LauncherDefaults | None
    runtime: str = "custom"
    definition_file: str | None = None  # the model definition file used, relative to the folder
    effective: EffectiveService | None = None  # how a replica would start (serving.core.runtimes)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the resolved definition, or the problems."""
        return {
            "ok": self.ok,
            "runtime": self.runtime,
            "model_definition_file": self.definition_file,
            "problems": [p.to_dict() for p in self.problems],
            "model_definition": _as_plain(self.model_definition),
            "launcher_defaults": _as_plain(self.defaults),
            "effective_service": _as_plain(self.effective),
        }


def _safe_relative(definition_path: str) -> str | None:
    """A definition file path inside the folder (``sub/def.yaml``), or None when it points elsewhere."""
    if not definition_path or "\x00" in definition_path or "\\" in definition_path:
        return None
    pure = PurePosixPath(definition_path)
    if pure.is_absolute() or any(part == ".." for part in pure.parts) or not pure.parts:
        return None
    return pure.as_posix()


def folder_entry(folder_fs: FolderFS, relative: str) -> tuple[str | None, str | None]:
    """(what ``relative`` is in the folder: "file", "dir", "symlink", ... or None when absent or out
    of reach; what is wrong with it as a definition file, or None), through storage.fs: a symlink,
    on the file or on its path, is reported, not followed. Reading it later refuses a swapped-in
    link again, so no check-then-use race leads outside."""
    from storage import fs

    try:
        entry = folder_fs.stat(relative)
    except fs.PathNotFound:
        return None, None
    except fs.FsError as exc:
        return None, _fs_problem(exc, relative)
    if entry.type == "symlink":
        return entry.type, SYMLINK_PROBLEM
    if entry.type != "file":
        return entry.type, "is not a regular file"
    return entry.type, None


def _regular_file_in(folder_fs: FolderFS, relative: str, c: _Collector) -> bool:
    """Whether ``relative`` is a regular file inside the folder; what is wrong otherwise goes to ``c``."""
    kind, problem = folder_entry(folder_fs, relative)
    if problem:
        c.add("", problem)
    return kind == "file"


def _folder_fs(folder: Path) -> FolderFS:
    from storage.fs import FolderFS

    return FolderFS(os.path.realpath(folder))


def find_model_definition(folder: Path, definition_path: str | None = None) -> Path | None:
    """The model definition file to use: ``definition_path`` when set (for the default name, falling
    back to ``model-definition.yml`` as the original does), else ``.yaml`` then ``.yml``. Only a
    regular file counts: a symlink is not followed (storage.fs)."""
    from storage import fs

    folder_fs = _folder_fs(folder)
    for name in _definition_candidates(definition_path):
        try:
            if folder_fs.stat(name).type == "file":
                return folder / name
        except fs.FsError:
            continue
    return None


def _definition_candidates(definition_path: str | None) -> tuple[str, ...]:
    if not definition_path or definition_path == DEFAULT_MODEL_DEFINITION_PATH:
        return MODEL_DEFINITION_NAMES
    return (definition_path,)


def validate_model_folder(
    folder: Path | str,
    runtime: str = "custom",
    definition_path: str | None = None,
    *,
    model_mount: str = "/models",
) -> FolderValidation:
    """Everything the platform would check about a model folder for ``runtime``, without starting it.

    Reads the model definition file (only for runtimes that need one: Custom) and
    ``service-definition.toml`` when present, and resolves how a replica would start.
    """
    from serving.core.runtimes import RUNTIMES, RuntimeConfigError, effective_service

    folder = Path(folder)
    problems: list[Problem] = []
    if not folder.is_dir():
        return FolderValidation(
            (Problem(str(folder), "", "is not a directory; give the path of a model folder"),),
            None,
            None,
            None,
            runtime,
        )
    # The folder the operator named is theirs (resolved once); what is inside it is read without
    # following links, as the platform itself reads a folder.
    folder_fs = _folder_fs(folder)
    variant = RUNTIMES.get(runtime)
    if variant is None:
        problems.append(Problem("", "runtime", f"unknown runtime {_show(runtime)}; use one of {', '.join(RUNTIMES)}"))

    model_definition: ModelDefinition | None = None
    used: str | None = None
    if variant is None or variant.needs_definition_file:
        wanted = definition_path or DEFAULT_MODEL_DEFINITION_PATH
        relative = _safe_relative(wanted)
        if relative is None:
            problems.append(
                Problem(
                    _clip(wanted, 80),
                    "",
                    "must be a path inside the model folder, such as model-definition.yaml (no '..', not absolute)",
                )
            )
        else:
            for name in _definition_candidates(relative):
                c = _Collector(name)
                found = _regular_file_in(folder_fs, name, c)
                problems.extend(c.problems)
                if found:
                    used = name
                    break
                if c.problems:
                    break
            if used is None and not any(p.file in _definition_candidates(relative) for p in problems):
                names = " or ".join(_definition_candidates(relative))
                problems.append(
                    Problem(
                        names,
                        "",
                        f"is missing from the model folder; the {variant.label if variant else runtime} runtime "
                        "needs a model definition file (upload one, or set the model definition file path)",
                    )
                )
            if used is not None:
                try:
                    data = read_folder_file(folder_fs, used)
                    if data is None:  # removed since it was found
                        raise _fail(used, "can not be read: No such file or directory")
                    model_definition = parse_model_definition(data, used, model_mount=model_mount)
                except DefinitionError as exc:
                    problems.extend(exc.problems)
                if model_definition is not None and model_definition.primary.service is None:
                    problems.append(
                        Problem(
                            used,
                            "models[0].service",
                            "is required: the Custom runtime starts the first model's service",
                        )
                    )

    service_definition: ServiceDefinition | None = None
    defaults: LauncherDefaults | None = None
    c = _Collector(SERVICE_DEFINITION_NAME)
    service_found = _regular_file_in(folder_fs, SERVICE_DEFINITION_NAME, c)
    problems.extend(c.problems)
    if service_found:
        try:
            data = read_folder_file(folder_fs, SERVICE_DEFINITION_NAME)
            if data is None:
                raise _fail(SERVICE_DEFINITION_NAME, "can not be read: No such file or directory")
            service_definition = parse_service_definition(data, SERVICE_DEFINITION_NAME)
            defaults = resolve_service_defaults(service_definition, runtime)
        except DefinitionError as exc:
            problems.extend(exc.problems)

    effective = None
    if not problems and variant is not None:
        try:
            effective = effective_service(
                runtime, model_definition, model_mount, dict(defaults.environ) if defaults else {}
            )
        except RuntimeConfigError as exc:
            problems.append(Problem(used or "", "", str(exc)))
    return FolderValidation(tuple(problems), model_definition, service_definition, defaults, runtime, used, effective)


# The names the issue uses for the file helpers.
load_model_definition_file = load_model_definition
load_service_definition_file = load_service_definition
