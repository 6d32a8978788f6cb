"""LLM Chat Test page (S8) per persona, its short-lived chat token, and the same-origin relay that
streams from the service's endpoint (here a stand-in proxy on a loopback port that records what it
received and answers like the proxy and llm-echo do)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client
from django.urls import reverse
from django.utils import timezone

from serving.actions import services
from serving.models import Endpoint, EndpointToken
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import free_port


class StandIn(BaseHTTPRequestHandler):
    """Answers /e/<slug>/v1/models and streams /e/<slug>/v1/chat/completions; 401 without a token."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []  # shared with the test on purpose

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: bytes = b"") -> bool:
        StandIn.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.headers.get("Authorization") != "Bearer good":
            self._json(401, {"error": {"code": "missing_token", "message": "This service needs a token."}})
            return False
        return True

    def do_GET(self) -> None:
        if self._record() and self.path.endswith("/v1/models"):
            self._json(200, {"object": "list", "data": [{"id": "echo-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self._record(body):
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for word in ("hello ", "there", None):
            delta = {"content": word} if word else {}
            event = {"choices": [{"index": 0, "delta": delta, "finish_reason": None if word else "stop"}]}
            data = f"data: {json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            self.wfile.flush()
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))


@pytest.fixture
def stand_in(settings: Any) -> Iterator[str]:
    StandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.SERVING_PROXY_URL = f"http://127.0.0.1:{server.server_address[1]}"
    yield settings.SERVING_PROXY_URL
    server.shutdown()
    server.server_close()


@pytest.fixture
def service(personas: dict[str, Any]) -> Endpoint:
    folder = FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="echo",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )
    return services.do_create_service(
        acting_user=personas["owner"],
        name="echo-chat",
        folder=folder,
        project=personas["project"],
        environ={"MODEL_NAME": "echo-model"},
    )


def client_for(personas: dict[str, Any], who: str | None, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    if who:
        client.force_login(personas[who])
    return client


def test_chat_page_per_persona(personas: dict[str, Any], service: Endpoint) -> None:
    page = reverse("serving:chat", kwargs={"pk": service.pk})
    for who in ("owner", "teammate", "admin"):
        response = client_for(personas, who).get(page)
        assert response.status_code == 200, who
        html = response.content.decode()
        assert 'data-model="echo-model"' in html
        assert f'data-relay="{page}v1"' in html
        assert service.url in html
        assert "Generate a chat token" in html
    assert client_for(personas, "stranger").get(page).status_code == 404
    anonymous = client_for(personas, None).get(page)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith(reverse("login"))


def test_chat_token_is_short_lived_audited_and_only_for_readers(personas: dict[str, Any], service: Endpoint) -> None:
    url = reverse("serving:chat-token", kwargs={"pk": service.pk})
    assert client_for(personas, "teammate").get(url).status_code == 405
    assert client_for(personas, "stranger").post(url).status_code == 404
    assert client_for(personas, None).post(url).status_code == 302
    # CSRF applies: a page on another site can not mint tokens with the user's session.
    assert client_for(personas, "teammate", enforce_csrf_checks=True).post(url).status_code == 403
    response = client_for(personas, "teammate").post(url)
    assert response.status_code == 200
    body = response.json()
    token = EndpointToken.objects.get(endpoint=service)
    assert body["token"].startswith(token.prefix) and body["prefix"] == token.prefix
    assert token.created_by == personas["teammate"]
    assert timezone.now() + dt.timedelta(minutes=55) < token.expires_at <= timezone.now() + dt.timedelta(hours=1)
    assert service.events.filter(kind="token_issued").exists()


async def _relay(
    user: Any, path: str, method: str = "get", body: Any = None, token: str | None = "good"
) -> tuple[int, str, bytes]:
    client = AsyncClient()
    if user is not None:
        await client.aforce_login(user)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if method == "post":
        response = await client.post(path, json.dumps(body), content_type="application/json", headers=headers)
    else:
        response = await client.get(path, headers=headers)
    if getattr(response, "streaming", False):
        chunks = [chunk async for chunk in response.streaming_content]
        content = b"".join(chunks)
    else:
        content = response.content
    return response.status_code, response.get("Content-Type", ""), content


@pytest.mark.django_db(transaction=True)
def test_relay_streams_from_the_endpoint_with_the_pages_token_only(
    personas: dict[str, Any], service: Endpoint, stand_in: str
) -> None:
    base = reverse("serving:chat", kwargs={"pk": service.pk}) + "v1/"
    relay = async_to_sync(_relay)
    status, _type, content = relay(personas["owner"], base + "models")
    assert status == 200
    assert json.loads(content)["data"][0]["id"] == "echo-model"
    seen = StandIn.seen[-1]
    assert seen["path"] == f"/e/{service.slug}/v1/models"
    assert seen["headers"]["Authorization"] == "Bearer good"
    assert "Cookie" not in seen["headers"]  # the session never leaves the web server

    question = {"model": "echo-model", "messages": [{"role": "user", "content": "hello there"}], "stream": True}
    status, content_type, content = relay(personas["teammate"], base + "chat/completions", "post", question)
    assert status == 200
    assert content_type.startswith("text/event-stream")
    words = [
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in content.decode().splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(words) == "hello there"
    assert content.decode().rstrip().endswith("data: [DONE]")
    assert json.loads(StandIn.seen[-1]["body"]) == question

    # The proxy's own refusal comes back as it is (the page puts it in words).
    status, _type, content = relay(personas["owner"], base + "models", token=None)
    assert status == 401
    assert json.loads(content)["error"]["code"] == "missing_token"


@pytest.mark.django_db(transaction=True)
def test_relay_refuses_strangers_other_paths_and_says_when_the_proxy_is_down(
    personas: dict[str, Any], service: Endpoint, settings: Any
) -> None:
    settings.SERVING_PROXY_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    base = reverse("serving:chat", kwargs={"pk": service.pk}) + "v1/"
    relay = async_to_sync(_relay)
    status, _type, content = relay(personas["stranger"], base + "models")
    assert status == 404
    status, _type, content = relay(None, base + "models")
    assert status == 401
    assert "log in again" in json.loads(content)["error"]["message"]
    for path in ("embeddings", "../../admin/", "models/../../x"):
        status, _type, _content = relay(personas["owner"], base + path)
        assert status == 404, path
    status, _type, content = relay(personas["owner"], base + "models")
    assert status == 502
    error = json.loads(content)["error"]
    assert error["code"] == "proxy_unreachable"
    assert service.url in error["message"] and "did not answer" in error["message"]


def test_relay_post_needs_csrf(personas: dict[str, Any], service: Endpoint) -> None:
    url = reverse("serving:chat", kwargs={"pk": service.pk}) + "v1/chat/completions"
    client = client_for(personas, "owner", enforce_csrf_checks=True)
    assert client.post(url, "{}", content_type="application/json").status_code == 403
