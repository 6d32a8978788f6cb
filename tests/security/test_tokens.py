"""Tokens and API keys at the REST API (issue 9, Security 2): every bad credential gets a 401 with a
challenge (never a crash, never a fall-through to someone else), digests are compared in constant
time, and neither a token nor a key is stored or logged in full."""

from __future__ import annotations

import ast
import hmac
import inspect
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.test import Client
from django.utils import timezone

from accounts.actions import do_issue_api_key
from accounts.models import ApiKey
from serving.core import tokens
from tests.security.world import World

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def me(authorization: str | None) -> Any:
    client = Client(enforce_csrf_checks=True)
    if authorization is not None:
        client.defaults["HTTP_AUTHORIZATION"] = authorization
    return client.get("/api/v1/me/")


def test_a_good_key_works_with_both_schemes(personas: dict[str, Any]) -> None:
    _, secret = do_issue_api_key(personas["owner"])
    for scheme in ("Token", "Bearer", "token", "bearer"):
        response = me(f"{scheme} {secret}")
        assert response.status_code == 200, scheme
        assert response.json()["username"] == "owner"


def test_every_bad_key_gets_401_with_a_challenge(personas: dict[str, Any], world: World) -> None:
    owner = personas["owner"]
    expired_key, expired = do_issue_api_key(owner, expires_at=timezone.now() + timedelta(seconds=60))
    ApiKey.objects.filter(pk=expired_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    revoked_key, revoked = do_issue_api_key(owner)
    revoked_key.revoked_at = timezone.now()
    revoked_key.save()
    _, good = do_issue_api_key(owner)
    forged = tokens.mint(tokens.API_KEY_KIND, "not-the-installation-key").token
    parsed = tokens.parse(good)
    assert parsed is not None
    same_lookup_other_secret = f"msk_{parsed.lookup}_{'A' * 43}"
    cases = {
        "no header": None,
        "expired": f"Token {expired}",
        "revoked": f"Token {revoked}",
        "forged (another HMAC key)": f"Token {forged}",
        "a real lookup with a wrong secret": f"Token {same_lookup_other_secret}",
        "malformed": "Token nope",
        "empty": "Token ",
        "scheme only": "Token",
        "wrong scheme": f"Basic {good}",
        "BackendAI is for services": f"BackendAI {good}",
        "a service token": f"Token {world.token_secret}",
        "two credentials": f"Token {good} {good}",
        "unicode": f"Token {good[:-1]}é",
        "control character": f"Token {good}\x00",
        "1 MB": "Token " + "a" * (1024 * 1024),
        "1 MB after a good key": f"Token {good}" + "a" * (1024 * 1024),
    }
    for name, header in cases.items():
        response = me(header)
        assert response.status_code == 401, (name, response.status_code)
        assert response.get("WWW-Authenticate", "").startswith("Token"), name
        assert "detail" in response.json(), name
        assert "owner" not in response.content.decode(), name
    assert me(f"Token {good}").status_code == 200  # nothing above broke the good key


def test_a_key_of_a_disabled_user_is_refused(personas: dict[str, Any]) -> None:
    _, secret = do_issue_api_key(personas["stranger"])
    personas["stranger"].is_active = False
    personas["stranger"].save()
    assert me(f"Token {secret}").status_code == 401


# --- constant-time comparison ------------------------------------------------------------------------


def test_verify_compares_with_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    minted = tokens.mint("mst", "k")
    assert tokens.verify(minted.token, minted.digest, "k") is True
    assert tokens.verify(minted.token, "0" * 64, "k") is False
    assert len(calls) == 2
    assert calls[0] == (minted.digest, minted.digest)


def test_the_api_key_check_goes_through_verify(monkeypatch: pytest.MonkeyPatch, personas: dict[str, Any]) -> None:
    from accounts import authentication

    seen: list[str] = []
    real = tokens.verify

    def spy(token: str, digest: str, key: Any) -> bool:
        seen.append(digest)
        return real(token, digest, key)

    monkeypatch.setattr(authentication.tokens, "verify", spy)
    key, secret = do_issue_api_key(personas["owner"])
    assert me(f"Token {secret}").status_code == 200
    assert seen == [key.digest]


def _compared_names(node: ast.Compare) -> set[str]:
    names: set[str] = set()
    for operand in [node.left, *node.comparators]:
        for sub in ast.walk(operand):
            if isinstance(sub, ast.Name):
                names.add(sub.id)
            elif isinstance(sub, ast.Attribute):
                names.add(sub.attr)
    return names


@pytest.mark.parametrize("module", ["serving/core/tokens.py", "accounts/authentication.py", "proxy/app.py"])
def test_no_secret_is_compared_with_equals(module: str) -> None:
    """By inspection: a digest, token or secret is never compared with ``==``/``!=``/``in`` (which
    stop at the first differing byte); only ``hmac.compare_digest`` (via ``tokens.verify``)."""
    tree = ast.parse((ROOT / module).read_text())
    suspicious = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue  # identity, lengths and expiry times are not secrets
        names = {n.lower() for n in _compared_names(node)}
        if any(("digest" in n or "secret" in n) for n in names) or {"token", "known"} & names:
            suspicious.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not suspicious, "\n".join(suspicious)


def test_the_proxy_checks_tokens_in_constant_time() -> None:
    from proxy.app import Proxy as ProxyApp

    source = inspect.getsource(ProxyApp._authorize)
    assert "tokens.verify(" in source and "hmac.compare_digest(" in source


# --- stored only as digests, never logged ------------------------------------------------------------


def every_stored_value() -> str:
    """Every value of every row of every table, as text."""
    parts: list[str] = []
    for model in apps.get_models():
        fields = [f.attname for f in model._meta.concrete_fields]
        for row in model._default_manager.values_list(*fields):
            parts.extend(str(value) for value in row)
    return "\n".join(parts)


def test_tokens_and_keys_are_stored_only_as_digests_and_never_logged(
    personas: dict[str, Any], world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    owner = Client()
    owner.force_login(personas["owner"])
    secrets = [world.token_secret, world.api_key_secret]
    response = owner.post(f"/api/v1/services/{world.service.pk}/tokens/", {}, content_type="application/json")
    assert response.status_code == 201
    secrets.append(response.json()["token"])
    response = owner.post("/api/v1/me/api-keys/", {"name": "ci"}, content_type="application/json")
    assert response.status_code == 201
    secrets.append(response.json()["key"])
    response = owner.post(f"/services/{world.service.pk}/chat/token/")
    assert response.status_code == 200
    secrets.append(response.json()["token"])
    response = owner.post(f"/services/{world.service.pk}/tokens/", {"expires_on": ""})
    assert response.status_code == 201
    page_tokens = _tokens_in(response.content.decode())
    assert page_tokens, "the page shows the new token once"
    secrets += page_tokens
    # Use them, and fail with them, so that every code path that could log one has run.
    for secret in secrets:
        Client().get("/api/v1/me/", HTTP_AUTHORIZATION=f"Token {secret}")
        Client().get("/api/v1/me/", HTTP_AUTHORIZATION=f"Token {secret}x")
    owner.delete(f"/api/v1/services/{world.service.pk}/tokens/{world.token.pk}/")
    stored = every_stored_value()
    logged = caplog.text
    for secret in secrets:
        assert tokens.parse(secret) is not None
        assert secret not in stored, "a token or key is stored in full"
        assert secret[15:] not in stored, "a token's secret part is stored"
        assert secret not in logged, "a token or key was logged"
    digests = set(ApiKey.objects.values_list("digest", flat=True))
    assert tokens.digest(world.api_key_secret, _hmac_key()) in digests


def _tokens_in(text: str) -> list[str]:
    import re

    return re.findall(r"mst_[a-z2-9]{10}_[A-Za-z0-9_-]{43}", text)


def _hmac_key() -> str:
    from django.conf import settings

    return str(settings.TOKEN_HMAC_KEY)
