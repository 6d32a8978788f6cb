"""The only writers of folder rows, folder directories and the files in them (docs/architecture.md).

Views parse and authorize (storage.access), then call exactly one of these. File actions go through
storage.fs, which refuses unsafe paths and symlinks; each change is logged with who did it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.models import Project, User
from storage.fs import Budget, Entry, FolderFS, QuotaExceeded, Upload, commit_uploads, format_bytes
from storage.models import Folder
from storage.quota import Hold

logger = logging.getLogger("storage.audit")


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
    _check_quota(quota_bytes, acting_user)
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
    logger.info("folder %s (%s) created by %s", folder.pk, folder.name, acting_user)
    return folder


def _check_quota(quota_bytes: int | None, acting_user: User) -> None:
    """Anyone may set a smaller quota than the default; only an operator may grant more."""
    if quota_bytes is None:
        return
    if quota_bytes < 0:
        raise ValidationError({"quota_bytes": "A quota is a number of bytes of at least 0."})
    if quota_bytes > settings.DEFAULT_FOLDER_QUOTA and not acting_user.is_superuser:
        raise ValidationError(
            {
                "quota_bytes": f"Only an operator can set a quota above the default of "
                f"{format_bytes(settings.DEFAULT_FOLDER_QUOTA)} ({settings.DEFAULT_FOLDER_QUOTA} bytes)."
            }
        )


def _mounted_by(folder: Folder) -> list[str]:
    # Imported here: storage sits below serving (a service mounts folders), and this is the one
    # question storage asks of it: which live services mount this folder.
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
    if "quota_bytes" in changes and changes["quota_bytes"] != folder.quota_bytes:
        _check_quota(changes["quota_bytes"], acting_user)
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
    logger.info("folder %s changed by %s: %s", folder.pk, acting_user, sorted(changes))
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
    folder_id, name = folder.pk, folder.name
    folder.delete()
    # The directory goes only once the row is surely gone; a failed transaction keeps both.
    transaction.on_commit(lambda: shutil.rmtree(path, ignore_errors=True))
    logger.info("folder %s (%s) deleted by %s", folder_id, name, acting_user)


# --- files -------------------------------------------------------------------------------------------


def folder_fs(folder: Folder) -> FolderFS:
    return FolderFS(folder.host_path)


def do_make_directory(folder: Folder, path: str, *, acting_user: User, parents: bool = False) -> Entry:
    """Create a directory in the folder (with ``parents``, the missing ones above it too)."""
    entry = folder_fs(folder).mkdir(path, parents=parents)
    logger.info("folder %s: %s created directory %r", folder.pk, acting_user, entry.path)
    return entry


def do_delete_path(folder: Folder, path: str, *, acting_user: User) -> Entry:
    """Delete a file, a symlink or a directory tree from the folder."""
    entry = folder_fs(folder).delete(path)
    logger.info("folder %s: %s deleted %s %r", folder.pk, acting_user, entry.type, entry.path)
    return entry


def do_move_path(folder: Folder, src: str, dst: str, *, acting_user: User) -> Entry:
    """Rename or move a file or directory inside the folder; never replaces an existing one."""
    entry = folder_fs(folder).move(src, dst)
    logger.info("folder %s: %s moved %r to %r", folder.pk, acting_user, src, entry.path)
    return entry


def do_upload_file(
    folder: Folder,
    path: str,
    chunks: Iterable[bytes],
    *,
    acting_user: User,
    content_length: int | None = None,
    hold: Hold | None = None,
) -> tuple[Entry, bool]:
    """Write one file from a stream of chunks: quota checked before and during, moved in place when complete.

    Returns (entry, created). On any error (quota, disk full, client gone) nothing in the folder changes.
    Its bytes are held while it streams (storage/quota.py), so a parallel upload sees them as taken,
    and they count towards the folder owner's storage limit too. ``hold``: made beforehand, in a
    thread that may use the database (the streaming path writes in a thread of its own).
    """
    fs = folder_fs(folder)
    used = fs.usage()
    hold = (hold or Hold(folder)).start(used)
    try:
        with fs.begin_upload(
            path, quota=folder.effective_quota, content_length=content_length, used=used, holder=hold
        ) as upload:
            for chunk in chunks:
                upload.write(chunk)
            entry, created = upload.commit()
    finally:
        hold.release()  # (after the commit: for an instant the bytes count twice, never zero times)
    logger.info("folder %s: %s uploaded %r (%d bytes)", folder.pk, acting_user, entry.path, entry.size)
    return entry, created


def begin_uploads(
    folder: Folder, content_length: int | None = None, hold: Hold | None = None
) -> tuple[FolderFS, Budget]:
    """The filesystem and a shared byte budget for a request that uploads many files (multipart).

    The request's declared length (files and form framing) is held at once against the quota and
    the owner's limit (storage/quota.py); release it with ``budget.release()`` when the request ends.
    """
    fs = folder_fs(folder)
    used = fs.usage()
    budget = Budget(folder.effective_quota - used, used=used, holder=(hold or Hold(folder)).start(used))
    if content_length:
        try:
            # (Not more than the quota leaves: the framing is not stored, the files are checked as they come.)
            budget.hold(min(content_length, budget.allowed))
        except QuotaExceeded as exc:
            raise QuotaExceeded(f"The upload was not saved: {exc.message}") from None
    return fs, budget


def do_commit_uploads(folder: Folder, uploads: list[Upload], *, acting_user: User) -> list[tuple[Entry, bool]]:
    """Move the files of a multipart request into place together (quota checked for all of them at once)."""
    results = commit_uploads(folder_fs(folder), uploads)
    for entry, _ in results:
        logger.info("folder %s: %s uploaded %r (%d bytes)", folder.pk, acting_user, entry.path, entry.size)
    return results
