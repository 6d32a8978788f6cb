"""Counting failed authentications: a fixed window per key in Django's cache (Redis, settings.CACHES).

Used by the login page (per username and client address, and per username alone) and by API key
authentication (per client address). The window starts at the first failure and lasts ``window``
seconds; at ``limit`` failures the key is blocked until the window ends. When the cache is
unreachable the limiter lets requests through (logged): a Redis outage must not lock everyone out
of the web app.
"""

from __future__ import annotations

import hashlib
import logging

from django.core.cache import cache

log = logging.getLogger(__name__)


class FailureLimiter:
    def __init__(self, scope: str, limit: int, window: int) -> None:
        self.scope = scope
        self.limit = limit
        self.window = window

    def _key(self, parts: tuple[str, ...]) -> str:
        # Hashed: usernames are user input (any length, any character) and must not shape cache keys.
        digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
        return f"auth-failures:{self.scope}:{digest}"

    def blocked(self, *parts: str) -> bool:
        try:
            return int(cache.get(self._key(parts), 0)) >= self.limit
        except Exception:  # fail open, see the module docstring
            log.warning("rate limiter: cache unavailable, %s not limited", self.scope, exc_info=True)
            return False

    def record_failure(self, *parts: str) -> None:
        key = self._key(parts)
        try:
            cache.add(key, 0, self.window)  # only the first failure of a window sets its expiry
            cache.incr(key)
        except ValueError:  # expired between add and incr: start a new window
            cache.set(key, 1, self.window)
        except Exception:
            log.warning("rate limiter: cache unavailable, failure not counted", exc_info=True)

    def reset(self, *parts: str) -> None:
        try:
            cache.delete(self._key(parts))
        except Exception:
            log.warning("rate limiter: cache unavailable, counter not reset", exc_info=True)


def client_address(meta: dict[str, str]) -> str:
    """The client's address: REMOTE_ADDR, which config/asgi_guards.py takes from X-Forwarded-For only
    when the peer is one of WEB_TRUSTED_PROXIES (anyone can send the header)."""
    return meta.get("REMOTE_ADDR") or "-"
