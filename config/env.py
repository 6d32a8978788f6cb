"""Typed environment helpers: a bad value stops the process with a sentence, never a silent default."""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import unquote, urlparse


class ConfigError(ValueError):
    pass


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false.")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer.") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is too small; it must be at least {minimum}.")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is too small; it must be at least {minimum}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_ipv4(name: str, default: str, *, hint: str = "") -> str:
    """An IPv4 address, as written (addresses built from it are ``host:port``, with no brackets)."""
    value = (os.environ.get(name) or default).strip()
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an IPv4 address{'; ' + hint if hint else ''}.") from None
    return value


def env_choice(name: str, default: str, choices: set[str]) -> str:
    value = os.environ.get(name, default) or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(sorted(choices))}.")
    return value


def database_from_url(url: str, *, sqlite_default: str) -> dict[str, object]:
    """Django DATABASES entry from a URL (postgres://user:pass@host:port/name or sqlite:///path)."""
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": sqlite_default,
            # WAL lets the web process read while a worker writes; a busy timeout instead of
            # "database is locked" errors under the worker's short write bursts.
            "OPTIONS": {
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
            },
            # A file (not in-memory) test database, so the workers and the proxy that integration
            # tests start as real processes see the same rows as the test.
            "TEST": {"NAME": str(sqlite_default).removesuffix(".sqlite3") + "-test.sqlite3"},
        }
    parsed = urlparse(url)
    if parsed.scheme in {"postgres", "postgresql", "pgsql"}:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
            "USER": unquote(parsed.username or ""),
            "PASSWORD": unquote(parsed.password or ""),
            "HOST": parsed.hostname or "",
            "PORT": str(parsed.port or ""),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    if parsed.scheme == "sqlite":
        return database_from_url("", sqlite_default=unquote(parsed.path) or sqlite_default)
    raise ConfigError(f"DATABASE_URL scheme {parsed.scheme!r} is not supported; use postgres://... or sqlite:///path.")
