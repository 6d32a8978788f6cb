"""Proxy settings from the environment (no Django here: the data plane must start without it).

Every setting is read once at start; a bad value stops the process with a sentence that names the
variable, like the web app's typed env helpers (config/env.py).

| variable | default | meaning |
|---|---|---|
| PROXY_HOST / PROXY_PORT | 127.0.0.1 / 8080 | where clients connect |
| PROXY_ADMIN_PORT | 8081 | /metrics (Prometheus) and /healthz, on PROXY_HOST |
| REDIS_URL / REDIS_PREFIX | redis://127.0.0.1:6379/0 / ms | where the routing table lives (serving/bus/routing.py) |
| TOKEN_HMAC_KEY / VAR_DIR | -, <repo>/var | the token digest key, else the file $VAR_DIR/token_hmac_key |
| SERVING_DOMAIN | (off) | also route by host name: <slug>.<SERVING_DOMAIN> |
| PROXY_KEEP_TOKEN | false | forward the platform token to the replica instead of removing it |
| PROXY_IDLE_TIMEOUT | 300 | seconds without a byte either way before a request is cut (504), or a websocket closed |
| PROXY_TOTAL_TIMEOUT | 0 (none) | a hard cap on a whole request, seconds; LLM streams can be long |
| PROXY_CONNECT_TIMEOUT | 5 | seconds to open a connection to a replica |
| PROXY_QUEUE_LIMIT | 256 | requests in flight per healthy route; an endpoint admits limit x routes |
| PROXY_HOLD_SECONDS | 0 | hold a request this long for a route to appear before answering 503 |
| PROXY_WAKE_TIMEOUT | 300 | a request to a sleeping service (scale to zero) waits this long for it to wake |
| PROXY_WAKE_QUEUE | 100 | requests held per sleeping service; beyond, 503 with Retry-After |
| PROXY_RESYNC_INTERVAL | 10 | seconds between full re-reads of the routing table |
| PROXY_STATS_INTERVAL | 2 | seconds between pushes of stats and token last-used times to Redis |
| PROXY_ROUTE_DOWN_SECONDS | 2 | a route that refused or dropped a new connection is skipped this long (doubling) |
| PROXY_KEEPALIVE_TIMEOUT | 75 | an idle client connection is closed after this many seconds |
| PROXY_UPSTREAM_IDLE | 4 | pooled replica connections idle this long are closed (below uvicorn's 5 s) |
| PROXY_REPLAY_LIMIT | 1048576 | request bodies up to this size are kept to retry on another replica |
| PROXY_RETRY_UNSAFE | false | also resend a POST that reached a replica which died unanswered (see below) |
| PROXY_ACCESS_LOG | false | one log line per request (off: the hot path does no logging) |
| PROXY_TRUSTED_PROXIES | 127.0.0.1,::1 | addresses (or CIDR ranges, or `*`) whose X-Forwarded-* headers are believed |
| PROXY_LOG_LEVEL | WARNING | the process's log level (INFO adds route failures) |
| LOG_FORMAT | text | json: one JSON object a line, with request id, service and route (serving/core/logs.py) |

PROXY_RETRY_UNSAFE: set, every request that reached a replica which then died without answering a
byte is sent again, whatever its service's retry policy says. The policy (``retry_policy``, see
proxy/exchange.py): ``safe`` answers such a POST 502 (it may have been processed; nginx and Envoy do
the same); ``inference``, the default, re-sends POSTs to inference paths (/v1/chat/completions,
/v1/embeddings, ...), which have no side effect; ``all`` re-sends every request.

PROXY_TRUSTED_PROXIES: a TLS terminator or load balancer in front of the proxy says who the client
was and which scheme and host it used, in X-Forwarded-For/Proto/Host; the replica gets them. From
any other address those headers are a client's claim: they are replaced by what the proxy saw
itself (the peer address, http, the Host header), so a client can not pose as another address or
as HTTPS to a replica. Set it to the terminator's addresses when one sits elsewhere.

Why the queue limit is per route: an endpoint's capacity grows with its replicas, and 256 is what one
vLLM replica runs at once by default (``max_num_seqs``); past it requests only wait in the replica.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number.") from None
    if value < minimum:
        raise SystemExit(f"{name}={raw!r} must be at least {minimum:g}.")
    return value


def _int(name: str, default: int, minimum: int = 0) -> int:
    value = _float(name, default, minimum)
    if value != int(value):
        raise SystemExit(f"{name}={value!r} must be a whole number.")
    return int(value)


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise SystemExit(f"{name}={raw!r} must be true or false.")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(name: str, default: str) -> tuple[Network, ...] | None:
    """Addresses and CIDR ranges, comma-separated; None means every address (``*``)."""
    raw = os.environ.get(name, default).strip()
    if raw == "*":
        return None
    networks = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SystemExit(
                f"{name}: {item!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8); "
                "give a comma-separated list, or * to trust every address."
            ) from None
    return tuple(networks)


def token_key() -> str:
    """The same key Django uses (config/settings.py): TOKEN_HMAC_KEY, else $VAR_DIR/token_hmac_key.

    The proxy only reads the file: the web app creates it on first start. A proxy started before
    that cannot verify any token, so it stops with a sentence saying what to do.
    """
    if os.environ.get("TOKEN_HMAC_KEY"):
        return os.environ["TOKEN_HMAC_KEY"]
    path = Path(os.environ.get("VAR_DIR") or str(ROOT / "var")) / "token_hmac_key"
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    if not value:
        raise SystemExit(f"No token key: set TOKEN_HMAC_KEY, or start the web app once so that {path} exists.")
    return value


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 8081
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "ms"
    token_key: str = ""
    domain: str = ""
    keep_token: bool = False
    idle_timeout: float = 300.0
    total_timeout: float | None = None
    connect_timeout: float = 5.0
    queue_limit: int = 256
    hold_seconds: float = 0.0
    wake_timeout: float = 300.0
    wake_queue: int = 100
    resync_interval: float = 10.0
    stats_interval: float = 2.0
    route_down_seconds: float = 2.0
    keepalive_timeout: float = 75.0
    upstream_idle: float = 4.0
    replay_limit: int = 1 << 20
    retry_unsafe: bool = False
    # Services one gateway request may try, the first included (proxy/app.py failover): after the
    # chosen one failed it before a byte of an answer, the next backend of its model name.
    gateway_backends: int = 3
    access_log: bool = False
    # None: every peer is trusted (``*``); empty: none is.
    trusted_proxies: tuple[Network, ...] | None = field(
        default=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    )

    def trusts(self, address: str) -> bool:
        """Whether a peer's X-Forwarded-* headers are believed (PROXY_TRUSTED_PROXIES)."""
        if self.trusted_proxies is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a Unix socket peer, or none
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted_proxies)

    @classmethod
    def from_env(cls) -> Config:
        total = _float("PROXY_TOTAL_TIMEOUT", 0.0)
        return cls(
            host=os.environ.get("PROXY_HOST", "127.0.0.1"),
            port=_int("PROXY_PORT", 8080),
            admin_port=_int("PROXY_ADMIN_PORT", 8081),
            redis_url=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            prefix=os.environ.get("REDIS_PREFIX") or "ms",
            token_key=token_key(),
            domain=os.environ.get("SERVING_DOMAIN", "").strip().lower().strip("."),
            keep_token=_bool("PROXY_KEEP_TOKEN", False),
            idle_timeout=_float("PROXY_IDLE_TIMEOUT", 300.0, 0.01),
            total_timeout=total or None,
            connect_timeout=_float("PROXY_CONNECT_TIMEOUT", 5.0, 0.01),
            queue_limit=_int("PROXY_QUEUE_LIMIT", 256, 1),
            hold_seconds=_float("PROXY_HOLD_SECONDS", 0.0),
            wake_timeout=_float("PROXY_WAKE_TIMEOUT", 300.0, 0.1),
            wake_queue=_int("PROXY_WAKE_QUEUE", 100, 1),
            resync_interval=_float("PROXY_RESYNC_INTERVAL", 10.0, 0.1),
            stats_interval=_float("PROXY_STATS_INTERVAL", 2.0, 0.1),
            route_down_seconds=_float("PROXY_ROUTE_DOWN_SECONDS", 2.0, 0.0),
            keepalive_timeout=_float("PROXY_KEEPALIVE_TIMEOUT", 75.0, 0.1),
            upstream_idle=_float("PROXY_UPSTREAM_IDLE", 4.0, 0.1),
            replay_limit=_int("PROXY_REPLAY_LIMIT", 1 << 20),
            retry_unsafe=_bool("PROXY_RETRY_UNSAFE", False),
            gateway_backends=_int("PROXY_GATEWAY_BACKENDS", 3, 1),
            access_log=_bool("PROXY_ACCESS_LOG", False),
            trusted_proxies=_networks("PROXY_TRUSTED_PROXIES", "127.0.0.1,::1"),
        )
