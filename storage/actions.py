"""The only writers of folder rows and folder directories."""

from __future__ import annotations

import shutil
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.models import Project, User
from storage.models import Folder


def _name_taken(name: str) -> ValidationError:
    return ValidationError({"name": f"You already have a folder named {name!r}; choose another name."})


@transaction.atomic
def do_create_folder(
    *,
    acting_user: User,
    name: str,
    usage_mode: str = Folder.UsageMode.GENERAL,
    project: Project | None = None,
    quota_bytes: int | None = None,
) -> Folder:
    """Create a folder and its directory under STORAGE_ROOT (named by id)."""
    folder = Folder(owner=acting_user, name=name, usage_mode=usage_mode, project=project, quota_bytes=quota_bytes)
    folder.full_clean(exclude=["owner", "project"], validate_constraints=False)
    if Folder.objects.filter(owner=acting_user, name=name).exists():
        raise _name_taken(name)
    try:
        with transaction.atomic():
            folder.save()
    except IntegrityError:
        raise _name_taken(name) from None
    folder.host_path.mkdir(parents=True, exist_ok=True)
    return folder


def _mounted_by(folder: Folder) -> list[str]:
    from serving.models import Endpoint

    names = []
    for endpoint in Endpoint.objects.live().only("name", "model_folder_id", "extra_mounts"):
        if endpoint.model_folder_id == folder.pk or any(
            str(m.get("folder")) == str(folder.pk) for m in endpoint.extra_mounts or []
        ):
            names.append(endpoint.name)
    return names


@transaction.atomic
def do_update_folder(folder: Folder, *, acting_user: User, changes: dict[str, Any]) -> Folder:
    """Rename, change usage mode or quota. A mounted folder keeps its usage mode."""
    if "usage_mode" in changes and changes["usage_mode"] != folder.usage_mode:
        users = _mounted_by(folder)
        if users:
            raise ValidationError(
                {
                    "usage_mode": f"Folder {folder.name!r} is mounted by service(s) {', '.join(users)}; terminate "
                    "them before changing its usage mode."
                }
            )
    for field, value in changes.items():
        setattr(folder, field, value)
    folder.full_clean(exclude=["owner", "project"], validate_constraints=False)
    if "name" in changes and Folder.objects.filter(owner=folder.owner, name=folder.name).exclude(pk=folder.pk).exists():
        raise _name_taken(folder.name)
    folder.save()
    return folder


@transaction.atomic
def do_delete_folder(folder: Folder, *, acting_user: User) -> None:
    """Delete a folder and its files; refused while a live service mounts it."""
    users = _mounted_by(folder)
    if users:
        raise ValidationError(
            {"detail": f"Folder {folder.name!r} is mounted by service(s) {', '.join(users)}; terminate them first."}
        )
    path = folder.host_path
    folder.delete()
    transaction.on_commit(lambda: shutil.rmtree(path, ignore_errors=True))
