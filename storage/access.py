"""Who may do what with a folder (one helper, DESIGN.md §3): a stranger gets 404, never a hint.

Read and write files: the owner, members of the folder's project, operators.
Rename, change mode, delete the folder: the owner, the project's managers, operators.
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


def access_folder(user: Any, folder_id: Any, *, manage: bool = False) -> Folder:
    try:
        folder = Folder.objects.visible_to(user).select_related("owner", "project").get(pk=folder_id)
    except (Folder.DoesNotExist, ValueError, TypeError, ValidationError):
        raise Http404("No such folder.") from None
    if manage and not can_manage_folder(user, folder):
        raise PermissionDenied("Only the owner, a project manager or an operator can change this folder.")
    return folder
