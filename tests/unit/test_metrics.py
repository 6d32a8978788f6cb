"""The pure parts of serving.bus.metrics: Prometheus parsing, proxy figures, chart buckets, kernel points."""

from __future__ import annotations

import json

import pytest

from serving.bus.metrics import (
    ExpositionError,
    buckets,
    canonical,
    decode,
    kernel_points,
    parse_prometheus,
    proxy_figures,
)
from serving.node.engines.base import ReplicaStats

VLLM_LIKE = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="b"} 4.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="0.5",model_name="a"} 2.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="a"} 5.0
vllm:e2e_request_latency_seconds_sum{model_name="a"} 9.5
vllm:e2e_request_latency_seconds_count{model_name="a"} 5.0
# TYPE requests counter
requests_total{code="200"} 10
requests_total{code="500"} 2
requests_created{code="200"} 1.7e9
# TYPE rpc summary
rpc{quantile="0.5"} 0.2
rpc_sum 4
rpc_count 8
odd_gauge NaN
llm_echo_requests_waiting 2
"""


def test_labels_are_summed_per_sample_name() -> None:
    values = parse_prometheus(VLLM_LIKE)
    assert values["vllm:num_requests_waiting"] == 7.0
    assert values["vllm:gpu_cache_usage_perc"] == 0.25
    assert values["requests_total"] == 12
    assert values["llm_echo_requests_waiting"] == 2


def test_buckets_quantiles_created_and_nan_are_left_out() -> None:
    values = parse_prometheus(VLLM_LIKE)
    assert values["vllm:e2e_request_latency_seconds_sum"] == 9.5
    assert values["vllm:e2e_request_latency_seconds_count"] == 5
    assert values["rpc_sum"] == 4 and values["rpc_count"] == 8
    for absent in ("vllm:e2e_request_latency_seconds_bucket", "requests_created", "rpc", "odd_gauge"):
        assert absent not in values


def test_the_llm_echo_exposition_parses() -> None:
    text = (
        "# HELP llm_echo_requests_waiting Completion requests in flight (being processed).\n"
        "# TYPE llm_echo_requests_waiting gauge\nllm_echo_requests_waiting 3\n"
        "# TYPE llm_echo_requests_total counter\nllm_echo_requests_total 17\n"
    )
    assert parse_prometheus(text) == {"llm_echo_requests_waiting": 3.0, "llm_echo_requests_total": 17.0}


@pytest.mark.parametrize("text", ["metric{ 3", "name value_is_not_a_number", 'a{x="1"} 1\nb{ 2\n'])
def test_malformed_text_is_refused_as_a_whole(text: str) -> None:
    with pytest.raises(ExpositionError):
        parse_prometheus(text)


def test_the_number_of_names_is_bounded() -> None:
    text = "".join(f"m{i} {i}\n" for i in range(50))
    assert len(parse_prometheus(text, max_names=10)) == 10
    assert parse_prometheus("") == {}


def _field(t: float, **values: float) -> str:
    return json.dumps({"t": t, "window": 2.0, **values})


def test_proxy_figures_sum_over_proxies_and_take_the_max_p95() -> None:
    fields = {
        b"a:8080:1": _field(100.0, rps=3.0, in_flight=2, p95_ms=40.0, errors_per_s=0.5, throttled_per_s=0.0),
        b"b:8080:2": _field(99.0, rps=1.5, in_flight=5, p95_ms=90.0, errors_per_s=0.0, throttled_per_s=1.0),
    }
    assert proxy_figures(fields, now=101.0) == {
        "rps": 4.5,
        "in_flight": 7.0,
        "p95_ms": 90.0,
        "errors_per_s": 0.5,
        "throttled_per_s": 1.0,
    }


def test_stale_or_broken_proxy_fields_are_ignored() -> None:
    fields = {
        "gone": _field(50.0, rps=100.0, in_flight=100),
        "broken": "{not json",
        "odd": json.dumps({"window": 2}),
        "live": _field(100.0, rps=1.0, in_flight="x"),  # type: ignore[arg-type]
    }
    figures = proxy_figures(fields, now=100.5)
    assert figures is not None and figures["rps"] == 1.0 and figures["in_flight"] == 0.0
    assert proxy_figures({"gone": _field(50.0, rps=1.0)}, now=100.0) is None
    assert proxy_figures({}, now=100.0) is None


def test_kernel_points_carry_percent_of_the_limit_when_there_is_one() -> None:
    points = kernel_points("e1", "r1", ReplicaStats(cpu_percent=150.0, mem_bytes=256, mem_limit_bytes=1024), 10.0)
    assert {p.metric: p.value for p in points} == {"cpu_percent": 150.0, "mem_bytes": 256.0, "mem_percent": 25.0}
    assert all(p.source == "kernel" and p.replica == "r1" and p.t == 10.0 for p in points)
    unlimited = kernel_points("e1", "r1", ReplicaStats(cpu_percent=1.0, mem_bytes=5, mem_limit_bytes=0), 10.0)
    assert [p.metric for p in unlimited] == ["cpu_percent", "mem_bytes"]


def test_chart_buckets_average_the_replicas_of_one_round() -> None:
    samples = [(100.0, 2.0), (100.0, 4.0), (105.0, 6.0), (105.2, 8.0), (110.0, 1.0)]
    assert buckets(samples, 5.0) == [[100.0, 3.0], [105.2, 7.0], [110.0, 1.0]]
    assert buckets([], 5.0) == []


def test_aliases_and_members() -> None:
    assert canonical("proxy", "requests_in_flight") == "in_flight"
    assert canonical("proxy", "p95") == "p95_ms"
    assert canonical("kernel", "cpu") == "cpu_percent"
    assert canonical("inference", "vllm:num_requests_waiting") == "vllm:num_requests_waiting"
    assert decode(b"2.5|100.000|r1") == 2.5
    assert decode("-1e-05|1.000|") == -1e-05
