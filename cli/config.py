"""Where the CLI finds the web app and its API key: the environment first, then the login file."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

URL_ENV = "MODELSERVE_URL"
KEY_ENV = "MODELSERVE_API_KEY"


class ConfigError(Exception):
    """A sentence telling the user what is missing and how to provide it."""


@dataclass(frozen=True)
class Settings:
    url: str
    api_key: str


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "modelserve" / "config.toml"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelserve"


def read_file() -> dict[str, str]:
    path = config_path()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Can not read {path}: {exc}. Fix it or run `modelserve login` again.") from None
    return {k: str(v) for k, v in data.items() if k in ("url", "api_key")}


def save(url: str, api_key: str) -> Path:
    """Write the login file readable by its owner only (mode 0600, created so: never world-readable)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A JSON string is a valid TOML basic string (same escapes).
    text = f"url = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    return path


def load() -> Settings:
    stored = read_file()
    url = os.environ.get(URL_ENV) or stored.get("url", "")
    key = os.environ.get(KEY_ENV) or stored.get("api_key", "")
    if not url or not key:
        missing = " and no ".join(n for n, v in (("web app URL", url), ("API key", key)) if not v)
        raise ConfigError(
            f"Not logged in (no {missing}): run `modelserve login --url URL --api-key KEY` "
            f"(or set {URL_ENV} and {KEY_ENV}, as CI does)."
        )
    return Settings(url=url.rstrip("/"), api_key=key)
