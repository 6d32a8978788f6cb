"""Gateway keys' limits (issue 17, proxy/limits.py) with the real proxy processes (two for "holds
across proxies"), real llm-echo replicas (they report ``usage``) and the real Redis."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serving.core import tokens
from tests.integration.test_gateway_proxy import call, chat
from tests.integration.test_proxy import KEY, Backend, Proxy, backends, wait_for

__all__ = ["backends"]  # the fixture, imported for its use here


@pytest.fixture(scope="module")
def gw() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


def grant(proxy: Proxy, project: str, **limits: int) -> tokens.MintedToken:
    """A project's gateway key with limits, as serving/bus/routing.py writes it."""
    minted = tokens.mint(tokens.GATEWAY_KEY_KIND, KEY)
    entry = {"digest": minted.digest, "expires": time.time() + 3600, "projects": [project], "owner": "", **limits}
    proxy.redis.hset(f"{proxy.prefix}:gateway:keys", minted.lookup, json.dumps(entry))
    proxy.redis.publish(f"{proxy.prefix}:routing:updates", json.dumps({"gateway_key": minted.lookup, "entry": entry}))
    return minted


def service(proxy: Proxy, backends: Callable[..., Backend], **env: str) -> tuple[str, str]:
    """A service of a new project serving a new model: (model, project)."""
    tag = uuid.uuid4().hex[:6]
    model, project = f"m-{tag}", f"p-{tag}"
    proxy.publish(f"s-{tag}", [backends(MODEL_NAME=model, **env).route()], models=[model], project=project, owner="1")
    return model, project


def early_in_a_minute(need: float = 25.0) -> None:
    """The budgets are per clock minute: start a test where its requests all fall in one minute."""
    if time.time() % 60 > 60 - need:
        wait_for(lambda: time.time() % 60 < 5, timeout=need + 5, promise=True, what="the next minute")


def wait_until_known(proxy: Proxy, model: str, project: str) -> None:
    probe = grant(proxy, project)
    wait_for(lambda: call(proxy, "/v1/chat/completions", probe.token, chat(model))[0] == 200, what="the entries")


def assert_limited(answer: tuple[int, dict[str, str], Any], kind: str) -> None:
    status, headers, body = answer
    assert status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == kind
    assert "Limit" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers[f"x-ratelimit-remaining-{kind}"] == "0"
    assert headers[f"x-ratelimit-reset-{kind}"].endswith("s")


def test_requests_per_minute_gives_429_with_openai_headers(gw: Proxy, backends: Callable[..., Backend]) -> None:
    model, project = service(gw, backends)
    wait_until_known(gw, model, project)
    early_in_a_minute()
    key = grant(gw, project, requests_per_minute=5)
    wait_for(lambda: call(gw, "/v1/models", key.token)[0] == 200, what="the key")  # (not counted)
    answers = [call(gw, "/v1/chat/completions", key.token, chat(model)) for _ in range(7)]
    _, headers, _ = answers[0]
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert int(headers["x-ratelimit-remaining-requests"]) <= 5
    assert [a[0] for a in answers] == [200] * 5 + [429] * 2
    assert_limited(answers[5], "requests")
    assert answers[5][1]["x-ratelimit-limit-requests"] == "5"


def test_requests_per_minute_holds_across_two_proxies(gw: Proxy, backends: Callable[..., Backend]) -> None:
    """Two proxy processes sharing one Redis: the key's minute budget is shared through leases; each
    proxy may admit its ``allowance`` (1 for a limit of 20) on credit, never more."""
    second = Proxy(REDIS_PREFIX=gw.prefix)
    second.prefix = gw.prefix
    try:
        model, project = service(gw, backends)
        wait_until_known(gw, model, project)
        wait_until_known(second, model, project)
        early_in_a_minute()
        limit = 20
        key = grant(gw, project, requests_per_minute=limit)
        wait_for(lambda: call(second, "/v1/models", key.token)[0] == 200, what="the key in the second proxy")
        wait_for(lambda: call(gw, "/v1/models", key.token)[0] == 200, what="the key in the first proxy")
        codes: list[int] = []
        lock = threading.Lock()

        def client(proxy: Proxy) -> None:
            for _ in range(15):
                status = call(proxy, "/v1/chat/completions", key.token, chat(model))[0]
                with lock:
                    codes.append(status)

        threads = [threading.Thread(target=client, args=(p,)) for p in (gw, second, gw, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        admitted = codes.count(200)
        assert set(codes) <= {200, 429}, codes
        # over: at most the allowance per proxy; under: at most a leased slice (1) per proxy left unused
        assert limit - 2 <= admitted <= limit + 2, codes
        minute = int(time.time() // 60)
        counter = int(gw.redis.get(f"{gw.prefix}:gateway:rl:{key.lookup}:r:{minute}") or 0)
        assert counter >= admitted
    finally:
        second.prefix = f"{gw.prefix}-second"  # its close cleans its own keys only: the table is gw's
        second.close()


def test_concurrency_limit(gw: Proxy, backends: Callable[..., Backend]) -> None:
    model, project = service(gw, backends, ECHO_TOKEN_DELAY="0.5")
    key = grant(gw, project, max_concurrency=2)
    wait_for(lambda: call(gw, "/v1/models", key.token)[0] == 200, what="the key")
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "a b c d e f g h"}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    streams = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200"), "a stream within the limit is answered"
            streams.append(s)
        third = call(gw, "/v1/chat/completions", key.token, chat(model))
        assert third[0] == 429 and third[2]["error"]["code"] == "rate_limit_exceeded", third
        assert "max_concurrency 2" in third[2]["error"]["message"]
    finally:
        for s in streams:
            s.close()
    # the streams' ends free their slots
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(model))[0] == 200, what="a free slot")


def test_tokens_per_minute_from_json_and_stream_usage(gw: Proxy, backends: Callable[..., Backend]) -> None:
    model, project = service(gw, backends)
    wait_until_known(gw, model, project)
    early_in_a_minute()
    probe, answers = grant(gw, project), []
    # A new key reaches the proxy by pub/sub: its first call may come before it (401, no usage).
    wait_for(
        lambda: answers.append(call(gw, "/v1/chat/completions", probe.token, chat(model))) or answers[-1][0] == 200,
        what="an answer with usage",
    )
    per_request = answers[-1][2]["usage"]["total_tokens"]
    assert per_request > 0
    key = grant(gw, project, tokens_per_minute=per_request * 6)
    wait_for(lambda: call(gw, "/v1/models", key.token)[0] == 200, what="the key")
    minute = int(time.time() // 60)
    counter = f"{gw.prefix}:gateway:rl:{key.lookup}:t:{minute}"

    # A stream's final usage chunk is charged (the client asked for it with include_usage).
    streamed = {**chat(model), "stream": True, "stream_options": {"include_usage": True}}
    status, headers, _ = call_raw(gw, key.token, streamed)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == str(per_request * 6)
    wait_for(lambda: int(gw.redis.get(counter) or 0) >= per_request, what="the stream's tokens in the counter")

    # JSON answers' usage: admitted until the budget is known spent, then 429 of type tokens.
    statuses = []

    def limited() -> bool:
        answer = call(gw, "/v1/chat/completions", key.token, chat(model))
        statuses.append(answer[0])
        if answer[0] == 429:
            assert_limited(answer, "tokens")
            return True
        return False

    wait_for(limited, what="the tokens limit")
    admitted = statuses.count(200) + 1
    # reached after 6 requests' tokens; passed by at most what one request in flight uses, plus the
    # requests admitted while the last lease answer was on the way
    assert 5 <= admitted <= 8, statuses


def call_raw(proxy: Proxy, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """A streamed answer read to its end (SSE: not JSON)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()
