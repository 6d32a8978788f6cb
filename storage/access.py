"""Who may do what with a folder (one helper, docs/architecture.md): a stranger gets 404, never a hint.

* See the folder and read its files: the owner, members of the folder's project, operators.
* Write its files (upload, create directory, move, delete files): the same people. A project folder
  is a shared workspace, so every member works in it, as in the original's group folders.
* Manage the folder itself (rename, change usage mode or quota, delete it): the owner, the project's
  managers and operators. Teammates get 403 for these: they can see the folder, so a 404 would lie.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404

from accounts.models import Membership
from storage.models import Folder


def can_manage_folder(user: Any, folder: Folder) -> bool:
    if user.is_superuser or folder.owner_id == user.pk:
        return True
    return (
        folder.project_id is not None
        and Membership.objects.filter(user=user, project_id=folder.project_id, role=Membership.Role.MANAGER).exists()
    )


def can_write_files(user: Any, folder: Folder) -> bool:
    """Everyone who can see a folder may change its files (see the module docstring)."""
    return bool(getattr(user, "is_authenticated", False) and getattr(user, "is_active", False))


def access_folder(user: Any, folder_id: Any, *, write: bool = False, manage: bool = False) -> Folder:
    """The folder if ``user`` may see it (404 otherwise); ``write``: its files, ``manage``: the folder (403)."""
    try:
        folder = Folder.objects.visible_to(user).select_related("owner", "project").get(pk=folder_id)
    except (Folder.DoesNotExist, ValueError, TypeError, ValidationError):
        raise Http404("No such folder.") from None
    if manage and not can_manage_folder(user, folder):
        raise PermissionDenied("Only the owner, a project manager or an operator can change this folder.")
    if write and not can_write_files(user, folder):
        raise PermissionDenied("You can not change the files of this folder.")
    return folder
