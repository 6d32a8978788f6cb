"""model-definition.yaml (S2) and service-definition.toml (S3), exactly, including hostile input."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serving.core import definitions as d
from serving.core.definitions import (
    MAX_FILE_BYTES,
    MAX_PROBLEMS,
    DefinitionError,
    HealthCheck,
    LauncherDefaults,
    MemSizeError,
    ModelDefinition,
    ModelMetadata,
    PreStartAction,
    Problem,
    field_path,
    parse_mem,
    parse_model_definition,
    parse_service_definition,
    resolve_service_defaults,
)
from serving.folders import find_model_definition, load_model_definition, load_service_definition, validate_model_folder
from tests.live import deadline_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# The manual's own files, exactly as printed in seed/model-serving.ja.md.
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

Parser = Callable[[str], Any]


def problems(
    text: str | bytes, parser: Callable[..., Any] = parse_model_definition
) -> list[tuple[str, str, int | None]]:
    with pytest.raises(DefinitionError) as info:
        parser(text)
    return [(p.field, p.message, p.line) for p in info.value.problems]


def fields(text: str | bytes, parser: Callable[..., Any] = parse_model_definition) -> list[str]:
    return [f for f, _, _ in problems(text, parser)]


def model(service: str, head: str = "") -> str:
    """A one-model file whose service block is ``service`` (lines start at line 5)."""
    return f"models:\n  - name: m\n    model_path: /models\n{head}    service:\n" + "".join(
        f"      {line}\n" for line in service.strip("\n").splitlines()
    )


def service_of(text: str, **kwargs: Any) -> d.Service:
    service = parse_model_definition(text, **kwargs).primary.service
    assert service is not None
    return service


def actions_of(yaml_actions: str, **kwargs: Any) -> tuple[PreStartAction, ...]:
    text = model("start_command: x\nport: 1\npre_start_actions:\n" + yaml_actions)
    return service_of(text, **kwargs).pre_start_actions


# --- the manual's own files -----------------------------------------------------------------------


def test_manual_model_definition_parses_exactly() -> None:
    definition = parse_model_definition(MANUAL_MODEL)
    assert isinstance(definition, ModelDefinition)
    assert len(definition.models) == 1
    primary = definition.primary
    assert (primary.name, primary.model_path, primary.metadata) == ("simple-http-server", "/models", None)
    assert primary.service == d.Service(
        start_command=("python", "-m", "http.server", "--directory", "/home/work", "8000"),
        port=8000,
        pre_start_actions=(),
        shell="/bin/bash",
        health_check=HealthCheck(
            path="/", interval=10.0, max_retries=10, max_wait_time=15.0, expected_status_code=200, initial_delay=60.0
        ),
    )


def test_manual_model_definition_as_bytes_with_bom_and_crlf() -> None:
    data = b"\xef\xbb\xbf" + MANUAL_MODEL.replace("\n", "\r\n").encode()
    assert parse_model_definition(data) == parse_model_definition(MANUAL_MODEL)


def test_manual_service_definition_parses_and_resolves() -> None:
    definition = parse_service_definition(MANUAL_SERVICE)
    assert set(definition.runtimes) == {"vllm"}
    defaults = resolve_service_defaults(definition, "vllm")
    assert defaults == LauncherDefaults(
        image="example.com/model-server:latest",
        architecture="x86_64",
        resources={"cpu": 1.0, "mem": 8 * 1024**3, "cuda.shares": 0.5},
        environ={"MODEL_NAME": "example-model-name"},
    )
    assert isinstance(defaults.resources["mem"], int)
    assert resolve_service_defaults(definition, "custom") is None
    assert definition.section("vllm") is definition.runtimes["vllm"]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_the_example_folders_are_valid(name: str) -> None:
    result = validate_model_folder(EXAMPLES / name)
    assert result.ok, result.problems
    assert result.model_definition is not None and result.effective is not None
    assert result.definition_file == "model-definition.yaml"
    assert not any("{model_path}" in part for part in result.effective.start_command or ())


# --- model-definition fields and defaults ----------------------------------------------------------


def test_health_check_defaults() -> None:
    check = service_of(model("start_command: x\nport: 1\nhealth_check:\n  path: /h")).health_check
    assert check == HealthCheck(path="/h")
    assert (check.interval, check.max_retries, check.max_wait_time) == (10.0, 10, 15.0)
    assert (check.expected_status_code, check.initial_delay, dict(check.headers)) == (200, 60.0, {})


def test_health_check_every_field() -> None:
    check = service_of(
        model(
            "start_command: x\nport: 1\nhealth_check:\n  path: /v1/health\n  interval: 2\n  max_retries: 0\n"
            "  max_wait_time: 0.5\n  expected_status_code: 204\n  initial_delay: 0"
        )
    ).health_check
    assert check == HealthCheck("/v1/health", 2.0, 0, 0.5, 204, 0.0)
    assert isinstance(check.interval, float) and isinstance(check.initial_delay, float)


def test_health_check_numbers_as_strings_and_nulls_take_defaults() -> None:
    # The original converts (ToFloat/ToInt) and allows null for every number.
    check = service_of(
        model(
            'start_command: x\nport: 1\nhealth_check:\n  path: /\n  interval: "2.5"\n  max_retries: "3"\n'
            "  max_wait_time: ~\n  expected_status_code: null\n  initial_delay:"
        )
    ).health_check
    assert check == HealthCheck("/", interval=2.5, max_retries=3)


def test_health_check_is_optional_and_null_is_none() -> None:
    assert service_of(model("start_command: x\nport: 1")).health_check is None
    assert service_of(model("start_command: x\nport: 1\nhealth_check: null")).health_check is None


def test_start_command_string_runs_in_the_shell_default_bash() -> None:
    service = service_of(model("start_command: python3 -m http.server 8000 && echo hi\nport: 8000"))
    assert service.start_command == "python3 -m http.server 8000 && echo hi"
    assert service.shell == "/bin/bash"


def test_start_command_multiline_string_and_custom_shell() -> None:
    service = service_of(model("start_command: |\n  cd /x\n  exec serve\nshell: /bin/sh\nport: 8000"))
    assert service.start_command == "cd /x\nexec serve\n"
    assert service.shell == "/bin/sh"


def test_start_command_list() -> None:
    assert service_of(model('start_command: [python3, "-m", "x"]\nport: 1')).start_command == ("python3", "-m", "x")


@pytest.mark.parametrize(("raw", "port"), [("1", 1), ("65535", 65535), ('"8000"', 8000), ("0x1F90", 8080)])
def test_port_values(raw: str, port: int) -> None:
    assert service_of(model(f"start_command: x\nport: {raw}")).port == port


def test_service_is_optional_per_model() -> None:
    text = "models:\n  - name: a\n    model_path: /a\n  - name: b\n    model_path: /b\n    service: null\n"
    definition = parse_model_definition(text)
    assert [(m.name, m.service) for m in definition.models] == [("a", None), ("b", None)]


def test_several_models_the_first_is_served() -> None:
    text = MANUAL_MODEL + "  - name: second\n    model_path: /other\n    service: {start_command: y, port: 9}\n"
    definition = parse_model_definition(text)
    assert [m.name for m in definition.models] == ["simple-http-server", "second"]
    assert definition.primary is definition.models[0]
    assert definition.models[1].service is not None and definition.models[1].service.port == 9


def test_problems_in_a_later_model_name_it() -> None:
    text = MANUAL_MODEL + "  - name: second\n    model_path: /other\n    service: {start_command: y, port: 0}\n"
    assert problems(text) == [("models[1].service.port", "must be an integer between 1 and 65535, got 0", 22)]


def test_metadata_known_fields_aliases_and_extra_keys() -> None:
    text = model(
        "start_command: x\nport: 1",
        head="    metadata:\n      author: Ann\n      title: T\n      version: 2\n      created_at: 2024-01-02\n"
        "      modified_at: '2024-02-03'\n      description: |\n        two\n        lines\n      task: chat\n"
        "      category: llm\n      architecture: LlamaForCausalLM\n      framework: [vllm, torch]\n"
        "      label: [a]\n      license: MIT\n      min_resource: {cpu: 1, mem: 1g}\n      homepage: x\n",
    )
    assert parse_model_definition(text).primary.metadata == ModelMetadata(
        author="Ann",
        title="T",
        version=2,
        created="2024-01-02",
        last_modified="2024-02-03",
        description="two\nlines\n",
        task="chat",
        category="llm",
        architecture="LlamaForCausalLM",
        framework=("vllm", "torch"),
        label=("a",),
        license="MIT",
        min_resource={"cpu": 1, "mem": "1g"},
        extra={"homepage": "x"},
    )


@pytest.mark.parametrize(
    ("metadata", "field", "words"),
    [
        ("[1]", "models[0].metadata", "mapping"),
        ("{created: a, created_at: b}", "models[0].metadata.created_at", "only one"),
        ("{framework: vllm}", "models[0].metadata.framework", "list of strings"),
        ("{label: [1]}", "models[0].metadata.label", "list of strings"),
        ("{version: [1]}", "models[0].metadata.version", "number or a string"),
        ("{author: 3}", "models[0].metadata.author", "string"),
        ("{min_resource: 3}", "models[0].metadata.min_resource", "mapping"),
    ],
)
def test_metadata_errors(metadata: str, field: str, words: str) -> None:
    found = problems(model("start_command: x\nport: 1", head=f"    metadata: {metadata}\n"))
    assert any(f == field and words in m for f, m, _ in found), found


# --- {model_path} ----------------------------------------------------------------------------------


def test_model_path_substitution_in_command_and_every_action_argument() -> None:
    text = model(
        """start_command: ["python3", "{model_path}/server.py"]
port: 8000
pre_start_actions:
  - action: run_command
    args: {command: ["ls", "{model_path}"]}
  - action: write_file
    args: {filename: "{model_path}/a.txt", body: "x {model_path}"}
  - action: write_tempfile
    args: {body: "{model_path}"}
  - action: mkdir
    args: {path: "{model_path}/d"}
  - action: log
    args: {message: "at {model_path}"}""",
    )
    service = service_of(text)
    assert service.start_command == ("python3", "/models/server.py")
    args = [dict(a.args) for a in service.pre_start_actions]
    assert args[0]["command"] == ("ls", "/models")
    assert (args[1]["filename"], args[1]["body"]) == ("/models/a.txt", "x /models")
    assert args[2]["body"] == "/models"
    assert args[3]["path"] == "/models/d"
    assert args[4]["message"] == "at /models"


def test_model_path_substitution_uses_the_models_own_path_or_the_mount() -> None:
    text = model("start_command: run {model_path}/x\nport: 1").replace("/models", "/weights")
    assert service_of(text).start_command == "run /weights/x"
    assert service_of(text, model_mount="/mnt/m").start_command == "run /mnt/m/x"


def test_other_braces_are_left_alone() -> None:
    service = service_of(model("start_command: echo {port} ${HOME} {{model_path}}\nport: 1"))
    assert service.start_command == "echo {port} ${HOME} {/models}"


# --- pre-start actions -----------------------------------------------------------------------------


def test_every_pre_start_action_and_its_defaults() -> None:
    actions = actions_of(
        """  - action: write_file
    args: {filename: a.txt, body: hi}
  - action: write_tempfile
    args: {body: "print(1)"}
  - action: run_command
    args: {command: [echo, hi]}
  - action: mkdir
    args: {path: /home/work/d}
  - action: log
    args: {message: hello}
  - action: write_file
    args: {filename: b.txt, body: hi, mode: "755", append: true}
  - action: log
    args: {message: dbg, debug: true}
  - action: run_command
    args: {command: [ls], echo: true}"""
    )
    assert [(a.action, dict(a.args)) for a in actions] == [
        ("write_file", {"filename": "a.txt", "body": "hi", "mode": "644", "append": False}),
        ("write_tempfile", {"body": "print(1)", "mode": "644"}),
        ("run_command", {"command": ("echo", "hi"), "echo": False, "check": False}),
        ("mkdir", {"path": "/home/work/d"}),
        ("log", {"message": "hello", "debug": False}),
        ("write_file", {"filename": "b.txt", "body": "hi", "mode": "755", "append": True}),
        ("log", {"message": "dbg", "debug": True}),
        ("run_command", {"command": ("ls",), "echo": True, "check": False}),
    ]


def test_pre_start_actions_null_or_empty() -> None:
    assert service_of(model("start_command: x\nport: 1\npre_start_actions: null")).pre_start_actions == ()
    assert service_of(model("start_command: x\nport: 1\npre_start_actions: []")).pre_start_actions == ()


def test_body_as_a_list_of_lines_as_the_original_writes_it() -> None:
    actions = actions_of(
        "  - {action: write_file, args: {filename: f, body: [a, b]}}\n"
        '  - {action: write_tempfile, args: {body: ["x = 1\\n", print(x)]}}'
    )
    assert actions[0].args["body"] == "a\nb\n"
    assert actions[1].args["body"] == "x = 1\nprint(x)"


def test_multiline_body_and_log_message() -> None:
    actions = actions_of("  - action: write_file\n    args:\n      filename: f\n      body: |\n        a\n        b\n")
    assert actions[0].args["body"] == "a\nb\n"
    assert actions_of('  - {action: log, args: {message: "a\\nb"}}')[0].args["message"] == "a\nb"


@pytest.mark.parametrize(
    ("raw", "mode"),
    [
        ('"644"', "644"),
        ("644", "644"),  # the digits, as an integer
        ("0644", "644"),  # YAML 1.1 reads this as octal 420: the digits the user wrote count
        ('"0644"', "644"),
        ('"0o755"', "755"),
        ("0o755", "755"),  # a string in YAML 1.1
        ('"600"', "600"),
        ('"4755"', "4755"),
        ('"7"', "007"),
        ("", "644"),  # null: the default
    ],
)
def test_file_modes(raw: str, mode: str) -> None:
    action = actions_of(f"  - {{action: write_file, args: {{filename: f, body: b, mode: {raw}}}}}")[0]
    assert action.args["mode"] == mode
    tempfile = actions_of(f"  - {{action: write_tempfile, args: {{body: b, mode: {raw}}}}}")[0]
    assert tempfile.args["mode"] == mode


@pytest.mark.parametrize("raw", ["9", '"888"', "abc", "true", '"17777"', "0x1A4", "[644]", '""', "6.44"])
def test_bad_file_modes(raw: str) -> None:
    found = problems(model(A + f"{{action: write_tempfile, args: {{body: b, mode: {raw}}}}}"))
    assert [f for f, _, _ in found] == ["models[0].service.pre_start_actions[0].args.mode"]
    assert "octal file mode" in found[0][1]


def test_run_command_numbers_become_strings_as_in_the_original() -> None:
    action = actions_of("  - {action: run_command, args: {command: [python3, -m, http.server, 8080]}}")[0]
    assert action.args["command"] == ("python3", "-m", "http.server", "8080")


A = "start_command: x\nport: 1\npre_start_actions:\n  - "


@pytest.mark.parametrize(
    ("action", "field", "words"),
    [
        ("{action: format_disk, args: {}}", "models[0].service.pre_start_actions[0].action", "unknown action"),
        ("{action: 3, args: {}}", "models[0].service.pre_start_actions[0].action", "unknown action"),
        ("{args: {path: /x}}", "models[0].service.pre_start_actions[0].action", "required"),
        ("{action: mkdir}", "models[0].service.pre_start_actions[0].args", "required"),
        ("{action: mkdir, args: [/x]}", "models[0].service.pre_start_actions[0].args", "mapping"),
        ("{action: mkdir, args: {path: /x}, ref: 1y}", "models[0].service.pre_start_actions[0].ref", "letters"),
        ("{action: mkdir, args: {path: /x}, ref: model_path}", "models[0].service.pre_start_actions[0].ref", "name"),
        ("{action: mkdir, args: {path: ''}}", "models[0].service.pre_start_actions[0].args.path", "empty"),
        ("{action: mkdir, args: {path: [a]}}", "models[0].service.pre_start_actions[0].args.path", "string"),
        ("{action: write_file, args: {body: x}}", "models[0].service.pre_start_actions[0].args.filename", "required"),
        ("{action: write_file, args: {filename: f}}", "models[0].service.pre_start_actions[0].args.body", "required"),
        (
            "{action: write_file, args: {filename: f, body: {a: 1}}}",
            "models[0].service.pre_start_actions[0].args.body",
            "list of lines",
        ),
        (
            "{action: write_file, args: {filename: f, body: b, append: yes please}}",
            "models[0].service.pre_start_actions[0].args.append",
            "true or false",
        ),
        (
            '{action: write_file, args: {filename: "a\\nb", body: b}}',
            "models[0].service.pre_start_actions[0].args.filename",
            "single line",
        ),
        ("{action: write_tempfile, args: {}}", "models[0].service.pre_start_actions[0].args.body", "required"),
        (
            "{action: run_command, args: {command: ls -l}}",
            "models[0].service.pre_start_actions[0].args.command",
            "list",
        ),
        ("{action: run_command, args: {command: []}}", "models[0].service.pre_start_actions[0].args.command", "list"),
        (
            "{action: run_command, args: {command: [ls, [a]]}}",
            "models[0].service.pre_start_actions[0].args.command[1]",
            "string",
        ),
        (
            "{action: run_command, args: {command: [ls], echo: 1}}",
            "models[0].service.pre_start_actions[0].args.echo",
            "true or false",
        ),
        (
            "{action: log, args: {message: m, debug: maybe}}",
            "models[0].service.pre_start_actions[0].args.debug",
            "true or false",
        ),
        ("{action: log, args: {message: 3}}", "models[0].service.pre_start_actions[0].args.message", "string"),
        ("[action, log]", "models[0].service.pre_start_actions[0]", "mapping"),
    ],
)
def test_pre_start_action_errors(action: str, field: str, words: str) -> None:
    found = problems(model(A + action))
    assert any(f == field and words in m for f, m, _ in found), found


def test_pre_start_actions_must_be_a_list() -> None:
    found = problems(model("start_command: x\nport: 1\npre_start_actions: {action: log}"))
    assert found[0][0] == "models[0].service.pre_start_actions" and "list" in found[0][1]


def test_run_command_given_as_a_string_gets_a_list_hint() -> None:
    (_, message, _), *_ = problems(model(A + "{action: run_command, args: {command: pip list}}"))
    assert '["pip", "list"]' in message


# --- health_check.headers (our extension) ----------------------------------------------------------


def test_our_health_check_headers_extension() -> None:
    check = service_of(
        model("start_command: x\nport: 1\nhealth_check:\n  path: /h\n  headers: {Authorization: Bearer k, X-N: 3}")
    ).health_check
    assert check is not None and dict(check.headers) == {"Authorization": "Bearer k", "X-N": "3"}


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ("[a]", "models[0].service.health_check.headers"),
        ('{"Bad Name": x}', 'models[0].service.health_check.headers."Bad Name"'),
        ('{X: "a\\r\\nInjected: 1"}', "models[0].service.health_check.headers.X"),
        ("{X: [1]}", "models[0].service.health_check.headers.X"),
        ("{X: true}", "models[0].service.health_check.headers.X"),
    ],
)
def test_health_check_header_errors(headers: str, field: str) -> None:
    assert field in fields(model(f"start_command: x\nport: 1\nhealth_check: {{path: /, headers: {headers}}}"))


# --- errors: field path, line, sentence -----------------------------------------------------------


S = "start_command: x\nport: 1\nhealth_check: "


@pytest.mark.parametrize(
    ("service", "field", "words"),
    [
        ("port: 8000", "models[0].service.start_command", "required"),
        ("start_command: null\nport: 8000", "models[0].service.start_command", "required"),
        ("start_command: x", "models[0].service.port", "required"),
        ("start_command: x\nport: 0", "models[0].service.port", "between 1 and 65535"),
        ("start_command: x\nport: 65536", "models[0].service.port", "between 1 and 65535"),
        ("start_command: x\nport: -1", "models[0].service.port", "between 1 and 65535"),
        ("start_command: x\nport: abc", "models[0].service.port", "integer"),
        ("start_command: x\nport: true", "models[0].service.port", "got true"),
        ("start_command: x\nport: 8000.5", "models[0].service.port", "integer"),
        ("start_command: x\nport: [8000]", "models[0].service.port", "got a list"),
        ("start_command: x\nport: '99999999999999999999999'", "models[0].service.port", "integer"),
        ("start_command: []\nport: 1", "models[0].service.start_command", "non-empty"),
        ("start_command: '  '\nport: 1", "models[0].service.start_command", "empty"),
        ("start_command: ['']\nport: 1", "models[0].service.start_command[0]", "empty"),
        ("start_command: [python, 3]\nport: 1", "models[0].service.start_command[1]", "quote it"),
        ("start_command: {a: 1}\nport: 1", "models[0].service.start_command", "string or a list"),
        ("start_command: x\nport: 1\nshell: ''", "models[0].service.shell", "empty"),
        ("start_command: x\nport: 1\nshell: [bash]", "models[0].service.shell", "string"),
        (S + "{interval: 1}", "models[0].service.health_check.path", "required"),
        (S + "{path: h}", "models[0].service.health_check.path", "starting with '/'"),
        (S + "{path: '/a b'}", "models[0].service.health_check.path", "starting with '/'"),
        (S + "{path: /, interval: 0}", "models[0].service.health_check.interval", "greater than 0"),
        (S + "{path: /, interval: .inf}", "models[0].service.health_check.interval", "at most"),
        (S + "{path: /, interval: .nan}", "models[0].service.health_check.interval", "seconds"),
        (S + "{path: /, interval: 86401}", "models[0].service.health_check.interval", "at most 86400"),
        (S + "{path: /, interval: ten}", "models[0].service.health_check.interval", "seconds"),
        (S + "{path: /, interval: true}", "models[0].service.health_check.interval", "seconds"),
        (S + "{path: /, max_wait_time: 0}", "models[0].service.health_check.max_wait_time", "greater than 0"),
        (S + "{path: /, initial_delay: -1}", "models[0].service.health_check.initial_delay", "at least 0"),
        (S + "{path: /, max_retries: -1}", "models[0].service.health_check.max_retries", "between"),
        (S + "{path: /, max_retries: 1.5}", "models[0].service.health_check.max_retries", "integer"),
        (S + "{path: /, expected_status_code: 99}", "models[0].service.health_check.expected_status_code", "between"),
        (S + "{path: /, expected_status_code: 600}", "models[0].service.health_check.expected_status_code", "between"),
        (S + "[/health]", "models[0].service.health_check", "mapping"),
    ],
)
def test_service_errors_name_the_field(service: str, field: str, words: str) -> None:
    found = problems(model(service))
    assert any(f == field and words in m for f, m, _ in found), found


def test_errors_carry_the_line_and_column_of_the_field() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_model_definition(model("start_command: x\nport: 99999"))
    [problem] = info.value.problems
    assert problem == Problem(
        "model-definition.yaml",
        "models[0].service.port",
        "must be an integer between 1 and 65535, got 99999",
        6,
        7,
    )
    assert str(problem) == (
        "model-definition.yaml:6:7: models[0].service.port: must be an integer between 1 and 65535, got 99999"
    )
    assert problem.to_dict() == {
        "file": "model-definition.yaml",
        "field": "models[0].service.port",
        "line": 6,
        "column": 7,
        "message": "must be an integer between 1 and 65535, got 99999",
    }


def test_the_file_name_given_is_used_in_problems() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_model_definition("models: 1", "conf/my-def.yml")
    assert str(info.value).startswith("conf/my-def.yml:1:1: models: must be a list")


def test_all_problems_are_reported_at_once_in_file_order() -> None:
    found = problems(model("port: -1\nhealth_check: {path: x, interval: 0}\nshell: 3"))
    assert [f for f, _, _ in found] == [
        "models[0].service.start_command",  # missing: the line of its parent
        "models[0].service.port",
        "models[0].service.health_check.path",
        "models[0].service.health_check.interval",
        "models[0].service.shell",
    ]
    assert [line for _, _, line in found] == [4, 5, 6, 6, 7]


def test_definition_error_is_a_value_error_listing_every_problem() -> None:
    with pytest.raises(ValueError, match="port") as info:
        parse_model_definition(model("port: -1\nshell: 3"))
    assert isinstance(info.value, DefinitionError)
    assert len(str(info.value).splitlines()) == len(info.value.problems) == 3


def test_problem_flood_is_capped() -> None:
    actions = "".join("  - {action: mkdir, args: {path: ''}}\n" for _ in range(MAX_PROBLEMS + 50))
    text = model("start_command: x\nport: 1\npre_start_actions:\n" + actions)
    with pytest.raises(DefinitionError) as info:
        parse_model_definition(text)
    assert len(info.value.problems) == MAX_PROBLEMS + 1
    assert "50 more problem(s)" in info.value.problems[-1].message
    # Unknown keys are warnings, capped the same way; the file is still valid.
    flood = model("start_command: x\nport: 1\n" + "".join(f"k{i}: 1\n" for i in range(MAX_PROBLEMS + 50)))
    assert len(parse_model_definition(flood).warnings) == MAX_PROBLEMS


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("", "", "empty"),
        ("# only a comment\n", "", "empty"),
        ("---\n", "", "empty"),
        ("[1, 2]", "", "top level must be a mapping"),
        ("just text", "", "top level must be a mapping"),
        ("models:", "models", "required"),
        ("models: 3", "models", "list"),
        ("models: {name: x}", "models", "list"),
        ("models: []", "models", "at least one model"),
        ("models: [3]", "models[0]", "mapping"),
        ("models: [[a]]", "models[0]", "mapping"),
        ("models: [null]", "models[0]", "mapping"),
        ("models:\n  - model_path: /m", "models[0].name", "required"),
        ("models:\n  - name: ''\n    model_path: /m", "models[0].name", "empty"),
        ("models:\n  - name: [x]\n    model_path: /m", "models[0].name", "string"),
        ('models:\n  - name: "a\\nb"\n    model_path: /m', "models[0].name", "single line"),
        ("models:\n  - name: x", "models[0].model_path", "required"),
        ("models:\n  - name: x\n    model_path: relative", "models[0].model_path", "absolute"),
        ("models:\n  - name: x\n    model_path: 3", "models[0].model_path", "string"),
        ("models:\n  - name: x\n    model_path: /m\n    service: [1]", "models[0].service", "mapping"),
        ("models:\n  - name: x\n    model_path: /m\n    service: run", "models[0].service", "mapping"),
    ],
)
def test_structure_errors(text: str, field: str, words: str) -> None:
    found = problems(text)
    assert any(f == field and words in m for f, m, _ in found), found


def test_odd_keys_are_quoted_and_shortened_in_field_paths() -> None:
    assert field_path("a", "b") == "a.b"
    assert field_path("", "cuda.shares") == '"cuda.shares"'
    assert field_path("x", "k" * 100) == 'x."' + "k" * 39 + '…"'
    warnings = parse_model_definition(model('start_command: x\nport: 1\n"a b.c": 1')).warnings
    assert [w.field for w in warnings] == ['models[0].service."a b.c"']


def test_yaml_syntax_error_points_at_line_and_column() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_model_definition("models:\n  - name: x\n    model_path: [unclosed\n")
    [problem] = info.value.problems
    assert problem.message.startswith("YAML syntax error: ")
    assert (problem.line, problem.column) == (4, 1)
    assert problem.field == ""
    with pytest.raises(DefinitionError) as info:
        parse_model_definition("models:\n  - name: x\n   bad: indent\n")
    assert (info.value.problems[0].line, info.value.problems[0].column) == (3, 4)


def test_tabs_and_several_documents_are_syntax_errors() -> None:
    assert "YAML syntax error" in problems("models:\n\t- name: x\n")[0][1]
    assert "single document" in problems("models: []\n---\nmodels: []\n")[0][1]


def test_duplicate_keys_are_refused() -> None:
    found = problems("models:\n  - name: a\n    name: b\n    model_path: /m\n")
    assert found == [("models[0].name", "this key appears twice in the same mapping; keep only one", 3)]


def test_keys_must_be_plain_names() -> None:
    found = problems("models:\n  - ? [a, b]\n    : 1\n    name: x\n    model_path: /m\n")
    assert found[0][0] == "models[0]" and "plain name" in found[0][1]


def test_yaml_scalars_keep_their_meaning_in_text_fields() -> None:
    # Unquoted values that YAML 1.1 reads as dates, "=" or "<<" are still text where text is expected.
    definition = parse_model_definition("models:\n  - name: 2024-01-01\n    model_path: /m\n")
    assert definition.primary.name == "2024-01-01"
    assert actions_of("  - {action: log, args: {message: =}}")[0].args["message"] == "="


# --- hostile input ---------------------------------------------------------------------------------


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
    bomb += "models: *i\n"
    start = time.monotonic()
    found = problems(bomb)
    assert time.monotonic() - start < deadline_for(1.0)
    assert found == [
        ("", "YAML anchors (&name) are not allowed in definition files; remove the anchor and write values out", 1)
    ]


def test_aliases_are_refused_with_their_position() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_model_definition("models:\n  - *x\n")
    # An alias to an unknown anchor is already a YAML error; either way the position is given.
    problem = info.value.problems[0]
    assert "alias" in problem.message.lower() or "anchor" in problem.message.lower()
    assert (problem.line, problem.column) == (2, 5)


def test_merge_keys_are_refused() -> None:
    found = problems("models:\n  - <<: {name: x}\n    model_path: /m\n")
    assert any("merge keys" in m for _, m, _ in found)


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['echo pwned']",
        "!!python/name:os.system",
        "!!python/object:__main__.X {}",
        "!!python/tuple [1]",
        "!custom 1",
        "!!set {a, b}",
        "!!omap [{a: 1}]",
        "!!binary aGVsbG8=",
        "!<tag:example.com,2000:x> 1",
    ],
)
def test_python_and_custom_tags_are_refused(value: str) -> None:
    found = problems(f"models: {value}\n")
    assert len(found) == 1 and "tag" in found[0][1], found
    assert found[0][2] == 1


def test_tags_on_keys_are_refused() -> None:
    assert any("tag" in m for _, m, _ in problems("models:\n  - !!python/name:os.system name: x\n    model_path: /m\n"))


def test_standard_explicit_tags_are_fine() -> None:
    service = service_of(model("start_command: !!str 123\nport: !!int '8000'"))
    assert (service.start_command, service.port) == ("123", 8000)


def test_deep_nesting_is_refused_quickly() -> None:
    start = time.monotonic()
    found = problems("models: " + "[" * 100_000 + "]" * 100_000)
    assert found[0][1] == "the document is nested deeper than 64 levels" and found[0][2] == 1
    found = problems("models:\n" + "".join("  " * i + "- \n" for i in range(1, 200)))
    assert "nested deeper" in found[0][1]
    found = problems("".join("  " * i + f"k{i}:\n" for i in range(300)))
    assert "nested deeper" in found[0][1]
    assert time.monotonic() - start < deadline_for(2.0)


def test_nesting_just_under_the_limit_is_only_a_type_error() -> None:
    text = "models: [{name: x, model_path: /m, metadata: {min_resource: " + "[" * 58 + "]" * 58 + "}}]"
    assert fields(text) == ["models[0].metadata.min_resource"]


def test_too_many_values_are_refused_quickly() -> None:
    start = time.monotonic()
    found = problems("models:\n" + "  - 1\n" * 100_000)
    assert "more than 20000 values" in found[0][1]
    assert time.monotonic() - start < deadline_for(2.0)


def test_huge_text_is_refused_before_parsing() -> None:
    start = time.monotonic()
    big = "# " + "x" * MAX_FILE_BYTES
    assert "larger than 1024 KiB" in problems(big)[0][1]
    assert "larger than 1024 KiB" in problems(big.encode())[0][1]
    assert "larger than 1024 KiB" in problems(big, parse_service_definition)[0][1]
    assert time.monotonic() - start < deadline_for(0.5)


def test_huge_file_is_refused_by_its_size_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "model-definition.yaml"
    with path.open("wb") as handle:
        handle.truncate(1024**3)  # sparse: a 1 GiB file that was never written
    start = time.monotonic()
    with pytest.raises(DefinitionError) as info:
        load_model_definition(path)
    assert time.monotonic() - start < deadline_for(0.5)
    assert info.value.problems[0].message == "the file is 1073741824 bytes; a definition file must be at most 1024 KiB"
    result = validate_model_folder(tmp_path)
    assert not result.ok and "bytes" in result.problems[0].message


def test_a_number_with_thousands_of_digits_is_a_problem_not_a_crash() -> None:
    found = problems(model("start_command: x\nport: " + "9" * 10_000))
    assert found[0][0] == "models[0].service.port" and "can not be read" in found[0][1]


@pytest.mark.parametrize(
    ("data", "words", "line"),
    [
        (b"\xff\xfe\x00garbage", "not UTF-8", 1),
        (b"models:\n  - name: \xe9t\xe9\n", "not UTF-8", 2),
        (b"models:\x00", "NUL", 1),
        (bytes(range(1, 256)), "not UTF-8", 2),
        (bytes(range(128)), "NUL", 1),
        (b"models:\n  - name: a\x07b\n", "#x0007", 2),
    ],
)
def test_binary_garbage_is_refused(data: bytes, words: str, line: int) -> None:
    for parser in (parse_model_definition, parse_service_definition):
        found = problems(data, parser)
        if words == "#x0007" and parser is parse_service_definition:
            continue  # TOML has its own words for control characters
        assert words in found[0][1] and found[0][2] == line, found


def test_nul_and_lone_surrogates_in_text() -> None:
    assert "NUL" in problems(model('start_command: "a\\0b"\nport: 1'))[0][1]
    assert "surrogate" in problems("models: \ud800")[0][1]
    assert "NUL" in problems('[vllm.environ]\nX = "a\\u0000"\n', parse_service_definition)[0][1]


def test_not_text_at_all() -> None:
    assert problems(123, parse_model_definition)[0][1].startswith("expected the text")  # type: ignore[arg-type]


WRONG = ["[]", "{}", "x", "1", "1.5", "true", "null", "[[1]]", "{a: {b: 1}}"]


@pytest.mark.parametrize("wrong", WRONG)
@pytest.mark.parametrize(
    "template",
    [
        "models: {W}",
        "models: [{W}]",
        "models: [{{name: {W}, model_path: /m}}]",
        "models: [{{name: n, model_path: {W}}}]",
        "models: [{{name: n, model_path: /m, service: {W}}}]",
        "models: [{{name: n, model_path: /m, metadata: {W}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: {W}, port: 1}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: [{W}], port: 1}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: {W}}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, shell: {W}}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, health_check: {W}}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, health_check: {{path: {W}}}}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, "
        "health_check: {{path: /, interval: {W}, headers: {W}}}}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, pre_start_actions: {W}}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, pre_start_actions: [{W}]}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, "
        "pre_start_actions: [{{action: {W}, args: {W}}}]}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, "
        "pre_start_actions: [{{action: write_file, args: {{filename: {W}, body: {W}, mode: {W}, append: {W}}}}}]}}}}]",
        "models: [{{name: n, model_path: /m, service: {{start_command: x, port: 1, "
        "pre_start_actions: [{{action: run_command, args: {{command: {W}, echo: {W}}}}}]}}}}]",
    ],
)
def test_wrong_types_at_every_level_give_a_problem_or_a_definition(template: str, wrong: str) -> None:
    text = template.format(W=wrong)
    try:
        parse_model_definition(text)
    except DefinitionError as exc:
        assert exc.problems and all(p.message for p in exc.problems)


# --- parse_mem -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8gb", 8 * 1024**3),
        ("8g", 8 * 1024**3),
        ("8G", 8 * 1024**3),
        ("8GiB", 8 * 1024**3),
        ("8 GB", 8 * 1024**3),
        ("512m", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("512Mi", 512 * 1024**2),
        ("1.5g", int(1.5 * 1024**3)),
        (".5k", 512),
        ("64k", 65536),
        ("64kb", 65536),
        ("2t", 2 * 1024**4),
        ("1p", 1024**5),
        ("100", 100),
        ("100b", 100),
        (" 7 ", 7),
        (1024, 1024),
        (0, 0),
        (1536.9, 1536),
    ],
)
def test_parse_mem(raw: str | int | float, expected: int) -> None:
    assert parse_mem(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "lots",
        "8 gigs",
        "-1g",
        "",
        "  ",
        True,
        False,
        "1e9",
        "8gbb",
        "8ib",
        "g",
        "1.2.3g",
        -1,
        float("inf"),
        float("nan"),
        "9" * 30 + "e",
        "9" * 19 + "e",
        None,
        [1],
        "1_000",
        "0x10",
        "8x" * 100,
    ],
)
def test_parse_mem_refuses_with_a_sentence(raw: object) -> None:
    with pytest.raises(MemSizeError) as info:
        parse_mem(raw)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) < 200


# --- service-definition.toml ------------------------------------------------------------------------


def test_several_runtimes_and_every_section() -> None:
    definition = parse_service_definition(
        MANUAL_SERVICE
        + """
[custom.environment]
image = "registry.local/python:3.11"
architecture = "aarch64"

[custom.resource_slots]
cpu = "2.5"
mem = 1073741824
cuda.shares = 1
"rocm.device" = 2
"hyperaccel-lpu.device" = "1"

[custom.environ]
N = 3
F = 0.5
B = true
S = "x"

[nim.environ]
NGC_API_KEY = "k"
"""
    )
    assert set(definition.runtimes) == {"vllm", "custom", "nim"}
    custom = resolve_service_defaults(definition, "custom")
    assert custom == LauncherDefaults(
        image="registry.local/python:3.11",
        architecture="aarch64",
        resources={"cpu": 2.5, "mem": 1024**3, "cuda.shares": 1.0, "rocm.device": 2.0, "hyperaccel-lpu.device": 1.0},
        environ={"N": "3", "F": "0.5", "B": "true", "S": "x"},
    )
    nim = resolve_service_defaults(definition, "nim")
    assert nim == LauncherDefaults(image="", architecture="", resources={}, environ={"NGC_API_KEY": "k"})


def test_empty_service_definition_has_no_sections() -> None:
    assert parse_service_definition("# nothing yet\n").runtimes == {}
    assert resolve_service_defaults(parse_service_definition(""), "vllm") is None


T = "[vllm.resource_slots]\n"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("[vllm.environment]\nimage = 'x'\n", "vllm.environment.architecture", "required"),
        ("[vllm.environment]\narchitecture = 'x'\n", "vllm.environment.image", "required"),
        ("[vllm.environment]\nimage = 1\narchitecture = 'x'\n", "vllm.environment.image", "string"),
        ("[vllm.environment]\nimage = ''\narchitecture = 'x'\n", "vllm.environment.image", "without spaces"),
        ("[vllm.environment]\nimage = 'a b'\narchitecture = 'x'\n", "vllm.environment.image", "without spaces"),
        ("[vllm]\nenvironment = 3\n", "vllm.environment", "table"),
        (T + "mem = 'lots'\n", "vllm.resource_slots.mem", "memory size"),
        (T + "mem = -1\n", "vllm.resource_slots.mem", "negative"),
        (T + "mem = true\n", "vllm.resource_slots.mem", "true/false"),
        (T + "mem = [1]\n", "vllm.resource_slots.mem", "memory size"),
        (T + "mem = 1\n", "vllm.resource_slots.mem", "1 byte is too little memory for a replica"),
        (T + "mem = '8mb'\n", "vllm.resource_slots.mem", "8,388,608 bytes is too little"),
        (T + "cpu = 'many'\n", "vllm.resource_slots.cpu", "number"),
        (T + "cpu = -1\n", "vllm.resource_slots.cpu", "at least 0"),
        (T + "cpu = nan\n", "vllm.resource_slots.cpu", "number"),
        (T + "cpu = inf\n", "vllm.resource_slots.cpu", "number"),
        (T + "cpu = 'inf'\n", "vllm.resource_slots.cpu", "number"),
        (T + "cpu = true\n", "vllm.resource_slots.cpu", "number"),
        (T + "cpu = 1979-05-27\n", "vllm.resource_slots.cpu", "number"),
        (T + '"cuda.shares" = "half"\n', 'vllm.resource_slots."cuda.shares"', "number"),
        (T + "gpu = 1\n", "vllm.resource_slots.gpu", "unknown resource"),
        (T + '"CUDA.X" = 1\n', 'vllm.resource_slots."CUDA.X"', "unknown resource"),
        ("[vllm]\nresource_slots = 'x'\n", "vllm.resource_slots", "table"),
        ("[vllm.environ]\n'1BAD' = 'x'\n", "vllm.environ.1BAD", "environment variable"),
        ("[vllm.environ]\n'A-B' = 'x'\n", "vllm.environ.A-B", "environment variable"),
        ("[vllm.environ]\nX = [1]\n", "vllm.environ.X", "string"),
        ("[vllm.environ]\nX = {a = 1}\n", "vllm.environ.X", "string"),
        ("[vllm.environ]\nX = 1979-05-27T07:32:00Z\n", "vllm.environ.X", "quotes"),
        ("[vllm]\nenviron = 'x'\n", "vllm.environ", "table"),
        ("[vllm.resource_opts]\nshmem = 'lots'\n", "vllm.resource_opts.shmem", "memory size"),
        ("[vllm]\nresource_opts = 1\n", "vllm.resource_opts", "table"),
        ("vllm = 3\n", "vllm", "group of tables"),
        ("[[vllm]]\nx = 1\n", "vllm", "group of tables"),
    ],
)
def test_service_definition_errors(text: str, field: str, words: str) -> None:
    found = problems(text, parse_service_definition)
    assert any(f == field and words in m for f, m, _ in found), found


def test_service_definition_problems_have_lines() -> None:
    text = "[vllm.environment]\nimage = 'x'\n\n[vllm.resource_slots]\ncpu = 1\n  mem = 'lots'\ncuda.shares = 'x'\n"
    found = problems(text, parse_service_definition)
    assert found == [
        ("vllm.environment.architecture", "is required: the image's CPU architecture, such as x86_64", 1),
        (
            "vllm.resource_slots.mem",
            "'lots' is not a memory size; write a number with a unit such as '512m', '8g' or '8gb'",
            6,
        ),
        (
            'vllm.resource_slots."cuda.shares"',
            "must be a number of at least 0 (or a numeric string such as \"0.5\"), got 'x'",
            7,
        ),
    ]


def test_toml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_service_definition("[vllm.environment]\nimage = \n")
    [problem] = info.value.problems
    assert problem.message.startswith("TOML syntax error: ")
    assert "(at line" not in problem.message
    assert (problem.line, problem.column) == (2, 9)
    assert str(problem).startswith("service-definition.toml:2:9: TOML syntax error")


def test_toml_hostile_input() -> None:
    start = time.monotonic()
    assert "nested too deeply" in problems("a = " + "[" * 100_000, parse_service_definition)[0][1]
    assert "nested too deeply" in problems("a = " + "{b = " * 50_000, parse_service_definition)[0][1]
    assert "can not be read as TOML" in problems("a = " + "9" * 100_000, parse_service_definition)[0][1]
    many = "".join(f"[t{i}.environ]\n'1x' = 1\n" for i in range(1000))
    assert len(problems(many, parse_service_definition)) == MAX_PROBLEMS + 1
    assert time.monotonic() - start < deadline_for(2.0)


# --- files and folders ------------------------------------------------------------------------------


def test_load_helpers_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "model-definition.yml").write_text(MANUAL_MODEL)
    (tmp_path / "service-definition.toml").write_text(MANUAL_SERVICE)
    assert load_model_definition(tmp_path / "model-definition.yml") == parse_model_definition(MANUAL_MODEL)
    assert load_service_definition(str(tmp_path / "service-definition.toml")).runtimes.keys() == {"vllm"}
    with pytest.raises(DefinitionError) as info:
        load_model_definition(tmp_path / "missing.yaml")
    assert str(info.value) == "missing.yaml: can not be read: No such file or directory"
    with pytest.raises(DefinitionError) as info:
        load_model_definition(tmp_path, "folder.yaml")
    assert str(info.value) == "folder.yaml: is not a regular file"


def test_load_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model-definition.yaml"
    os.mkfifo(fifo)
    with pytest.raises(DefinitionError, match="not a regular file"):
        load_model_definition(fifo)
    assert not validate_model_folder(tmp_path).ok


def test_definition_file_lookup(tmp_path: Path) -> None:
    assert find_model_definition(tmp_path) is None
    (tmp_path / "model-definition.yml").write_text(MANUAL_MODEL)
    assert find_model_definition(tmp_path) == tmp_path / "model-definition.yml"
    assert find_model_definition(tmp_path, "model-definition.yaml") == tmp_path / "model-definition.yml"
    (tmp_path / "model-definition.yaml").write_text(MANUAL_MODEL)
    assert find_model_definition(tmp_path) == tmp_path / "model-definition.yaml"
    assert find_model_definition(tmp_path, "other.yaml") is None
    assert validate_model_folder(tmp_path).definition_file == "model-definition.yaml"


def test_configurable_definition_path(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "serve.yaml").write_text(model("start_command: x\nport: 0"))
    result = validate_model_folder(tmp_path, definition_path="conf/serve.yaml")
    assert [(p.file, p.field) for p in result.problems] == [("conf/serve.yaml", "models[0].service.port")]
    (tmp_path / "conf" / "serve.yaml").write_text(MANUAL_MODEL)
    result = validate_model_folder(tmp_path, definition_path="conf/serve.yaml")
    assert result.ok and result.definition_file == "conf/serve.yaml"
    missing = validate_model_folder(tmp_path, definition_path="nope.yaml")
    assert [(p.file, "missing" in p.message) for p in missing.problems] == [("nope.yaml", True)]


@pytest.mark.parametrize("bad", ["../model-definition.yaml", "/etc/passwd", "a/../../x.yaml", "a\\b.yaml", "a\x00b"])
def test_definition_path_must_stay_inside_the_folder(tmp_path: Path, bad: str) -> None:
    result = validate_model_folder(tmp_path, definition_path=bad)
    assert len(result.problems) == 1
    assert "inside the model folder" in result.problems[0].message


def test_symlinked_definition_files_are_reported_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text(MANUAL_MODEL)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model-definition.yaml").symlink_to(secret)
    (folder / "service-definition.toml").symlink_to(secret)
    result = validate_model_folder(folder)
    assert [(p.file, p.message) for p in result.problems] == [
        ("model-definition.yaml", "is a symbolic link; upload the file itself into the model folder"),
        ("service-definition.toml", "is a symbolic link; upload the file itself into the model folder"),
    ]
    (folder / "sub").symlink_to(tmp_path)
    result = validate_model_folder(folder, definition_path="sub/secret.yaml")
    assert any("outside the model folder" in p.message for p in result.problems)


def test_validate_model_folder_reports_both_files(tmp_path: Path) -> None:
    (tmp_path / "model-definition.yml").write_text(model("start_command: x\nport: 0"))
    (tmp_path / "service-definition.toml").write_text("[custom.environment]\nimage = 'i'\n")
    result = validate_model_folder(tmp_path)
    assert [p.field for p in result.problems] == ["models[0].service.port", "custom.environment.architecture"]
    assert [p.file for p in result.problems] == ["model-definition.yml", "service-definition.toml"]
    assert result.effective is None


def test_validate_model_folder_ok_and_runtime_without_definition(tmp_path: Path) -> None:
    empty = validate_model_folder(tmp_path)
    assert [p.file for p in empty.problems] == ["model-definition.yaml or model-definition.yml"]
    assert "Custom runtime needs a model definition file" in empty.problems[0].message
    vllm = validate_model_folder(tmp_path, runtime="vllm")
    assert vllm.ok and vllm.model_definition is None and vllm.effective is not None
    assert vllm.effective.port == 8000
    (tmp_path / "model-definition.yaml").write_text(MANUAL_MODEL)
    (tmp_path / "service-definition.toml").write_text(MANUAL_SERVICE.replace("vllm", "custom"))
    result = validate_model_folder(tmp_path)
    assert result.ok
    assert result.defaults is not None and result.defaults.image == "example.com/model-server:latest"
    assert result.effective is not None and result.effective.start_command == MANUAL_MODEL_COMMAND
    json.dumps(result.to_dict())
    assert result.to_dict()["model_definition"]["models"][0]["service"]["port"] == 8000


MANUAL_MODEL_COMMAND = ("python", "-m", "http.server", "--directory", "/home/work", "8000")


def test_validate_model_folder_other_failures(tmp_path: Path) -> None:
    assert validate_model_folder(tmp_path / "nope").problems[0].message.startswith("is not a directory")
    unknown = validate_model_folder(tmp_path, runtime="tensorflow")
    assert unknown.problems[0].field == "runtime" and "use one of custom, vllm" in unknown.problems[0].message
    (tmp_path / "model-definition.yaml").write_text("models: [{name: a, model_path: /a}]")
    no_service = validate_model_folder(tmp_path)
    assert [(p.file, p.field) for p in no_service.problems] == [("model-definition.yaml", "models[0].service")]
    # A runtime that does not need the file does not read it (as the platform does not).
    (tmp_path / "model-definition.yaml").write_text("{{{ broken")
    assert validate_model_folder(tmp_path, runtime="nim").ok
    (tmp_path / "service-definition.toml").write_text("[vllm.environ]\nVLLM_TP_SIZE = 'two'\n")
    tp = validate_model_folder(tmp_path, runtime="vllm")
    assert [p.message for p in tp.problems] == ["VLLM_TP_SIZE must be a whole number such as 1, 2 or 4, got 'two'."]


def test_model_mount_reaches_the_placeholder(tmp_path: Path) -> None:
    (tmp_path / "model-definition.yaml").write_text(model("start_command: [python3, '{model_path}/s.py']\nport: 1"))
    result = validate_model_folder(tmp_path, model_mount="/mnt/model")
    assert result.effective is not None and result.effective.start_command == ("python3", "/mnt/model/s.py")


def test_module_is_pure() -> None:
    sources = [path.read_text() for path in Path(d.__file__).parent.glob("*.py")]
    assert len(sources) > 1  # the package's modules, not only its __init__
    for source in sources:
        assert "import django" not in source and "from django" not in source


# --- issue 18: Backend.AI files as they are written today ------------------------------------------


def test_unknown_keys_are_warnings_with_did_you_mean() -> None:
    text = model("start_command: x\nport: 1\nhealth_check: {path: /, inital_delay: 5, enable: true}\nextra: 1")
    definition = parse_model_definition("other: 1\n" + text)
    assert [(w.field, w.message, w.line) for w in definition.warnings] == [
        ("other", "unknown key, ignored (the known keys here: models)", 1),
        ("models[0].service.health_check.inital_delay", "unknown key, ignored; did you mean 'initial_delay'?", 8),
        (
            "models[0].service.health_check.enable",
            "unknown key, ignored (the known keys here: path, interval, max_retries, max_wait_time, "
            "expected_status_code, initial_delay, headers)",
            8,
        ),
        (
            "models[0].service.extra",
            "unknown key, ignored (the known keys here: pre_start_actions, start_command, shell, port, health_check)",
            9,
        ),
    ]
    health = definition.primary.service.health_check  # type: ignore[union-attr]
    assert health is not None and health.initial_delay == 60.0  # the typo is not applied


def test_kebab_case_spellings_of_every_field() -> None:
    text = (
        "models:\n  - name: m\n    model-path: /models\n    service:\n      start-command: [a]\n      port: 1\n"
        "      pre-start-actions:\n        - {action: run_command, args: {command: [x]}}\n"
        "      health-check: {path: /, initial-delay: 5, max-retries: 2, max-wait-time: 3,"
        " expected-status-code: 204}\n"
    )
    definition = parse_model_definition(text)
    assert definition.warnings == ()
    service = definition.primary.service
    assert service is not None and service.health_check is not None
    assert (service.health_check.initial_delay, service.health_check.expected_status_code) == (5.0, 204)
    assert len(service.pre_start_actions) == 1
    assert fields(model("start_command: x\nport: 1\nhealth_check: {path: /}\nhealth-check: {path: /}")) == [
        "models[0].service.health-check"
    ]
    toml = "[vllm.resource-slots]\ncpu = 2\n[vllm.resource-opts]\nshmem = '1g'\n"
    section = parse_service_definition(toml).runtimes["vllm"]
    assert section.resources == {"cpu": 2.0} and section.resource_opts == {"shmem": 1024**3}


def test_hostile_input_stays_an_error_even_under_unknown_keys() -> None:
    with pytest.raises(DefinitionError, match="anchors"):
        parse_model_definition("models:\n  - name: m\n    model_path: /m\n    info: &a {x: 1}\n    other: *a\n")
    with pytest.raises(DefinitionError, match="tag"):
        parse_model_definition("models:\n  - name: m\n    model_path: /m\n    info: !!python/object:os.system x\n")


def test_ref_names_are_checked() -> None:
    actions = service_of(
        model(
            "start_command: x\nport: 1\npre_start_actions:\n"
            "  - {action: run_command, args: {command: [v], check: true}, ref: ver}\n"
            "  - {action: log, args: {message: '{ver}'}}"
        )
    ).pre_start_actions
    assert [(a.ref, dict(a.args).get("check")) for a in actions] == [("ver", True), (None, None)]
    twice = "  - {action: mkdir, args: {path: /a}, ref: x}\n  - {action: mkdir, args: {path: /b}, ref: x}"
    assert "earlier action" in problems(model("start_command: x\nport: 1\npre_start_actions:\n" + twice))[0][1]


def test_a_broken_runtime_section_does_not_hide_the_others() -> None:
    text = "[vllm.environment]\nimage = 'v'\narchitecture = 'x86_64'\n[nim.resource_slots]\nmem = 'lots'\n"
    definition = d.read_service_definition(text)
    assert set(definition.runtimes) == {"vllm"}
    assert [p.field for p in definition.problems_for("nim")] == ["nim.resource_slots.mem"]
    assert definition.problems_for("vllm") == ()
    with pytest.raises(DefinitionError):
        parse_service_definition(text)  # the strict form still lists every problem
    warned = d.read_service_definition("[vllm.environment]\nimage = 'v'\narchitecture = 'x'\nimgae = 'w'\n")
    assert [w.message for w in warned.warnings_for("vllm")] == ["unknown key, ignored; did you mean 'image'?"]


def test_validate_model_folder_picks_the_described_runtime_and_ignores_other_sections(tmp_path: Path) -> None:
    (tmp_path / "service-definition.toml").write_text(
        "[nim.resource_slots]\nmem = 'lots'\n[vllm.environment]\nimage = 'v'\narchitecture = 'x86_64'\n"
        "[vllm.resource_opts]\nshmem = '2g'\n"
    )
    result = validate_model_folder(tmp_path, runtime=None)
    assert result.runtime == "nim"  # the first known section, even a broken one: its problems are shown
    assert not result.ok
    vllm = validate_model_folder(tmp_path, runtime="vllm")
    assert vllm.ok, vllm.problems
    assert vllm.defaults is not None and vllm.defaults.resource_opts == {"shmem": 2 * 1024**3}
