"""The gateway at the proxy's root (issue 17): the real proxy process, real llm-echo replicas, real
Redis, and the real ``openai`` client. The routing table and the gateway keys are written into Redis
in the format serving/bus/routing.py writes (its own tests cover that side)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from serving.core import tokens
from tests.integration.test_examples import minilm
from tests.integration.test_proxy import KEY, Backend, Proxy, backends, wait_for

__all__ = ["backends", "minilm"]  # the fixtures, imported for their use here (minilm skips without the model)


@pytest.fixture(scope="module")
def gw() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


def grant(
    proxy: Proxy, *, services: list[str] = (), projects: list[str] = (), owner: str = "", expires: float | None = None
) -> tokens.MintedToken:  # type: ignore[assignment]
    """What serving/bus/routing.py does for a gateway key: write its entry, then announce it."""
    minted = tokens.mint(tokens.GATEWAY_KEY_KIND, KEY)
    entry = {
        "digest": minted.digest,
        "expires": expires or time.time() + 3600,
        "services": list(services),
        "projects": list(projects),
        "owner": owner,
    }
    proxy.redis.hset(f"{proxy.prefix}:gateway:keys", minted.lookup, json.dumps(entry))
    proxy.redis.publish(f"{proxy.prefix}:routing:updates", json.dumps({"gateway_key": minted.lookup, "entry": entry}))
    return minted


def revoke(proxy: Proxy, key: tokens.MintedToken) -> None:
    proxy.redis.hdel(f"{proxy.prefix}:gateway:keys", key.lookup)
    proxy.redis.publish(f"{proxy.prefix}:routing:updates", json.dumps({"gateway_key": key.lookup, "entry": None}))


def call(
    proxy: Proxy, path: str, key: str | None, body: Any = None, method: str | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.port}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def chat(model: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello there"}], "model": model}


def two_services(proxy: Proxy, backends: Callable[..., Backend]) -> tuple[str, str, str, str, str]:
    """Two services of a new project serving the models ``alpha-<x>`` and ``beta-<x>``; another
    project's third. Returns the slugs, the models and the project."""
    tag = uuid.uuid4().hex[:6]
    project = f"p-{tag}"
    alpha, beta = backends(MODEL_NAME=f"alpha-{tag}"), backends(MODEL_NAME=f"beta-{tag}")
    slug_a, slug_b = f"a-{tag}", f"b-{tag}"
    proxy.publish(slug_a, [alpha.route()], models=[f"alpha-{tag}"], project=project, owner="1")
    proxy.publish(slug_b, [beta.route()], models=[f"beta-{tag}"], project=project, owner="1")
    proxy.publish(f"c-{tag}", [beta.route()], models=[f"gamma-{tag}"], project="other", owner="2")
    return slug_a, slug_b, f"alpha-{tag}", f"beta-{tag}", project


def test_routes_by_model_and_lists_only_the_keys_models(gw: Proxy, backends: Callable[..., Backend]) -> None:
    slug_a, slug_b, alpha, beta, project = two_services(gw, backends)
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(alpha))[0] == 200, what="the entries")

    for model, slug in ((alpha, slug_a), (beta, slug_b)):
        status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(model))
        assert status == 200, body
        assert body["model"] == model  # the replica that answered serves that model
        assert headers["X-Modelserve-Service"] == slug
    status, headers, body = call(gw, "/v1/completions", key.token, {"model": beta, "prompt": "hi"})
    assert status == 200 and headers["X-Modelserve-Service"] == slug_b, body

    status, _, listing = call(gw, "/v1/models", key.token)
    assert status == 200
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == sorted([alpha, beta])  # not the other project's gamma
    assert all(m["object"] == "model" for m in listing["data"])


def test_unknown_and_forbidden_models_get_the_same_openai_404(gw: Proxy, backends: Callable[..., Backend]) -> None:
    slug_a, _, alpha, beta, _ = two_services(gw, backends)
    only_alpha = grant(gw, services=[f"id-{slug_a}"])
    wait_for(lambda: call(gw, "/v1/chat/completions", only_alpha.token, chat(alpha))[0] == 200, what="the entries")

    status, _, listing = call(gw, "/v1/models", only_alpha.token)
    assert [m["id"] for m in listing["data"]] == [alpha]
    unknown = call(gw, "/v1/chat/completions", only_alpha.token, chat("no-such-model"))
    forbidden = call(gw, "/v1/chat/completions", only_alpha.token, chat(beta))
    for status, _, body in (unknown, forbidden):
        assert status == 404
        assert set(body["error"]) >= {"message", "type", "code"}
        assert body["error"]["code"] == "model_not_found"
        assert body["error"]["type"] == "invalid_request_error"
    assert forbidden[2]["error"]["message"].replace(beta, "X") == unknown[2]["error"]["message"].replace(
        "no-such-model", "X"
    )


def test_bad_keys_and_bodies(gw: Proxy, backends: Callable[..., Backend]) -> None:
    _, _, alpha, _, project = two_services(gw, backends)
    key = grant(gw, projects=[project])
    expired = grant(gw, projects=[project], expires=time.time() - 1)
    endpoint_token = tokens.mint(tokens.ENDPOINT_TOKEN_KIND, KEY)
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(alpha))[0] == 200, what="the entries")

    assert call(gw, "/v1/models", None)[0] == 401
    assert call(gw, "/v1/models", endpoint_token.token)[2]["error"]["code"] == "invalid_api_key"
    assert call(gw, "/v1/models", expired.token)[2]["error"]["code"] == "expired_api_key"
    wrong = key.token[:-4] + ("AAAA" if not key.token.endswith("AAAA") else "BBBB")
    assert call(gw, "/v1/models", wrong)[0] == 401

    status, _, body = call(gw, "/v1/chat/completions", key.token, {"messages": []})
    assert status == 400 and body["error"]["code"] == "invalid_model", body
    assert call(gw, "/v1/chat/completions", key.token, raw=b"[1, 2]")[0] == 400
    assert call(gw, "/v1/chat/completions", key.token, {"model": 5})[0] == 400
    assert call(gw, "/v1/unknown", key.token, chat(alpha))[0] == 404


def test_model_found_early_in_a_large_body_and_missing_past_the_bound(
    gw: Proxy, backends: Callable[..., Backend]
) -> None:
    """The model ahead of a 3 MiB body routes it (the body streams through); a body with no model in
    its first 64 KiB gets 400 without being read to its end."""
    _, _, alpha, _, project = two_services(gw, backends)
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(alpha))[0] == 200, what="the entries")
    big = "x" * (3 << 20)
    status, _, body = call(
        gw, "/v1/chat/completions", key.token, {"model": alpha, "messages": [{"role": "user", "content": big}]}
    )
    assert status == 200, body

    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (key.token.encode(), 10 << 20)
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(head + b'{"messages": [{"role": "user", "content": "' + b"y" * (128 << 10))
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"64 KiB" in answer


def test_revoked_key_is_refused_within_a_second(gw: Proxy, backends: Callable[..., Backend]) -> None:
    _, _, alpha, _, project = two_services(gw, backends)
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(alpha))[0] == 200, what="the entries")
    revoke(gw, key)
    wait_for(lambda: call(gw, "/v1/models", key.token)[0] == 401, timeout=1.0, promise=True, what="the revocation")


def test_the_openai_client(gw: Proxy, backends: Callable[..., Backend]) -> None:
    slug_a, _, alpha, beta, project = two_services(gw, backends)
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(alpha))[0] == 200, what="the entries")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=key.token, max_retries=0)

    assert sorted(m.id for m in client.models.list()) == sorted([alpha, beta])
    response = client.chat.completions.with_raw_response.create(
        model=alpha, messages=[{"role": "user", "content": "hello"}]
    )
    assert response.headers["x-modelserve-service"] == slug_a
    completion = response.parse()
    assert completion.model == alpha and completion.choices[0].message.content
    stream = client.chat.completions.create(
        model=beta, messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces)
    # Streaming with usage: the client asks for the final usage chunk, and it comes through.
    chunks = list(
        client.chat.completions.create(
            model=beta,
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nothing-here", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="msg_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def publish_alias(proxy: Proxy, alias_id: str, name: str, project: str, backends: list[tuple[str, int]]) -> None:
    """What serving/bus/routing.py publish_alias does: write the entry, then announce it."""
    entry = {
        "name": name,
        "project": project,
        "owner": "1",
        "backends": [{"service": f"id-{slug}", "weight": weight} for slug, weight in backends],
    }
    proxy.redis.hset(f"{proxy.prefix}:gateway:aliases", alias_id, json.dumps(entry))
    proxy.redis.publish(f"{proxy.prefix}:routing:updates", json.dumps({"alias": alias_id, "entry": entry}))


def test_an_alias_splits_by_weight_and_is_listed(gw: Proxy, backends: Callable[..., Backend]) -> None:
    slug_a, slug_b, _, _, project = two_services(gw, backends)
    name = f"chat-{uuid.uuid4().hex[:6]}"
    publish_alias(gw, uuid.uuid4().hex, name, project, [(slug_a, 3), (slug_b, 1)])
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(name))[0] == 200, what="the alias")

    served = {slug_a: 0, slug_b: 0}
    for _ in range(400):
        status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(name))
        assert status == 200, body
        served[headers["X-Modelserve-Service"]] += 1
    # 3:1 -> 300 of 400 expected; binomial sd ~8.7, so 240..360 is far outside chance.
    assert 240 <= served[slug_a] <= 360, served

    status, _, listing = call(gw, "/v1/models", key.token)
    assert name in [m["id"] for m in listing["data"]]
    # A key that may call none of the backends neither sees the alias nor reaches it.
    other = grant(gw, projects=["other"])
    wait_for(lambda: call(gw, "/v1/models", other.token)[0] == 200, what="the other key")
    assert name not in [m["id"] for m in call(gw, "/v1/models", other.token)[2]["data"]]
    status, _, body = call(gw, "/v1/chat/completions", other.token, chat(name))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # A key for one backend only: the alias is listed, and every request goes to that backend.
    only_b = grant(gw, services=[f"id-{slug_b}"])
    wait_for(lambda: call(gw, "/v1/chat/completions", only_b.token, chat(name))[0] == 200, what="the key")
    assert name in [m["id"] for m in call(gw, "/v1/models", only_b.token)[2]["data"]]
    for _ in range(10):
        assert call(gw, "/v1/chat/completions", only_b.token, chat(name))[1]["X-Modelserve-Service"] == slug_b


def test_an_alias_fails_over_to_a_backend_with_a_healthy_replica(gw: Proxy, backends: Callable[..., Backend]) -> None:
    tag = uuid.uuid4().hex[:6]
    project = f"p-{tag}"
    spill = backends(MODEL_NAME=f"spill-{tag}")
    own, other = f"own-{tag}", f"spill-{tag}"
    gw.publish(own, [], models=[f"own-{tag}"], project=project, owner="1", status="DEGRADED")  # 0 replicas
    gw.publish(other, [spill.route()], models=[f"spillm-{tag}"], project=project, owner="1")
    name = f"llm-{tag}"
    alias_id = uuid.uuid4().hex
    publish_alias(gw, alias_id, name, project, [(own, 100), (other, 1)])
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(name))[0] == 200, what="the alias")
    for _ in range(30):
        status, headers, body = call(gw, "/v1/chat/completions", key.token, chat(name))
        assert status == 200, body
        assert headers["X-Modelserve-Service"] == other

    # The self-hosted backend gets a replica: it takes (nearly) all the traffic again.
    mine = backends(MODEL_NAME=f"own-{tag}")
    gw.publish(own, [mine.route()], models=[f"own-{tag}"], project=project, owner="1")
    wait_for(
        lambda: call(gw, "/v1/chat/completions", key.token, chat(name))[1].get("X-Modelserve-Service") == own,
        what="the backend's replica",
    )
    served = [call(gw, "/v1/chat/completions", key.token, chat(name))[1]["X-Modelserve-Service"] for _ in range(50)]
    assert served.count(own) >= 45, served

    # The alias removed: its name is unknown again.
    gw.redis.hdel(f"{gw.prefix}:gateway:aliases", alias_id)
    gw.redis.publish(f"{gw.prefix}:routing:updates", json.dumps({"alias": alias_id, "entry": None}))
    wait_for(lambda: call(gw, "/v1/chat/completions", key.token, chat(name))[0] == 404, what="the removal")


def test_embeddings_from_the_minilm_example_through_the_openai_client(gw: Proxy, minilm: int) -> None:
    """The MiniLM example (examples/minilm-embeddings, the real model) behind the gateway; skipped
    where ``make deps-minilm`` has not installed it, as in test_examples.py."""
    tag = uuid.uuid4().hex[:6]
    project, model = f"p-{tag}", "all-MiniLM-L6-v2"
    route = {"id": f"minilm-{minilm}", "host": "127.0.0.1", "port": minilm, "weight": 1}
    gw.publish(f"minilm-{tag}", [route], models=[model], project=project, owner="1")
    key = grant(gw, projects=[project])
    wait_for(lambda: call(gw, "/v1/models", key.token)[0] == 200, what="the key")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=key.token, max_retries=0)
    wait_for(lambda: [m.id for m in client.models.list()] == [model], what="the service's entry")

    response = client.embeddings.with_raw_response.create(model=model, input=["a cat sits", "a kitten sits", "tax law"])
    assert response.headers["x-modelserve-service"] == f"minilm-{tag}"
    vectors = [d.embedding for d in response.parse().data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5
        )

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])  # a real model, not an echo
    # The client asks for base64 by default (and decoded it above); as floats, the same vector.
    again = client.embeddings.create(model=model, input="a cat sits", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
