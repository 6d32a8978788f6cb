"""Scale to zero's pure half (serving/core/sleep.py) and the proxy's retry-policy and sleep fields."""

from __future__ import annotations

import json

import pytest

from proxy.exchange import inference_path
from proxy.metrics import EndpointStats
from proxy.table import Endpoint
from serving.core import sleep


def sample(t: float, last: float, in_flight: int = 0) -> bytes:
    return json.dumps({"t": t, "last": last, "in_flight": in_flight, "rps": 0}).encode()


def test_activity_takes_the_latest_request_and_the_fresh_proxies_in_flight() -> None:
    fields = {
        b"a:1": sample(t=100.0, last=90.0, in_flight=2),
        b"b:2": sample(t=99.0, last=95.0, in_flight=1),
        b"c:3": sample(t=50.0, last=40.0, in_flight=7),  # a proxy that stopped: its in_flight is stale
        b"d:4": b"not json",
    }
    seen = sleep.activity(fields, now=100.0)
    assert seen == sleep.Activity(last=95.0, in_flight=3)
    assert sleep.activity({}, now=1.0) == sleep.Activity(0.0, 0)


def test_idle_counts_from_the_last_request_or_the_later_start() -> None:
    assert sleep.idle_for(100.0, sleep.Activity(last=70.0, in_flight=0), since=10.0) == 30.0
    assert sleep.idle_for(100.0, sleep.Activity(last=0.0, in_flight=0), since=80.0) == 20.0  # never called
    assert sleep.idle_for(100.0, sleep.Activity(last=70.0, in_flight=1), since=10.0) == 0.0  # a stream runs
    assert sleep.should_sleep(30, 30.0) and not sleep.should_sleep(30, 29.9) and not sleep.should_sleep(None, 1e9)


@pytest.mark.parametrize(
    ("line", "inference"),
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\n", True),
        (b"POST /v1/completions?stream=true HTTP/1.1\r\n", True),
        (b"POST /v1/embeddings/ HTTP/1.1\r\n", True),
        (b"POST /v1/responses HTTP/1.1\r\n", True),
        (b"POST /generate_stream HTTP/1.1\r\n", True),
        (b"POST /v2/models/resnet/versions/2/infer HTTP/1.1\r\n", True),
        (b"POST /v1/models/resnet:predict HTTP/1.1\r\n", True),
        (b"POST /v1/files HTTP/1.1\r\n", False),
        (b"POST /v1/chat/completions/cancel HTTP/1.1\r\n", False),
        (b"POST /v1/fine_tuning/jobs HTTP/1.1\r\n", False),
        (b"", False),
    ],
)
def test_inference_paths(line: bytes, inference: bool) -> None:
    assert inference_path(line) is inference


def test_an_entry_carries_the_retry_policy_and_whether_the_service_sleeps() -> None:
    endpoint = Endpoint("s", EndpointStats())
    endpoint.update({"routes": []})
    assert endpoint.retry_policy == "inference" and endpoint.sleeps is False  # an older control plane's entry
    endpoint.update({"routes": [], "retry_policy": "safe", "scale_to_zero": True})
    assert endpoint.retry_policy == "safe" and endpoint.sleeps is True
    endpoint.update({"routes": [], "retry_policy": "bogus"})
    assert endpoint.retry_policy == "inference" and endpoint.sleeps is False
