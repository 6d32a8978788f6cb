"""Typed environment helpers: a bad value stops the process with a sentence, never a silent default."""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import unquote, urlparse, urlsplit

import dj_database_url


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


_DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, as a browser writes it in an Origin header: lower case, the
    scheme's default port left out. ValueError with a sentence when it is not an http(s) address."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} is not a URL like http://host:port") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// address with a host name")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r} holds a user name; an origin is only scheme://host:port")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6, written in brackets in URLs and origins
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def env_url_origin(name: str, default: str) -> str:
    """An http(s) address (a path is allowed); checked like an origin so a typo stops the process."""
    value = (os.environ.get(name) or default).strip()
    try:
        origin_of(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}; e.g. https://modelserve.example.com.") from None
    return value.rstrip("/")


def env_origins(name: str, default: list[str]) -> list[str]:
    """Exact origins, comma-separated: ``scheme://host[:port]``, no path and no wildcard (an origin
    either is the site or is not; a pattern is how a sibling site on another port gets in)."""
    raw = os.environ.get(name)
    items = default if raw is None else [item.strip() for item in raw.split(",") if item.strip()]
    origins: list[str] = []
    for item in items:
        if "*" in item:
            raise ConfigError(
                f"{name}: {item!r} has a wildcard; list every origin exactly, e.g. https://ms.example.com."
            )
        try:
            parts = urlsplit(item)
            origin = origin_of(item)
        except ValueError as exc:
            raise ConfigError(
                f"{name}: {exc}; list origins like https://ms.example.com or http://10.0.0.5:8000."
            ) from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{name}: {item!r} has a path; an origin is only scheme://host[:port], e.g. {origin}.")
        if origin not in origins:
            origins.append(origin)
    return origins


def loopback_variants(origin: str) -> list[str]:
    """The origin, and when its host is a loopback name, the same scheme and port under the other
    loopback names (a browser on the machine may open any of them)."""
    parts = urlsplit(origin)
    host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    if host not in LOOPBACK_NAMES:
        return [origin]
    suffix = parts.netloc[len(host) :]
    return [origin, *(f"{parts.scheme}://{name}{suffix}" for name in LOOPBACK_NAMES if name != host)]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def env_networks(name: str, default: list[str]) -> tuple[Network, ...]:
    """IP addresses and CIDR ranges, comma-separated (empty: none). No ``*``: trusting every peer's
    forwarding headers is trusting every client's word."""
    raw = os.environ.get(name)
    items = default if raw is None else [item.strip() for item in raw.split(",") if item.strip()]
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"{name}: {item!r} is not an IP address or CIDR range; list the addresses of the TLS "
                "terminators or load balancers in front of the web app, e.g. 10.0.0.2,10.1.0.0/24."
            ) from None
    return tuple(networks)


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
        # dj-database-url keeps the query string as the driver's options (sslmode, connect_timeout,
        # target_session_attrs, ...), which a hand-written parser silently dropped.
        try:
            entry = dict(dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True))
        except ValueError as exc:
            raise ConfigError(f"DATABASE_URL could not be read ({exc}); use postgres://user:password@host:port/name.")
        entry["NAME"] = entry.get("NAME") or "postgres"
        entry["PORT"] = str(entry.get("PORT") or "")
        return entry
    if parsed.scheme == "sqlite":
        return database_from_url("", sqlite_default=unquote(parsed.path) or sqlite_default)
    raise ConfigError(f"DATABASE_URL scheme {parsed.scheme!r} is not supported; use postgres://... or sqlite:///path.")
