"""JSON Schemas of ``model-definition.yaml`` and ``service-definition.toml``, for editors.

YAML and TOML language servers (VS Code's YAML and Even Better TOML extensions, JetBrains IDEs)
check a file against a JSON Schema as it is typed. These schemas are generated from the parser's own
field tables (``serving.core.definitions``): every key the parser reads needs a type here, so a key
added to the parser without one fails the generation (and the test that keeps
``docs/schemas/*.json`` in step). The web app publishes them at
``/api/v1/schemas/model-definition.json`` and ``/api/v1/schemas/service-definition.json``.

The schemas are strict where the parser is lenient: a key the parser does not know is only a warning
there (Backend.AI files carry such keys), but an editor marks it, which is what catches a typo such
as ``inital_delay`` while it is typed. Both spellings of a key (``initial_delay``,
``initial-delay``) are accepted, as the parser accepts them.
"""

from __future__ import annotations

from typing import Any

from serving.core import definitions
from serving.core.definitions import model
from serving.core.runtimes import RUNTIMES

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
MODEL_DEFINITION_ID = "model-definition.json"
SERVICE_DEFINITION_ID = "service-definition.json"

_STRING: dict[str, Any] = {"type": "string"}
_SECONDS: dict[str, Any] = {"type": "number", "minimum": 0, "maximum": model.MAX_SECONDS}
_LINES: dict[str, Any] = {"oneOf": [_STRING, {"type": "array", "items": _STRING}]}
_MODE: dict[str, Any] = {
    "description": 'An octal file mode such as "644" or "755".',
    "oneOf": [{"type": "string", "pattern": "^(0[oO])?[0-7]{1,5}$"}, {"type": "integer", "minimum": 0}],
}
_FLAG: dict[str, Any] = {"type": "boolean"}
_COMMAND_PARTS: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": ["string", "number"]}}

# The type of every key the parser reads, by where it stands. A key the parser reads without an
# entry here makes ``model_definition_schema`` raise KeyError.
HEALTH_CHECK_FIELDS: dict[str, dict[str, Any]] = {
    "path": {"type": "string", "pattern": "^/", "description": "The HTTP path probed, such as /health."},
    "interval": {**_SECONDS, "exclusiveMinimum": 0, "description": "Seconds between checks (default 10)."},
    "max_retries": {"type": "integer", "minimum": 0, "maximum": 10_000, "description": "Failures before unhealthy."},
    "max_wait_time": {**_SECONDS, "exclusiveMinimum": 0, "description": "Timeout of one check, in seconds."},
    "expected_status_code": {"type": "integer", "minimum": 100, "maximum": 599},
    "initial_delay": {**_SECONDS, "description": "Seconds after the start before the first check (default 60)."},
    "headers": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
}
ACTION_ARG_FIELDS: dict[str, dict[str, Any]] = {
    "filename": _STRING,
    "body": _LINES,
    "mode": _MODE,
    "append": _FLAG,
    "command": _COMMAND_PARTS,
    "echo": _FLAG,
    "check": {**_FLAG, "description": "Stop the replica when the command fails (default: record and go on)."},
    "path": _STRING,
    "message": _STRING,
    "debug": _FLAG,
}
SERVICE_FIELDS: dict[str, dict[str, Any]] = {
    "start_command": {
        "description": "The command that starts the inference server: a string (run by the shell) or a list.",
        "oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": _STRING}],
    },
    "shell": {**_STRING, "description": "The shell for a string start_command (default /bin/bash)."},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "The port the server listens on."},
    "pre_start_actions": {},  # filled in below (it needs the actions' schemas)
    "health_check": {},  # filled in below
}
MODEL_FIELDS: dict[str, dict[str, Any]] = {
    "name": {**_STRING, "description": "The model's name."},
    "model_path": {**_STRING, "pattern": "^/", "description": "Where the model folder is mounted, such as /models."},
    "service": {},  # filled in below
    "metadata": {},  # filled in below
}
METADATA_FIELDS: dict[str, dict[str, Any]] = {
    "version": {"type": ["string", "integer"]},
    "framework": {"type": "array", "items": _STRING},
    "label": {"type": "array", "items": _STRING},
    "min_resource": {"type": "object"},
}


def _spellings(fields: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each key under both spellings the parser accepts (``initial_delay`` and ``initial-delay``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, schema in fields.items():
        out[name] = schema
        if "_" in name:
            out[name.replace("_", "-")] = schema
    return out


def _object(keys: tuple[str, ...], fields: dict[str, dict[str, Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": _spellings({key: fields[key] for key in keys}),
        "required": list(required),
        "additionalProperties": False,
    }


def _action(kind: str) -> dict[str, Any]:
    required, optional = model.ACTION_ARGS[kind]
    return {
        "type": "object",
        "properties": {
            "action": {"const": kind},
            "args": _object(required + optional, ACTION_ARG_FIELDS, required),
            "ref": {
                "type": "string",
                "pattern": "^" + model.REF_NAME.pattern.removesuffix(r"\Z") + "$",
                "description": "Save this action's result under a name; later arguments use it as {name}.",
            },
        },
        "required": ["action", "args"],
        "additionalProperties": False,
    }


def model_definition_schema() -> dict[str, Any]:
    """The JSON Schema of ``model-definition.yaml`` (S2)."""
    metadata_fields = {name: {"type": "string"} for name in model.METADATA_STRINGS}
    for aliases in model.METADATA_ALIASES.values():
        metadata_fields.update({alias: {"type": "string"} for alias in aliases})
    metadata_fields.update(METADATA_FIELDS)
    # Metadata is free-form beyond the known keys (the parser keeps the rest as ``extra``).
    metadata = {"type": "object", "properties": _spellings(metadata_fields)}
    service_fields = {
        **SERVICE_FIELDS,
        "pre_start_actions": {"type": "array", "items": {"oneOf": [_action(k) for k in model.PRE_START_ACTIONS]}},
        "health_check": _object(model.HEALTH_KEYS, HEALTH_CHECK_FIELDS, ("path",)),
    }
    model_fields = {
        **MODEL_FIELDS,
        "service": _object(model.SERVICE_KEYS, service_fields, ("start_command", "port")),
        "metadata": metadata,
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": MODEL_DEFINITION_ID,
        "title": "modelserve model-definition.yaml",
        "description": "How the platform starts and checks a model's inference server (Backend.AI's format).",
        "type": "object",
        "properties": {
            "models": {
                "type": "array",
                "minItems": 1,
                "items": _object(model.MODEL_KEYS, model_fields, ("name", "model_path")),
            }
        },
        "required": ["models"],
        "additionalProperties": False,
    }


def service_definition_schema() -> dict[str, Any]:
    """The JSON Schema of ``service-definition.toml`` (S3.2): one table per runtime."""
    mem = {"type": ["string", "integer", "number"], "description": 'A size such as "8g" or a number of bytes.'}
    slot = {"type": ["number", "string"], "description": "A number of at least 0."}
    sections: dict[str, dict[str, Any]] = {
        "environment": {
            "type": "object",
            "properties": {"image": _STRING, "architecture": _STRING},
            "additionalProperties": False,
        },
        "resource_slots": {
            "type": "object",
            "properties": {"cpu": slot, "mem": mem},
            # Accelerators are dotted keys (cuda.shares), which TOML also writes as nested tables.
            "additionalProperties": {"oneOf": [slot, {"type": "object"}]},
        },
        "environ": {
            "type": "object",
            "propertyNames": {"pattern": "^" + definitions.ENV_NAME.pattern.removesuffix(r"\Z") + "$"},
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        },
        "resource_opts": {
            "type": "object",
            "properties": _spellings({opt: mem for opt in definitions.RESOURCE_OPTS}),
            "additionalProperties": False,
        },
    }
    runtime = _object(definitions.SERVICE_SECTIONS, sections)
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": SERVICE_DEFINITION_ID,
        "title": "modelserve service-definition.toml",
        "description": "The launcher's defaults for each runtime: image, resources, environment.",
        "type": "object",
        "properties": {name: runtime for name in RUNTIMES},
        "additionalProperties": False,
    }


SCHEMAS = {MODEL_DEFINITION_ID: model_definition_schema, SERVICE_DEFINITION_ID: service_definition_schema}
