"""The hostile-input reader both definition files share, and how problems are reported.

Pure: no Django and no I/O: it reads the bytes or text it is handed (the files themselves are read
by ``serving.folders``, through storage.fs). What is here: the limits (``MAX_FILE_BYTES``,
``MAX_DEPTH``, ``MAX_NODES``, ``MAX_PROBLEMS``), ``Problem`` and ``DefinitionError`` with the
``Collector`` that gathers every problem of a file with its line and column, ``decode`` (size,
UTF-8, NUL), the safe YAML composer and the tree that turns its nodes into plain values, and the
memory-size parser (``parse_mem``, ``replica_mem_problem``) that service definitions, the API and
the slots share. ``serving.core.definitions`` says why hostile input is refused the way it is.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64  # nested mappings/lists; a real definition file uses about 6
MAX_NODES = 20_000  # values in one YAML document; a real definition file has a few hundred at most
MAX_PROBLEMS = 100  # reported in one error; the rest are counted
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?\Z")
_MEM_TEXT = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?|\.[0-9]{1,20})\s*(?:([kmgtpe])(?:i?b|i)?|b)?\s*\Z", re.I)
_MEM_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5, "e": 1024**6}
_MAX_MEM = 2**63 - 1
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


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(value: Any) -> str:
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
        return repr(clip(value))
    if isinstance(value, int | float):
        return clip(repr(value), 40)
    return f"a {type(value).__name__} value"


def field_path(parent: str, key: str) -> str:
    """``field_path("models[0]", "port")`` -> ``models[0].port``; odd keys are quoted and shortened."""
    part = key if len(key) <= 40 and _PLAIN_KEY.match(key) else json.dumps(clip(key, 40), ensure_ascii=False)
    return f"{parent}.{part}" if parent else part


def _parent_path(path: str) -> str | None:
    match = _LAST_SEGMENT.search(path)
    if match is None or (match.start() == 0 and not path.startswith("[")):
        return "" if path else None
    return path[: match.start()]


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


class Collector:
    """Collects problems while validating; ``marks`` maps field paths to (line, column).

    ``warnings`` are things the file says that are not used (an unknown key, as Backend.AI ignores
    them): reported with their position like problems, but the file is still valid."""

    def __init__(self, file: str, marks: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.file = file
        self.marks = dict(marks or {})
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.dropped = 0

    def warn(self, path: str, message: str) -> None:
        if len(self.warnings) < MAX_PROBLEMS:
            line, column = self._mark(path)
            self.warnings.append(Problem(self.file, path, message, line, column))

    def sorted_warnings(self) -> tuple[Problem, ...]:
        return tuple(sorted(self.warnings, key=lambda p: (p.line is None, p.line or 0, p.column or 0)))

    def known_keys(self, data: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> dict[str, Any]:
        """``data`` with kebab-case spellings of ``allowed`` keys (``initial-delay``) read as their
        snake_case names and unknown keys left out, each unknown one a warning that names it (with a
        "did you mean" for a near miss). Two spellings of one key are a problem."""
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_") if isinstance(key, str) else key
            where = field_path(path, key)
            if name not in allowed:
                self.warn(where, unknown_key_message(key, allowed))
                continue
            if name in out:
                self.add(where, f"is the same key as {name}; keep only one spelling")
                continue
            if name != key and where in self.marks:
                self.marks.setdefault(field_path(path, name), self.marks[where])
            out[name] = value
        return out

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


def unknown_key_message(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    """The warning for an unknown key: ignored, with the known key it probably meant."""
    spelled = key.replace("-", "_").lower()
    close = difflib.get_close_matches(spelled, list(allowed), n=1, cutoff=0.75)
    if close:
        return f"unknown key, ignored; did you mean {close[0]!r}?"
    return f"unknown key, ignored (the known keys here: {', '.join(allowed)})"


def fail(file: str, message: str, line: int | None = None, column: int | None = None) -> DefinitionError:
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
            raise MemSizeError(f"a memory size of {show(value)} bytes is too large")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise MemSizeError(f"a memory size must be a finite number of at least 0, got {show(value)}")
        number = value
    elif isinstance(value, str):
        match = _MEM_TEXT.match(value) if len(value) <= 64 else None
        if match is None:
            raise MemSizeError(
                f"{show(value)} is not a memory size; write a number with a unit such as '512m', '8g' or '8gb'"
            )
        digits, unit = match.group(1), (match.group(2) or "").lower()
        number = float(digits) * _MEM_FACTORS[unit]
    else:
        raise MemSizeError(f"a memory size must be a number or a string such as '8g', got {show(value)}")
    if number > _MAX_MEM:
        raise MemSizeError(f"the memory size {show(value)} is too large")
    return int(number)


# --- decoding ------------------------------------------------------------------------------------


def decode(data: bytes | str, file: str) -> str:
    """Bytes or text -> text, refusing what no definition file contains (size, encoding, NUL)."""
    if not isinstance(data, bytes | str):
        raise fail(file, f"expected the text of the file, got {type(data).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise fail(file, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; a definition file is small text")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            prefix = data[: exc.start].decode("utf-8", "replace")
            line, column = _line_column(prefix, len(prefix))
            raise fail(
                file, f"the file is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8", line, column
            ) from None
    else:
        text = data
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            line, column = _line_column(text, exc.start)
            raise fail(file, "the text contains an invalid character (a lone surrogate)", line, column) from None
    nul = text.find("\x00")
    if nul >= 0:
        line, column = _line_column(text, nul)
        raise fail(file, "the file contains NUL bytes; is it a binary file? Save it as plain text", line, column)
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
        raise fail(file, exc.message, *_mark_of(exc.mark)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "the text is not valid YAML"
        if exc.context and exc.context.startswith("while"):
            problem = f"{problem} ({exc.context})"
        elif exc.context:
            problem = f"{exc.context}, {problem}"
        raise fail(file, f"YAML syntax error: {problem}", *_mark_of(mark)) from None
    except ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise fail(
            file,
            f"the character #x{exc.character:04x} is not allowed in YAML; remove it or write it as an escape",
            line,
            column,
        ) from None
    except yaml.YAMLError as exc:
        raise fail(file, f"YAML error: {clip(str(exc), 200)}") from None
    except RecursionError:
        raise fail(file, f"the document is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()


class _YamlTree:
    """Plain Python values from a composed node tree, with the position of every field."""

    def __init__(self, file: str) -> None:
        self.collector = Collector(file)
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
                self._problem(node, path, f"the tag {clip(node.tag, 60)!r} is not allowed; use a plain YAML list")
                return None
            return [self.convert(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != f"{_TAG}map":
                self._problem(node, path, f"the tag {clip(node.tag, 60)!r} is not allowed; use a plain YAML mapping")
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
                self._problem(key_node, path, f"the tag {clip(key_node.tag, 60)!r} is not allowed on a key")
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
            self._problem(node, path, f"the tag {clip(tag, 60)!r} is not allowed; use plain YAML values")
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
            self._problem(node, path, f"the number {show(text)} can not be read; write a smaller, plain number")
            return None


def yaml_values(text: str, file: str) -> tuple[Any, _YamlTree]:
    node = _compose(text, file)
    tree = _YamlTree(file)
    if node is None:
        return None, tree
    try:
        value = tree.convert(node, "")
    except RecursionError:
        raise fail(file, f"the document is nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    tree.collector.raise_if_any()
    return value, tree
