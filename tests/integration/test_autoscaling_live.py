"""Autoscaling for real (issue 7): the llm-echo example on the local engine, under a bounded load through
the real proxy, scales 1 -> 3 on the proxy's in-flight metric and back to 1 after the load stops; the
scaling events tell the whole story. Short intervals and cooldowns (0.5 s ticks, 2-3 s cooldowns)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from serving.models import Endpoint, ScalingEvent
from tests.factories import FolderFactory
from tests.live import ROOT, wait_for

WORDS = " ".join(f"w{i}" for i in range(40))  # 40 tokens x ECHO_TOKEN_DELAY 0.02 s = 0.8 s a request


def load(url: str, stop: threading.Event, deadline: float, sent: list[int]) -> None:
    """One client of the bounded load: completions back to back until told to stop or the deadline."""
    body = json.dumps({"prompt": WORDS}).encode()
    while not stop.is_set() and time.monotonic() < deadline:
        request = urllib.request.Request(
            url + "v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
            sent[0] += 1
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)


def test_llm_echo_scales_out_under_load_and_back_in(
    live_factory: Any, api: Any, personas: dict[str, Any], settings: Any
) -> None:
    system = live_factory(AUTOSCALE_INTERVAL="0.5", METRICS_INTERVAL="0.5", PROXY_STATS_INTERVAL="0.5")
    proxy = system.start_proxy()
    settings.SERVING_PROXY_URL = proxy
    source = ROOT / "examples" / "llm-echo"
    folder = FolderFactory(
        owner=personas["owner"], name="llm-echo", files={p.name: p.read_text() for p in source.iterdir() if p.is_file()}
    )
    owner = api("owner")
    created = owner.post(
        "/api/v1/services/",
        {"name": "echo-scaled", "folder": str(folder.pk), "replicas": 1, "open_to_public": True},
        format="json",
    ).json()
    sid, url = created["id"], created["url"]
    rules = f"/api/v1/services/{sid}/rules/"
    common = {"source": "proxy", "metric": "in_flight", "min_replicas": 1, "max_replicas": 3}
    out = owner.post(
        rules,
        {
            **common,
            "direction": "out",
            "comparator": "GREATER_THAN",
            "threshold": 4,
            "step": 1,
            "cooldown": 2,
            "window": 2,
        },
        format="json",
    )
    assert out.status_code == 201, out.json()
    scale_in = owner.post(
        rules,
        {
            **common,
            "direction": "in",
            "comparator": "LESS_THAN",
            "threshold": 1,
            "step": -1,
            "cooldown": 3,
            "window": 3,
        },
        format="json",
    )
    assert scale_in.status_code == 201, scale_in.json()

    def healthy() -> int:
        return sum(r["status"] == "healthy" for r in owner.get(f"/api/v1/services/{sid}/").json()["routes"])

    wait_for(lambda: healthy() == 1, timeout=30, what="1 healthy replica")

    def desired() -> int:
        return Endpoint.objects.get(pk=sid).desired_replicas

    stop, sent = threading.Event(), [0]
    deadline = time.monotonic() + 60  # the load is bounded whatever happens
    clients = [threading.Thread(target=load, args=(url, stop, deadline, sent), daemon=True) for _ in range(12)]
    started = time.monotonic()
    for client in clients:
        client.start()
    try:
        wait_for(lambda: desired() == 3, timeout=40, interval=0.2, what="scale out to 3 under load")
        wait_for(lambda: healthy() == 3, timeout=30, interval=0.2, what="3 healthy replicas")
        scaled_out = time.monotonic() - started
        # The charts' series are there: the proxy's, the replicas' /metrics and their engine stats.
        series = owner.get(f"/api/v1/services/{sid}/metrics/?window=600").json()["series"]
        assert max(v for _, v in series["proxy:in_flight"]) > 4
        assert max(v for _, v in series["inference:llm_echo_requests_waiting"]) > 0
        assert "kernel:cpu_percent" in series and "kernel:mem_bytes" in series
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=15)
    assert sent[0] > 0
    wait_for(lambda: desired() == 1, timeout=40, interval=0.2, what="scale back in to 1 after the load")
    wait_for(
        lambda: healthy() == 1 and len(owner.get(f"/api/v1/services/{sid}/").json()["routes"]) == 1,
        timeout=30,
        what="the extra replicas stopped",
    )

    story = [
        (e.old_replicas, e.new_replicas, e.metric)
        for e in ScalingEvent.objects.filter(endpoint_id=sid, acted=True).order_by("created_at", "id")
    ]
    assert story == [
        (1, 2, "proxy:in_flight"),
        (2, 3, "proxy:in_flight"),
        (3, 2, "proxy:in_flight"),
        (2, 1, "proxy:in_flight"),
    ], story
    shown = owner.get(f"/api/v1/services/{sid}/scaling-events/").json()
    acted = [e for e in shown if e["acted"]]
    assert all(e["observed"] is not None and e["window"] in (2, 3) and e["reason"] for e in acted)
    assert acted[-1]["rule"]["direction"] == "out" and acted[0]["rule"]["direction"] == "in"  # newest first
    # Not-acted decisions explain the waits (cooldowns, the maximum, "no data" before any traffic).
    reasons = {e["reason"].split(" (")[0] for e in shown if not e["acted"]}
    assert reasons & {"rule cooldown", "service cooldown after the last scaling", "already at the rule's maximum"}
    print(f"scaled 1 -> 3 in {scaled_out:.1f} s under load; {sent[0]} requests")
