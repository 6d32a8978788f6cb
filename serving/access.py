"""One authorization helper per object kind (DESIGN.md §3): a stranger gets 404, never a hint.

Read: the owner, members of the service's project, operators (superusers).
Write (modify, scale, terminate, rules): the owner, the project's managers, operators.
Tokens may be issued by anyone who can read the service: teammates call it too.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404

from accounts.models import Membership
from serving.models import Endpoint


def can_write_endpoint(user: Any, endpoint: Endpoint) -> bool:
    if user.is_superuser or endpoint.owner_id == user.pk:
        return True
    if endpoint.project_id is None:
        return False
    return Membership.objects.filter(user=user, project_id=endpoint.project_id, role=Membership.Role.MANAGER).exists()


def access_endpoint(user: Any, endpoint_id: Any, *, write: bool = False, include_destroyed: bool = False) -> Endpoint:
    """The endpoint if ``user`` may see it (404 otherwise) and, with ``write``, change it (403)."""
    queryset = Endpoint.objects.visible_to(user).select_related("owner", "project", "model_folder", "preset")
    if not include_destroyed:
        queryset = queryset.live()
    try:
        endpoint = queryset.get(pk=endpoint_id)
    except (Endpoint.DoesNotExist, ValueError, TypeError, ValidationError):
        raise Http404("No such service.") from None
    if write and not can_write_endpoint(user, endpoint):
        raise PermissionDenied("Only the owner, a project manager or an operator can change this service.")
    return endpoint
