"""Proxy settings from the environment (no Django here: the data plane must start without it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number.") from None


def _token_key() -> str:
    """The same key Django uses (config/settings.py): TOKEN_HMAC_KEY, else var/token_hmac_key."""
    if os.environ.get("TOKEN_HMAC_KEY"):
        return os.environ["TOKEN_HMAC_KEY"]
    path = Path(os.environ.get("VAR_DIR", str(ROOT / "var"))) / "token_hmac_key"
    try:
        return path.read_text().strip()
    except OSError:
        raise SystemExit(f"No token key: set TOKEN_HMAC_KEY or run the web app once so that {path} exists.") from None


@dataclass(frozen=True)
class Config:
    host: str
    port: int
    admin_port: int
    redis_url: str
    prefix: str
    token_key: str
    domain: str
    keep_token: bool
    idle_timeout: float
    total_timeout: float | None
    queue_limit: int
    hold_seconds: float
    resync_interval: float

    @classmethod
    def from_env(cls) -> Config:
        total = _float("PROXY_TOTAL_TIMEOUT", 0.0)
        return cls(
            host=os.environ.get("PROXY_HOST", "127.0.0.1"),
            port=int(_float("PROXY_PORT", 8080)),
            admin_port=int(_float("PROXY_ADMIN_PORT", 8081)),
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            prefix=os.environ.get("REDIS_PREFIX", "ms"),
            token_key=_token_key(),
            domain=os.environ.get("SERVING_DOMAIN", ""),
            keep_token=os.environ.get("PROXY_KEEP_TOKEN", "").lower() in {"1", "true", "yes"},
            idle_timeout=_float("PROXY_IDLE_TIMEOUT", 300.0),
            total_timeout=total or None,
            queue_limit=int(_float("PROXY_QUEUE_LIMIT", 512)),
            hold_seconds=_float("PROXY_HOLD_SECONDS", 0.0),
            resync_interval=_float("PROXY_RESYNC_INTERVAL", 10.0),
        )
