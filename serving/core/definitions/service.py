"""``service-definition.toml`` (S3): its dataclasses, ``parse_service_definition`` and the launcher
defaults it gives a runtime variant (``resolve_service_defaults``).

Pure: no Django, no I/O. Also the one rule for environment variable names (``ENV_NAME``) and the
refusal of the dynamic loader's variables (``loader_variable_problem``), which the API, the
launcher, this file and the engines share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tomli

from serving.core.definitions.reader import (
    FLOAT_TEXT,
    MAX_PROBLEMS,
    Collector,
    DefinitionError,
    MemSizeError,
    Problem,
    clip,
    decode,
    fail,
    field_path,
    parse_mem,
    replica_mem_problem,
    show,
)

SERVICE_DEFINITION_NAME = "service-definition.toml"
SERVICE_SECTIONS = ("environment", "resource_slots", "environ", "resource_opts")
RESOURCE_OPTS = ("shmem",)  # [runtime.resource_opts]: the shared memory (/dev/shm) size

# A variable name both engines can hand on: ASCII only (str.isalpha() would take "MODÈLE", which
# the local engine's sandbox refuses at start). One rule for the API, the launcher, the folder's
# service-definition.toml and the engines.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ENV_NAME_RULE = "ASCII letters, digits and _, not starting with a digit"
# glibc's "unsecure" variables (sysdeps/generic/unsecvars.h) that make the dynamic loader or libc
# load code, or read or write files, named by whoever set them: in a privileged process that is
# the user's code running as root. The engines hand users' variables only to the replica's own,
# unprivileged process; refusing these where users set them is defence in depth (issue 13). Left
# out on purpose: TMPDIR and TZDIR (no code is loaded; servers legitimately set them) and the
# MALLOC_* tunables other than MALLOC_TRACE (which writes a file).
LOADER_VARIABLES = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
    }
)
_ACCELERATOR_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}\.[a-z][a-z0-9_-]{0,31}\Z")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


# --- service-definition.toml ---------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeSection:
    """One ``[{runtime}.*]`` group of the service definition (S3.1)."""

    image: str | None = None
    architecture: str | None = None
    # cpu (cores), mem (bytes, an int), accelerators such as cuda.shares
    resources: Mapping[str, float] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)
    # [runtime.resource_opts]: shmem in bytes
    resource_opts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceDefinition:
    """The usable runtime sections; ``broken`` holds the problems of each section that is not (an
    error in ``[vllm.*]`` does not stop the file from giving defaults for another runtime), and
    ``section_warnings`` what each section says that is not used (unknown keys)."""

    runtimes: Mapping[str, RuntimeSection]
    broken: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict, compare=False)
    section_warnings: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict, compare=False)

    def section(self, runtime: str) -> RuntimeSection | None:
        return self.runtimes.get(runtime)

    @property
    def names(self) -> tuple[str, ...]:
        """Every runtime the file has a section for, usable or not, in file order."""
        return tuple(self.section_warnings)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(w for found in self.section_warnings.values() for w in found)

    def problems_for(self, runtime: str) -> tuple[Problem, ...]:
        return self.broken.get(runtime, ())

    def warnings_for(self, runtime: str) -> tuple[Problem, ...]:
        return self.section_warnings.get(runtime, ())


@dataclass(frozen=True)
class LauncherDefaults:
    """What the service launcher is pre-filled with for one runtime variant (S3.2)."""

    image: str  # "" when the section has no [runtime.environment]
    architecture: str
    resources: Mapping[str, float]
    environ: Mapping[str, str]
    resource_opts: Mapping[str, int] = field(default_factory=dict)  # shmem in bytes


def _split_dotted(key: str) -> list[str]:
    """``vllm."cuda.shares"`` -> ``["vllm", "cuda.shares"]`` (a linear scan, no backtracking)."""
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


def _toml_path(parts: list[str]) -> str:
    path = ""
    for part in parts:
        path = field_path(path, part)
    return path


def _toml_marks(text: str) -> dict[str, tuple[int, int]]:
    """Cheap positions for TOML fields: table headers and the keys written under them."""
    marks: dict[str, tuple[int, int]] = {}
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[") and "]" in stripped:
            table = _split_dotted(stripped.lstrip("[").split("]", 1)[0])
            marks.setdefault(_toml_path(table), (number, line.find("[") + 1))
            continue
        name, equals, _ = stripped.partition("=")
        if equals and name.strip() and not name.lstrip().startswith("#"):
            keys = _split_dotted(name.strip())
            column = line.find(name.strip()[:1]) + 1
            marks.setdefault(_toml_path([*table, *keys]), (number, column))
            if len(keys) > 1:  # cuda.shares = 1 unquoted: also under the joined name
                marks.setdefault(_toml_path([*table, ".".join(keys)]), (number, column))
    return marks


def _flatten_slots(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``cuda.shares = 1`` written unquoted is a nested table in TOML: read it as the dotted key."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and not prefix:
            out.extend(_flatten_slots(value, name))
        else:
            out.append((name, value))
    return out


def _slot_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
            number = float(value.strip())
        else:
            return None
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


class _Service:
    def __init__(self, c: Collector) -> None:
        self.c = c

    def text(self, data: Mapping[str, Any], key: str, path: str, what: str) -> str | None:
        where = field_path(path, key)
        value = data.get(key)
        if value is None:
            self.c.add(where, f"is required: {what}")
        elif not isinstance(value, str):
            self.c.add(where, f"must be a string ({what}), got {show(value)}; put it in quotes")
        elif not value.strip() or any(ch.isspace() or ord(ch) < 32 for ch in value.strip()) or "\x00" in value:
            self.c.add(where, f"must be one word without spaces ({what}), got {show(value)}")
        else:
            return value.strip()
        return None

    def section(self, runtime: str, raw: Any) -> RuntimeSection | None:
        c = self.c
        path = field_path("", runtime)
        if not isinstance(raw, dict):
            c.add(path, f"must be a group of tables such as [{clip(runtime, 40)}.environment], got {show(raw)}")
            return None
        raw = c.known_keys(raw, SERVICE_SECTIONS, path)
        image = architecture = None
        if "environment" in raw:
            epath = field_path(path, "environment")
            environment = raw["environment"]
            if not isinstance(environment, dict):
                c.add(epath, f"must be a table with image and architecture, got {show(environment)}")
            else:
                environment = c.known_keys(environment, ("image", "architecture"), epath)
                image = self.text(environment, "image", epath, "the container image, such as example.com/server:1.0")
                architecture = self.text(
                    environment, "architecture", epath, "the image's CPU architecture, such as x86_64"
                )
        resources: dict[str, float] = {}
        if "resource_slots" in raw:
            resources = self.slots(raw["resource_slots"], field_path(path, "resource_slots"))
        environ: dict[str, str] = {}
        if "environ" in raw:
            environ = self.environ(raw["environ"], field_path(path, "environ"))
        opts: dict[str, int] = {}
        if "resource_opts" in raw:
            opts = self.resource_opts(raw["resource_opts"], field_path(path, "resource_opts"))
        return RuntimeSection(
            image=image, architecture=architecture, resources=resources, environ=environ, resource_opts=opts
        )

    def resource_opts(self, raw: Any, path: str) -> dict[str, int]:
        out: dict[str, int] = {}
        if not isinstance(raw, dict):
            self.c.add(path, f'must be a table such as shmem = "1g", got {show(raw)}')
            return out
        for key, value in self.c.known_keys(raw, RESOURCE_OPTS, path).items():
            where = field_path(path, key)
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                self.c.add(where, f'must be a memory size such as "1g" or a number of bytes, got {show(value)}')
                continue
            try:
                out[key] = parse_mem(value)
            except MemSizeError as exc:
                self.c.add(where, str(exc))
        return out

    def slots(self, raw: Any, path: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if not isinstance(raw, dict):
            self.c.add(path, f'must be a table such as cpu = 1, mem = "8gb", got {show(raw)}')
            return out
        for key, value in _flatten_slots(raw):
            where = field_path(path, key)
            if key == "mem":
                if not isinstance(value, str | int | float):
                    self.c.add(where, f'must be a memory size such as "8gb" or a number of bytes, got {show(value)}')
                    continue
                try:
                    out["mem"] = parse_mem(value)
                except MemSizeError as exc:
                    self.c.add(where, str(exc))
                    continue
                too_little = replica_mem_problem(out["mem"])
                if too_little:
                    self.c.add(where, too_little)
                    del out["mem"]
                continue
            if key == "shm":
                if not isinstance(value, str | int | float) or isinstance(value, bool):
                    self.c.add(where, f'must be a memory size such as "2gb" or a number of bytes, got {show(value)}')
                    continue
                try:
                    out["shm"] = parse_mem(value)
                except MemSizeError as exc:
                    self.c.add(where, str(exc))
                continue
            if key != "cpu" and not _ACCELERATOR_KEY.match(key):
                self.c.add(where, 'unknown resource; use cpu, mem, shm or an accelerator such as "cuda.shares"')
                continue
            number = _slot_number(value)
            if number is None:
                self.c.add(
                    where, f'must be a number of at least 0 (or a numeric string such as "0.5"), got {show(value)}'
                )
                continue
            out[key] = number
        return out

    def environ(self, raw: Any, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        if not isinstance(raw, dict):
            self.c.add(path, f'must be a table of variables such as MODEL_NAME = "name", got {show(raw)}')
            return out
        for key, value in raw.items():
            where = field_path(path, key)
            if not ENV_NAME.match(key):
                self.c.add(where, f"is not a valid environment variable name; use {ENV_NAME_RULE}")
            elif problem := loader_variable_problem(key):
                self.c.add(where, problem)
            elif isinstance(value, bool):
                out[key] = "true" if value else "false"
            elif isinstance(value, str):
                if "\x00" in value:
                    self.c.add(where, "contains a NUL character; remove it")
                else:
                    out[key] = value
            elif isinstance(value, int | float):
                out[key] = str(value)
            else:
                self.c.add(where, f"must be a string, number or true/false, got {show(value)}; put it in quotes")
        return out


def loader_variable_problem(name: str) -> str | None:
    """Why the environment variable ``name`` is refused in a service's environment, as a sentence
    that names it, or None. ``LD_*`` (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...) and glibc's other
    loader variables would make every program of the replica, the platform's own privileged
    start-up steps included, load code or files the user chose."""
    if not (name.startswith("LD_") or name in LOADER_VARIABLES):
        return None
    return (
        f"{name} is refused: it makes the dynamic loader or the C library load code or files it names "
        "into every program of the replica, the platform's own start-up steps included. Set it inside "
        f"the start command instead (for example `env {name}=... python3 server.py`), where it reaches "
        "only your server."
    )


def parse_service_definition(data: bytes | str, file: str = SERVICE_DEFINITION_NAME) -> ServiceDefinition:
    """Parse the text of a service definition file (S3); raises ``DefinitionError`` listing every
    problem, of every runtime section (``read_service_definition`` keeps the usable sections)."""
    definition = read_service_definition(data, file)
    c = Collector(file)
    for found in definition.broken.values():
        for problem in found:
            if len(c.problems) >= MAX_PROBLEMS:
                c.dropped += 1
            else:
                c.problems.append(problem)
    c.raise_if_any()
    return definition


def read_service_definition(data: bytes | str, file: str = SERVICE_DEFINITION_NAME) -> ServiceDefinition:
    """Parse the text of a service definition file (S3), each runtime section on its own: raises
    ``DefinitionError`` only for the file as a whole (size, encoding, TOML syntax); a section with
    problems is left out of ``runtimes`` and its problems are in ``broken``."""
    text = decode(data, file)
    try:
        tree = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None)
        column = getattr(exc, "colno", None)
        message = str(getattr(exc, "msg", "") or exc)
        position = _TOML_POSITION.search(str(exc))
        if line is None and position:
            line, column = int(position.group(1)), int(position.group(2))
        message = _TOML_POSITION.sub("", message).strip() or "the text is not valid TOML"
        raise fail(file, f"TOML syntax error: {clip(message, 200)}", line, column) from None
    except RecursionError:
        raise fail(file, "the document is nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer with thousands of digits
        raise fail(file, f"the file can not be read as TOML: {clip(str(exc), 120)}") from None
    marks = _toml_marks(text)
    runtimes: dict[str, RuntimeSection] = {}
    broken: dict[str, tuple[Problem, ...]] = {}
    warnings: dict[str, tuple[Problem, ...]] = {}
    for runtime, raw in tree.items():
        c = Collector(file, marks)
        section = _Service(c).section(runtime, raw)
        warnings[runtime] = c.sorted_warnings()
        try:
            c.raise_if_any()
        except DefinitionError as exc:
            broken[runtime] = tuple(exc.problems)
            continue
        if section is not None:
            runtimes[runtime] = section
    return ServiceDefinition(runtimes=runtimes, broken=broken, section_warnings=warnings)


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
        resource_opts=dict(section.resource_opts),
    )
