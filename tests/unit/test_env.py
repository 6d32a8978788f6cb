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
