"""Parse and validate ``model-definition.yaml`` (S2) and ``service-definition.toml`` (S3).

Pure: no Django, no I/O. The parsers take the bytes or text of a file; reading it from a model
folder is ``serving.folders``' job, which goes through ``storage.fs`` (each path component opened
without following a symlink: a folder's content is written by users and by replicas, and a symlink
planted there must never make the platform read a host file, issue 13). The parsers return frozen
dataclasses or raise one ``DefinitionError`` that lists *every* problem found, each with the file,
the field path (``models[0].service.port``), the line and column where known, and a sentence that
says what is wrong and how to fix it.

Split by concern; this package re-exports the public names, so callers write
``from serving.core import definitions`` and ``definitions.X``:

* ``reader``: the hostile-input reader both files share (limits, ``Problem``/``DefinitionError``,
  decoding, the safe YAML composer) and the memory-size parser;
* ``model``: ``model-definition.yaml``, its dataclasses and ``parse_model_definition``;
* ``service``: ``service-definition.toml``, its dataclasses, ``parse_service_definition``,
  ``resolve_service_defaults`` and the environment variable name rules.

Hostile input is refused quickly and safely: files over 1 MiB, YAML anchors and aliases (no
"billion laughs"), every non-standard tag (``!!python/object`` and friends), nesting deeper than
``MAX_DEPTH``, more than ``MAX_NODES`` values, invalid UTF-8, NUL characters, and wrong types at every
level. YAML is *composed* (never constructed) with the safe loader, and the Python values are built
here from the node tree, which also gives every field its line and column.

What the original accepts, we accept (``port: "8000"``, numeric strings for the health-check
numbers, ``body`` as a list of lines, ``run_command``'s ``echo``, ``metadata`` with its aliases).
Unknown keys are not errors (Backend.AI ignores them): each is a *warning* naming the key, with a
"did you mean" for a near miss of a known key (``inital_delay``), returned by the parsers as data
(``ModelDefinition.warnings``, ``ServiceDefinition.warnings``), never logged. Every field may also be
spelled kebab-case (``initial-delay``). The hostile-input rules above stay errors.

Our own additions, beyond the original, are marked "extension" in ``model``:

* ``health_check.headers``: a mapping of header names to values sent with every probe, for
  runtimes that check a token on every path.
* ``{model_path}`` in ``start_command`` and in the string arguments of pre-start actions is replaced
  by the model's ``model_path`` (or by the mount point given to the parser).
* Limits the original does not state: health-check times at most one day, ``max_retries`` at most
  10000, ``expected_status_code`` 100..599, ``model_path`` and ``health_check.path`` absolute.
"""

from __future__ import annotations

from serving.core.definitions.model import (
    DEFAULT_MODEL_DEFINITION_PATH,
    MAX_SECONDS,
    MODEL_DEFINITION_NAMES,
    MODEL_PATH_PLACEHOLDER,
    PRE_START_ACTIONS,
    REF_NAME,
    HealthCheck,
    HealthCheckConfig,
    Model,
    ModelConfig,
    ModelDefinition,
    ModelMetadata,
    PreStartAction,
    Service,
    ServiceConfig,
    parse_model_definition,
)
from serving.core.definitions.reader import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    MAX_PROBLEMS,
    MIN_REPLICA_MEM,
    DefinitionError,
    MemSizeError,
    Problem,
    field_path,
    parse_mem,
    replica_mem_problem,
    unknown_key_message,
)
from serving.core.definitions.service import (
    ENV_NAME,
    ENV_NAME_RULE,
    LOADER_VARIABLES,
    RESOURCE_OPTS,
    SERVICE_DEFINITION_NAME,
    SERVICE_SECTIONS,
    LauncherDefaults,
    RuntimeSection,
    ServiceDefinition,
    loader_variable_problem,
    parse_service_definition,
    read_service_definition,
    resolve_service_defaults,
)

__all__ = [
    "DEFAULT_MODEL_DEFINITION_PATH",
    "ENV_NAME",
    "ENV_NAME_RULE",
    "LOADER_VARIABLES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MAX_PROBLEMS",
    "MAX_SECONDS",
    "MIN_REPLICA_MEM",
    "MODEL_DEFINITION_NAMES",
    "MODEL_PATH_PLACEHOLDER",
    "PRE_START_ACTIONS",
    "REF_NAME",
    "RESOURCE_OPTS",
    "SERVICE_DEFINITION_NAME",
    "SERVICE_SECTIONS",
    "DefinitionError",
    "HealthCheck",
    "HealthCheckConfig",
    "LauncherDefaults",
    "MemSizeError",
    "Model",
    "ModelConfig",
    "ModelDefinition",
    "ModelMetadata",
    "PreStartAction",
    "Problem",
    "RuntimeSection",
    "Service",
    "ServiceConfig",
    "ServiceDefinition",
    "field_path",
    "loader_variable_problem",
    "parse_mem",
    "parse_model_definition",
    "parse_service_definition",
    "read_service_definition",
    "replica_mem_problem",
    "resolve_service_defaults",
    "unknown_key_message",
]
