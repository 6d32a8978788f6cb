"""``model-definition.yaml`` (S2): its dataclasses and ``parse_model_definition``.

Pure: no Django, no I/O. The text goes through the shared hostile-input reader
(``serving.core.definitions.reader``), then ``_Model`` checks the plain values field by field into
frozen dataclasses, collecting every problem with its field path and position.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.core.definitions.reader import (
    FLOAT_TEXT,
    Collector,
    Problem,
    decode,
    fail,
    field_path,
    show,
    yaml_values,
)

MAX_SECONDS = 86_400.0  # upper bound of every health-check time (extension)
MODEL_DEFINITION_NAMES = ("model-definition.yaml", "model-definition.yml")
DEFAULT_MODEL_DEFINITION_PATH = MODEL_DEFINITION_NAMES[0]
PRE_START_ACTIONS = ("write_file", "write_tempfile", "run_command", "mkdir", "log")
MODEL_PATH_PLACEHOLDER = "{model_path}"
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,18}\Z")
REF_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")  # a pre-start action's ``ref``
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")  # an RFC 9110 token


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
    * ``run_command``: ``command`` tuple of str, ``echo`` bool (default false), ``check`` bool
      (default false: a non-zero exit is recorded and the start goes on, as the original does;
      true stops the replica)
    * ``mkdir``: ``path`` str
    * ``log``: ``message`` str, ``debug`` bool (default false)

    A ``body`` written as a list of lines becomes one string as the original writes it: each line
    followed by a newline for ``write_file``, the lines joined as they are for ``write_tempfile``.
    """

    action: str
    args: Mapping[str, Any]
    # Saves the action's result under this name for later actions' ``{name}`` (the original's
    # service actions): write_tempfile's path, run_command's ``{name[out]}``/``{name[err]}``.
    ref: str | None = None


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
    # What the file says that is not used (unknown keys), in file order; the file is still valid.
    warnings: tuple[Problem, ...] = field(default=(), compare=False)

    @property
    def primary(self) -> Model:
        """The model that is served: the first, as in the original."""
        return self.models[0]


# The names the issue uses, for readers who look for them.
ModelConfig = Model
ServiceConfig = Service
HealthCheckConfig = HealthCheck

MODEL_KEYS = ("name", "model_path", "service", "metadata")
SERVICE_KEYS = ("pre_start_actions", "start_command", "shell", "port", "health_check")
HEALTH_KEYS = (
    "path",
    "interval",
    "max_retries",
    "max_wait_time",
    "expected_status_code",
    "initial_delay",
    "headers",
)
ACTION_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # action -> (required, optional)
    "write_file": (("filename", "body"), ("mode", "append")),
    "write_tempfile": (("body",), ("mode",)),
    "run_command": (("command",), ("echo", "check")),
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
METADATA_STRINGS = ("author", "title", "description", "task", "category", "architecture", "license")
METADATA_ALIASES = {"created": ("created", "created_at"), "last_modified": ("last_modified", "modified_at")}


# --- model-definition.yaml: validation -----------------------------------------------------------


class _Model:
    """Validates the plain values of a model definition into the dataclasses."""

    def __init__(self, c: Collector, int_texts: Mapping[str, str], model_mount: str | None) -> None:
        self.c = c
        self.int_texts = int_texts
        self.model_mount = model_mount

    # generic checks

    def mapping(self, value: Any, path: str, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.c.add(path, f"must be a mapping ({what}), got {show(value)}")
        return None

    def keys(self, data: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> dict[str, Any]:
        """Kebab-case keys read as snake_case; unknown keys warned about and left out."""
        return self.c.known_keys(data, allowed, path)

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
            self.c.add(where, f"must be a string ({what}), got {show(value)}; put it in quotes")
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
            self.c.add(path, f"must be an integer between {low} and {high}, got {show(value)}")
            return None
        return number

    def seconds(self, value: Any, path: str, *, positive: bool) -> float | None:
        number: float | None = None
        try:
            if isinstance(value, int | float) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
                number = float(value.strip())
        except OverflowError:
            number = None
        valid = number is not None and math.isfinite(number) and 0 <= number <= MAX_SECONDS
        if number is not None and positive and number == 0:
            valid = False
        if not valid or number is None:
            low = "greater than 0" if positive else "at least 0"
            self.c.add(path, f"must be a number of seconds, {low} and at most {MAX_SECONDS:g}, got {show(value)}")
            return None
        return number

    def flag(self, value: Any, path: str) -> bool:
        if isinstance(value, bool):
            return value
        self.c.add(path, f"must be true or false, got {show(value)}")
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
            c.add("", f"the top level must be a mapping with a 'models' list, got {show(tree)}")
            return None
        tree = self.keys(tree, ("models",), "")
        raw_models = tree.get("models")
        if raw_models is None:
            c.add("models", "is required: a list with at least one model (name, model_path, service)")
            return None
        if not isinstance(raw_models, list):
            c.add("models", f"must be a list of models, got {show(raw_models)}; start each model with '- name:'")
            return None
        if not raw_models:
            c.add("models", "must list at least one model; the first one is served")
            return None
        models = [self.model(raw, f"models[{i}]") for i, raw in enumerate(raw_models)]
        if any(m is None for m in models):
            return None
        return ModelDefinition(models=tuple(m for m in models if m is not None), warnings=self.c.sorted_warnings())

    def model(self, raw: Any, path: str) -> Model | None:
        data = self.mapping(raw, path, "with name, model_path and service")
        if data is None:
            return None
        data = self.keys(data, MODEL_KEYS, path)
        name = self.text(data, "name", path, required=True, what="the name of the model")
        model_path = self.text(data, "model_path", path, required=True, what="where the model is, such as /models")
        if model_path is not None and not model_path.startswith("/"):
            self.c.add(
                field_path(path, "model_path"), f"must be an absolute path such as /models, got {show(model_path)}"
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
        data = self.keys(data, SERVICE_KEYS, path)
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
            self.c.add(actions_path, f"must be a list of actions ('- action: ...'), got {show(raw_actions)}")
        elif raw_actions is not None:
            refs: set[str] = set()
            for i, item in enumerate(raw_actions):
                action = self.action(item, f"{actions_path}[{i}]", model_path, refs)
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
                    self.c.add(f"{path}[{i}]", f"must be a string, got {show(part)}{hint}")
                    continue
                parts.append(self.sub(part, model_path))
            if len(parts) != len(value):
                return None
            if not parts[0].strip():
                self.c.add(f"{path}[0]", "must name the program to run; it is empty")
                return None
            return tuple(parts)
        self.c.add(path, f"must be a string or a list of strings, got {show(value)}")
        return None

    def health(self, raw: Any, path: str) -> HealthCheck | None:
        data = self.mapping(raw, path, "with at least a path")
        if data is None:
            return None
        data = self.keys(data, HEALTH_KEYS, path)
        probe = self.text(data, "path", path, required=True, what="the HTTP path to probe, such as /health")
        if probe is not None and (not probe.startswith("/") or any(ch.isspace() or ord(ch) < 32 for ch in probe)):
            self.c.add(
                field_path(path, "path"), f"must be a URL path starting with '/', such as /health, got {show(probe)}"
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
                self.c.add(where, f"must be a string, got {show(value)}")
            elif any((ord(ch) < 32 and ch != "\t") or ch == "\x7f" for ch in str(value)):
                self.c.add(where, "must be a single line without control characters (no line breaks)")
            else:
                out[name] = str(value)
        return out if len(out) == len(data) else None

    def action(self, raw: Any, path: str, model_path: str, refs: set[str]) -> PreStartAction | None:
        data = self.mapping(raw, path, "with 'action' and 'args'")
        if data is None:
            return None
        data = self.keys(data, ("action", "args", "ref"), path)
        ref = self.ref(data.get("ref"), field_path(path, "ref"), refs)
        kind = data.get("action")
        if kind is None:
            self.c.add(field_path(path, "action"), f"is required: one of {', '.join(PRE_START_ACTIONS)}")
            return None
        if not isinstance(kind, str) or kind not in ACTION_ARGS:
            self.c.add(
                field_path(path, "action"), f"unknown action {show(kind)}; use one of {', '.join(PRE_START_ACTIONS)}"
            )
            return None
        apath = field_path(path, "args")
        if data.get("args") is None:
            self.c.add(apath, f"is required for the {kind} action, e.g. {_ACTION_EXAMPLES[kind]}")
            return None
        args = self.mapping(data["args"], apath, f"the arguments of the {kind} action")
        if args is None:
            return None
        required, optional = ACTION_ARGS[kind]
        args = self.keys(args, required + optional, apath)
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
            for name in ("echo", "check"):
                out[name] = self.flag(args[name], field_path(apath, name)) if args.get(name) is not None else False
        if len(self.c.problems) + self.c.dropped != before or any(args.get(n) is None for n in required):
            return None
        return PreStartAction(action=kind, args=out, ref=ref)

    def ref(self, value: Any, path: str, refs: set[str]) -> str | None:
        """A name later actions use as ``{name}``: an identifier, saved once, not ``model_path``."""
        if value is None:
            return None
        if not isinstance(value, str) or not REF_NAME.match(value):
            self.c.add(path, f"must be a name of letters, digits and _ (not starting with a digit), got {show(value)}")
            return None
        if value == MODEL_PATH_PLACEHOLDER.strip("{}"):
            self.c.add(path, "model_path is the model's path already; choose another name")
            return None
        if value in refs:
            self.c.add(path, f"the name {value!r} is saved by an earlier action already; choose another name")
            return None
        refs.add(value)
        return value

    def body(self, value: Any, path: str, kind: str) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(line, str) for line in value):
            # The original writes each line of a list followed by a newline (write_tempfile: as is).
            return "".join(f"{line}\n" for line in value) if kind == "write_file" else "".join(value)
        self.c.add(path, f"must be a string (use '|' for several lines) or a list of lines, got {show(value)}")
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
        self.c.add(path, f'must be an octal file mode such as "644" or "755", got {show(value)}')
        return "644"

    def command(self, value: Any, path: str, model_path: str) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not value:
            hint = f"; write it as a list, e.g. {json.dumps(value.split()[:4])}" if isinstance(value, str) else ""
            self.c.add(path, f"must be a non-empty list of strings such as [python3, -m, pip, list]{hint}")
            return None
        parts: list[str] = []
        for i, part in enumerate(value):
            if isinstance(part, bool) or not isinstance(part, str | int | float):
                self.c.add(f"{path}[{i}]", f"must be a string, got {show(part)}")
            else:
                parts.append(self.sub(str(part), model_path))  # the original runs str(piece)
        return tuple(parts) if len(parts) == len(value) else None

    def metadata(self, raw: Any, path: str) -> ModelMetadata | None:
        data = self.mapping(raw, path, "such as {author: ..., title: ...}")
        if data is None:
            return None
        known: dict[str, Any] = {}
        for name in METADATA_STRINGS:
            if data.get(name) is not None:
                known[name] = self.text(
                    data, name, path, required=False, what=name, single_line=False, allow_empty=True
                )
        for name, aliases in METADATA_ALIASES.items():
            given = [alias for alias in aliases if data.get(alias) is not None]
            if len(given) > 1:
                self.c.add(field_path(path, given[1]), f"is the same as {given[0]}; keep only one of them")
            elif given:
                known[name] = self.text(data, given[0], path, required=False, what=name, allow_empty=True)
        version = data.get("version")
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int | str):
                self.c.add(field_path(path, "version"), f"must be a number or a string, got {show(version)}")
            else:
                known["version"] = version
        for name in ("framework", "label"):
            value = data.get(name)
            if value is None:
                continue
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                known[name] = tuple(value)
            else:
                self.c.add(field_path(path, name), f"must be a list of strings, got {show(value)}")
        min_resource = data.get("min_resource")
        if min_resource is not None:
            known["min_resource"] = self.mapping(min_resource, field_path(path, "min_resource"), "of resource slots")
        handled = {*METADATA_STRINGS, "version", "framework", "label", "min_resource"}
        handled.update(alias for aliases in METADATA_ALIASES.values() for alias in aliases)
        extra = {k: v for k, v in data.items() if k not in handled}
        return ModelMetadata(**{k: v for k, v in known.items() if v is not None}, extra=extra)


def parse_model_definition(
    data: bytes | str, file: str = DEFAULT_MODEL_DEFINITION_PATH, *, model_mount: str | None = None
) -> ModelDefinition:
    """Parse the text of a model definition file (S2); raises ``DefinitionError`` listing every problem.

    ``{model_path}`` in the start command and in pre-start action arguments becomes ``model_mount``
    when given (where the platform mounts the folder), else each model's own ``model_path``.
    """
    text = decode(data, file)
    tree, yaml_tree = yaml_values(text, file)
    c = Collector(file, yaml_tree.marks)
    definition = _Model(c, yaml_tree.int_texts, model_mount).definition(tree)
    c.raise_if_any()
    if definition is None:  # pragma: no cover - every path to None adds a problem
        raise fail(file, "the model definition is not valid")
    return definition
