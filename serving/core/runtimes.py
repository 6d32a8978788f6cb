"""Inference runtime variants (S4.1): how each one starts, listens and is health-checked. Pure.

Only ``custom`` reads a model definition file; the others are driven by the image and by environment
variables, as in the original (where ``vllm``, ``nim``, ``huggingface-tgi`` and ``cmd`` build a one-model
definition themselves: port and health path from the runtime's profile, no pre-start actions).

Where the original runs the image's own command for every variant but Custom, we start the servers we
know (vLLM, TGI, SGLang) with an explicit command built from the environment, so that the same image
works whatever its entrypoint is; NVIDIA NIM and "Predefined Image Command" run the image's own command.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from serving.core.definitions import HealthCheck, ModelDefinition, PreStartAction

# Set by the platform in every replica (serving/node/replicas.py), whatever the runtime.
PLATFORM_ENV = {
    "BACKEND_MODEL_NAME": "the model's name: the definition's models[0].name (Custom) or the served model name",
    "BACKEND_MODEL_PATH": "where the model folder is mounted (the launcher's model destination, default /models)",
    "BACKEND_SERVICE_PORT": "the port the server must listen on inside the replica",
}
_POSITIVE_INT = re.compile(r"[1-9][0-9]{0,3}\Z")
_TOKEN = re.compile(r"[A-Za-z0-9_.:+-]{1,64}\Z")
_MAX_EXTRA_ARGS = 4096  # characters of *_EXTRA_ARGS


@dataclass(frozen=True)
class RuntimeVariant:
    name: str
    label: str
    port: int | None  # None: from the model definition file (Custom)
    health_path: str | None  # None: healthy when the port accepts connections (or from the definition)
    needs_definition_file: bool
    # argv template; "{model_path}" becomes the model mount; None = the image's own command
    command: tuple[str, ...] | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)  # variable -> what it does
    # LLM servers take long to load a model: probes do not count before this many seconds.
    initial_delay: float = 60.0
    openai_compatible: bool = False
    # The model name when the environment does not give one (as the original names them).
    default_model_name: str = "model"

    @property
    def default_health_check(self) -> HealthCheck | None:
        """The health check a replica of this runtime gets (None: a TCP connect, or the definition's)."""
        if self.health_path is None:
            return None
        return HealthCheck(path=self.health_path, initial_delay=self.initial_delay)


_MODEL_NAME_ENV = "the served model name clients ask for (default {default}); MODEL_NAME is used when unset"

RUNTIMES: dict[str, RuntimeVariant] = {
    "custom": RuntimeVariant(
        name="custom",
        label="Custom",
        port=None,
        health_path=None,
        needs_definition_file=True,
        env_vars={},
        default_model_name="",
    ),
    "vllm": RuntimeVariant(
        name="vllm",
        label="vLLM",
        port=8000,
        health_path="/health",
        needs_definition_file=False,
        command=("vllm", "serve", "{model_path}", "--host", "0.0.0.0", "--port", "8000"),
        env_vars={
            "BACKEND_MODEL_NAME": _MODEL_NAME_ENV.format(default="vllm-model") + " (--served-model-name)",
            "VLLM_TP_SIZE": "tensor parallel size, the number of GPUs (--tensor-parallel-size)",
            "VLLM_PP_SIZE": "pipeline parallel size (--pipeline-parallel-size)",
            "VLLM_QUANTIZATION": "quantization method such as awq or fp8 (--quantization)",
            "VLLM_EXTRA_ARGS": "any other 'vllm serve' arguments, as one string (split like a shell does)",
        },
        openai_compatible=True,
        default_model_name="vllm-model",
    ),
    "nim": RuntimeVariant(
        name="nim",
        label="NVIDIA NIM",
        port=8000,
        health_path="/v1/health/ready",
        needs_definition_file=False,
        env_vars={
            "NGC_API_KEY": "your NGC key; the NIM image downloads its model with it",
            "BACKEND_MODEL_NAME": _MODEL_NAME_ENV.format(default="nim-model")
            + " (passed on as NIM_SERVED_MODEL_NAME unless that is set)",
            "NIM_TENSOR_PARALLEL_SIZE": "tensor parallel size (read by the NIM image itself)",
            "NIM_MODEL_NAME": "the model path or name a model-free NIM loads (read by the NIM image itself)",
        },
        openai_compatible=True,
        default_model_name="nim-model",
    ),
    "cmd": RuntimeVariant(
        name="cmd",
        label="Predefined Image Command",
        port=8000,
        health_path=None,
        needs_definition_file=False,
        env_vars={
            "BACKEND_MODEL_NAME": _MODEL_NAME_ENV.format(default="image-model") + "; the image's command may read it",
            "BACKEND_SERVICE_PORT": "the port the image's command must listen on (always 8000)",
        },
        initial_delay=0.0,
        default_model_name="image-model",
    ),
    "huggingface-tgi": RuntimeVariant(
        name="huggingface-tgi",
        label="Hugging Face TGI",
        port=3000,
        health_path="/info",
        needs_definition_file=False,
        command=("text-generation-launcher", "--model-id", "{model_path}", "--port", "3000", "--hostname", "0.0.0.0"),
        env_vars={
            "BACKEND_MODEL_NAME": _MODEL_NAME_ENV.format(default="tgi-model"),
            "TGI_NUM_SHARD": "tensor parallel size, the number of GPUs (--num-shard)",
            "TGI_QUANTIZE": "quantization method such as awq or bitsandbytes (--quantize)",
            "TGI_EXTRA_ARGS": "any other text-generation-launcher arguments, as one string",
        },
        openai_compatible=True,
        default_model_name="tgi-model",
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
        env_vars={
            "BACKEND_MODEL_NAME": _MODEL_NAME_ENV.format(default="sglang-model") + " (--served-model-name)",
            "SGLANG_TP_SIZE": "tensor parallel size, the number of GPUs (--tp-size)",
            "SGLANG_EXTRA_ARGS": "any other sglang.launch_server arguments, as one string",
        },
        openai_compatible=True,
        default_model_name="sglang-model",
    ),
}


class RuntimeConfigError(ValueError):
    """A runtime variant can not start with what it was given; ``str()`` says why and how to fix it."""


def get_runtime(name: str) -> RuntimeVariant:
    """The runtime variant called ``name``; a clear error listing the valid names otherwise."""
    variant = RUNTIMES.get(name) if isinstance(name, str) else None
    if variant is None:
        shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
        raise RuntimeConfigError(f"Unknown runtime {shown}; use one of: {', '.join(RUNTIMES)}.")
    return variant


@dataclass(frozen=True)
class EffectiveService:
    """How one replica starts: what the engine runs and how the health checker probes it."""

    start_command: str | tuple[str, ...] | None  # str: run with ``shell -c``; None: the image's own command
    shell: str
    port: int
    health_check: HealthCheck | None  # None: healthy when the port accepts connections
    pre_start_actions: tuple[PreStartAction, ...]
    model_name: str
    # Variables the runtime adds for the server; the user's own environment wins over them.
    environ: Mapping[str, str] = field(default_factory=dict)


def _positive_int(environ: Mapping[str, str], name: str) -> str | None:
    value = str(environ.get(name, "")).strip()
    if not value:
        return None
    if not _POSITIVE_INT.match(value):
        raise RuntimeConfigError(f"{name} must be a whole number such as 1, 2 or 4, got {value[:40]!r}.")
    return value


def _token(environ: Mapping[str, str], name: str) -> str | None:
    value = str(environ.get(name, "")).strip()
    if not value:
        return None
    if not _TOKEN.match(value):
        raise RuntimeConfigError(f"{name} must be one word such as awq or fp8, got {value[:40]!r}.")
    return value


def _extra(environ: Mapping[str, str], name: str) -> list[str]:
    value = str(environ.get(name, "")).strip()
    if not value:
        return []
    if len(value) > _MAX_EXTRA_ARGS:
        raise RuntimeConfigError(f"{name} is longer than {_MAX_EXTRA_ARGS} characters; shorten it.")
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise RuntimeConfigError(
            f"{name} can not be split into arguments ({exc}); check its quotes, e.g. --dtype half --max-model-len 4096."
        ) from None


def _custom(definition: ModelDefinition | None) -> EffectiveService:
    if definition is None:
        raise RuntimeConfigError(
            "The Custom runtime needs a model definition file (model-definition.yaml or model-definition.yml) in "
            "the model folder; upload one or choose another runtime variant."
        )
    model = definition.primary
    if model.service is None:
        raise RuntimeConfigError(
            "models[0].service is missing from the model definition file; the Custom runtime needs its "
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


def effective_service(
    runtime: str, definition: ModelDefinition | None, model_mount: str, environ: Mapping[str, str]
) -> EffectiveService:
    """How a replica of ``runtime`` starts, given the folder's definition (Custom only), the model
    mount and the service's environment variables. Raises ``RuntimeConfigError`` with a sentence."""
    variant = get_runtime(runtime)
    if variant.needs_definition_file:
        return _custom(definition)
    if not isinstance(model_mount, str) or not model_mount.startswith("/") or "\x00" in model_mount:
        raise RuntimeConfigError(
            f"The model destination must be an absolute path such as /models, got {model_mount!r}."
        )
    model_name = (
        str(environ.get("BACKEND_MODEL_NAME") or "").strip()
        or str(environ.get("MODEL_NAME") or "").strip()
        or variant.default_model_name
    )
    added: dict[str, str] = {}
    command: tuple[str, ...] | None = None
    if variant.command is not None:
        command = tuple(part.replace("{model_path}", model_mount) for part in variant.command)
    if runtime == "vllm" and command is not None:
        extra = ["--served-model-name", model_name]
        for env, flag, read in (
            ("VLLM_TP_SIZE", "--tensor-parallel-size", _positive_int),
            ("VLLM_PP_SIZE", "--pipeline-parallel-size", _positive_int),
            ("VLLM_QUANTIZATION", "--quantization", _token),
        ):
            value = read(environ, env)
            if value is not None:
                extra += [flag, value]
        command = (*command, *extra, *_extra(environ, "VLLM_EXTRA_ARGS"))
    elif runtime == "huggingface-tgi" and command is not None:
        extra = []
        for env, flag, read in (
            ("TGI_NUM_SHARD", "--num-shard", _positive_int),
            ("TGI_QUANTIZE", "--quantize", _token),
        ):
            value = read(environ, env)
            if value is not None:
                extra += [flag, value]
        command = (*command, *extra, *_extra(environ, "TGI_EXTRA_ARGS"))
    elif runtime == "sglang" and command is not None:
        extra = ["--served-model-name", model_name]
        tp = _positive_int(environ, "SGLANG_TP_SIZE")
        if tp is not None:
            extra += ["--tp-size", tp]
        command = (*command, *extra, *_extra(environ, "SGLANG_EXTRA_ARGS"))
    elif runtime == "nim":
        added["NIM_SERVED_MODEL_NAME"] = model_name
    port = variant.port if variant.port is not None else 8000
    return EffectiveService(
        start_command=command,
        shell="/bin/bash",
        port=port,
        health_check=variant.default_health_check,
        pre_start_actions=(),
        model_name=model_name,
        environ=added,
    )
