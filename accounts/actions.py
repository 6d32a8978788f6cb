"""Writers of account rows (API keys, memberships); views and commands call these, nothing else."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiKey, Membership, Project, User
from serving.core import tokens


def do_issue_api_key(user: User, *, name: str = "", expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Create a personal API key; returns the row and the key itself (shown once, never stored)."""
    minted = tokens.mint(tokens.API_KEY_KIND, settings.TOKEN_HMAC_KEY)
    key = ApiKey.objects.create(user=user, name=name, lookup=minted.lookup, digest=minted.digest, expires_at=expires_at)
    return key, minted.token


def do_revoke_api_key(key: ApiKey) -> None:
    """Revoke an API key; it stops working on the next request."""
    ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


@transaction.atomic
def do_add_member(project: Project, user: User, role: str = Membership.Role.MEMBER) -> Membership:
    """Add ``user`` to ``project`` with ``role`` (or change the role of an existing member)."""
    membership, _ = Membership.objects.update_or_create(project=project, user=user, defaults={"role": role})
    return membership
