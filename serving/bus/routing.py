"""The only bridge from the control plane to the data plane: the routing table in Redis.

For each live endpoint, one JSON entry in the hash ``<prefix>:routing`` keyed by slug: whether it is
public, its healthy routes (address and weight) and the digests of its active tokens. Every change
is also published on ``<prefix>:routing:updates`` so proxies apply it within milliseconds; a proxy
also re-reads the whole hash periodically, so a lost message heals by itself.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from django.conf import settings
from django.utils import timezone

from accounts.models import Membership
from serving.models import Endpoint, EndpointToken, GatewayKey, ModelAlias, Route, served_model_names

log = logging.getLogger(__name__)

_client: redis.Redis | None = None


def table_key() -> str:
    return f"{settings.REDIS_PREFIX}:routing"


def complete_key() -> str:
    """Set with every full write of the table: the proxies know the hash holds *every* endpoint. A
    Redis restarted without its data lacks it, and the proxies then keep their last table instead
    of dropping every endpoint until the next full write (proxy/table.py)."""
    return f"{settings.REDIS_PREFIX}:routing:complete"


def updates_channel() -> str:
    return f"{settings.REDIS_PREFIX}:routing:updates"


def get_redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    return _client


def build_entry(endpoint: Endpoint, routes: list[Route], active_tokens: list[EndpointToken]) -> dict[str, Any]:
    """The proxy's view of one endpoint (plain data; see proxy/table.py for the reader)."""
    status = endpoint.compute_status(routes)
    return {
        "id": str(endpoint.pk),
        "slug": endpoint.slug,
        "name": endpoint.name,
        "public": endpoint.open_to_public,
        "status": status,
        # The gateway (proxy/gateway.py): the model names it answers to, and whose keys may call it.
        "models": served_model_names(endpoint),
        "project": str(endpoint.project_id or ""),
        "owner": str(endpoint.owner_id),
        "routes": [
            {"id": str(r.pk), "host": r.host, "port": r.port, "weight": r.traffic_ratio, "revision": r.spec_version}
            for r in routes
            if r.status == Route.Status.HEALTHY and r.host and r.port and r.traffic_ratio > 0
        ],
        # Revision shares (issue 16): {"<n>": percent}; empty: every route by its weight alone.
        "shares": revision_shares(endpoint),
        "tokens": {t.lookup: {"digest": t.digest, "expires": t.expires_at.timestamp()} for t in active_tokens},
        # Off: the proxy removes every cookie both ways. On: it still removes the web app's own
        # cookies, named here as this installation configures them (the proxy has no Django).
        # Never without SERVING_DOMAIN (a service turned on before that rule): with path-based
        # addresses every service shares one origin and so each other's cookies.
        "forward_cookies": endpoint.forward_cookies and bool(settings.SERVING_DOMAIN),
        "platform_cookies": platform_cookie_names(),
        # Which requests the proxy sends again after their replica closed unanswered (proxy/exchange.py).
        "retry_policy": endpoint.retry_policy,
        # Scale to zero: with no route the proxy holds a request and asks for a wake (serving/control/sleep.py)
        # instead of answering 503: while the service may sleep, sleeps, or is waking.
        "scale_to_zero": endpoint.idle_timeout is not None
        or endpoint.slept_at is not None
        or endpoint.woke_at is not None,
    }


def gateway_keys_key() -> str:
    """The gateway keys the proxies accept (proxy/gateway.py): lookup -> JSON entry."""
    return f"{settings.REDIS_PREFIX}:gateway:keys"


def build_key_entry(key: GatewayKey, projects: list[str]) -> dict[str, Any]:
    """The proxy's view of a gateway key: its digest, expiry and scope. ``projects``: a user key's
    projects (the user's memberships now: a later change reaches the proxies with the next full write)."""
    return {
        "digest": key.digest,
        "expires": key.expires_at.timestamp(),
        "services": [str(pk) for pk in key.services.values_list("pk", flat=True)],
        "projects": [str(key.project_id)] if key.project_id else projects,
        "owner": "" if key.project_id else str(key.owner_id),
        "requests_per_minute": key.requests_per_minute,
        "tokens_per_minute": key.tokens_per_minute,
        "max_concurrency": key.max_concurrency,
    }


def _user_projects(user_id: Any) -> list[str]:
    return [str(p) for p in Membership.objects.filter(user_id=user_id).values_list("project_id", flat=True)]


def publish_gateway_key(key_id: str) -> None:
    """Write one gateway key's entry (or remove it when revoked or gone) and announce the change."""
    key = GatewayKey.objects.filter(pk=key_id).first()
    client = get_redis()
    if key is None:
        return
    pipe = client.pipeline()
    if not key.is_active():
        pipe.hdel(gateway_keys_key(), key.lookup)
        pipe.publish(updates_channel(), json.dumps({"gateway_key": key.lookup, "entry": None}))
    else:
        entry = build_key_entry(key, _user_projects(key.owner_id))
        pipe.hset(gateway_keys_key(), key.lookup, json.dumps(entry, separators=(",", ":")))
        pipe.publish(updates_channel(), json.dumps({"gateway_key": key.lookup, "entry": entry}))
    pipe.execute()


def publish_gateway_key_safely(key_id: str) -> None:
    try:
        publish_gateway_key(key_id)
    except redis.RedisError as exc:
        log.warning("gateway key update %s deferred: %s", key_id, exc)


def aliases_key() -> str:
    """The model aliases the proxies route (proxy/gateway.py): alias id -> JSON entry."""
    return f"{settings.REDIS_PREFIX}:gateway:aliases"


def build_alias_entry(alias: ModelAlias) -> dict[str, Any]:
    """The proxy's view of an alias: its name, scope (like a service's) and backends in order."""
    return {
        "name": alias.name,
        "project": str(alias.project_id or ""),
        "owner": str(alias.owner_id),
        "backends": [{"service": str(b.endpoint_id), "weight": b.weight} for b in alias.backends.all()],
    }


def publish_alias(alias_id: str) -> None:
    """Write one alias's entry (or remove it when deleted) and announce the change."""
    alias = ModelAlias.objects.filter(pk=alias_id).first()
    entry = build_alias_entry(alias) if alias is not None else None
    pipe = get_redis().pipeline()
    if entry is None:
        pipe.hdel(aliases_key(), alias_id)
    else:
        pipe.hset(aliases_key(), alias_id, json.dumps(entry, separators=(",", ":")))
    pipe.publish(updates_channel(), json.dumps({"alias": alias_id, "entry": entry}, separators=(",", ":")))
    pipe.execute()


def publish_alias_safely(alias_id: str) -> None:
    try:
        publish_alias(alias_id)
    except redis.RedisError as exc:
        log.warning("model alias update %s deferred: %s", alias_id, exc)


def revision_shares(endpoint: Endpoint) -> dict[str, int]:
    """The proxy's split by revision: whole percents, only revisions with a share."""
    return {str(n): int(share) for n, share in sorted((endpoint.traffic or {}).items()) if int(share) > 0}


def platform_cookie_names() -> list[str]:
    """The web app's cookies, which must never reach a replica: the session would let its owner act
    as the caller on the platform, and the CSRF and language cookies are the platform's too."""
    return sorted({settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME, settings.LANGUAGE_COOKIE_NAME})


def publish_endpoint(endpoint_id: str) -> None:
    """Write one endpoint's entry (or remove it when destroyed) and announce the change."""
    endpoint = Endpoint.objects.filter(pk=endpoint_id).first()
    client = get_redis()
    if endpoint is None or endpoint.lifecycle == Endpoint.Lifecycle.DESTROYED:
        slug = endpoint.slug if endpoint is not None else None
        if slug:
            pipe = client.pipeline()
            pipe.hdel(table_key(), slug)
            pipe.publish(updates_channel(), json.dumps({"slug": slug, "entry": None}))
            pipe.execute()
        return
    routes = list(endpoint.routes.all())
    now = timezone.now()
    active = list(endpoint.tokens.filter(revoked_at__isnull=True, expires_at__gt=now))
    entry = build_entry(endpoint, routes, active)
    payload = json.dumps(entry, separators=(",", ":"))
    pipe = client.pipeline()
    pipe.hset(table_key(), endpoint.slug, payload)
    pipe.publish(updates_channel(), json.dumps({"slug": endpoint.slug, "entry": entry}, separators=(",", ":")))
    pipe.execute()


def publish_endpoint_safely(endpoint_id: str) -> None:
    """publish_endpoint for on-commit hooks: Redis being down must not fail the user's request;
    the periodic full publish (reconcile tick) repairs the table when Redis is back."""
    try:
        publish_endpoint(endpoint_id)
    except redis.RedisError as exc:
        log.warning("routing table update for endpoint %s deferred: %s", endpoint_id, exc)


def publish_all() -> int:
    """Rewrite the whole table from the database (repairs anything missed); returns entries written."""
    client = get_redis()
    now = timezone.now()
    live = list(Endpoint.objects.live().prefetch_related("routes"))
    tokens_by_endpoint: dict[Any, list[EndpointToken]] = {}
    for token in EndpointToken.objects.filter(endpoint__in=live, revoked_at__isnull=True, expires_at__gt=now):
        tokens_by_endpoint.setdefault(token.endpoint_id, []).append(token)
    entries: dict[str | bytes, bytes | float | int | str] = {
        e.slug: json.dumps(
            build_entry(e, list(e.routes.all()), tokens_by_endpoint.get(e.pk, [])), separators=(",", ":")
        )
        for e in live
    }
    stale = set(k.decode() for k in client.hkeys(table_key())) - set(entries)
    keys: dict[str | bytes, bytes | float | int | str] = {
        key.lookup: json.dumps(build_key_entry(key, _user_projects(key.owner_id)), separators=(",", ":"))
        for key in GatewayKey.objects.filter(revoked_at__isnull=True, expires_at__gt=now)
    }
    aliases: dict[str | bytes, bytes | float | int | str] = {
        str(alias.pk): json.dumps(build_alias_entry(alias), separators=(",", ":"))
        for alias in ModelAlias.objects.prefetch_related("backends")
    }
    pipe = client.pipeline()  # MULTI/EXEC: a proxy reads the table, the keys and the mark together
    if stale:
        pipe.hdel(table_key(), *stale)
    if entries:
        pipe.hset(table_key(), mapping=entries)
    pipe.delete(gateway_keys_key())
    if keys:
        pipe.hset(gateway_keys_key(), mapping=keys)
    pipe.delete(aliases_key())
    if aliases:
        pipe.hset(aliases_key(), mapping=aliases)
    pipe.set(complete_key(), timezone.now().isoformat())
    pipe.publish(updates_channel(), json.dumps({"resync": True}))
    pipe.execute()
    return len(entries)


def resent_key() -> str:
    """Where the proxies count requests they sent again to another replica (proxy/report.py): slug -> n."""
    return f"{settings.REDIS_PREFIX}:proxy:resent"


def failovers_key() -> str:
    """Where the proxies count gateway requests a service failed unanswered and that went on to
    another backend of their model name (proxy/report.py): slug of the service that failed -> n."""
    return f"{settings.REDIS_PREFIX}:proxy:failovers"


def take_resent() -> dict[str, int]:
    """Take (read and clear, atomically) the proxies' counts of re-sent requests, by slug."""
    return _take_counts(resent_key())


def take_failovers() -> dict[str, int]:
    """Take (read and clear, atomically) the proxies' counts of gateway failovers, by slug."""
    return _take_counts(failovers_key())


def _take_counts(key: str) -> dict[str, int]:
    pipe = get_redis().pipeline(transaction=True)
    pipe.hgetall(key)
    pipe.delete(key)
    raw, _ = pipe.execute()
    counts: dict[str, int] = {}
    for slug, count in raw.items():
        try:
            counts[slug.decode()] = int(count)
        except (UnicodeDecodeError, ValueError):
            continue
    return counts


def wake_list_key() -> str:
    """The list of wake requests the proxies push for sleeping services (proxy/report.py)."""
    return f"{settings.REDIS_PREFIX}:wake"


def wake_dedupe_key(slug: str) -> str:
    """Set with NX by the proxy that asks first: one wake per service, however many proxies hold requests."""
    return f"{settings.REDIS_PREFIX}:wake:{slug}"


def token_usage_key() -> str:
    """Where the proxies batch tokens' last use (proxy/report.py): lookup -> epoch seconds."""
    return f"{settings.REDIS_PREFIX}:tokens:last_used"


def take_token_usage() -> dict[str, float]:
    """Take (read and clear, atomically) the proxies' batched last-use times of tokens.

    A proxy that writes between our read and our delete cannot lose a time: MULTI/EXEC runs the two
    as one step. Unparseable values are dropped (they can only come from a foreign writer)."""
    pipe = get_redis().pipeline(transaction=True)
    pipe.hgetall(token_usage_key())
    pipe.delete(token_usage_key())
    raw, _ = pipe.execute()
    used: dict[str, float] = {}
    for lookup, when in raw.items():
        try:
            used[lookup.decode()] = float(when)
        except (UnicodeDecodeError, ValueError):
            continue
    return used
