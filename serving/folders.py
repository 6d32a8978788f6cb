"""A model folder's definition files on disk: read, validated, and turned into launcher defaults.

The I/O half of the definition files (the pure parsers are ``serving.core.definitions``): the
size-capped readers (``read_folder_file``, ``load_model_definition``, ``load_service_definition``),
``folder_entry``, ``find_model_definition``, ``validate_model_folder`` (what the platform would check
and run, for ``manage.py validate_model_folder``), and the launcher defaults from a folder's
``service-definition.toml`` (S3.2, S1.3). Every file is read through ``storage.fs`` (each path
component opened without following a symlink): a folder's content is written by users and by
replicas, and a symlink planted there must never make the platform read a host file (issue 13).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from serving.core import definitions, slots
from serving.core.definitions import (
    DEFAULT_MODEL_DEFINITION_PATH,
    MAX_FILE_BYTES,
    MODEL_DEFINITION_NAMES,
    SERVICE_DEFINITION_NAME,
    DefinitionError,
    LauncherDefaults,
    ModelDefinition,
    Problem,
    ServiceDefinition,
    parse_model_definition,
    parse_service_definition,
    read_service_definition,
    resolve_service_defaults,
    writes,
)
from serving.core.definitions.reader import Collector, clip, fail, show
from serving.core.runtimes import RUNTIMES, EffectiveService, RuntimeConfigError, effective_service
from storage import fs
from storage.fs import FolderFS
from storage.models import Folder

SERVICE_DEFINITION_FILE = "service-definition.toml"


@dataclass(frozen=True)
class FolderDefaults:
    image: str = ""
    architecture: str = ""
    resources: dict[str, float] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=dict)
    resource_opts: dict[str, int] = field(default_factory=dict)  # [runtime.resource_opts]: shmem bytes
    problems: tuple[str, ...] = ()  # why the file could not be used, in words
    warnings: tuple[str, ...] = ()  # what the runtime's section says that is not used (unknown keys)


def folder_service_definition(folder_fs: FolderFS) -> ServiceDefinition | None:
    """The folder's ``service-definition.toml`` read section by section (a broken section does not
    hide the others), or None when there is none. DefinitionError: the file as a whole is unusable."""
    data = read_folder_file(folder_fs, SERVICE_DEFINITION_FILE)
    if data is None:
        return None
    return read_service_definition(data, SERVICE_DEFINITION_FILE)


def described_runtime(service_definition: ServiceDefinition | None) -> str:
    """The runtime a folder describes: the first runtime its service-definition.toml has a section
    for (``[vllm.*]``), in file order, that the platform knows; else Custom."""
    for name in service_definition.names if service_definition is not None else ():
        if name in RUNTIMES:
            return name
    return "custom"


def folder_runtime(folder: Folder) -> str:
    """``described_runtime`` of a folder; Custom when its service-definition.toml can not be read."""
    try:
        return described_runtime(folder_service_definition(FolderFS(folder.host_path)))
    except DefinitionError:
        return "custom"


def folder_defaults(folder: Folder, runtime: str) -> FolderDefaults:
    """The section of the folder's service definition for ``runtime``, or empty defaults.

    A missing file is normal (defaults are optional); a broken one does not block creating the
    service, its problems are reported so the launcher can show them next to the fields. Only the
    problems of the file as a whole and of ``runtime``'s own section count: a broken ``[nim.*]``
    does not take the defaults of ``[vllm.*]`` away. The file is read through storage.fs: a symlink
    planted in the folder (by a replica that can write there) is reported, never followed, so no
    host file becomes the service's defaults.
    """
    try:
        service_definition = folder_service_definition(FolderFS(folder.host_path))
    except definitions.DefinitionError as exc:
        return FolderDefaults(problems=tuple(str(p) for p in exc.problems))
    if service_definition is None:
        return FolderDefaults()
    warnings = tuple(str(p) for p in service_definition.warnings_for(runtime))
    broken = service_definition.problems_for(runtime)
    if broken:
        return FolderDefaults(problems=tuple(str(p) for p in broken), warnings=warnings)
    resolved = definitions.resolve_service_defaults(service_definition, runtime)
    if resolved is None:
        return FolderDefaults(warnings=warnings)
    return FolderDefaults(
        image=resolved.image,
        architecture=resolved.architecture,
        resources=slots.normalize(resolved.resources),
        environ=dict(resolved.environ),
        resource_opts=dict(resolved.resource_opts),
        warnings=warnings,
    )


# --- files on disk -------------------------------------------------------------------------------


SYMLINK_PROBLEM = "is a symbolic link; upload the file itself into the model folder"


def _fs_problem(exc: Exception, relative: str) -> str:
    """What a storage.fs refusal means for a definition file, as a sentence for its Problem."""
    if isinstance(exc, fs.SymlinkRefused):
        if exc.path and exc.path != relative:
            return (
                f"is outside the model folder: {exc.path!r} on its path is a symbolic link, and links are never "
                "followed; upload the directory itself"
            )
        return SYMLINK_PROBLEM
    if isinstance(exc, fs.PathNotFound):
        return "can not be read: No such file or directory"
    if isinstance(exc, fs.NotAFile | fs.PathConflict):
        return "is not a regular file"
    return f"can not be read: {getattr(exc, 'message', exc)}"


def read_folder_file(folder_fs: FolderFS, relative: str, file: str | None = None) -> bytes | None:
    """A definition file's bytes read through storage.fs, size-capped; None when it is absent.

    A symlink (the file, or a directory on its path), a directory, a pipe or a file over
    MAX_FILE_BYTES is a DefinitionError naming ``file`` (default ``relative``); nothing is followed,
    and the size is checked on the opened file before a byte is read."""
    name = file or relative
    try:
        with folder_fs.open_read(relative) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise fail(
                    name, f"the file is {size} bytes; a definition file must be at most {MAX_FILE_BYTES // 1024} KiB"
                )
            data = handle.read(MAX_FILE_BYTES + 1)
    except fs.PathNotFound:
        return None
    except fs.FsError as exc:
        # Chained (not ``from None``): a replica start tells a node without the folder's data
        # (StorageUnavailable) from a bad file.
        raise fail(name, _fs_problem(exc, relative)) from exc
    except OSError as exc:
        raise fail(name, f"can not be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise fail(name, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; a definition file is small text")
    return data


def _read_capped(path: Path, file: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES. The directory is the caller's (an
    operator's path, or a folder's root); the file in it is opened without following a symlink."""
    data = read_folder_file(FolderFS(os.path.realpath(path.parent)), path.name, file)
    if data is None:
        raise fail(file, "can not be read: No such file or directory")
    return data


def load_model_definition(
    path: Path | str, file: str | None = None, *, model_mount: str | None = None
) -> ModelDefinition:
    """Read (size-capped) and parse a model definition file; problems name it ``file`` (default: its name)."""
    path = Path(path)
    name = file or path.name
    return parse_model_definition(_read_capped(path, name), name, model_mount=model_mount)


def load_service_definition(path: Path | str, file: str | None = None) -> ServiceDefinition:
    """Read (size-capped) and parse a service definition file."""
    path = Path(path)
    name = file or path.name
    return parse_service_definition(_read_capped(path, name), name)


def _as_plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _as_plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class FolderValidation:
    """Everything ``validate_model_folder`` found: the problems, or what the platform would run."""

    problems: tuple[Problem, ...]
    model_definition: ModelDefinition | None
    service_definition: ServiceDefinition | None
    defaults: LauncherDefaults | None
    runtime: str = "custom"
    definition_file: str | None = None  # the model definition file used, relative to the folder
    effective: EffectiveService | None = None  # how a replica would start (serving.core.runtimes)
    # What the files say that is not used (unknown keys, with a "did you mean"): the folder is still valid.
    warnings: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the resolved definition, or the problems."""
        return {
            "ok": self.ok,
            "runtime": self.runtime,
            "model_definition_file": self.definition_file,
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [p.to_dict() for p in self.warnings],
            "model_definition": _as_plain(self.model_definition),
            "launcher_defaults": _as_plain(self.defaults),
            "effective_service": _as_plain(self.effective),
        }


def _safe_relative(definition_path: str) -> str | None:
    """A definition file path inside the folder (``sub/def.yaml``), or None when it points elsewhere."""
    if not definition_path or "\x00" in definition_path or "\\" in definition_path:
        return None
    pure = PurePosixPath(definition_path)
    if pure.is_absolute() or any(part == ".." for part in pure.parts) or not pure.parts:
        return None
    return pure.as_posix()


def folder_entry(folder_fs: FolderFS, relative: str) -> tuple[str | None, str | None]:
    """(what ``relative`` is in the folder: "file", "dir", "symlink", ... or None when absent or out
    of reach; what is wrong with it as a definition file, or None), through storage.fs: a symlink,
    on the file or on its path, is reported, not followed. Reading it later refuses a swapped-in
    link again, so no check-then-use race leads outside."""
    try:
        entry = folder_fs.stat(relative)
    except fs.PathNotFound:
        return None, None
    except fs.FsError as exc:
        return None, _fs_problem(exc, relative)
    if entry.type == "symlink":
        return entry.type, SYMLINK_PROBLEM
    if entry.type != "file":
        return entry.type, "is not a regular file"
    return entry.type, None


def _regular_file_in(folder_fs: FolderFS, relative: str, c: Collector) -> bool:
    """Whether ``relative`` is a regular file inside the folder; what is wrong otherwise goes to ``c``."""
    kind, problem = folder_entry(folder_fs, relative)
    if problem:
        c.add("", problem)
    return kind == "file"


def _folder_fs(folder: Path) -> FolderFS:
    return FolderFS(os.path.realpath(folder))


def find_model_definition(folder: Path, definition_path: str | None = None) -> Path | None:
    """The model definition file to use: ``definition_path`` when set (for the default name, falling
    back to ``model-definition.yml`` as the original does), else ``.yaml`` then ``.yml``. Only a
    regular file counts: a symlink is not followed (storage.fs)."""
    folder_fs = _folder_fs(folder)
    for name in _definition_candidates(definition_path):
        try:
            if folder_fs.stat(name).type == "file":
                return folder / name
        except fs.FsError:
            continue
    return None


def _definition_candidates(definition_path: str | None) -> tuple[str, ...]:
    if not definition_path or definition_path == DEFAULT_MODEL_DEFINITION_PATH:
        return MODEL_DEFINITION_NAMES
    return (definition_path,)


def validate_model_folder(
    folder: Path | str,
    runtime: str | None = "custom",
    definition_path: str | None = None,
    *,
    model_mount: str = "/models",
) -> FolderValidation:
    """Everything the platform would check about a model folder for ``runtime``, without starting it.

    Reads the model definition file (only for runtimes that need one: Custom) and
    ``service-definition.toml`` when present, and resolves how a replica would start. ``runtime``
    None: the runtime the folder describes (``described_runtime``). Unknown keys are ``warnings``.
    """
    folder = Path(folder)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    if runtime is None:
        try:
            runtime = described_runtime(folder_service_definition(_folder_fs(folder))) if folder.is_dir() else "custom"
        except DefinitionError:
            runtime = "custom"  # the file's problems are reported below
    if not folder.is_dir():
        return FolderValidation(
            (Problem(str(folder), "", "is not a directory; give the path of a model folder"),),
            None,
            None,
            None,
            runtime,
        )
    # The folder the operator named is theirs (resolved once); what is inside it is read without
    # following links, as the platform itself reads a folder.
    folder_fs = _folder_fs(folder)
    variant = RUNTIMES.get(runtime)
    if variant is None:
        problems.append(Problem("", "runtime", f"unknown runtime {show(runtime)}; use one of {', '.join(RUNTIMES)}"))

    model_definition: ModelDefinition | None = None
    used: str | None = None
    if variant is None or variant.needs_definition_file:
        wanted = definition_path or DEFAULT_MODEL_DEFINITION_PATH
        relative = _safe_relative(wanted)
        if relative is None:
            problems.append(
                Problem(
                    clip(wanted, 80),
                    "",
                    "must be a path inside the model folder, such as model-definition.yaml (no '..', not absolute)",
                )
            )
        else:
            for name in _definition_candidates(relative):
                c = Collector(name)
                found = _regular_file_in(folder_fs, name, c)
                problems.extend(c.problems)
                if found:
                    used = name
                    break
                if c.problems:
                    break
            if used is None and not any(p.file in _definition_candidates(relative) for p in problems):
                names = " or ".join(_definition_candidates(relative))
                problems.append(
                    Problem(
                        names,
                        "",
                        f"is missing from the model folder; the {variant.label if variant else runtime} runtime "
                        "needs a model definition file (upload one, or set the model definition file path)",
                    )
                )
            if used is not None:
                try:
                    data = read_folder_file(folder_fs, used)
                    if data is None:  # removed since it was found
                        raise fail(used, "can not be read: No such file or directory")
                    model_definition = parse_model_definition(data, used, model_mount=model_mount)
                    warnings.extend(model_definition.warnings)
                except DefinitionError as exc:
                    problems.extend(exc.problems)
                if model_definition is not None and model_definition.primary.service is None:
                    problems.append(
                        Problem(
                            used,
                            "models[0].service",
                            "is required: the Custom runtime starts the first model's service",
                        )
                    )

    service_definition: ServiceDefinition | None = None
    defaults: LauncherDefaults | None = None
    c = Collector(SERVICE_DEFINITION_NAME)
    service_found = _regular_file_in(folder_fs, SERVICE_DEFINITION_NAME, c)
    problems.extend(c.problems)
    if service_found:
        try:
            data = read_folder_file(folder_fs, SERVICE_DEFINITION_NAME)
            if data is None:
                raise fail(SERVICE_DEFINITION_NAME, "can not be read: No such file or directory")
            service_definition = read_service_definition(data, SERVICE_DEFINITION_NAME)
            # Only this runtime's section counts: a broken [nim.*] does not fail the folder for vLLM.
            problems.extend(service_definition.problems_for(runtime))
            warnings.extend(service_definition.warnings_for(runtime))
            defaults = resolve_service_defaults(service_definition, runtime)
            # [runtime.environ] pointing a cache into the read-only model folder fails at run time.
            for name, value in (defaults.environ if defaults else {}).items():
                for text in writes.environ_warnings({name: value}, model_mount):
                    warnings.append(Problem(SERVICE_DEFINITION_NAME, f"{runtime}.environ.{name}", text))
        except DefinitionError as exc:
            problems.extend(exc.problems)

    effective = None
    if not problems and variant is not None:
        try:
            effective = effective_service(
                runtime, model_definition, model_mount, dict(defaults.environ) if defaults else {}
            )
        except RuntimeConfigError as exc:
            problems.append(Problem(used or "", "", str(exc)))
    return FolderValidation(
        tuple(problems), model_definition, service_definition, defaults, runtime, used, effective, tuple(warnings)
    )


# The names the issue uses for the file helpers.
load_model_definition_file = load_model_definition
load_service_definition_file = load_service_definition
