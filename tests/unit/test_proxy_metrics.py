"""Proxy counters, the p95 estimate pushed for autoscaling, and settings (proxy/metrics.py, config.py)."""

from __future__ import annotations

import pytest

from proxy.config import Config, token_key
from proxy.metrics import BOUNDS, EndpointStats, quantile, render
from proxy.table import Table


def test_quantile_interpolates_inside_a_bucket() -> None:
    counts = [0] * (len(BOUNDS) + 1)
    counts[BOUNDS.index(0.01)] = 100  # all between 5 ms and 10 ms
    assert quantile(counts, 0.5) == pytest.approx(0.0075)
    assert quantile(counts, 0.95) == pytest.approx(0.00975)
    assert quantile([0] * (len(BOUNDS) + 1), 0.95) == 0.0


def test_window_reports_figures_since_the_last_push() -> None:
    stats = EndpointStats()
    for _ in range(95):
        stats.observe(200, 0.004)
    for _ in range(5):
        stats.observe(503, 2.0)
    stats.throttled += 4
    figures = stats.window(2.0)
    assert figures["rps"] == 50.0 and figures["requests"] == 100
    assert figures["errors_per_s"] == 2.5 and figures["throttled_per_s"] == 2.0
    assert 2.5 < figures["p95_ms"] <= 5.0
    assert stats.window(2.0)["requests"] == 0  # the next window starts empty


def test_render_is_prometheus_text() -> None:
    table = Table("redis://unused", "ms", 10)
    table.apply(
        "chat",
        {"id": "1", "slug": "chat", "public": True, "routes": [{"id": "r1", "host": "h", "port": 1, "weight": 1}]},
    )
    table.endpoints["chat"].stats.observe(200, 0.02)
    table.endpoints["chat"].routes[0].codes[2] += 1
    text = render(table, {"endpoints": 1, "retries_total": 0})
    assert 'modelserve_proxy_requests_total{endpoint="chat",code="2xx"} 1' in text
    assert 'modelserve_proxy_request_duration_seconds_bucket{endpoint="chat",le="0.025"} 1' in text
    assert 'modelserve_proxy_request_duration_seconds_bucket{endpoint="chat",le="+Inf"} 1' in text
    assert 'modelserve_proxy_route_requests_total{endpoint="chat",route="r1",code="2xx"} 1' in text
    assert "# TYPE modelserve_proxy_retries_total counter" in text
    assert text.endswith("\n")


def test_config_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("TOKEN_HMAC_KEY", "k")
    monkeypatch.setenv("PROXY_PORT", "9000")
    monkeypatch.setenv("PROXY_TOTAL_TIMEOUT", "0")
    monkeypatch.setenv("PROXY_KEEP_TOKEN", "yes")
    monkeypatch.setenv("SERVING_DOMAIN", ".Models.Example.")
    config = Config.from_env()
    assert config.port == 9000 and config.total_timeout is None and config.keep_token
    assert config.domain == "models.example" and config.queue_limit == 256 and config.idle_timeout == 300
    monkeypatch.setenv("PROXY_QUEUE_LIMIT", "lots")
    with pytest.raises(SystemExit, match="PROXY_QUEUE_LIMIT"):
        Config.from_env()


def test_token_key_comes_from_env_or_var_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    var = Path(str(tmp_path))
    monkeypatch.delenv("TOKEN_HMAC_KEY", raising=False)
    monkeypatch.setenv("VAR_DIR", str(var))
    with pytest.raises(SystemExit, match="token_hmac_key"):
        token_key()
    (var / "token_hmac_key").write_text("from-file\n")
    assert token_key() == "from-file"  # what config/settings.py wrote for Django
    monkeypatch.setenv("TOKEN_HMAC_KEY", "from-env")
    assert token_key() == "from-env"
