"""Typed settings from the environment (config/env.py): a bad value is refused with a sentence."""

from __future__ import annotations

import pytest

from config.env import ConfigError, env_ipv4


def test_node_address_is_an_ipv4_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_ADDRESS", raising=False)
    assert env_ipv4("NODE_ADDRESS", "127.0.0.1") == "127.0.0.1"
    monkeypatch.setenv("NODE_ADDRESS", " 10.0.0.5 ")
    assert env_ipv4("NODE_ADDRESS", "127.0.0.1") == "10.0.0.5"
    # A host name, or IPv6 (host:port strings built from it would need brackets), is refused.
    for bad in ("node-b.example", "::1", "10.0.0", "10.0.0.256"):
        monkeypatch.setenv("NODE_ADDRESS", bad)
        with pytest.raises(ConfigError, match=rf"NODE_ADDRESS='{bad}' is not an IPv4 address; use one"):
            env_ipv4("NODE_ADDRESS", "127.0.0.1", hint="use one of this host's")


def test_web_origins_are_exact_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.env import env_origins, loopback_variants, origin_of

    monkeypatch.setenv("WEB_ORIGINS", " HTTPS://MS.Example.com:443/ , http://10.0.0.5:8000,http://10.0.0.5:8000")
    assert env_origins("WEB_ORIGINS", []) == ["https://ms.example.com", "http://10.0.0.5:8000"]
    for bad, why in [
        ("https://*.example.com", "has a wildcard"),
        ("ms.example.com", "is not an http:// or https:// address"),
        ("ftp://ms.example.com", "is not an http:// or https:// address"),
        ("https://ms.example.com/app", "has a path"),
        ("http://ms.example.com:99999", "is not a URL"),
        ("http://user@ms.example.com", "holds a user name"),
    ]:
        monkeypatch.setenv("WEB_ORIGINS", bad)
        with pytest.raises(ConfigError, match=why):
            env_origins("WEB_ORIGINS", [])
    assert origin_of("http://[::1]:8000/x") == "http://[::1]:8000"
    assert loopback_variants("http://127.0.0.1:8000") == [
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
    ]
    assert loopback_variants("http://[::1]:9000")[1:] == ["http://127.0.0.1:9000", "http://localhost:9000"]
    assert loopback_variants("https://ms.example.com") == ["https://ms.example.com"]


def test_csrf_trusted_origins_is_replaced_by_web_origins() -> None:
    """An old CSRF_TRUSTED_ORIGINS is refused with a sentence, not silently ignored: the websockets
    would otherwise refuse the site it names."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "CSRF_TRUSTED_ORIGINS": "https://ms.example.com"}
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and "set WEB_ORIGINS instead" in out.stderr


def test_web_trusted_proxies_are_addresses_or_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipaddress import ip_network

    from config.env import env_networks

    monkeypatch.delenv("WEB_TRUSTED_PROXIES", raising=False)
    assert env_networks("WEB_TRUSTED_PROXIES", []) == ()
    monkeypatch.setenv("WEB_TRUSTED_PROXIES", "10.0.0.2, 10.1.0.0/24,::1")
    assert env_networks("WEB_TRUSTED_PROXIES", []) == (
        ip_network("10.0.0.2/32"),
        ip_network("10.1.0.0/24"),
        ip_network("::1/128"),
    )
    for bad in ("*", "lb.example", "10.0.0.0/33"):
        monkeypatch.setenv("WEB_TRUSTED_PROXIES", bad)
        with pytest.raises(ConfigError, match="is not an IP address or CIDR range"):
            env_networks("WEB_TRUSTED_PROXIES", [])


def test_database_url_keeps_the_drivers_options() -> None:
    """A PostgreSQL URL's query string (sslmode, connect_timeout) reaches the driver (issue 20)."""
    from config.env import database_from_url

    entry = database_from_url(
        "postgres://svc:p%40ss@db.internal:6432/modelserve?sslmode=require&connect_timeout=5", sqlite_default="x"
    )
    assert entry["ENGINE"] == "django.db.backends.postgresql"
    assert (entry["NAME"], entry["USER"], entry["PASSWORD"], entry["HOST"], entry["PORT"]) == (
        "modelserve",
        "svc",
        "p@ss",
        "db.internal",
        "6432",
    )
    assert entry["OPTIONS"] == {"sslmode": "require", "connect_timeout": 5}
    assert entry["CONN_MAX_AGE"] == 60 and entry["CONN_HEALTH_CHECKS"] is True
    plain = database_from_url("postgresql://127.0.0.1/test", sqlite_default="x")
    assert (plain["NAME"], plain["HOST"], plain["PORT"], plain.get("OPTIONS", {})) == ("test", "127.0.0.1", "", {})
    with pytest.raises(ConfigError, match=r"DATABASE_URL scheme 'mysql' is not supported"):
        database_from_url("mysql://u@h/db", sqlite_default="x")
