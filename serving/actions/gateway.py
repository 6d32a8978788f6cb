"""The writers of gateway keys (issue 17; proxy/gateway.py): create and revoke.

A key's secret is shown once, at creation; the row keeps its lookup id and HMAC digest
(``serving.core.tokens``), as endpoint tokens do. Both changes reach every proxy after the commit,
over the routing table's pub/sub channel, so a revoked key is refused within a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.models import Project, User
from serving.bus import routing
from serving.core import tokens
from serving.models import Endpoint, GatewayKey


@transaction.atomic
def do_create_gateway_key(
    *,
    acting_user: User,
    name: str,
    expires_at: datetime,
    project: Project | None = None,
    services: Iterable[Endpoint] = (),
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrency: int | None = None,
) -> tuple[GatewayKey, str]:
    """A new key (returned with its secret, shown once). ``services``: the caller checked they may
    call each; they must belong to the key's scope (the project, or what the user may call)."""
    if expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry date must be in the future."})
    chosen = list(services)
    for endpoint in chosen:
        if endpoint.lifecycle != Endpoint.Lifecycle.CREATED:
            raise ValidationError({"services": f"Service {endpoint.name!r} is terminated; choose a live one."})
        if project is not None and endpoint.project_id != project.pk:
            raise ValidationError(
                {
                    "services": f"Service {endpoint.name!r} is not in project {project.name!r}: a project's key "
                    "calls only the project's services."
                }
            )
    minted = tokens.mint(tokens.GATEWAY_KEY_KIND, settings.TOKEN_HMAC_KEY)
    key = GatewayKey.objects.create(
        name=name,
        owner=acting_user,
        project=project,
        lookup=minted.lookup,
        digest=minted.digest,
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_concurrency=max_concurrency,
    )
    key.services.set(chosen)
    transaction.on_commit(lambda: routing.publish_gateway_key_safely(str(key.pk)))
    return key, minted.token


@transaction.atomic
def do_revoke_gateway_key(key: GatewayKey) -> None:
    """Revoke a key; every proxy refuses it within a second (pub/sub)."""
    GatewayKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    transaction.on_commit(lambda: routing.publish_gateway_key_safely(str(key.pk)))
