"""Scale to zero with real parts (issue 16): control worker (its wake listener), node worker, beat,
one or two real proxies and llm-echo replicas on the local engine.

A service with a short idle timeout sleeps at 0 replicas (status SLEEPING, its replicas gone); a
plain request and a streaming one each wake it and get their answer; the scaling log has each wake
with its cold-start time; the held requests are bounded (503 with Retry-After beyond); two proxies
holding requests for the same service cause one wake.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from serving.models import Endpoint, Route, ScalingEvent, ServiceEvent
from tests.live import LiveSystem, _answers, free_port, wait_for
from tests.reliability.conftest import FAST_ECHO_DEFINITION, echo_folder

FAST = {"SLEEP_INTERVAL": "0.3", "RECONCILE_INTERVAL": "0.5"}
CHAT = {"model": "llm-echo", "messages": [{"role": "user", "content": "wake up"}]}


def start_proxy(system: LiveSystem, name: str, **env: str) -> str:
    port, admin = free_port(), free_port()
    system._spawn(
        name,
        [sys.executable, "-m", "proxy"],
        PROXY_PORT=str(port),
        PROXY_ADMIN_PORT=str(admin),
        PROXY_STATS_INTERVAL="0.3",
        **env,
    )
    wait_for(lambda: _answers(f"http://127.0.0.1:{admin}/healthz"), timeout=30, what=f"{name} to answer")
    return f"http://127.0.0.1:{port}"


def create(api: Any, personas: dict[str, Any], **fields: Any) -> dict[str, Any]:
    folder = echo_folder(personas["owner"], definition=FAST_ECHO_DEFINITION)
    body = {"name": "sleepy", "folder": str(folder.pk), "replicas": 1, "open_to_public": True, **fields}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return dict(response.json())


def status(api: Any, sid: str) -> str:
    return str(api("owner").get(f"/api/v1/services/{sid}/").json()["status"])


def asleep(api: Any, sid: str) -> bool:
    """SLEEPING, and its replicas really gone (none left on the engine's side of the table)."""
    return status(api, sid) == "SLEEPING" and not Route.objects.filter(endpoint_id=sid).exists()


def chat(
    proxy: str, slug: str, stream: bool = False, timeout: float = 60, request_id: str = ""
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", **({"X-Request-ID": request_id} if request_id else {})}
    request = urllib.request.Request(
        f"{proxy}/e/{slug}/v1/chat/completions", data=json.dumps({**CHAT, "stream": stream}).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wake_lines(sid: str) -> list[ScalingEvent]:
    return list(ScalingEvent.objects.filter(endpoint_id=sid, metric="wake").order_by("created_at"))


def test_sleeps_when_idle_and_a_plain_or_a_streaming_request_wakes_it(
    live_factory: Any, api: Any, personas: dict[str, Any]
) -> None:
    system = live_factory(**FAST)
    proxy = start_proxy(system, "proxy")
    created = create(api, personas)
    sid, slug = created["id"], created["slug"]
    wait_for(lambda: status(api, sid) == "HEALTHY", timeout=60, what="the first replica")
    assert chat(proxy, slug)[0] == 200
    response = api("owner").patch(f"/api/v1/services/{sid}/", {"idle_timeout": 2}, format="json")
    assert response.status_code == 200, response.json()

    # No request for 2 s: it sleeps, and reads as sleeping, not as an error.
    wait_for(lambda: asleep(api, sid), timeout=30, what="the service to sleep")
    slept = ServiceEvent.objects.get(endpoint_id=sid, kind="slept")
    assert "idle timeout 2 s" in slept.message and slept.level == "info"
    assert ScalingEvent.objects.filter(endpoint_id=sid, metric="idle", old_replicas=1, new_replicas=0).exists()

    # A plain request wakes it and gets its answer (held meanwhile, not 503).
    started = time.monotonic()
    code, _, body = chat(proxy, slug, request_id="the-waking-request")
    assert code == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "wake up"
    print(f"\n[wake by a plain request] answered after {time.monotonic() - started:.2f} s")
    first = wait_for(lambda: [w for w in wake_lines(sid) if w.observed is not None], timeout=15, what="cold start")
    assert len(first) == 1 and 0 < first[0].observed < 60 and "cold start" in first[0].reason
    assert first[0].old_replicas == 0 and first[0].new_replicas == 1
    assert ServiceEvent.objects.filter(endpoint_id=sid, kind="woken").count() == 1
    # The held request's id reached the wake's event (proxy -> wake request -> the control worker).
    assert ServiceEvent.objects.get(endpoint_id=sid, kind="woken").request_id == "the-waking-request"
    assert ServiceEvent.objects.filter(endpoint_id=sid, kind="awake").count() == 1

    # Asleep again; a streaming request wakes it the same way and streams its tokens.
    wait_for(lambda: asleep(api, sid), timeout=30, what="the service to sleep again")
    code, headers, body = chat(proxy, slug, stream=True)
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream"), body
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "wake up"
    wait_for(lambda: len([w for w in wake_lines(sid) if w.observed is not None]) == 2, timeout=15, what="2 wakes")


def test_two_proxies_cause_one_wake_and_held_requests_are_bounded(
    live_factory: Any, api: Any, personas: dict[str, Any]
) -> None:
    system = live_factory(**FAST)
    one = start_proxy(system, "proxy-1", PROXY_WAKE_QUEUE="2")
    two = start_proxy(system, "proxy-2", PROXY_WAKE_QUEUE="2")
    # A replica that takes 3 s to start: the requests below are all held while it wakes.
    created = create(api, personas, idle_timeout=1, environ={"ECHO_STARTUP_DELAY": "3"})
    sid, slug = created["id"], created["slug"]
    wait_for(lambda: asleep(api, sid), timeout=60, what="the service to sleep")
    assert Endpoint.objects.get(pk=sid).wake_replicas == 1

    answers: list[int] = []

    def call(proxy: str) -> None:
        answers.append(chat(proxy, slug)[0])

    threads = [threading.Thread(target=call, args=(p,)) for p in (one, one, two, two)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    # Each proxy holds at most 2 requests for the service: a third one gets 503 with Retry-After at once.
    code, headers, body = chat(one, slug, timeout=5)
    assert code == 503 and headers.get("Retry-After") == "5", body
    assert b"already wait" in body
    for thread in threads:
        thread.join(timeout=60)
    assert answers == [200, 200, 200, 200]
    # Four held requests at two proxies: one wake.
    assert len(wake_lines(sid)) == 1
    assert ServiceEvent.objects.filter(endpoint_id=sid, kind="woken").count() == 1
    line = wait_for(lambda: wake_lines(sid)[0].observed, timeout=15, what="the cold start")
    assert line >= 3  # the replica's own 3 s start is in it
