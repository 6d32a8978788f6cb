"""Runtime variants (S4.1): the table, and how a replica of each starts (effective_service)."""

from __future__ import annotations

import pytest

from serving.core.definitions import HealthCheck, parse_model_definition
from serving.core.runtimes import (
    PLATFORM_ENV,
    RUNTIMES,
    EffectiveService,
    RuntimeConfigError,
    RuntimeVariant,
    effective_service,
    get_runtime,
)

CUSTOM = """\
models:
  - name: "simple-http-server"
    model_path: "/models"
    service:
      pre_start_actions:
        - action: mkdir
          args: {path: /home/work/x}
      start_command: python3 {model_path}/serve.py
      shell: /bin/sh
      port: 8080
      health_check: {path: /health, initial_delay: 5}
  - name: second
    model_path: /other
    service: {start_command: [b], port: 9}
"""


def test_the_table() -> None:
    rows = {
        name: (v.label, v.port, v.health_path, v.needs_definition_file, v.command is not None)
        for name, v in RUNTIMES.items()
    }
    assert rows == {
        "custom": ("Custom", None, None, True, False),
        "vllm": ("vLLM", 8000, "/health", False, True),
        "nim": ("NVIDIA NIM", 8000, "/v1/health/ready", False, False),
        "cmd": ("Predefined Image Command", 8000, None, False, False),
        "huggingface-tgi": ("Hugging Face TGI", 3000, "/info", False, True),
        "sglang": ("SGLang", 9001, "/health", False, True),
    }
    assert all(name == variant.name for name, variant in RUNTIMES.items())
    assert [name for name, v in RUNTIMES.items() if v.needs_definition_file] == ["custom"]


def test_variants_are_frozen() -> None:
    with pytest.raises(AttributeError):
        RUNTIMES["vllm"].port = 1  # type: ignore[misc]
    assert isinstance(RUNTIMES["vllm"], RuntimeVariant)


@pytest.mark.parametrize(
    ("name", "variables"),
    [
        ("vllm", {"BACKEND_MODEL_NAME", "VLLM_TP_SIZE", "VLLM_PP_SIZE", "VLLM_QUANTIZATION", "VLLM_EXTRA_ARGS"}),
        ("nim", {"NGC_API_KEY", "BACKEND_MODEL_NAME", "NIM_TENSOR_PARALLEL_SIZE", "NIM_MODEL_NAME"}),
        ("cmd", {"BACKEND_MODEL_NAME", "BACKEND_SERVICE_PORT"}),
        ("huggingface-tgi", {"BACKEND_MODEL_NAME", "TGI_NUM_SHARD", "TGI_QUANTIZE", "TGI_EXTRA_ARGS"}),
        ("sglang", {"BACKEND_MODEL_NAME", "SGLANG_TP_SIZE", "SGLANG_EXTRA_ARGS"}),
        ("custom", set()),
    ],
)
def test_env_vars_that_drive_each_runtime(name: str, variables: set[str]) -> None:
    variant = RUNTIMES[name]
    assert set(variant.env_vars) == variables
    assert all(description for description in variant.env_vars.values())


def test_platform_env_is_documented() -> None:
    assert set(PLATFORM_ENV) == {"BACKEND_MODEL_NAME", "BACKEND_MODEL_PATH", "BACKEND_SERVICE_PORT"}


def test_default_health_checks() -> None:
    assert RUNTIMES["vllm"].default_health_check == HealthCheck(path="/health")
    assert RUNTIMES["nim"].default_health_check == HealthCheck(path="/v1/health/ready")
    assert RUNTIMES["huggingface-tgi"].default_health_check == HealthCheck(path="/info")
    assert RUNTIMES["sglang"].default_health_check == HealthCheck(path="/health")
    assert RUNTIMES["cmd"].default_health_check is None  # healthy when the port answers
    assert RUNTIMES["custom"].default_health_check is None  # from the definition file


def test_get_runtime() -> None:
    assert get_runtime("nim") is RUNTIMES["nim"]
    with pytest.raises(RuntimeConfigError) as info:
        get_runtime("tensorflow-serving")
    assert str(info.value) == (
        "Unknown runtime 'tensorflow-serving'; use one of: custom, vllm, nim, cmd, huggingface-tgi, sglang."
    )
    assert isinstance(info.value, ValueError)
    with pytest.raises(RuntimeConfigError):
        get_runtime("VLLM")
    with pytest.raises(RuntimeConfigError):
        get_runtime(None)  # type: ignore[arg-type]


# --- effective_service -------------------------------------------------------------------------------


def test_custom_comes_from_the_first_model_of_the_definition() -> None:
    definition = parse_model_definition(CUSTOM)
    service = effective_service("custom", definition, "/models", {"BACKEND_MODEL_NAME": "ignored"})
    assert service == EffectiveService(
        start_command="python3 /models/serve.py",
        shell="/bin/sh",
        port=8080,
        health_check=HealthCheck(path="/health", initial_delay=5.0),
        pre_start_actions=definition.primary.service.pre_start_actions,  # type: ignore[union-attr]
        model_name="simple-http-server",
    )
    assert service.pre_start_actions[0].action == "mkdir"


def test_custom_without_a_definition_or_a_service_is_a_clear_error() -> None:
    with pytest.raises(RuntimeConfigError, match=r"needs a model definition file \(model-definition.yaml"):
        effective_service("custom", None, "/models", {})
    no_service = parse_model_definition("models: [{name: a, model_path: /a}]")
    with pytest.raises(RuntimeConfigError, match=r"models\[0\].service is missing"):
        effective_service("custom", no_service, "/models", {})


def test_unknown_runtime() -> None:
    with pytest.raises(RuntimeConfigError, match="Unknown runtime"):
        effective_service("bogus", None, "/models", {})


def test_vllm_defaults() -> None:
    service = effective_service("vllm", None, "/models", {})
    assert service.start_command == (
        "vllm",
        "serve",
        "/models",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--served-model-name",
        "vllm-model",
    )
    assert (service.port, service.health_check, service.pre_start_actions) == (8000, HealthCheck("/health"), ())
    assert service.model_name == "vllm-model"
    assert service.environ == {}


def test_vllm_is_driven_by_environment_variables() -> None:
    service = effective_service(
        "vllm",
        parse_model_definition(CUSTOM),  # ignored: only Custom reads the definition
        "/mnt/llama",
        {
            "BACKEND_MODEL_NAME": "llama-3",
            "VLLM_TP_SIZE": "2",
            "VLLM_PP_SIZE": " 1 ",
            "VLLM_QUANTIZATION": "awq",
            "VLLM_EXTRA_ARGS": "--dtype half --chat-template '/models/a b.jinja'",
        },
    )
    assert service.start_command is not None
    assert service.start_command[2] == "/mnt/llama"
    assert service.start_command[7:] == (
        "--served-model-name",
        "llama-3",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "1",
        "--quantization",
        "awq",
        "--dtype",
        "half",
        "--chat-template",
        "/models/a b.jinja",
    )
    assert service.model_name == "llama-3"


def test_model_name_falls_back_to_model_name_then_the_runtime_default() -> None:
    assert (
        effective_service("vllm", None, "/m", {"MODEL_NAME": "example-model-name"}).model_name == "example-model-name"
    )
    both = {"MODEL_NAME": "b", "BACKEND_MODEL_NAME": "a"}
    assert effective_service("vllm", None, "/m", both).model_name == "a"
    assert effective_service("vllm", None, "/m", {"BACKEND_MODEL_NAME": "  "}).model_name == "vllm-model"
    defaults = {name: effective_service(name, None, "/m", {}).model_name for name in RUNTIMES if name != "custom"}
    assert defaults == {
        "vllm": "vllm-model",
        "nim": "nim-model",
        "cmd": "image-model",
        "huggingface-tgi": "tgi-model",
        "sglang": "sglang-model",
    }


@pytest.mark.parametrize(
    ("runtime", "environ", "words"),
    [
        ("vllm", {"VLLM_TP_SIZE": "two"}, "VLLM_TP_SIZE must be a whole number"),
        ("vllm", {"VLLM_TP_SIZE": "0"}, "VLLM_TP_SIZE must be a whole number"),
        ("vllm", {"VLLM_PP_SIZE": "-1"}, "VLLM_PP_SIZE must be a whole number"),
        ("vllm", {"VLLM_QUANTIZATION": "awq; rm -rf /"}, "VLLM_QUANTIZATION must be one word"),
        ("vllm", {"VLLM_EXTRA_ARGS": "--x 'unclosed"}, "VLLM_EXTRA_ARGS can not be split into arguments"),
        ("vllm", {"VLLM_EXTRA_ARGS": "x" * 5000}, "VLLM_EXTRA_ARGS is longer than"),
        ("huggingface-tgi", {"TGI_NUM_SHARD": "1.5"}, "TGI_NUM_SHARD must be a whole number"),
        ("huggingface-tgi", {"TGI_EXTRA_ARGS": '"'}, "TGI_EXTRA_ARGS can not be split"),
        ("sglang", {"SGLANG_TP_SIZE": "x"}, "SGLANG_TP_SIZE must be a whole number"),
        ("sglang", {"SGLANG_EXTRA_ARGS": "'"}, "SGLANG_EXTRA_ARGS can not be split"),
    ],
)
def test_bad_environment_values_are_clear_errors(runtime: str, environ: dict[str, str], words: str) -> None:
    with pytest.raises(RuntimeConfigError, match=words):
        effective_service(runtime, None, "/models", environ)


@pytest.mark.parametrize("mount", ["models", "", "/a\x00b"])
def test_model_mount_must_be_absolute(mount: str) -> None:
    with pytest.raises(RuntimeConfigError, match="absolute path"):
        effective_service("vllm", None, mount, {})


def test_nim_runs_the_images_own_command() -> None:
    service = effective_service("nim", None, "/models", {"BACKEND_MODEL_NAME": "llama", "NGC_API_KEY": "k"})
    assert service.start_command is None
    assert (service.port, service.health_check) == (8000, HealthCheck("/v1/health/ready"))
    assert service.environ == {"NIM_SERVED_MODEL_NAME": "llama"}


def test_cmd_runs_the_images_own_command_and_is_healthy_when_the_port_answers() -> None:
    service = effective_service("cmd", None, "/models", {})
    assert (service.start_command, service.port, service.health_check) == (None, 8000, None)
    assert RUNTIMES["cmd"].initial_delay == 0.0


def test_tgi() -> None:
    service = effective_service("huggingface-tgi", None, "/models", {"TGI_NUM_SHARD": "4", "TGI_QUANTIZE": "awq"})
    assert service.start_command == (
        "text-generation-launcher",
        "--model-id",
        "/models",
        "--port",
        "3000",
        "--hostname",
        "0.0.0.0",
        "--num-shard",
        "4",
        "--quantize",
        "awq",
    )
    assert (service.port, service.health_check) == (3000, HealthCheck("/info"))


def test_sglang() -> None:
    service = effective_service(
        "sglang", None, "/w", {"SGLANG_TP_SIZE": "2", "SGLANG_EXTRA_ARGS": "--mem-fraction-static 0.8"}
    )
    assert service.start_command == (
        "python3",
        "-m",
        "sglang.launch_server",
        "--model-path",
        "/w",
        "--host",
        "0.0.0.0",
        "--port",
        "9001",
        "--served-model-name",
        "sglang-model",
        "--tp-size",
        "2",
        "--mem-fraction-static",
        "0.8",
    )
    assert (service.port, service.health_check) == (9001, HealthCheck("/health"))


def test_every_runtime_gives_a_port_the_server_listens_on() -> None:
    definition = parse_model_definition(CUSTOM)
    for name, variant in RUNTIMES.items():
        service = effective_service(name, definition, "/models", {})
        assert 1 <= service.port <= 65535
        assert variant.port in (None, service.port)
