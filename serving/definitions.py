"""Parse and validate ``model-definition.yaml`` (S2) and ``service-definition.toml`` (S3).

Pure: no Django, no I/O beyond the two size-capped ``load_*`` helpers. The parsers return frozen
dataclasses or raise one ``DefinitionError`` that lists *every* problem found, each with the file, the
field path (``models[0].service.port``), the line and column where known, and a sentence that says
what is wrong and how to fix it.

Hostile input is refused quickly: files over 1 MiB, YAML anchors/aliases (no "billion laughs"),
non-standard tags (``!!python/object`` and friends), nesting deeper than 32 levels, invalid UTF-8,
NUL bytes, and wrong types at every level.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli
import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
MODEL_DEFINITION_NAMES = ("model-definition.yaml", "model-definition.yml")
SERVICE_DEFINITION_NAME = "service-definition.toml"
PRE_START_ACTIONS = ("write_file", "write_tempfile", "run_command", "mkdir", "log")

_STANDARD_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:binary",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_MEM_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


# --- problems ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: str
    field: str
    message: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "field": self.field,
            "line": self.line,
            "column": self.column,
            "message": self.message,
        }


class DefinitionError(ValueError):
    """One or more problems in a definition file; ``str()`` lists them one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Collector:
    """Collects problems while validating; marks map field paths to (line, column)."""

    def __init__(self, file: str, marks: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.file = file
        self.marks = dict(marks or {})
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        line, column = self._mark(path)
        self.problems.append(Problem(self.file, path, message, line, column))

    def _mark(self, path: str) -> tuple[int | None, int | None]:
        probe = path
        while probe:
            if probe in self.marks:
                return self.marks[probe]
            parent = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", probe)
            if parent == probe:
                break
            probe = parent
        return (None, None)

    def raise_if_any(self) -> None:
        if self.problems:
            raise DefinitionError(self.problems)


# --- small shared parsers ------------------------------------------------------------------------


def parse_mem(value: str | int | float) -> int:
    """``"8gb"``, ``"8g"``, ``"512m"``, ``"512MiB"``, ``"1.5g"``, ``1024`` -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError("a memory size must be a number or a string such as '8g', not a boolean")
    if isinstance(value, (int, float)):
        if value < 0 or math.isnan(value):
            raise ValueError(f"a memory size must not be negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"a memory size must be a number or a string such as '8g', got {type(value).__name__}")
    match = _MEM_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a memory size; write it like '512m', '8g' or '8gb'")
    number, unit, _ = match.groups()
    return int(float(number) * _MEM_FACTORS[unit.lower()])


def _type_name(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "empty",
    }.get(type(value), type(value).__name__)


# --- YAML: compose safely, convert nodes with their positions -----------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (no alias bombs) and limits nesting depth."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:  # type: ignore[override]
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None,
                None,
                "YAML aliases (*name) are not allowed in definition files; write the value out",
                event.start_mark,
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.MarkedYAMLError(
                None,
                None,
                "YAML anchors (&name) are not allowed in definition files; write the value out",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(
                    None, None, f"the document is nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


def _decode(data: bytes | str, file: str) -> str:
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise DefinitionError(
                [
                    Problem(
                        file,
                        "",
                        f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; "
                        "a definition file is a few lines of text",
                    )
                ]
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DefinitionError(
                [Problem(file, "", f"the file is not UTF-8 text (byte {exc.start}); save it as UTF-8")]
            ) from None
    else:
        text = data
        if len(text) > MAX_FILE_BYTES:
            raise DefinitionError(
                [
                    Problem(
                        file,
                        "",
                        f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; "
                        "a definition file is a few lines of text",
                    )
                ]
            )
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DefinitionError([Problem(file, "", "the file contains NUL bytes; is it a binary file?", line)])
    return text.removeprefix("\ufeff")


def _yaml_tree(text: str, file: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """Parse YAML into plain values plus a map ``field path -> (line, column)`` (1-based)."""
    try:
        loader = _NoAliasLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise DefinitionError([Problem(file, "", f"YAML syntax error: {problem}", line, column)]) from None
    except yaml.YAMLError as exc:
        raise DefinitionError([Problem(file, "", f"YAML error: {exc}")]) from None
    except RecursionError:
        raise DefinitionError([Problem(file, "", f"the document is nested too deeply (limit {MAX_DEPTH})")]) from None
    if node is None:
        return None, {}
    marks: dict[str, tuple[int, int]] = {}
    problems: list[Problem] = []
    constructor = yaml.SafeLoader("")

    def convert(n: Node, path: str) -> Any:
        marks.setdefault(path, (n.start_mark.line + 1, n.start_mark.column + 1))
        if n.tag not in _STANDARD_TAGS:
            problems.append(
                Problem(
                    file,
                    path,
                    f"the tag {n.tag!r} is not allowed; use plain YAML values",
                    n.start_mark.line + 1,
                    n.start_mark.column + 1,
                )
            )
            return None
        if isinstance(n, MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                key = convert(key_node, path + ".<key>") if not isinstance(key_node, ScalarNode) else key_node.value
                if not isinstance(key, str) or isinstance(key_node, (MappingNode, SequenceNode)):
                    problems.append(
                        Problem(
                            file,
                            path,
                            "mapping keys must be plain names",
                            key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1,
                        )
                    )
                    continue
                child = f"{path}.{key}" if path else key
                marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in out:
                    problems.append(
                        Problem(
                            file,
                            child,
                            "this key appears twice; keep one",
                            key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1,
                        )
                    )
                out[key] = convert(value_node, child)
            return out
        if isinstance(n, SequenceNode):
            return [convert(item, f"{path}[{i}]") for i, item in enumerate(n.value)]
        try:
            value = constructor.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            problems.append(
                Problem(file, path, f"invalid value: {exc}", n.start_mark.line + 1, n.start_mark.column + 1)
            )
            return None
        if not isinstance(value, (str, int, float, bool, type(None))):
            value = str(n.value)  # timestamps, binary: keep the text the user wrote
        return value

    try:
        tree = convert(node, "")
    except RecursionError:
        raise DefinitionError([Problem(file, "", f"the document is nested too deeply (limit {MAX_DEPTH})")]) from None
    if problems:
        raise DefinitionError(problems)
    return tree, marks


# --- model-definition.yaml -----------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    path: str
    interval: float = 10.0
    max_retries: int = 10
    max_wait_time: float = 15.0
    expected_status_code: int = 200
    initial_delay: float = 60.0
    # Our extension (not in the original): headers sent with each probe, e.g. for a runtime that
    # checks its own API key on every path.
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreStartAction:
    action: str
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Service:
    start_command: str | tuple[str, ...]
    port: int
    pre_start_actions: tuple[PreStartAction, ...] = ()
    shell: str = "/bin/bash"
    health_check: HealthCheck | None = None


@dataclass(frozen=True)
class Model:
    name: str
    model_path: str
    service: Service | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDefinition:
    models: tuple[Model, ...]

    @property
    def primary(self) -> Model:
        """The model that is served (the first, as in the original)."""
        return self.models[0]


_MODEL_KEYS = {"name", "model_path", "service", "metadata"}
_SERVICE_KEYS = {"pre_start_actions", "start_command", "port", "health_check", "shell"}
_HEALTH_KEYS = {"path", "interval", "max_retries", "max_wait_time", "expected_status_code", "initial_delay", "headers"}
_ACTION_ARGS: dict[str, tuple[set[str], set[str]]] = {  # action -> (required, optional)
    "write_file": ({"filename", "body"}, {"mode", "append"}),
    "write_tempfile": ({"body"}, {"mode"}),
    "run_command": ({"command"}, set()),
    "mkdir": ({"path"}, set()),
    "log": ({"message"}, {"debug"}),
}


def _unknown(c: _Collector, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            c.add(f"{path}.{key}" if path else str(key), f"unknown key; allowed here: {', '.join(sorted(allowed))}")


def _number(
    c: _Collector, data: Mapping[str, Any], key: str, path: str, default: float, *, minimum: float, strict: bool = False
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        c.add(f"{path}.{key}", f"must be a number of seconds, got {_type_name(value)} {value!r}")
        return default
    if value < minimum or (strict and value == minimum) or not math.isfinite(value):
        c.add(f"{path}.{key}", f"must be {'greater than' if strict else 'at least'} {minimum:g}, got {value!r}")
        return default
    return float(value)


def _integer(c: _Collector, data: Mapping[str, Any], key: str, path: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        c.add(f"{path}.{key}", f"must be an integer between {low} and {high}, got {_type_name(value)} {value!r}")
        return default
    if not low <= value <= high:
        c.add(f"{path}.{key}", f"must be an integer between {low} and {high}, got {value}")
        return default
    return value


def _string(
    c: _Collector, data: Mapping[str, Any], key: str, path: str, *, required: bool = True, default: str = ""
) -> str:
    if key not in data:
        if required:
            c.add(f"{path}.{key}" if path else key, "is required")
        return default
    value = data[key]
    if not isinstance(value, str) or (required and not value.strip()):
        c.add(f"{path}.{key}" if path else key, f"must be a non-empty string, got {_type_name(value)} {value!r}")
        return default
    return value


def _mode(c: _Collector, value: Any, path: str) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.fullmatch(r"0?o?[0-7]{3,4}", text):
        c.add(path, f"must be an octal file mode such as '644' or '755', got {value!r}")
        return "644"
    return text.lstrip("0o").rjust(3, "0") if text.strip("0o") else "000"


def _sub(value: str, model_path: str) -> str:
    return value.replace("{model_path}", model_path)


def _action(c: _Collector, raw: Any, path: str, model_path: str) -> PreStartAction | None:
    if not isinstance(raw, dict):
        c.add(path, f"must be a mapping with 'action' and 'args', got {_type_name(raw)}")
        return None
    _unknown(c, raw, {"action", "args"}, path)
    kind = raw.get("action")
    if kind not in _ACTION_ARGS:
        c.add(f"{path}.action", f"unknown action {kind!r}; use one of {', '.join(PRE_START_ACTIONS)}")
        return None
    args = raw.get("args", {})
    if not isinstance(args, dict):
        c.add(f"{path}.args", f"must be a mapping, got {_type_name(args)}")
        return None
    required, optional = _ACTION_ARGS[kind]
    apath = f"{path}.args"
    for missing in sorted(required - args.keys()):
        c.add(f"{apath}.{missing}", f"is required for the {kind} action")
    _unknown(c, args, required | optional, apath)
    out: dict[str, Any] = {}
    for key in ("filename", "body", "path", "message"):
        if key in args:
            if not isinstance(args[key], str) or (key != "body" and not args[key]):
                c.add(f"{apath}.{key}", f"must be a string, got {_type_name(args[key])}")
            else:
                out[key] = _sub(args[key], model_path)
    if kind in ("write_file", "write_tempfile"):
        out["mode"] = _mode(c, args.get("mode", "644"), f"{apath}.mode")
    if kind == "write_file":
        append = args.get("append", False)
        if not isinstance(append, bool):
            c.add(f"{apath}.append", f"must be true or false, got {append!r}")
        out["append"] = bool(append) if isinstance(append, bool) else False
    if kind == "log":
        debug = args.get("debug", False)
        if not isinstance(debug, bool):
            c.add(f"{apath}.debug", f"must be true or false, got {debug!r}")
        out["debug"] = bool(debug) if isinstance(debug, bool) else False
    if kind == "run_command" and "command" in args:
        command = args["command"]
        if not isinstance(command, list) or not command or not all(isinstance(x, str) for x in command):
            c.add(f"{apath}.command", "must be a non-empty list of strings, e.g. [python3, -m, pip, list]")
        else:
            out["command"] = tuple(_sub(x, model_path) for x in command)
    return PreStartAction(action=kind, args=out)


def _health(c: _Collector, raw: Any, path: str) -> HealthCheck | None:
    if not isinstance(raw, dict):
        c.add(path, f"must be a mapping, got {_type_name(raw)}")
        return None
    _unknown(c, raw, _HEALTH_KEYS, path)
    probe_path = _string(c, raw, "path", path)
    if probe_path and not probe_path.startswith("/"):
        c.add(f"{path}.path", f"must start with '/', e.g. /health; got {probe_path!r}")
    headers = raw.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        c.add(f"{path}.headers", "must be a mapping of header names to string values")
        headers = {}
    return HealthCheck(
        path=probe_path or "/",
        interval=_number(c, raw, "interval", path, 10.0, minimum=0.0, strict=True),
        max_retries=_integer(c, raw, "max_retries", path, 10, 0, 10_000),
        max_wait_time=_number(c, raw, "max_wait_time", path, 15.0, minimum=0.0, strict=True),
        expected_status_code=_integer(c, raw, "expected_status_code", path, 200, 100, 599),
        initial_delay=_number(c, raw, "initial_delay", path, 60.0, minimum=0.0),
        headers=dict(headers),
    )


def _service(c: _Collector, raw: Any, path: str, model_path: str) -> Service | None:
    if not isinstance(raw, dict):
        c.add(path, f"must be a mapping, got {_type_name(raw)}")
        return None
    _unknown(c, raw, _SERVICE_KEYS, path)
    command: str | tuple[str, ...] = ""
    if "start_command" not in raw:
        c.add(f"{path}.start_command", "is required: the command that starts the inference server")
    else:
        value = raw["start_command"]
        if isinstance(value, str) and value.strip():
            command = _sub(value, model_path)
        elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
            command = tuple(_sub(x, model_path) for x in value)
        elif isinstance(value, list) and value and not all(isinstance(x, str) for x in value):
            bad = next(i for i, x in enumerate(value) if not isinstance(x, str))
            c.add(f"{path}.start_command[{bad}]", f'must be a string; quote it, e.g. "{value[bad]}"')
        else:
            c.add(f"{path}.start_command", "must be a non-empty string or a non-empty list of strings")
    port = 0
    if "port" not in raw:
        c.add(f"{path}.port", "is required: the port the server listens on inside the container")
    else:
        port = _integer(c, raw, "port", path, 0, 1, 65535)
    shell = _string(c, raw, "shell", path, required=False, default="/bin/bash") or "/bin/bash"
    actions_raw = raw.get("pre_start_actions", [])
    actions: list[PreStartAction] = []
    if actions_raw is None:
        actions_raw = []
    if not isinstance(actions_raw, list):
        c.add(f"{path}.pre_start_actions", f"must be a list of actions, got {_type_name(actions_raw)}")
    else:
        for i, item in enumerate(actions_raw):
            action = _action(c, item, f"{path}.pre_start_actions[{i}]", model_path)
            if action is not None:
                actions.append(action)
    health = _health(c, raw["health_check"], f"{path}.health_check") if raw.get("health_check") is not None else None
    return Service(start_command=command, port=port, pre_start_actions=tuple(actions), shell=shell, health_check=health)


def parse_model_definition(data: bytes | str, file: str = "model-definition.yaml") -> ModelDefinition:
    """Parse the text of a model definition file; raises DefinitionError listing every problem."""
    text = _decode(data, file)
    tree, marks = _yaml_tree(text, file)
    c = _Collector(file, marks)
    if tree is None:
        c.add("", "the file is empty; it needs a 'models' list (see examples/simple-http-server)")
        c.raise_if_any()
    if not isinstance(tree, dict):
        c.add("", f"the top level must be a mapping with a 'models' list, got {_type_name(tree)}")
        c.raise_if_any()
    _unknown(c, tree, {"models"}, "")
    raw_models = tree.get("models")
    if raw_models is None:
        c.add("models", "is required: a list with at least one model")
        c.raise_if_any()
    if not isinstance(raw_models, list) or not raw_models:
        c.add("models", f"must be a non-empty list of models, got {_type_name(raw_models)}")
        c.raise_if_any()
    models: list[Model] = []
    for i, raw in enumerate(raw_models):
        path = f"models[{i}]"
        if not isinstance(raw, dict):
            c.add(path, f"must be a mapping with name, model_path and service, got {_type_name(raw)}")
            continue
        _unknown(c, raw, _MODEL_KEYS, path)
        name = _string(c, raw, "name", path)
        model_path = _string(c, raw, "model_path", path)
        if model_path and not model_path.startswith("/"):
            c.add(f"{path}.model_path", f"must be an absolute path such as /models, got {model_path!r}")
        service = _service(c, raw["service"], f"{path}.service", model_path) if "service" in raw else None
        metadata = raw.get("metadata", {})
        if not isinstance(metadata, dict):
            c.add(f"{path}.metadata", f"must be a mapping, got {_type_name(metadata)}")
            metadata = {}
        models.append(Model(name=name, model_path=model_path, service=service, metadata=metadata))
    c.raise_if_any()
    return ModelDefinition(models=tuple(models))


# --- service-definition.toml ---------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeSection:
    image: str | None = None
    architecture: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)  # normalised: mem in bytes
    environ: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceDefinition:
    runtimes: Mapping[str, RuntimeSection]


@dataclass(frozen=True)
class LauncherDefaults:
    image: str
    architecture: str
    resources: Mapping[str, float]
    environ: Mapping[str, str]


_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def _split_dotted(key: str) -> list[str]:
    """``vllm."cuda.shares"`` -> ``["vllm", "cuda.shares"]`` (a linear scan: no regex backtracking)."""
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


def _toml_marks(text: str) -> dict[str, tuple[int, int]]:
    """Cheap positions for TOML fields: table headers and the keys under them."""
    marks: dict[str, tuple[int, int]] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[") and "]" in stripped:
            table = ".".join(_split_dotted(stripped.strip("[").split("]", 1)[0]))
            marks.setdefault(table, (number, 1))
            continue
        name, equals, _ = stripped.partition("=")
        if equals and name.strip():
            key = ".".join(_split_dotted(name.strip()))
            marks.setdefault(f"{table}.{key}" if table else key, (number, line.find(name.strip()[:1]) + 1))
    return marks


def parse_service_definition(data: bytes | str, file: str = SERVICE_DEFINITION_NAME) -> ServiceDefinition:
    """Parse the text of a service definition file; raises DefinitionError listing every problem."""
    text = _decode(data, file)
    try:
        tree = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        message = str(getattr(exc, "msg", "") or exc)
        position = _TOML_POS.search(str(exc))
        if line is None and position:
            line, column = int(position.group(1)), int(position.group(2))
        message = _TOML_POS.sub("", message).strip()
        raise DefinitionError([Problem(file, "", f"TOML syntax error: {message}", line, column)]) from None
    except RecursionError:
        raise DefinitionError([Problem(file, "", "the document is nested too deeply")]) from None
    c = _Collector(file, _toml_marks(text))
    runtimes: dict[str, RuntimeSection] = {}
    for runtime, section in tree.items():
        if not isinstance(section, dict):
            c.add(runtime, f"must be a table such as [{runtime}.environment], got {_type_name(section)}")
            continue
        _unknown(c, section, {"environment", "resource_slots", "environ"}, runtime)
        image = architecture = None
        environment = section.get("environment")
        if environment is not None:
            path = f"{runtime}.environment"
            if not isinstance(environment, dict):
                c.add(path, f"must be a table, got {_type_name(environment)}")
            else:
                _unknown(c, environment, {"image", "architecture"}, path)
                image = _string(c, environment, "image", path) or None
                architecture = _string(c, environment, "architecture", path) or None
        resources: dict[str, float] = {}
        slots_raw = section.get("resource_slots")
        if slots_raw is not None:
            path = f"{runtime}.resource_slots"
            if not isinstance(slots_raw, dict):
                c.add(path, f"must be a table, got {_type_name(slots_raw)}")
            else:
                for key, value in _flatten(slots_raw):
                    kpath = f'{path}."{key}"' if "." in key else f"{path}.{key}"
                    if key == "mem":
                        try:
                            resources["mem"] = float(parse_mem(value))
                        except ValueError as exc:
                            c.add(kpath, str(exc))
                        continue
                    if key != "cpu" and not re.fullmatch(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*", key):
                        c.add(kpath, 'unknown resource; use cpu, mem or an accelerator such as "cuda.shares"')
                        continue
                    try:
                        number = float(value) if not isinstance(value, bool) else float("nan")
                    except (TypeError, ValueError):
                        number = float("nan")
                    if not math.isfinite(number) or number < 0:
                        c.add(
                            kpath, f'must be a number of at least 0 (or a numeric string such as "0.5"), got {value!r}'
                        )
                        continue
                    resources[key] = number
        environ: dict[str, str] = {}
        environ_raw = section.get("environ")
        if environ_raw is not None:
            path = f"{runtime}.environ"
            if not isinstance(environ_raw, dict):
                c.add(path, f"must be a table, got {_type_name(environ_raw)}")
            else:
                for key, value in environ_raw.items():
                    if not _ENV_NAME.match(key):
                        c.add(f"{path}.{key}", "is not a valid environment variable name (letters, digits, _)")
                    elif isinstance(value, bool):
                        environ[key] = "true" if value else "false"
                    elif isinstance(value, (str, int, float)):
                        environ[key] = str(value)
                    else:
                        c.add(f"{path}.{key}", f"must be a string, got {_type_name(value)}")
        runtimes[runtime] = RuntimeSection(image=image, architecture=architecture, resources=resources, environ=environ)
    c.raise_if_any()
    return ServiceDefinition(runtimes=runtimes)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``cuda.shares = 1`` written unquoted is a nested table in TOML; treat it as the dotted key."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and len(name.split(".")) < 3:
            out.extend(_flatten(value, name))
        else:
            out.append((name, value))
    return out


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


def _read_capped(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DefinitionError(
                [
                    Problem(
                        path.name,
                        "",
                        f"the file is {size} bytes; a definition file must be under {MAX_FILE_BYTES // 1024} KiB",
                    )
                ]
            )
        with path.open("rb") as handle:
            return handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise DefinitionError([Problem(path.name, "", f"can not be read: {exc.strerror or exc}")]) from None


def load_model_definition(path: Path) -> ModelDefinition:
    return parse_model_definition(_read_capped(path), path.name)


def load_service_definition(path: Path) -> ServiceDefinition:
    return parse_service_definition(_read_capped(path), path.name)


@dataclass(frozen=True)
class FolderValidation:
    problems: tuple[Problem, ...]
    model_definition: ModelDefinition | None
    service_definition: ServiceDefinition | None
    defaults: LauncherDefaults | None

    @property
    def ok(self) -> bool:
        return not self.problems


def find_model_definition(folder: Path, definition_path: str | None = None) -> Path | None:
    names = (definition_path,) if definition_path else MODEL_DEFINITION_NAMES
    for name in names:
        if name and (folder / name).is_file():
            return folder / name
    return None


def validate_model_folder(
    folder: Path, runtime: str = "custom", definition_path: str | None = None
) -> FolderValidation:
    """Everything the platform would check about a model folder, without starting anything."""
    problems: list[Problem] = []
    model_definition = service_definition = None
    defaults = None
    if not folder.is_dir():
        return FolderValidation((Problem(str(folder), "", "is not a directory"),), None, None, None)
    from serving.runtimes import RUNTIMES

    variant = RUNTIMES.get(runtime)
    if variant is None:
        problems.append(
            Problem(str(folder), "runtime", f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        )
    found = find_model_definition(folder, definition_path)
    if found is None:
        if variant is None or variant.needs_definition_file:
            wanted = definition_path or " or ".join(MODEL_DEFINITION_NAMES)
            problems.append(Problem(wanted, "", f"is missing from the folder; the {runtime} runtime needs it"))
    else:
        try:
            model_definition = load_model_definition(found)
            if variant is not None and variant.needs_definition_file and model_definition.primary.service is None:
                problems.append(Problem(found.name, "models[0].service", "is required to start the custom runtime"))
        except DefinitionError as exc:
            problems.extend(exc.problems)
    service_path = folder / SERVICE_DEFINITION_NAME
    if service_path.is_file():
        try:
            service_definition = load_service_definition(service_path)
            defaults = resolve_service_defaults(service_definition, runtime)
        except DefinitionError as exc:
            problems.extend(exc.problems)
    return FolderValidation(tuple(problems), model_definition, service_definition, defaults)
