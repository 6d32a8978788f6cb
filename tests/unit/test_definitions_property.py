"""Any input gives a definition or our DefinitionError: never another exception, never slow."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import tomli_w
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.core.definitions import (
    PRE_START_ACTIONS,
    SERVICE_SECTIONS,
    DefinitionError,
    MemSizeError,
    ModelDefinition,
    ServiceDefinition,
    parse_mem,
    parse_model_definition,
    parse_service_definition,
    resolve_service_defaults,
)
from tests.live import deadline_for, deadline_ms

SETTINGS = settings(max_examples=150, deadline=deadline_ms(1), suppress_health_check=[HealthCheck.too_slow])

MANUAL = """\
models:
  - name: "simple-http-server"
    model_path: "/models"
    service:
      pre_start_actions:
        - action: write_file
          args: {filename: /home/work/a, body: "x", mode: "644", append: false}
        - action: run_command
          args: {command: [python3, --version]}
        - action: log
          args: {message: hi, debug: true}
      start_command:
        - python
        - -m
        - http.server
        - "8000"
      port: 8000
      health_check:
        path: /
        interval: 10.0
        max_retries: 10
        max_wait_time: 15.0
        expected_status_code: 200
        initial_delay: 60.0
"""
MANUAL_TOML = """\
[vllm.environment]
image        = "example.com/model-server:latest"
architecture = "x86_64"

[vllm.resource_slots]
cpu = 1
mem = "8gb"
"cuda.shares" = "0.5"

[vllm.environ]
MODEL_NAME = "example-model-name"
"""

KEYS = [
    "models",
    "name",
    "model_path",
    "service",
    "metadata",
    "start_command",
    "shell",
    "port",
    "health_check",
    "path",
    "interval",
    "max_retries",
    "max_wait_time",
    "expected_status_code",
    "initial_delay",
    "headers",
    "pre_start_actions",
    "action",
    "args",
    "command",
    "body",
    "filename",
    "mode",
    "append",
    "message",
    "debug",
    "echo",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["/", "/health", "644", "0644", "{model_path}", "8gb", "", " ", "~", "0x10"]),
)
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    max_leaves=25,
)


def near(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes anything: reaches the deep checks and their error paths."""
    return st.one_of(good, good, trees)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


health = optional(
    path=near(st.sampled_from(["/", "/health", "health", "/a b"])),
    interval=near(st.floats(-1, 100)),
    max_retries=near(st.integers(-1, 20)),
    max_wait_time=near(st.floats(0, 20)),
    expected_status_code=near(st.integers(90, 610)),
    initial_delay=near(st.floats(-1, 100)),
    headers=near(st.dictionaries(st.sampled_from(["Authorization", "X-K", "bad name"]), st.text(max_size=10))),
)
args = optional(
    filename=near(st.text(max_size=10)),
    body=near(st.one_of(st.text(max_size=10), st.lists(st.text(max_size=5), max_size=3))),
    mode=near(st.sampled_from(["644", 644, "0o755", "999", 7, True])),
    append=near(st.booleans()),
    command=near(st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3)),
    echo=near(st.booleans()),
    path=near(st.text(max_size=10)),
    message=near(st.text(max_size=10)),
    debug=near(st.booleans()),
)
action = optional(action=near(st.sampled_from([*PRE_START_ACTIONS, "format_disk"])), args=near(args))
service = optional(
    start_command=near(st.one_of(st.text(max_size=10), st.lists(st.text(max_size=5), max_size=4))),
    port=near(st.integers(-5, 70_000)),
    shell=near(st.sampled_from(["/bin/sh", ""])),
    health_check=near(health),
    pre_start_actions=near(st.lists(action, max_size=3)),
)
model = optional(
    name=near(st.text(max_size=10)),
    model_path=near(st.sampled_from(["/models", "models", ""])),
    service=near(service),
    metadata=trees,
)
documents = st.fixed_dictionaries({"models": near(st.lists(model, max_size=3))})


def _check(parse: Callable[[Any], Any], data: object) -> Any:
    start = time.monotonic()
    try:
        result = parse(data)
    except DefinitionError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem.file, str) and isinstance(problem.field, str)
            assert isinstance(problem.message, str) and problem.message
            assert problem.line is None or problem.line >= 1
            assert problem.column is None or problem.column >= 1
        assert str(exc)
        result = None
    assert time.monotonic() - start < deadline_for(1.0)
    return result


def _check_definition(definition: ModelDefinition | None) -> None:
    if definition is None:
        return
    assert definition.models and definition.primary is definition.models[0]
    for m in definition.models:
        assert m.name.strip() and m.model_path.startswith("/")
        if m.service is None:
            continue
        assert 1 <= m.service.port <= 65535
        assert m.service.start_command
        check = m.service.health_check
        if check is not None:
            assert check.path.startswith("/")
            assert check.interval > 0 and check.max_wait_time > 0 and check.initial_delay >= 0
            assert all(math.isfinite(v) for v in (check.interval, check.max_wait_time, check.initial_delay))
            assert 100 <= check.expected_status_code <= 599 and check.max_retries >= 0
        for a in m.service.pre_start_actions:
            assert a.action in PRE_START_ACTIONS
            if "mode" in a.args:
                assert int(a.args["mode"], 8) <= 0o7777


@SETTINGS
@given(st.text(max_size=2000))
def test_model_definition_any_text(text: str) -> None:
    _check_definition(_check(parse_model_definition, text))


@SETTINGS
@given(st.binary(max_size=2000))
def test_model_definition_any_bytes(data: bytes) -> None:
    _check_definition(_check(parse_model_definition, data))


@SETTINGS
@given(trees)
def test_model_definition_any_structure(tree: object) -> None:
    _check_definition(_check(parse_model_definition, yaml.safe_dump(tree)))


@SETTINGS
@given(documents)
def test_model_definition_plausible_structure(document: dict[str, Any]) -> None:
    _check_definition(_check(parse_model_definition, yaml.safe_dump(document, allow_unicode=True)))


@SETTINGS
@given(st.integers(0, len(MANUAL)), st.integers(0, 20), st.text(max_size=8))
def test_model_definition_edited_manual_example(at: int, cut: int, insert: str) -> None:
    _check_definition(_check(parse_model_definition, MANUAL[:at] + insert + MANUAL[at + cut :]))


toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.sampled_from(["8gb", "0.5", "1.5g", "x86_64", "-1", "nan"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
toml_keys = st.one_of(
    st.sampled_from(["image", "architecture", "cpu", "mem", "cuda.shares", "MODEL_NAME", "1BAD"]), st.text(max_size=8)
)
sections = st.dictionaries(
    st.one_of(st.sampled_from(SERVICE_SECTIONS), st.text(min_size=1, max_size=6)),
    st.one_of(st.dictionaries(toml_keys, toml_values, max_size=4), toml_scalars),
    max_size=4,
)
toml_documents = st.dictionaries(st.one_of(st.sampled_from(["vllm", "custom", "nim"]), st.text(max_size=6)), sections)


def _check_service(definition: ServiceDefinition | None) -> None:
    if definition is None:
        return
    for runtime in definition.runtimes:
        defaults = resolve_service_defaults(definition, runtime)
        assert defaults is not None
        assert all(math.isfinite(v) and v >= 0 for v in defaults.resources.values())
        assert all(isinstance(v, str) for v in defaults.environ.values())


@SETTINGS
@given(st.text(max_size=2000))
def test_service_definition_any_text(text: str) -> None:
    _check_service(_check(parse_service_definition, text))


@SETTINGS
@given(st.binary(max_size=2000))
def test_service_definition_any_bytes(data: bytes) -> None:
    _check_service(_check(parse_service_definition, data))


@SETTINGS
@given(toml_documents)
def test_service_definition_any_structure(tree: dict[str, Any]) -> None:
    _check_service(_check(parse_service_definition, tomli_w.dumps(tree)))


@SETTINGS
@given(st.integers(0, len(MANUAL_TOML)), st.integers(0, 20), st.text(max_size=8))
def test_service_definition_edited_manual_example(at: int, cut: int, insert: str) -> None:
    _check_service(_check(parse_service_definition, MANUAL_TOML[:at] + insert + MANUAL_TOML[at + cut :]))


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.booleans()))
def test_parse_mem_gives_bytes_or_a_sentence(value: str | int | float) -> None:
    try:
        result = parse_mem(value)
    except MemSizeError as exc:
        assert str(exc)
    else:
        assert isinstance(result, int) and 0 <= result < 2**63
