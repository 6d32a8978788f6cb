"""Gateway keys' limits (issue 17): concurrent requests, requests per minute, tokens per minute.

**Concurrency** is a counter per key in each proxy process (``KeyState.in_flight``): sharing it would
cost a Redis round trip at each request's start and end, so with N proxies behind a balancer a key
may have up to N x ``max_concurrency`` requests in flight (each proxy holds the limit itself).

**Per-minute budgets** hold across every proxy, with no Redis round trip on a request's path. Each
budget (a key's requests, or its tokens) is counted in fixed minute windows (epoch // 60, so proxies
agree through their clocks) in one Redis counter ``<prefix>:gateway:rl:<lookup>:<r|t>:<minute>``
(expires after 2 minutes). A proxy never asks Redis per request: it takes a **lease**, a slice of the
minute's budget (``LEASE_SCRIPT``: atomically add what it used beyond its leases, then take
min(slice, limit - counter)), serves from it in memory, and takes the next slice in the background
when half of it is used. The first requests of a minute do not wait either: each proxy may admit up
to ``allowance`` requests on credit while its first lease is on the way; they are charged to the
counter with that lease (added even past the limit). So over a minute, every proxy together admits
at most ``limit + proxies x allowance`` requests (``allowance`` = ceil(limit / 200): 3 of 600, i.e.
0.5% per proxy); a slice leased and not used before the minute ends is lost, so they may also admit
up to one slice per proxy fewer than the limit. A request that finds the lease empty and the credit
spent while a lease is on the way waits for that answer (one Redis round trip, only then).

Tokens are known only after the answer (its ``usage``): a request is admitted while its key's token
budget is not known to be spent, and its tokens are taken from the token lease afterwards (what the
lease does not cover is added to the counter with the next lease). Tokens may so pass the limit by
what the requests in flight when it was reached use, plus a slice per proxy.

Redis away: a proxy whose lease request fails enforces the budget alone for that minute (up to the
whole limit in each proxy), rather than refusing every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from proxy.usage import usage_of

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.gateway import GatewayKey

log = logging.getLogger("proxy.limits")

_time = time.time

WINDOW = 60  # seconds: the budgets are per minute
COUNTER_TTL = 2 * WINDOW

# KEYS[1]: the counter; ARGV: used beyond the leases (added whatever the limit), wanted, limit, ttl.
# Returns {taken, counter}.
LEASE_SCRIPT = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
local take = math.min(tonumber(ARGV[2]), tonumber(ARGV[3]) - used)
if take > 0 then used = redis.call('INCRBY', KEYS[1], take) else take = 0 end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {take, used}
"""


def tokens_used(tail: bytes) -> int:
    """prompt + completion tokens of the last ``usage`` in ``tail`` (0 when none is found)."""
    prompt, completion = usage_of(tail)
    return prompt + completion


def reset_text(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


class Budget:
    """One per-minute budget of one key in this process: its lease and what it owes the counter."""

    __slots__ = (
        "allowance",
        "borrowed",
        "counter",
        "debt",
        "exhausted",
        "kind",
        "lease",
        "limit",
        "local",
        "minute",
        "pending",
        "slice",
        "solo",
    )

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind  # "r" (requests) or "t" (tokens)
        self.limit = limit
        self.slice = max(1, min(math.ceil(limit / 50), 1000 if kind == "r" else 100_000))
        self.allowance = max(1, min(self.slice, math.ceil(limit / 200)))
        self.minute = -1
        self.lease = 0  # units leased and not used
        self.debt = 0  # units used beyond the leases, not yet added to the counter
        self.borrowed = 0  # requests admitted on credit this minute
        self.counter = 0  # the shared counter at the last answer
        self.local = 0  # units this process used this minute
        self.exhausted = False  # the counter reached the limit this minute
        self.pending = False  # a lease request is on the way
        self.solo = False  # Redis failed this minute: the budget is enforced here alone

    def roll(self, minute: int) -> None:
        if minute != self.minute:
            self.minute = minute
            self.lease = self.debt = self.borrowed = self.counter = self.local = 0
            self.exhausted = self.solo = False

    def use(self, n: int) -> None:
        self.local += n
        if self.lease >= n:
            self.lease -= n
        else:
            self.debt += n - self.lease
            self.lease = 0

    def remaining(self) -> int:
        return max(0, self.limit - max(self.counter, self.local)) + self.lease if not self.exhausted else self.lease

    def wants_lease(self) -> bool:
        if self.pending or self.exhausted or self.solo:
            return False
        return self.lease * 2 <= self.slice or self.debt > 0


class KeyState:
    """A gateway key's limits and usage in this process (kept by lookup, so a key's counters outlive
    the key object that a change to its entry replaces)."""

    __slots__ = ("concurrency", "in_flight", "limiter", "lookup", "requests", "tokens", "waiters")

    def __init__(self, limiter: Limiter, lookup: str) -> None:
        self.limiter = limiter
        self.lookup = lookup
        self.concurrency = 0
        self.in_flight = 0
        self.requests: Budget | None = None
        self.tokens: Budget | None = None
        self.waiters: list[tuple[Exchange, Any]] = []

    def configure(self, key: GatewayKey) -> None:
        self.concurrency = key.max_concurrency
        rpm, tpm = key.requests_per_minute, key.tokens_per_minute
        if not rpm:
            self.requests = None
        elif self.requests is None or self.requests.limit != rpm:
            self.requests = Budget("r", rpm)
        if not tpm:
            self.tokens = None
        elif self.tokens is None or self.tokens.limit != tpm:
            self.tokens = Budget("t", tpm)

    def finish(self, used: int) -> None:
        """The request ended (any way): free its concurrency slot, charge its tokens (prompt +
        completion, read from its answer by proxy/usage.py)."""
        self.in_flight -= 1
        tokens = self.tokens
        if tokens is not None and used:
            tokens.roll(int(_time() // WINDOW))
            tokens.use(used)
            if tokens.local >= tokens.limit and tokens.solo:
                tokens.exhausted = True
            if tokens.wants_lease():
                self.limiter.lease(self, tokens)

    def headers(self, now: float) -> bytes:
        """OpenAI's x-ratelimit-* headers for this key's per-minute budgets."""
        reset = reset_text(WINDOW - now % WINDOW)
        out = []
        for budget, name in ((self.requests, b"requests"), (self.tokens, b"tokens")):
            if budget is not None:
                out.append(
                    b"x-ratelimit-limit-%b: %d\r\nx-ratelimit-remaining-%b: %d\r\nx-ratelimit-reset-%b: %b\r\n"
                    % (name, budget.limit, name, budget.remaining(), name, reset.encode())
                )
        return b"".join(out)


# admit()'s verdicts besides None (admitted)
WAIT = "wait"


class Limiter:
    """Every key's ``KeyState`` in this process, and the background lease requests."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.prefix = prefix
        self.client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        self.script = self.client.register_script(LEASE_SCRIPT)
        self.states: dict[str, KeyState] = {}
        self.resume: Callable[[Exchange, Any], None] | None = None  # re-admits a request that waited
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {"gateway_lease_requests_total": 0, "gateway_lease_failures_total": 0}

    def state(self, key: GatewayKey) -> KeyState | None:
        """The key's state, or None when it has no limit (nothing to count)."""
        state = self.states.get(key.lookup)
        if state is None:
            if not (key.max_concurrency or key.requests_per_minute or key.tokens_per_minute):
                return None
            state = self.states[key.lookup] = KeyState(self, key.lookup)
        if state.concurrency != key.max_concurrency or _changed(state, key):
            state.configure(key)
        return state

    def admit(self, state: KeyState, now: float) -> tuple[str, Budget | None] | None:
        """None: admitted (counted); else ("concurrency", None), (WAIT, budget), ("requests"|"tokens", budget)."""
        if state.concurrency and state.in_flight >= state.concurrency:
            return "concurrency", None
        minute = int(now // WINDOW)
        tokens = state.tokens
        if tokens is not None:
            tokens.roll(minute)
            if tokens.exhausted and tokens.lease <= 0:
                return "tokens", tokens
            if tokens.minute == minute and tokens.counter == 0 and tokens.wants_lease():
                self.lease(state, tokens)  # learn the minute's counter early
        requests = state.requests
        if requests is not None:
            requests.roll(minute)
            if requests.lease > 0:
                requests.lease -= 1
                requests.local += 1
            elif requests.solo:
                if requests.local >= requests.limit:
                    return "requests", requests
                requests.local += 1
            elif requests.exhausted:
                return "requests", requests
            elif requests.borrowed < requests.allowance:
                requests.borrowed += 1
                requests.use(1)
            elif requests.pending:
                return WAIT, requests
            else:
                self.lease(state, requests)
                return WAIT, requests
            if requests.wants_lease():
                self.lease(state, requests)
        state.in_flight += 1
        return None

    def lease(self, state: KeyState, budget: Budget) -> None:
        budget.pending = True
        self.counters["gateway_lease_requests_total"] += 1
        task = asyncio.get_running_loop().create_task(self._lease(state, budget))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lease(self, state: KeyState, budget: Budget) -> None:
        minute, debt = budget.minute, budget.debt
        budget.debt = 0
        try:
            key = f"{self.prefix}:gateway:rl:{state.lookup}:{budget.kind}:{minute}"
            taken, counter = await self.script(keys=[key], args=[debt, budget.slice, budget.limit, COUNTER_TTL])
        except Exception as exc:
            self.counters["gateway_lease_failures_total"] += 1
            log.warning(
                "gateway key %s: no lease from Redis (%s: %s); this proxy enforces its limit alone this minute",
                state.lookup,
                exc.__class__.__name__,
                exc,
            )
            if budget.minute == minute:
                budget.solo = True
        else:
            if budget.minute == minute:  # (an answer for a minute that has ended is of no use)
                budget.lease += int(taken)
                budget.counter = int(counter)
                if int(taken) == 0 and budget.counter >= budget.limit:
                    budget.exhausted = True
        finally:
            budget.pending = False
        if budget.minute == minute and budget.debt and not budget.exhausted and not budget.solo:
            self.lease(state, budget)  # what was used meanwhile
        waiters, state.waiters = state.waiters, []
        if waiters and self.resume is not None:
            for ex, endpoint in waiters:
                if not ex.ended:
                    self.resume(ex, endpoint)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):  # best effort at shutdown
            await asyncio.wait_for(self.client.aclose(), 1.0)


def _changed(state: KeyState, key: GatewayKey) -> bool:
    requests, tokens = state.requests, state.tokens
    return (requests.limit if requests else None) != (key.requests_per_minute or None) or (
        tokens.limit if tokens else None
    ) != (key.tokens_per_minute or None)
