"""Gateway usage (issue 17): the real proxy process counts each key's use per service and day, pushes
it to Redis in batches (and at a graceful stop), the control plane folds it into GatewayUsage rows,
and the API gives them as JSON and CSV. Real llm-echo replicas report the usage compared against."""

from __future__ import annotations

import csv
import io
import json
import signal
import uuid
from collections.abc import Callable
from typing import Any

import openai
import pytest

from serving.bus import routing
from serving.control import usage
from serving.models import GatewayKey, GatewayUsage
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.integration.test_gateway_proxy import call
from tests.integration.test_proxy import KEY, Backend, Proxy, backends, stop, wait_for

__all__ = ["backends"]  # the fixture, imported for its use here

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )


def serve(api: Any, folder: Folder, proxy: Proxy, backends: Callable[..., Backend]) -> tuple[str, str, str]:
    """A service in the DB and its llm-echo replica in the proxy's table, and a key for it made
    through the API (published as serving/bus/routing.py does). Returns (model, service id, key)."""
    model = f"echo-{uuid.uuid4().hex[:6]}"
    created = api("owner").post(
        "/api/v1/services/",
        {"name": model, "folder": str(folder.pk), "replicas": 1, "project": folder.project_id, "model_names": [model]},
        format="json",
    )
    assert created.status_code == 201, created.json()
    service = created.json()["id"]
    replica = backends(MODEL_NAME=model)
    proxy.publish(model, [replica.route()], id=service, models=[model], project=str(folder.project_id))
    made = api("owner").post("/api/v1/gateway-keys/", {"name": "usage", "services": [service]}, format="json")
    assert made.status_code == 201, made.json()
    routing.publish_gateway_key(made.json()["id"])  # (the API's on_commit does not run inside a test's transaction)
    return model, service, made.json()["key"]


def client(proxy: Proxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key=key, max_retries=0)


def chats(proxy: Proxy, key: str, model: str) -> tuple[int, int, int]:
    """Three plain chats, two streams with usage and one without: (requests, prompt, completion) as
    the replica reported them."""
    oa = client(proxy, key)
    wait_for(lambda: call(proxy, "/v1/models", key)[0] == 200, what="the proxy to know the key")
    prompt = completion = requests = 0
    for text in ("hello", "hello there friend", "one two three four five"):
        answer = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
        assert answer.usage is not None
        prompt, completion, requests = (
            prompt + answer.usage.prompt_tokens,
            completion + answer.usage.completion_tokens,
            requests + 1,
        )
    for text in ("a streamed reply", "another streamed reply here"):
        stream = oa.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            stream=True,
            stream_options={"include_usage": True},
        )
        last = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(last) == 1
        prompt, completion, requests = (
            prompt + last[0].prompt_tokens,
            completion + last[0].completion_tokens,
            requests + 1,
        )
    for _ in oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "no usage"}], stream=True):
        pass  # the client did not ask for usage: none reported, none counted
    return requests + 1, prompt, completion


def test_usage_rows_match_what_the_replicas_reported_json_and_csv(
    api: Any, folder: Folder, backends: Callable[..., Backend], settings: Any
) -> None:
    proxy = Proxy()
    try:
        settings.REDIS_PREFIX, settings.TOKEN_HMAC_KEY = proxy.prefix, KEY
        model, service, key = serve(api, folder, proxy, backends)
        requests, prompt, completion = chats(proxy, key, model)
        status, _, _ = call(proxy, "/v1/chat/completions", key, {"model": model, "messages": "not a list"})
        assert status >= 400
        requests += 1
        assert prompt and completion

        def folded() -> bool:
            usage.fold()
            row = GatewayUsage.objects.filter(endpoint_id=service).first()
            return row is not None and row.requests >= requests

        wait_for(folded, what="the usage to reach the database")
        row = GatewayUsage.objects.get(endpoint_id=service)
        assert (row.requests, row.prompt_tokens, row.completion_tokens, row.errors) == (requests, prompt, completion, 1)
        assert sum(row.latency.values()) == requests
        usage.fold()  # nothing new: nothing added twice
        assert GatewayUsage.objects.get(endpoint_id=service).requests == requests

        key_id = GatewayKey.objects.get(usage=row).pk
        body = api("owner").get(f"/api/v1/gateway-keys/{key_id}/usage/").json()
        assert len(body) == 1
        assert body[0]["service"] == service and body[0]["service_name"] == model
        assert (body[0]["requests"], body[0]["prompt_tokens"], body[0]["completion_tokens"], body[0]["errors"]) == (
            requests,
            prompt,
            completion,
            1,
        )
        assert 0 < body[0]["p50_ms"] <= body[0]["p95_ms"]
        answer = api("owner").get(f"/api/v1/gateway-keys/{key_id}/usage/?format=csv")
        assert answer.status_code == 200 and answer["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(answer.content.decode())))
        assert rows[0]["day"] == body[0]["day"] and int(rows[0]["prompt_tokens"]) == prompt
        assert int(rows[0]["requests"]) == requests
        assert api("stranger").get(f"/api/v1/gateway-keys/{key_id}/usage/").status_code == 404
    finally:
        proxy.close()


def test_a_graceful_stop_loses_no_usage(
    api: Any, folder: Folder, backends: Callable[..., Backend], settings: Any
) -> None:
    proxy = Proxy(PROXY_STATS_INTERVAL="3600")  # no push but the one at the stop
    try:
        settings.REDIS_PREFIX, settings.TOKEN_HMAC_KEY = proxy.prefix, KEY
        model, service, key = serve(api, folder, proxy, backends)
        requests, prompt, completion = chats(proxy, key, model)
        usage.fold()
        assert not GatewayUsage.objects.filter(endpoint_id=service).exists()  # still in the proxy's memory
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=15) == 0
        usage.fold()
        row = GatewayUsage.objects.get(endpoint_id=service)
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (requests, prompt, completion)
        assert json.dumps(row.latency)
    finally:
        stop(proxy.proc)
        proxy.close()
