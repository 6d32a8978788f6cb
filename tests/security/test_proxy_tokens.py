"""Tokens at the real data plane (``python -m proxy`` + real Redis), issued and revoked through the REST
API: every bad credential gets 401, a revoked token is refused within 1 s of the API's answer, an
absurd header is a clean 4xx, the platform token never reaches the replica, and no process logs it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client

from serving.bus import routing
from serving.core import tokens
from serving.models import Route
from tests.integration.test_proxy import KEY, Backend, Proxy, stop, wait_for
from tests.security.world import World, build_world

pytestmark = pytest.mark.django_db


@pytest.fixture
def proxy(settings: Any) -> Iterator[Proxy]:
    p = Proxy()
    # The web app writes where this proxy reads, with the key it verifies with.
    settings.REDIS_PREFIX = p.prefix
    settings.TOKEN_HMAC_KEY = KEY
    yield p
    p.close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend(aux=True)
    yield b
    stop(b.proc)


def serve(world: World, backend: Backend) -> None:
    Route.objects.filter(pk=world.route.pk).update(host="127.0.0.1", port=backend.port, status=Route.Status.HEALTHY)
    routing.publish_endpoint(str(world.service.pk))


def issue(client: Client, world: World) -> tuple[str, str]:
    response = client.post(f"/api/v1/services/{world.service.pk}/tokens/", {}, content_type="application/json")
    assert response.status_code == 201, response.content
    body = response.json()
    return body["id"], body["token"]


def test_tokens_at_the_proxy(
    proxy: Proxy,
    backend: Backend,
    personas: dict[str, Any],
    django_capture_on_commit_callbacks: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = Client()
    owner.force_login(personas["owner"])
    with django_capture_on_commit_callbacks(execute=True):
        world = build_world(personas["owner"], personas["project"])
        neighbour = build_world(personas["stranger"], None)
    serve(world, backend)
    serve(neighbour, backend)
    slug = world.service.slug
    with django_capture_on_commit_callbacks(execute=True):
        token_id, token = issue(owner, world)
    # "A token works at the proxy as soon as the call that created it has returned" (DESIGN §7).
    wait_for(
        lambda: proxy.call(slug, "headers", token=token)[0] == 200, timeout=1.0, what="the new token", promise=True
    )
    for scheme in ("BackendAI", "Bearer", "backendai", "bearer"):
        status, _, body = proxy.call(slug, "headers", token=token, scheme=scheme)
        assert status == 200, scheme
        forwarded = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
        assert "authorization" not in forwarded, "the platform token must not reach the replica"

    api_key = world.api_key_secret
    cases: dict[str, tuple[str | None, str]] = {
        "missing": (None, "BackendAI"),
        "empty": ("", "BackendAI"),
        "malformed": ("nope", "BackendAI"),
        "wrong scheme": (token, "Basic"),
        "the DRF scheme": (token, "Token"),
        "another service's token": (neighbour.token_secret, "BackendAI"),
        "an API key": (api_key, "Bearer"),
        "forged": (tokens.mint("mst", "another-key").token, "BackendAI"),
        "unknown": (tokens.mint("mst", KEY).token, "BackendAI"),
        "a real lookup with a wrong secret": (token[:15] + "A" * 43, "BackendAI"),
        "two tokens": (f"{token} {token}", "BackendAI"),
        "long": (token + "a" * 4000, "BackendAI"),
    }
    for name, (credential, scheme) in cases.items():
        status, headers, body = proxy.call(slug, "headers", token=credential, scheme=scheme)
        assert status == 401, (name, status, body[:200])
        assert "BackendAI" in headers.get("WWW-Authenticate", ""), name
        assert json.loads(body)["error"]["code"] in ("missing_token", "malformed_token", "invalid_token"), name

    # Expired: the row's expiry passes, the table is republished.
    with django_capture_on_commit_callbacks(execute=True):
        expiring_id, expiring = issue(owner, world)
    wait_for(
        lambda: proxy.call(slug, "headers", token=expiring)[0] == 200,
        timeout=1.0,
        what="the second token",
        promise=True,
    )
    from django.utils import timezone

    from serving.models import EndpointToken

    EndpointToken.objects.filter(pk=expiring_id).update(expires_at=timezone.now())
    routing.publish_endpoint(str(world.service.pk))
    wait_for(lambda: proxy.call(slug, "headers", token=expiring)[0] == 401, timeout=1.0, what="expiry", promise=True)

    # Revoked through the API: refused within 1 s of the DELETE's answer.
    with django_capture_on_commit_callbacks(execute=True):
        response = owner.delete(f"/api/v1/services/{world.service.pk}/tokens/{token_id}/")
    assert response.status_code == 204
    revoked_at = time.monotonic()
    wait_for(lambda: proxy.call(slug, "headers", token=token)[0] == 401, timeout=1.0, what="revocation", promise=True)
    elapsed = time.monotonic() - revoked_at
    print(f"revocation effective at the proxy after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    assert proxy.call(neighbour.service.slug, "headers", token=neighbour.token_secret)[0] == 200

    # Nothing above is in any process's log, nor in the routing table (digests only).
    table = b"".join(proxy.redis.hvals(f"{proxy.prefix}:routing")).decode()
    for secret in (token, expiring, neighbour.token_secret, api_key):
        assert secret not in proxy.log_text()
        assert secret not in caplog.text
        assert secret not in table
        assert secret[15:] not in table


def _head(proxy: Proxy, header: bytes) -> bytes:
    request = b"GET /e/whatever/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n\r\n"
    return proxy.raw(request, until=lambda got: b"\r\n\r\n" in got)


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
def test_an_absurd_authorization_header_is_a_clean_4xx(proxy: Proxy, size: int) -> None:
    try:
        answer = _head(proxy, b"BackendAI " + b"a" * size)
    except (ConnectionResetError, BrokenPipeError):
        answer = b""  # refused before all of it was read: acceptable, as long as the proxy lives
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:200]
    assert proxy.proc.poll() is None, "the proxy crashed"
    assert proxy.health().get("routing_table_loaded")
