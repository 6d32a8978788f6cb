"""Model store (S1.3): which model folders can run, and the launcher values pre-filled from them (S3.2).

The definition files are read through storage.fs like every other user file: a definition file that
is a symlink (planted by a container that had the folder mounted read-write) is reported as a
problem, never followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings

from serving import folders
from serving.core import definitions, slots
from serving.core.definitions import MODEL_DEFINITION_NAMES, SERVICE_DEFINITION_NAME, DefinitionError, Problem
from storage import fs as fsmod
from storage.fs import FolderFS
from storage.models import Folder

DEFAULT_MODEL_MOUNT = "/models"


@dataclass(frozen=True)
class StoreInfo:
    """What the folder list needs: cheap (a few lstat calls, no parsing)."""

    runnable: bool  # a model folder with both definition files: shows "Run this model"
    model_definition_path: str | None
    has_service_definition: bool


def _is_file(folder_fs: FolderFS, name: str) -> bool:
    return folders.folder_entry(folder_fs, name)[0] == "file"


def _exists(folder_fs: FolderFS, name: str) -> bool:
    return folders.folder_entry(folder_fs, name)[0] is not None


def store_info(folder: Folder) -> StoreInfo:
    folder_fs = FolderFS(folder.host_path)
    found = next((name for name in MODEL_DEFINITION_NAMES if _is_file(folder_fs, name)), None)
    service = _is_file(folder_fs, SERVICE_DEFINITION_NAME)
    runnable = folder.usage_mode == Folder.UsageMode.MODEL and found is not None and service
    return StoreInfo(runnable=runnable, model_definition_path=found, has_service_definition=service)


def _read(folder_fs: FolderFS, name: str) -> bytes:
    """A definition file's bytes, size-capped and never through a symlink (serving.folders'
    reader, so the launcher words every problem as ``validate_model_folder`` does)."""
    data = folders.read_folder_file(folder_fs, name)
    if data is None:
        raise DefinitionError([Problem(name, "", "does not exist in this folder")])
    return data


def launcher_values(
    folder: Folder, runtime: str | None = "custom", definition_path: str | None = None
) -> dict[str, Any]:
    """The service launcher pre-filled from the folder (S1.3, S3.2), with every problem in its files.

    Problems never raise: the launcher shows them next to the fields (file, field path, line), and the
    user may still fix the values by hand. ``runtime`` None: the runtime the folder describes (the
    first known runtime its service-definition.toml has a section for, else Custom). ``warnings``:
    what the files say that is not used (unknown keys, with a "did you mean").
    """
    from serving.core.runtimes import RUNTIMES

    folder_fs = FolderFS(folder.host_path)
    if runtime is None:
        runtime = folders.folder_runtime(folder)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    variant = RUNTIMES.get(runtime)
    if variant is None:
        problems.append(Problem("", "runtime", f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}"))

    # The first default name present at all: a symlink there is then read, refused and reported
    # ("is a symbolic link"), rather than called missing.
    model_definition_path = definition_path or next(
        (name for name in MODEL_DEFINITION_NAMES if _is_file(folder_fs, name)),
        next((name for name in MODEL_DEFINITION_NAMES if _exists(folder_fs, name)), MODEL_DEFINITION_NAMES[0]),
    )
    needs_definition = variant is None or variant.needs_definition_file
    present = False
    try:
        folder_fs.stat(model_definition_path)
        present = True
    except fsmod.PathNotFound:
        if needs_definition:
            problems.append(
                Problem(model_definition_path, "", f"is missing from the folder; the {runtime} runtime needs it")
            )
    except fsmod.FsError as exc:  # a bad path typed into the launcher
        problems.append(Problem(model_definition_path, "", exc.message))
    if present:
        try:
            data = _read(folder_fs, model_definition_path)
            model_definition = definitions.parse_model_definition(data, model_definition_path)
            warnings.extend(model_definition.warnings)
            if needs_definition and model_definition.primary.service is None:
                problems.append(
                    Problem(model_definition_path, "models[0].service", f"is required to start the {runtime} runtime")
                )
        except DefinitionError as exc:
            problems.extend(exc.problems)

    image = architecture = ""
    resources: dict[str, float] = {}
    environ: dict[str, str] = {}
    resource_opts: dict[str, int] = {}
    try:
        folder_fs.stat(SERVICE_DEFINITION_NAME)
        has_service_definition = True
    except fsmod.FsError:
        has_service_definition = False  # optional: defaults then come from the platform
    if has_service_definition:
        try:
            data = _read(folder_fs, SERVICE_DEFINITION_NAME)
            service_definition = definitions.read_service_definition(data, SERVICE_DEFINITION_NAME)
            # Only this runtime's section counts: a broken [nim.*] does not take [vllm.*]'s defaults away.
            problems.extend(service_definition.problems_for(runtime))
            warnings.extend(service_definition.warnings_for(runtime))
            resolved = definitions.resolve_service_defaults(service_definition, runtime)
            if resolved is not None:
                image, architecture = resolved.image, resolved.architecture
                resources = slots.normalize(resolved.resources)
                environ = dict(resolved.environ)
                resource_opts = dict(resolved.resource_opts)
        except DefinitionError as exc:
            problems.extend(exc.problems)
        except slots.SlotError as exc:
            problems.append(Problem(SERVICE_DEFINITION_NAME, f"{runtime}.resource_slots", str(exc)))

    return {
        "folder": str(folder.pk),
        "folder_name": folder.name,
        "runtime": runtime,
        "image": image or settings.DEFAULT_IMAGE,
        "image_from_folder": bool(image),
        "architecture": architecture,
        "resources": resources,
        "environ": environ,
        "resource_opts": resource_opts,  # [runtime.resource_opts]: shmem in bytes
        "model_mount": DEFAULT_MODEL_MOUNT,
        "model_definition_path": model_definition_path,
        "has_service_definition": has_service_definition,
        # As in the folder list: both files present as regular files (a symlink is reported, not run).
        "runnable": folder.usage_mode == Folder.UsageMode.MODEL
        and _is_file(folder_fs, model_definition_path)
        and _is_file(folder_fs, SERVICE_DEFINITION_NAME),
        "problems": [p.to_dict() for p in problems],
        "warnings": [p.to_dict() for p in warnings],
    }
