"""Launcher defaults from a model folder's ``service-definition.toml`` (S3.2, S1.3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.core import definitions, slots
from storage.fs import FolderFS
from storage.models import Folder

SERVICE_DEFINITION_FILE = "service-definition.toml"


@dataclass(frozen=True)
class FolderDefaults:
    image: str = ""
    architecture: str = ""
    resources: dict[str, float] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # why the file could not be used, in words


def folder_defaults(folder: Folder, runtime: str) -> FolderDefaults:
    """The section of the folder's service definition for ``runtime``, or empty defaults.

    A missing file is normal (defaults are optional); a broken one does not block creating the
    service, its problems are reported so the launcher can show them next to the fields. The file
    is read through storage.fs: a symlink planted in the folder (by a replica that can write
    there) is reported, never followed, so no host file becomes the service's defaults.
    """
    try:
        data = definitions.read_folder_file(FolderFS(folder.host_path), SERVICE_DEFINITION_FILE)
        if data is None:
            return FolderDefaults()
        service_definition = definitions.parse_service_definition(data, SERVICE_DEFINITION_FILE)
    except definitions.DefinitionError as exc:
        return FolderDefaults(problems=tuple(str(p) for p in exc.problems))
    resolved = definitions.resolve_service_defaults(service_definition, runtime)
    if resolved is None:
        return FolderDefaults()
    return FolderDefaults(
        image=resolved.image,
        architecture=resolved.architecture,
        resources=slots.normalize(resolved.resources),
        environ=dict(resolved.environ),
    )
