"""Inference runtime variants (S4.1): how each one starts, listens and is health-checked. Pure.

Only ``custom`` reads a model definition file; the others are driven by the image and by
environment variables, as in the original.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from serving.definitions import HealthCheck, ModelDefinition, PreStartAction


@dataclass(frozen=True)
class RuntimeVariant:
    name: str
    label: str
    port: int
    health_path: str | None  # None: healthy when the port accepts connections
    needs_definition_file: bool
    # argv template; "{model_path}" is replaced; None = the image's own command
    command: tuple[str, ...] | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)  # name -> what it does
    # Model loading takes long for LLM servers: don't count failures before this.
    initial_delay: float = 60.0
    openai_compatible: bool = False


RUNTIMES: dict[str, RuntimeVariant] = {
    "custom": RuntimeVariant(
        name="custom",
        label="Custom",
        port=8000,
        health_path=None,
        needs_definition_file=True,
        env_vars={},
    ),
    "vllm": RuntimeVariant(
        name="vllm",
        label="vLLM",
        port=8000,
        health_path="/health",
        needs_definition_file=False,
        command=("vllm", "serve", "{model_path}", "--host", "0.0.0.0", "--port", "8000"),
        env_vars={
            "BACKEND_MODEL_NAME": "the model name clients use (--served-model-name)",
            "VLLM_TP_SIZE": "tensor parallel size (--tensor-parallel-size)",
            "VLLM_PP_SIZE": "pipeline parallel size (--pipeline-parallel-size)",
            "VLLM_QUANTIZATION": "quantization method (--quantization)",
            "VLLM_EXTRA_ARGS": "any other vllm serve arguments, as one string",
        },
        openai_compatible=True,
    ),
    "nim": RuntimeVariant(
        name="nim",
        label="NVIDIA NIM",
        port=8000,
        health_path="/v1/health/ready",
        needs_definition_file=False,
        env_vars={
            "NGC_API_KEY": "your NGC key (the image downloads its model with it)",
            "NIM_MODEL_NAME": "the model path or name the NIM loads",
        },
        openai_compatible=True,
    ),
    "cmd": RuntimeVariant(
        name="cmd",
        label="Predefined Image Command",
        port=8000,
        health_path=None,
        needs_definition_file=False,
        env_vars={"BACKEND_MODEL_NAME": "passed to the image's command"},
        initial_delay=0.0,
    ),
    "huggingface-tgi": RuntimeVariant(
        name="huggingface-tgi",
        label="Hugging Face TGI",
        port=3000,
        health_path="/info",
        needs_definition_file=False,
        command=("text-generation-launcher", "--model-id", "{model_path}", "--port", "3000", "--hostname", "0.0.0.0"),
        env_vars={"TGI_EXTRA_ARGS": "any other text-generation-launcher arguments"},
        openai_compatible=True,
    ),
    "sglang": RuntimeVariant(
        name="sglang",
        label="SGLang",
        port=9001,
        health_path="/health",
        needs_definition_file=False,
        command=(
            "python3",
            "-m",
            "sglang.launch_server",
            "--model-path",
            "{model_path}",
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
        ),
        env_vars={"BACKEND_MODEL_NAME": "the served model name", "SGLANG_EXTRA_ARGS": "other launch_server arguments"},
        openai_compatible=True,
    ),
}


class RuntimeConfigError(ValueError):
    """A runtime variant can not start with what it was given; str() says why in words."""


def get_runtime(name: str) -> RuntimeVariant:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise RuntimeConfigError(f"Unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}.") from None


@dataclass(frozen=True)
class EffectiveService:
    start_command: str | tuple[str, ...] | None  # str: run with ``shell -c``; None: the image's own
    shell: str
    port: int
    health_check: HealthCheck | None  # None: healthy when the port accepts connections
    pre_start_actions: tuple[PreStartAction, ...]
    model_name: str


def _extra(environ: Mapping[str, str], name: str) -> list[str]:
    value = environ.get(name, "").strip()
    return shlex.split(value) if value else []


def effective_service(
    runtime: str, definition: ModelDefinition | None, model_mount: str, environ: Mapping[str, str]
) -> EffectiveService:
    """How a replica of ``runtime`` starts, given the folder's definition (custom only) and env."""
    variant = get_runtime(runtime)
    if variant.needs_definition_file:
        if definition is None:
            raise RuntimeConfigError("The custom runtime needs a model definition file in the model folder.")
        model = definition.primary
        if model.service is None:
            raise RuntimeConfigError(
                "models[0].service is missing from the model definition file; the custom runtime needs its "
                "start_command and port."
            )
        return EffectiveService(
            start_command=model.service.start_command,
            shell=model.service.shell,
            port=model.service.port,
            health_check=model.service.health_check,
            pre_start_actions=model.service.pre_start_actions,
            model_name=model.name,
        )
    model_name = (
        environ.get("BACKEND_MODEL_NAME")
        or environ.get("MODEL_NAME")
        or model_mount.rstrip("/").rsplit("/", 1)[-1]
        or "model"
    )
    command: tuple[str, ...] | None = None
    if variant.command is not None:
        command = tuple(part.replace("{model_path}", model_mount) for part in variant.command)
        if runtime == "vllm":
            extra = ["--served-model-name", model_name]
            for env, flag in (
                ("VLLM_TP_SIZE", "--tensor-parallel-size"),
                ("VLLM_PP_SIZE", "--pipeline-parallel-size"),
                ("VLLM_QUANTIZATION", "--quantization"),
            ):
                if environ.get(env):
                    extra += [flag, environ[env]]
            command = (*command, *extra, *_extra(environ, "VLLM_EXTRA_ARGS"))
        elif runtime == "huggingface-tgi":
            command = (*command, *_extra(environ, "TGI_EXTRA_ARGS"))
        elif runtime == "sglang":
            command = (*command, "--served-model-name", model_name, *_extra(environ, "SGLANG_EXTRA_ARGS"))
    health = (
        HealthCheck(path=variant.health_path, initial_delay=variant.initial_delay)
        if variant.health_path is not None
        else None
    )
    return EffectiveService(
        start_command=command,
        shell="/bin/sh",
        port=variant.port,
        health_check=health,
        pre_start_actions=(),
        model_name=model_name,
    )
