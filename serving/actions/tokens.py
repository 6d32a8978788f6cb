"""The writers of endpoint tokens (S7.1; docs/architecture.md): issue, revoke, and record their use.

A token's secret is shown once, at issue; the rows keep only its lookup id and HMAC digest
(``serving.core.tokens``). Issuing and revoking update the proxies' routing table after the commit,
so every proxy accepts or refuses the token within a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from serving.actions.services import publish_routing
from serving.bus.events import record_event
from serving.core import tokens
from serving.models import Endpoint, EndpointToken


@transaction.atomic
def do_issue_token(endpoint: Endpoint, *, acting_user: User, expires_at: datetime) -> tuple[EndpointToken, str]:
    """Generate a token for a private endpoint (S7.1); returns the row and the token (shown once)."""
    if endpoint.lifecycle != Endpoint.Lifecycle.CREATED:
        raise ValidationError({"detail": "A terminated service can not get new tokens."})
    if expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry date must be in the future."})
    minted = tokens.mint(tokens.ENDPOINT_TOKEN_KIND, settings.TOKEN_HMAC_KEY)
    token = EndpointToken.objects.create(
        endpoint=endpoint,
        created_by=acting_user,
        lookup=minted.lookup,
        digest=minted.digest,
        expires_at=expires_at,
    )
    record_event(
        endpoint,
        "token_issued",
        # Read on the event log by people: minutes and the zone, not isoformat's microseconds.
        f"Token {token.prefix}… issued, expires {expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC.",
        actor=acting_user,
        data={"token_id": str(token.pk)},
    )
    publish_routing(endpoint.pk)
    return token, minted.token


@transaction.atomic
def do_revoke_token(token: EndpointToken, *, acting_user: User | None) -> None:
    """Revoke a token; every proxy refuses it within a second (pub/sub)."""
    if EndpointToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        record_event(
            token.endpoint,
            "token_revoked",
            f"Token {token.prefix}… revoked.",
            actor=acting_user,
            data={"token_id": str(token.pk)},
        )
    publish_routing(token.endpoint_id)


def do_record_token_usage(used: Mapping[str, float]) -> int:
    """Move the proxies' batched last-use times onto the tokens (never a DB write per request).

    ``used`` maps a token's lookup to epoch seconds. A time only moves forward, so an old batch
    replayed late cannot hide a newer use. No audit event: this is bookkeeping, not a change anyone
    made. Returns how many tokens were updated."""
    if not used:
        return 0
    changed = []
    with transaction.atomic():
        for token in EndpointToken.objects.select_for_update().filter(lookup__in=list(used)):
            when = datetime.fromtimestamp(used[token.lookup], tz=timezone.get_current_timezone())
            if token.last_used_at is None or when > token.last_used_at:
                token.last_used_at = when
                changed.append(token)
        EndpointToken.objects.bulk_update(changed, ["last_used_at"])
    return len(changed)
