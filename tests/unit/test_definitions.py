"""model-definition.yaml (S2) and service-definition.toml (S3), exactly, including hostile input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serving.definitions import (
    DefinitionError,
    HealthCheck,
    parse_mem,
    parse_model_definition,
    parse_service_definition,
    resolve_service_defaults,
    validate_model_folder,
)

MANUAL_MODEL = """\
models:
  - name: "simple-http-server"
    model_path: "/models"
    service:
      start_command:
        - python
        - -m
        - http.server
        - --directory
        - /home/work
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

MANUAL_SERVICE = """\
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


def problems(text: str, parser=parse_model_definition) -> list[tuple[str, str, int | None]]:  # type: ignore[no-untyped-def]
    with pytest.raises(DefinitionError) as info:
        parser(text)
    return [(p.field, p.message, p.line) for p in info.value.problems]


def fields(text: str, parser=parse_model_definition) -> list[str]:  # type: ignore[no-untyped-def]
    return [f for f, _, _ in problems(text, parser)]


def model(service: str, head: str = "") -> str:
    return f"models:\n  - name: m\n    model_path: /models\n{head}    service:\n" + "".join(
        f"      {line}\n" for line in service.strip("\n").splitlines()
    )


# --- the manual's own files ----------------------------------------------------------------------


def test_manual_model_definition_parses_exactly() -> None:
    definition = parse_model_definition(MANUAL_MODEL)
    primary = definition.primary
    assert (primary.name, primary.model_path) == ("simple-http-server", "/models")
    assert primary.service is not None
    assert primary.service.start_command == ("python", "-m", "http.server", "--directory", "/home/work", "8000")
    assert primary.service.port == 8000
    assert primary.service.health_check == HealthCheck(path="/")


def test_manual_service_definition_parses_and_resolves() -> None:
    definition = parse_service_definition(MANUAL_SERVICE)
    defaults = resolve_service_defaults(definition, "vllm")
    assert defaults is not None
    assert defaults.image == "example.com/model-server:latest"
    assert defaults.architecture == "x86_64"
    assert defaults.resources == {"cpu": 1.0, "mem": float(8 * 1024**3), "cuda.shares": 0.5}
    assert defaults.environ == {"MODEL_NAME": "example-model-name"}
    assert resolve_service_defaults(definition, "custom") is None


# --- fields and defaults -------------------------------------------------------------------------


def test_health_check_defaults() -> None:
    service = parse_model_definition(model("start_command: x\nport: 1\nhealth_check:\n  path: /h")).primary.service
    assert service is not None and service.health_check is not None
    check = service.health_check
    assert (check.interval, check.max_retries, check.max_wait_time) == (10.0, 10, 15.0)
    assert (check.expected_status_code, check.initial_delay) == (200, 60.0)


def test_health_check_is_optional_and_shell_defaults_to_bash() -> None:
    service = parse_model_definition(model("start_command: python3 -m http.server\nport: 8000")).primary.service
    assert service is not None
    assert service.health_check is None
    assert service.start_command == "python3 -m http.server"
    assert service.shell == "/bin/bash"


def test_model_path_substitution_in_command_and_action_args() -> None:
    text = model(
        """start_command: ["python3", "{model_path}/server.py"]
port: 8000
pre_start_actions:
  - action: run_command
    args: {command: ["ls", "{model_path}"]}
  - action: write_file
    args: {filename: "{model_path}/../home/work/a.txt", body: "x {model_path}"}"""
    )
    service = parse_model_definition(text).primary.service
    assert service is not None
    assert service.start_command == ("python3", "/models/server.py")
    assert service.pre_start_actions[0].args["command"] == ("ls", "/models")
    assert service.pre_start_actions[1].args["body"] == "x /models"


def test_every_pre_start_action_and_its_defaults() -> None:
    text = model(
        """start_command: x
port: 1
pre_start_actions:
  - action: write_file
    args: {filename: a.txt, body: hi}
  - action: write_tempfile
    args: {body: "print(1)"}
  - action: run_command
    args: {command: [echo, hi]}
  - action: mkdir
    args: {path: /home/work/d}
  - action: log
    args: {message: hello, debug: true}
  - action: write_file
    args: {filename: b.txt, body: hi, mode: "755", append: true}"""
    )
    service = parse_model_definition(text).primary.service
    assert service is not None
    actions = service.pre_start_actions
    assert [a.action for a in actions] == ["write_file", "write_tempfile", "run_command", "mkdir", "log", "write_file"]
    assert actions[0].args == {"filename": "a.txt", "body": "hi", "mode": "644", "append": False}
    assert actions[1].args == {"body": "print(1)", "mode": "644"}
    assert actions[4].args == {"message": "hello", "debug": True}
    assert actions[5].args["mode"] == "755" and actions[5].args["append"] is True


def test_several_models_the_first_is_served() -> None:
    text = MANUAL_MODEL + "  - name: second\n    model_path: /other\n"
    definition = parse_model_definition(text)
    assert len(definition.models) == 2
    assert definition.primary.name == "simple-http-server"


def test_our_health_check_headers_extension() -> None:
    text = model("start_command: x\nport: 1\nhealth_check:\n  path: /h\n  headers: {Authorization: Bearer k}")
    service = parse_model_definition(text).primary.service
    assert service is not None and service.health_check is not None
    assert service.health_check.headers == {"Authorization": "Bearer k"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8gb", 8 * 1024**3),
        ("8g", 8 * 1024**3),
        ("512m", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("1.5g", int(1.5 * 1024**3)),
        (1024, 1024),
        ("64k", 65536),
        ("100", 100),
    ],
)
def test_parse_mem(raw: str | int, expected: int) -> None:
    assert parse_mem(raw) == expected


@pytest.mark.parametrize("raw", ["lots", "8 gigs", "-1g", "", True, "1e9"])
def test_parse_mem_refuses(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_mem(raw)  # type: ignore[arg-type]


# --- errors: field path, line, sentence -----------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "field", "words"),
    [
        ("port: 8000", "models[0].service.start_command", "required"),
        ("start_command: x", "models[0].service.port", "required"),
        ("start_command: x\nport: 0", "models[0].service.port", "between 1 and 65535"),
        ("start_command: x\nport: 65536", "models[0].service.port", "between 1 and 65535"),
        ("start_command: x\nport: abc", "models[0].service.port", "integer"),
        ("start_command: x\nport: true", "models[0].service.port", "integer"),
        ("start_command: []\nport: 1", "models[0].service.start_command", "non-empty"),
        ("start_command: [python, 3]\nport: 1", "models[0].service.start_command[1]", "string"),
        ("start_command: x\nport: 1\nhealth_check: {interval: 1}", "models[0].service.health_check.path", "required"),
        ("start_command: x\nport: 1\nhealth_check: {path: h}", "models[0].service.health_check.path", "start with"),
        (
            "start_command: x\nport: 1\nhealth_check: {path: /, interval: 0}",
            "models[0].service.health_check.interval",
            "greater than",
        ),
        (
            "start_command: x\nport: 1\nhealth_check: {path: /, max_retries: -1}",
            "models[0].service.health_check.max_retries",
            "between",
        ),
        (
            "start_command: x\nport: 1\nhealth_check: {path: /, expected_status_code: 99}",
            "models[0].service.health_check.expected_status_code",
            "between",
        ),
        (
            "start_command: x\nport: 1\nhealth_check: {path: /, initial_delay: -1}",
            "models[0].service.health_check.initial_delay",
            "at least",
        ),
        (
            "start_command: x\nport: 1\nhealth_check: {path: /, timeout: 3}",
            "models[0].service.health_check.timeout",
            "unknown key",
        ),
        ("start_command: x\nport: 1\nextra: 1", "models[0].service.extra", "unknown key"),
        (
            "start_command: x\nport: 1\npre_start_actions: [{action: format_disk}]",
            "models[0].service.pre_start_actions[0].action",
            "unknown action",
        ),
        (
            "start_command: x\nport: 1\npre_start_actions: [{action: write_file, args: {body: x}}]",
            "models[0].service.pre_start_actions[0].args.filename",
            "required",
        ),
        (
            "start_command: x\nport: 1\npre_start_actions: [{action: run_command, args: {command: ls}}]",
            "models[0].service.pre_start_actions[0].args.command",
            "list of strings",
        ),
        (
            "start_command: x\nport: 1\npre_start_actions: [{action: mkdir, args: {path: /x, mode: 1}}]",
            "models[0].service.pre_start_actions[0].args.mode",
            "unknown key",
        ),
        (
            "start_command: x\nport: 1\n"
            "pre_start_actions: [{action: write_file,args: {filename: a, body: b, mode: 9}}]",
            "models[0].service.pre_start_actions[0].args.mode",
            "octal",
        ),
        (
            "start_command: x\nport: 1\npre_start_actions: [{action: log, args: {message: m, debug: maybe}}]",
            "models[0].service.pre_start_actions[0].args.debug",
            "true or false",
        ),
        ("start_command: x\nport: 1\npre_start_actions: {action: log}", "models[0].service.pre_start_actions", "list"),
    ],
)
def test_service_errors_name_the_field(service: str, field: str, words: str) -> None:
    found = problems(model(service))
    assert any(f == field and words in m for f, m, _ in found), found


def test_errors_carry_the_line_of_the_field() -> None:
    found = problems(model("start_command: x\nport: 99999"))
    assert found == [("models[0].service.port", "must be an integer between 1 and 65535, got 99999", 6)]


def test_all_problems_are_reported_at_once() -> None:
    found = fields(model("port: -1\nhealth_check: {path: x}"))
    assert set(found) == {
        "models[0].service.start_command",
        "models[0].service.port",
        "models[0].service.health_check.path",
    }


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", ""),
        ("[1, 2]", ""),
        ("models: 3", "models"),
        ("models: []", "models"),
        ("other: 1", "other"),
        ("models: [3]", "models[0]"),
        ("models:\n  - model_path: /m", "models[0].name"),
        ("models:\n  - name: x", "models[0].model_path"),
        ("models:\n  - name: x\n    model_path: relative", "models[0].model_path"),
        ("models:\n  - name: x\n    model_path: /m\n    service: [1]", "models[0].service"),
    ],
)
def test_structure_errors(text: str, field: str) -> None:
    assert field in fields(text)


def test_yaml_syntax_error_points_at_line_and_column() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_model_definition("models:\n  - name: x\n    model_path: [unclosed\n")
    problem = info.value.problems[0]
    assert "YAML syntax error" in problem.message
    assert problem.line is not None and problem.line >= 3
    assert problem.column is not None
    assert str(problem).startswith("model-definition.yaml:")


def test_duplicate_keys_are_refused() -> None:
    assert "models[0].name" in fields("models:\n  - name: a\n    name: b\n    model_path: /m\n")


# --- hostile input ---------------------------------------------------------------------------------


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
    bomb += "models: *i\n"
    start = time.monotonic()
    found = problems(bomb)
    assert time.monotonic() - start < 1.0
    assert "anchors" in found[0][1] or "aliases" in found[0][1]


@pytest.mark.parametrize(
    "tag",
    ["!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!custom 1", "!!python/tuple [1]"],
)
def test_python_and_custom_tags_are_refused(tag: str) -> None:
    found = problems(f"models: {tag}\n")
    assert found
    assert "tag" in found[0][1] or "YAML" in found[0][1]


def test_deep_nesting_is_refused() -> None:
    found = problems("models: " + "[" * 5000 + "]" * 5000)
    assert "nested" in found[0][1]
    found = problems("models:\n" + "".join("  " * i + "- \n" for i in range(1, 60)))
    assert found


def test_huge_file_is_refused(tmp_path: Path) -> None:
    big = "# " + "x" * (1024 * 1024 + 10)
    assert "larger than" in problems(big)[0][1]
    path = tmp_path / "model-definition.yaml"
    path.write_text(big)
    result = validate_model_folder(tmp_path)
    assert not result.ok
    assert "bytes" in result.problems[0].message


@pytest.mark.parametrize("data", [b"\xff\xfe\x00garbage", b"models:\x00", bytes(range(256))])
def test_binary_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(DefinitionError):
        parse_model_definition(data)
    with pytest.raises(DefinitionError):
        parse_service_definition(data)


# --- service-definition.toml errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("[vllm.environment]\nimage = 'x'\n", "vllm.environment.architecture", "required"),
        ("[vllm.environment]\nimage = 1\narchitecture = 'x'\n", "vllm.environment.image", "string"),
        ("[vllm.resource_slots]\nmem = 'lots'\n", "vllm.resource_slots.mem", "memory size"),
        ("[vllm.resource_slots]\ncpu = 'many'\n", "vllm.resource_slots.cpu", "number"),
        ("[vllm.resource_slots]\ngpu = 1\n", "vllm.resource_slots.gpu", "unknown resource"),
        ("[vllm.environ]\n'1BAD' = 'x'\n", "vllm.environ.1BAD", "environment variable"),
        ("[vllm.environ]\nX = [1]\n", "vllm.environ.X", "string"),
        ("[vllm.extra]\na = 1\n", "vllm.extra", "unknown key"),
        ("vllm = 3\n", "vllm", "table"),
    ],
)
def test_service_definition_errors(text: str, field: str, words: str) -> None:
    found = problems(text, parse_service_definition)
    assert any(f == field and words in m for f, m, _ in found), found


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_service_definition("[vllm.environment]\nimage = \n")
    problem = info.value.problems[0]
    assert problem.line == 2
    assert "TOML syntax error" in problem.message


def test_unquoted_dotted_accelerator_key_and_numbers() -> None:
    definition = parse_service_definition(
        "[custom.resource_slots]\ncuda.shares = 0.5\ncpu = '2'\n[custom.environ]\nN = 3\n"
    )
    section = definition.runtimes["custom"]
    assert section.resources == {"cuda.shares": 0.5, "cpu": 2.0}
    assert section.environ == {"N": "3"}


def test_validate_model_folder_reports_both_files(tmp_path: Path) -> None:
    (tmp_path / "model-definition.yml").write_text(model("start_command: x\nport: 0"))
    (tmp_path / "service-definition.toml").write_text("[custom.environment]\nimage = 'i'\n")
    result = validate_model_folder(tmp_path)
    assert [p.field for p in result.problems] == ["models[0].service.port", "custom.environment.architecture"]
    assert [p.file for p in result.problems] == ["model-definition.yml", "service-definition.toml"]


def test_validate_model_folder_ok_and_runtime_without_definition(tmp_path: Path) -> None:
    assert not validate_model_folder(tmp_path).ok  # custom needs the file
    assert validate_model_folder(tmp_path, runtime="vllm").ok
    (tmp_path / "model-definition.yaml").write_text(MANUAL_MODEL)
    (tmp_path / "service-definition.toml").write_text(MANUAL_SERVICE.replace("vllm", "custom"))
    result = validate_model_folder(tmp_path)
    assert result.ok
    assert result.defaults is not None and result.defaults.image == "example.com/model-server:latest"
