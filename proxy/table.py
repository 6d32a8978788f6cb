"""The routing table in memory: a full load from Redis at start, pub/sub updates, periodic resync.

Written by ``serving/bus/routing.py``: hash ``<prefix>:routing`` (slug -> JSON entry) and channel
``<prefix>:routing:updates`` (``{"slug", "entry"}``, entry null when the endpoint is gone, or
``{"resync": true}``). The follower subscribes first and loads the whole hash second, so no update
falls in between; it re-reads the hash every ``resync_interval`` so a lost message heals by itself.
When Redis is away the last table stays in use and the follower retries in the background; one log
line per outage, not one per attempt. A Redis that comes back *empty* (restarted without its data)
does not empty the table either: the key ``<prefix>:routing:complete``, set by every full write of
the table, is missing then, and until the control plane writes the table again (its next reconcile
tick) entries are applied but none is removed.

Objects here are updated in place (an entry for a known slug updates its Endpoint, a route with the
same id and address keeps its Route) because requests in flight hold them: their counters and pooled
connections must survive a table update.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from proxy.gateway import Alias, GatewayKey
from proxy.metrics import EndpointStats

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.upstream import Upstream

log = logging.getLogger("proxy.table")

_random = random.random
_monotonic = time.monotonic

# The web app's cookies under Django's default names: removed even when an entry names none (an
# entry from an older control plane), besides the names the entry gives (serving/bus/routing.py).
DEFAULT_PLATFORM_COOKIES = frozenset((b"sessionid", b"csrftoken", b"django_language"))
_cookie_sets: dict[tuple[str, ...], frozenset[bytes]] = {}


def platform_cookies(names: Any) -> frozenset[bytes]:
    """The cookie names (lower case) never passed to or from a replica; one shared set per list."""
    key = tuple(str(n) for n in names or ())
    found = _cookie_sets.get(key)
    if found is None:
        found = _cookie_sets[key] = DEFAULT_PLATFORM_COOKIES | {n.lower().encode("latin-1") for n in key}
    return found


class Route:
    """One healthy replica of an endpoint, with its pool of idle keep-alive connections."""

    __slots__ = (
        "codes",
        "down_until",
        "endpoint_slug",
        "failures",
        "gone",
        "host",
        "host_line",
        "id",
        "idle",
        "in_flight",
        "port",
        "weight",
    )

    def __init__(self, route_id: str, host: str, port: int, weight: float, endpoint_slug: str) -> None:
        self.id = route_id
        self.host = host
        self.port = port
        self.weight = weight
        self.endpoint_slug = endpoint_slug
        # The Host header replicas see: their own address, as nginx's proxy_pass sends by default.
        self.host_line = f"Host: {host}:{port}\r\n".encode("latin-1")
        self.idle: list[Upstream] = []  # LIFO: the warmest connection first, the oldest ones expire
        self.in_flight = 0
        self.down_until = 0.0
        self.failures = 0  # consecutive connect failures: the local down period doubles with each
        self.codes = [0, 0, 0, 0, 0, 0]  # responses by status class (index status // 100)
        self.gone = False

    def mark_down(self, now: float, base: float) -> bool:
        """Skip this route for a while after a refused connection; True when newly marked."""
        fresh = self.down_until <= now
        self.failures += 1
        self.down_until = now + min(base * (2 ** (self.failures - 1)), 30.0)
        return fresh

    def retire(self) -> None:
        """The route left the table: close its idle connections; busy ones close when done."""
        self.gone = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class Endpoint:
    """One endpoint (model service) as the proxy sees it."""

    __slots__ = (
        "by_revision",
        "capacity",
        "cumulative",
        "forward_cookies",
        "id",
        "in_flight",
        "models",
        "name",
        "owner",
        "platform_cookies",
        "project",
        "public",
        "raw",
        "retry_policy",
        "routes",
        "sleeps",
        "slug",
        "split",
        "stats",
        "status",
        "tokens",
        "total_weight",
        "waiters",
        "wake_sent",
    )

    def __init__(self, slug: str, stats: EndpointStats) -> None:
        self.slug = slug
        self.id = ""
        self.name = ""
        self.project = ""  # the gateway (proxy/gateway.py): whose keys may call it, and by which names
        self.owner = ""
        self.models: tuple[str, ...] = ()
        self.public = False
        self.forward_cookies = False  # cookies pass both ways, except the platform's own
        self.platform_cookies = DEFAULT_PLATFORM_COOKIES
        self.status = ""
        self.retry_policy = "inference"  # which requests are sent again (proxy/exchange.py retryable)
        self.sleeps = False  # scale to zero: a request with no route is held and wakes the service
        self.wake_sent = 0.0  # when this proxy last asked the control plane to wake it (monotonic)
        self.routes: list[Route] = []
        self.capacity = 1  # routes counted for the in-flight limit (at least one: held requests)
        self.cumulative: list[float] = []
        self.total_weight = 0.0
        self.tokens: dict[str, tuple[str, float]] = {}  # lookup -> (digest, expires epoch)
        self.in_flight = 0
        self.waiters: list[Exchange] = []  # requests held while no route is available
        self.stats = stats
        self.raw: bytes | None = None  # the hash value last applied: an unchanged entry is skipped
        # Revisions (issue 16): the routes of each revision (a client may pin one), and the groups
        # with a traffic share when the entry splits by revision (None: by route weight alone).
        self.by_revision: dict[int, RevisionRoutes] = {}
        self.split: list[RevisionRoutes] | None = None

    def update(self, entry: dict[str, Any]) -> list[Route]:
        """Apply an entry; returns the routes that left (for their pools to be closed)."""
        old = {r.id: r for r in self.routes}
        routes: list[Route] = []
        for raw in entry.get("routes") or ():
            route_id, host, port = str(raw["id"]), str(raw["host"]), int(raw["port"])
            weight = float(raw.get("weight", 1) or 0)
            if weight <= 0:
                continue
            route = old.get(route_id)
            if route is None or (route.host, route.port) != (host, port):
                route = Route(route_id, host, port, weight, self.slug)
            else:
                del old[route_id]
                route.weight = weight
            routes.append(route)
        tokens = {str(k): (str(v["digest"]), float(v["expires"])) for k, v in (entry.get("tokens") or {}).items()}
        self.id = str(entry.get("id", ""))
        self.name = str(entry.get("name", "") or self.slug)
        self.project = str(entry.get("project") or "")
        self.owner = str(entry.get("owner") or "")
        self.models = tuple(str(m) for m in entry.get("models") or ())
        self.public = bool(entry.get("public"))
        self.forward_cookies = entry.get("forward_cookies") is True
        self.platform_cookies = platform_cookies(entry.get("platform_cookies"))
        self.status = str(entry.get("status", "") or "")
        policy = entry.get("retry_policy")
        self.retry_policy = policy if policy in ("safe", "inference", "all") else "inference"
        self.sleeps = entry.get("scale_to_zero") is True
        self.tokens = tokens
        cumulative: list[float] = []
        total = 0.0
        for route in routes:
            total += route.weight
            cumulative.append(total)
        # Assigned last, together: pick() never sees routes and weights from two different entries.
        self.routes, self.cumulative, self.total_weight = routes, cumulative, total
        self.capacity = len(routes) or 1
        self.update_split(entry, routes)
        return list(old.values())

    def update_split(self, entry: dict[str, Any], routes: list[Route]) -> None:
        """Group the routes by revision and keep the entry's shares (issue 16). A group keeps its
        place in the smooth weighted round robin across updates, so a split stays exact."""
        revision_of = {str(raw["id"]): int(raw.get("revision") or 0) for raw in entry.get("routes") or ()}
        shares = {int(n): int(p) for n, p in (entry.get("shares") or {}).items() if int(p) > 0}
        members: dict[int, list[Route]] = {n: [] for n in shares}
        for route in routes:
            members.setdefault(revision_of.get(route.id, 0), []).append(route)
        old = self.by_revision
        groups: dict[int, RevisionRoutes] = {}
        for number, mine in members.items():
            group = old.get(number) or RevisionRoutes(number)
            group.set(mine, shares.get(number, 0))
            groups[number] = group
        # No split when one revision holds every route and all the traffic: the usual pick, no cost.
        split = [g for g in groups.values() if g.share > 0]
        if not shares or (len(split) == 1 and len(groups) == 1):
            self.by_revision, self.split = groups, None
        else:
            self.by_revision, self.split = groups, split

    def choose(self, now: float, exclude: list[Route] | None = None, pinned: int | None = None) -> Route | None:
        """The route for a request when the endpoint splits by revision or the client pins one
        (``X-Modelserve-Revision``): a revision by share (smooth weighted round robin: exact over
        any run of requests, a few additions each), then a route within it as ``pick`` chooses.
        A revision with no route left (not yet healthy, all excluded) gives its turn to the rest."""
        if pinned is not None:
            group = self.by_revision.get(pinned)
            return group.pick(now, exclude) if group is not None else None
        split = self.split
        if split is None:
            return self.pick(now, exclude)
        best: RevisionRoutes | None = None
        total = 0
        for group in split:
            if group.routes:
                group.current += group.share
                total += group.share
                if best is None or group.current > best.current:
                    best = group
        if best is None:
            return self.pick(now, exclude)
        best.current -= total
        return best.pick(now, exclude) or self.pick(now, exclude)

    def pick(self, now: float, exclude: list[Route] | None = None) -> Route | None:
        """Weighted power of two choices: two different routes drawn by weight, the one with fewer
        requests in flight per unit of weight wins (ties go to the first draw, so an idle endpoint
        splits traffic by weight). Routes marked down locally are skipped unless nothing else is
        left (the mark is a guess; a connect attempt is cheap); routes in ``exclude`` never."""
        routes = self.routes
        if not exclude:
            if len(routes) == 1:
                route = routes[0]
                if route.down_until <= now:
                    return route
            elif routes:
                cumulative, total = self.cumulative, self.total_weight
                i = bisect_right(cumulative, _random() * total)
                if i >= len(routes):  # float rounding at the very top
                    i = len(routes) - 1
                a = routes[i]
                # The second draw skips the first route's share of the weight: always another route.
                x = _random() * (total - a.weight)
                if x >= cumulative[i] - a.weight:
                    x += a.weight
                j = bisect_right(cumulative, x)
                if j == i or j >= len(routes):
                    j = (i + 1) % len(routes)
                b = routes[j]
                if a.down_until <= now and b.down_until <= now:
                    return a if a.in_flight * b.weight <= b.in_flight * a.weight else b
        return self._pick_slow(now, exclude or [])

    def _pick_slow(self, now: float, exclude: list[Route]) -> Route | None:
        candidates = [r for r in self.routes if r not in exclude]
        up = [r for r in candidates if r.down_until <= now]
        if up:
            candidates = up
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a = random.choices(candidates, weights=[r.weight for r in candidates])[0]
        others = [r for r in candidates if r is not a]
        b = random.choices(others, weights=[r.weight for r in others])[0]
        return a if a.in_flight * b.weight <= b.in_flight * a.weight else b


class RevisionRoutes:
    """The routes of one revision of an endpoint, chosen among as ``Endpoint.pick`` does."""

    __slots__ = ("cumulative", "current", "number", "routes", "share", "total_weight")

    def __init__(self, number: int) -> None:
        self.number = number
        self.routes: list[Route] = []
        self.cumulative: list[float] = []
        self.total_weight = 0.0
        self.share = 0
        self.current = 0  # the smooth weighted round robin's running credit

    def set(self, routes: list[Route], share: int) -> None:
        cumulative: list[float] = []
        total = 0.0
        for route in routes:
            total += route.weight
            cumulative.append(total)
        self.routes, self.cumulative, self.total_weight, self.share = routes, cumulative, total, share

    def pick(self, now: float, exclude: list[Route] | None = None) -> Route | None:
        return Endpoint.pick(self, now, exclude)  # type: ignore[arg-type]  # the same fields

    def _pick_slow(self, now: float, exclude: list[Route]) -> Route | None:
        return Endpoint._pick_slow(self, now, exclude)  # type: ignore[arg-type]


class Table:
    """The endpoints by slug, kept in step with Redis by a background follower task."""

    def __init__(self, redis_url: str, prefix: str, resync_interval: float) -> None:
        self.redis_url = redis_url
        self.key = f"{prefix}:routing"
        self.channel = f"{prefix}:routing:updates"
        self.complete_key = f"{prefix}:routing:complete"
        self.keys_key = f"{prefix}:gateway:keys"
        self.aliases_key = f"{prefix}:gateway:aliases"
        self.resync_interval = resync_interval
        self.endpoints: dict[str, Endpoint] = {}
        self.stats: dict[str, EndpointStats] = {}  # outlive their endpoint: counters never go back
        self.keys: dict[str, GatewayKey] = {}  # gateway keys by lookup (proxy/gateway.py)
        self.aliases: dict[str, Alias] = {}  # model aliases by id (proxy/gateway.py)
        self._models: dict[str, list[Endpoint]] | None = None  # model name -> endpoints; None: to rebuild
        self._alias_names: dict[str, list[Alias]] = {}  # alias name -> aliases (rebuilt with _models)
        self._by_id: dict[str, Endpoint] = {}  # endpoint id -> endpoint (rebuilt with _models)
        self.loaded = False
        self.loaded_at = 0.0  # epoch of the last full load
        self.connected = False
        self.on_routes: Callable[[Endpoint], None] | None = None  # wakes requests held for a route
        self._bad: set[str] = set()
        self._kept = False  # logged that an incomplete table in Redis was not applied
        self._task: asyncio.Task[None] | None = None

    # --- applying entries (pure, synchronous; unit-tested without Redis) ------------------------

    def apply(self, slug: str, entry: dict[str, Any] | None, raw: bytes | None = None) -> None:
        self._models = None
        if entry is None:
            gone = self.endpoints.pop(slug, None)
            if gone is not None:
                for route in gone.routes:
                    route.retire()
                gone.routes, gone.cumulative, gone.total_weight, gone.capacity = [], [], 0.0, 1
                gone.status = "TERMINATING"
                self._wake(gone)
            return
        endpoint = self.endpoints.get(slug)
        if endpoint is None:
            stats = self.stats.get(slug)
            if stats is None:
                stats = self.stats[slug] = EndpointStats()
            endpoint = Endpoint(slug, stats)
        try:
            left = endpoint.update(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if slug not in self._bad:  # once per bad entry, not once per resync
                log.warning("routing entry for %r ignored (%s: %s)", slug, exc.__class__.__name__, exc)
                self._bad.add(slug)
            return
        self._bad.discard(slug)
        endpoint.raw = raw
        self.endpoints[slug] = endpoint
        for route in left:
            route.retire()
        if endpoint.routes and endpoint.waiters:
            self._wake(endpoint)

    def by_model(self, name: str) -> list[Endpoint]:
        """The endpoints that declare the model ``name`` (names are unique per project, so several
        when keys of different projects use one name); the index is rebuilt after a change."""
        models = self._models
        if models is None:
            models = self._index()
        return models.get(name) or []

    def _index(self) -> dict[str, list[Endpoint]]:
        models: dict[str, list[Endpoint]] = {}
        by_id: dict[str, Endpoint] = {}
        for endpoint in self.endpoints.values():
            by_id[endpoint.id] = endpoint
            for model in endpoint.models:
                models.setdefault(model, []).append(endpoint)
        names: dict[str, list[Alias]] = {}
        for alias in self.aliases.values():
            names.setdefault(alias.name, []).append(alias)
        self._models, self._by_id, self._alias_names = models, by_id, names
        return models

    def aliases_named(self, name: str) -> list[Alias]:
        """The aliases called ``name`` (one per project at most)."""
        if self._models is None:
            self._index()
        return self._alias_names.get(name) or []

    def by_id(self, endpoint_id: str) -> Endpoint | None:
        if self._models is None:
            self._index()
        return self._by_id.get(endpoint_id)

    def apply_alias(self, alias_id: str, entry: dict[str, Any] | None) -> None:
        self._models = None
        if entry is None:
            self.aliases.pop(alias_id, None)
            return
        try:
            self.aliases[alias_id] = Alias.from_entry(alias_id, entry)
        except (KeyError, TypeError, ValueError) as exc:
            self.aliases.pop(alias_id, None)
            log.warning("model alias entry %r ignored (%s: %s)", alias_id, exc.__class__.__name__, exc)

    def load_aliases(self, entries: dict[bytes, bytes], complete: bool) -> None:
        aliases: dict[str, Alias] = {} if complete else dict(self.aliases)
        for alias_b, value in entries.items():
            alias_id = alias_b.decode()
            try:
                aliases[alias_id] = Alias.from_entry(alias_id, json.loads(value))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("model alias entry %r ignored (%s: %s)", alias_id, exc.__class__.__name__, exc)
        self.aliases = aliases
        self._models = None

    def apply_key(self, lookup: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.keys.pop(lookup, None)
            return
        try:
            self.keys[lookup] = GatewayKey.from_entry(lookup, entry)
        except (KeyError, TypeError, ValueError) as exc:
            self.keys.pop(lookup, None)
            log.warning("gateway key entry %r ignored (%s: %s)", lookup, exc.__class__.__name__, exc)

    def load_keys(self, entries: dict[bytes, bytes], complete: bool) -> None:
        keys: dict[str, GatewayKey] = {} if complete else dict(self.keys)
        for lookup_b, value in entries.items():
            lookup = lookup_b.decode()
            try:
                keys[lookup] = GatewayKey.from_entry(lookup, json.loads(value))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("gateway key entry %r ignored (%s: %s)", lookup, exc.__class__.__name__, exc)
        self.keys = keys

    def _wake(self, endpoint: Endpoint) -> None:
        if endpoint.waiters and self.on_routes is not None:
            self.on_routes(endpoint)

    def load(self, entries: dict[bytes, bytes], complete: bool = True) -> None:
        """Replace the table with a full read of the hash (unchanged entries cost one compare).

        ``complete`` False: the hash is not known to hold the whole table (Redis restarted empty and
        the control plane has not rewritten it yet): entries are applied, none is removed.
        """
        seen: set[str] = set()
        for slug_b, value in entries.items():
            slug = slug_b.decode()
            seen.add(slug)
            known = self.endpoints.get(slug)
            if known is not None and known.raw == value:
                continue
            try:
                entry = json.loads(value)
            except ValueError as exc:
                if slug not in self._bad:
                    log.warning("routing entry for %r is not JSON: %s", slug, exc)
                    self._bad.add(slug)
                continue
            self.apply(slug, entry, value)
        if complete or not self.loaded:
            for slug in [s for s in self.endpoints if s not in seen]:
                self.apply(slug, None)
        elif len(seen) < len(self.endpoints) and not self._kept:
            self._kept = True
            log.warning(
                "Redis holds no complete routing table (restarted empty?): keeping the last one (%d endpoints) "
                "until the control plane writes it again",
                len(self.endpoints),
            )
        if complete:
            self._kept = False
        self.loaded = True
        self.loaded_at = time.time()

    def handle_message(self, data: bytes) -> bool:
        """Apply one pub/sub message; True when it asks for a full re-read."""
        try:
            message = json.loads(data)
        except ValueError:
            return False
        if not isinstance(message, dict):
            return False
        if message.get("resync"):
            return True
        alias_id = message.get("alias")
        if isinstance(alias_id, str):
            entry = message.get("entry")
            self.apply_alias(alias_id, entry if isinstance(entry, dict) else None)
            return False
        lookup = message.get("gateway_key")
        if isinstance(lookup, str):
            entry = message.get("entry")
            self.apply_key(lookup, entry if isinstance(entry, dict) else None)
            return False
        slug = message.get("slug")
        if isinstance(slug, str):
            entry = message.get("entry")
            # raw=None: the next full load compares against the hash value and re-applies once.
            self.apply(slug, entry if isinstance(entry, dict) else None)
        return False

    # --- following Redis ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down: nothing to report
                await self._task

    async def _load_from(self, client: aioredis.Redis) -> None:
        entries, complete, keys, aliases = await _read_table(
            client, self.key, self.complete_key, self.keys_key, self.aliases_key
        )
        self.load(entries, complete)
        self.load_keys(keys, complete)
        self.load_aliases(aliases, complete)

    async def _follow(self) -> None:
        outage_since: float | None = None
        delay = 0.2
        loop = asyncio.get_running_loop()
        while True:
            client = aioredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=2, socket_timeout=10, socket_keepalive=True
            )
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._load_from(client)  # after subscribing: no update is missed
                self.connected = True
                delay = 0.2
                if outage_since is not None:
                    log.warning(
                        "Redis is back after %.0f s; routing table reloaded (%d endpoints)",
                        time.time() - outage_since,
                        len(self.endpoints),
                    )
                    outage_since = None
                next_resync = loop.time() + self.resync_interval
                while True:
                    timeout = max(0.01, next_resync - loop.time())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                    resync = False
                    if message is not None and message.get("type") == "message":
                        resync = self.handle_message(message["data"])
                    if resync or loop.time() >= next_resync:
                        await self._load_from(client)
                        next_resync = loop.time() + self.resync_interval
            except asyncio.CancelledError:
                await _close(pubsub, client)
                raise
            except Exception as exc:  # any Redis or network trouble: keep the table, retry later
                self.connected = False
                if outage_since is None:
                    outage_since = time.time()
                    log.warning(
                        "Redis at %s unreachable (%s: %s); serving from the last routing table (%d endpoints)",
                        self.redis_url,
                        exc.__class__.__name__,
                        exc,
                        len(self.endpoints),
                    )
                await _close(pubsub, client)
                await asyncio.sleep(delay)
                # At most 0.5 s between attempts: once Redis is back, a route change must reach the
                # proxy within 1 s (docs/architecture.md); one connection attempt per 0.5 s costs nothing.
                delay = min(delay * 2, 0.5)


async def _read_table(
    client: aioredis.Redis, key: str, complete_key: str, keys_key: str, aliases_key: str
) -> tuple[dict[bytes, bytes], bool, dict[bytes, bytes], dict[bytes, bytes]]:
    """The hash, whether it is complete, the gateway keys and the model aliases, in one MULTI (a full
    write sets all)."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(key)
    pipe.exists(complete_key)
    pipe.hgetall(keys_key)
    pipe.hgetall(aliases_key)
    entries, complete, keys, aliases = await pipe.execute()
    return entries, bool(complete), keys, aliases


async def _close(pubsub: Any, client: aioredis.Redis) -> None:
    for closer in (pubsub.aclose, client.aclose):
        try:
            await asyncio.wait_for(closer(), 1.0)
        except (Exception, asyncio.CancelledError):  # noqa: S112 - the connection is already broken
            continue
