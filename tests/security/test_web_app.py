"""The web app (issue 9, Security 6): production settings, security headers and the
Content-Security-Policy, login and API key rate limiting, and XSS in every user-provided string a page
shows. CSRF is covered by test_hostile_input.py and the access matrix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings
from django.test import AsyncClient, Client
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import User
from serving.models import AutoScalingRule, Endpoint, Node, ResourcePreset, Route, ScalingEvent, ServiceEvent
from storage.models import Folder
from tests.live import free_port
from tests.security.world import World

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_KEYS = [
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SESSION_COOKIE_HTTPONLY",
    "SECURE_PROXY_SSL_HEADER",
    "SECURE_HSTS_SECONDS",
    "SECURE_CONTENT_TYPE_NOSNIFF",
    "SECURE_REFERRER_POLICY",
    "X_FRAME_OPTIONS",
    "CONTENT_SECURITY_POLICY",
    "LOGIN_FAILURE_LIMIT",
    "LOGIN_FAILURE_WINDOW",
    "DEBUG",
]


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECURE", "DEBUG", "LOGIN_FAILURE", "SESSION"))}
    env.update(DJANGO_SETTINGS_MODULE="config.settings", **extra)
    return env


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    """The settings a fresh process computes with SECURE=true (the production switch), nothing else."""
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({{k: getattr(s, k) for k in {PRODUCTION_KEYS!r}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_child_env(SECURE="true"),
        capture_output=True,
        text=True,
        check=True,
    )
    values: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


# --- production settings and headers ---------------------------------------------------------------


def test_secure_true_switches_on_every_production_setting(production: dict[str, Any]) -> None:
    assert production["DEBUG"] is False
    assert production["SESSION_COOKIE_SECURE"] is True
    assert production["CSRF_COOKIE_SECURE"] is True
    assert production["SESSION_COOKIE_HTTPONLY"] is True
    assert production["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert production["SECURE_HSTS_SECONDS"] >= 180 * 24 * 3600
    assert production["SECURE_CONTENT_TYPE_NOSNIFF"] is True
    assert production["SECURE_REFERRER_POLICY"] in ("same-origin", "strict-origin-when-cross-origin", "no-referrer")
    assert production["X_FRAME_OPTIONS"] == "DENY"
    assert "frame-ancestors 'none'" in production["CONTENT_SECURITY_POLICY"]
    assert (production["LOGIN_FAILURE_LIMIT"], production["LOGIN_FAILURE_WINDOW"]) == (10, 900)


def test_check_deploy_with_secure_true_warns_only_about_deliberate_choices() -> None:
    """W005/W021: endpoints may live on plain-HTTP subdomains (SERVING_DOMAIN), so HSTS does not cover
    subdomains nor ask for preloading; W008: TLS is terminated (and redirected) in front of daphne."""
    out = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        check=False,
        cwd=ROOT,
        env=_child_env(SECURE="true"),
        capture_output=True,
        text=True,
    )
    found = set(re.findall(r"\((security\.[WE]\d+)\)", out.stdout + out.stderr))
    assert found <= {"security.W005", "security.W008", "security.W021"}, out.stdout + out.stderr


@pytest.fixture
def secure_settings(settings: Any, production: dict[str, Any]) -> Any:
    for key in ("SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS"):
        setattr(settings, key, production[key])
    settings.SECURE_PROXY_SSL_HEADER = tuple(production["SECURE_PROXY_SSL_HEADER"])
    return settings


def test_headers_and_cookies_behind_tls(secure_settings: Any, personas: dict[str, Any]) -> None:
    user = User.objects.create_user(f"tls-{uuid.uuid4().hex[:8]}", password="correct horse battery")
    client = Client(HTTP_X_FORWARDED_PROTO="https")
    page = client.get(reverse("login"))
    assert page.status_code == 200
    assert page["Strict-Transport-Security"].startswith(f"max-age={secure_settings.SECURE_HSTS_SECONDS}")
    assert page["X-Frame-Options"] == "DENY"
    assert page["X-Content-Type-Options"] == "nosniff"
    assert page["Referrer-Policy"] == "same-origin"
    assert "frame-ancestors 'none'" in page["Content-Security-Policy"]
    assert page.cookies["csrftoken"]["secure"]
    login = client.post(reverse("login"), {"username": user.username, "password": "correct horse battery"})
    assert login.status_code == 302
    session = login.cookies["sessionid"]
    assert session["secure"] and session["httponly"]
    # Plain HTTP (no X-Forwarded-Proto from the TLS terminator): no HSTS, as the RFC says.
    assert "Strict-Transport-Security" not in Client().get(reverse("login"))
    # The forwarded header is trusted only when SECURE is on (else anyone could claim https).
    assert Client(HTTP_X_FORWARDED_PROTO="https").get(reverse("healthz")).wsgi_request.is_secure()


def test_forwarded_proto_is_not_trusted_without_secure(settings: Any) -> None:
    assert settings.SECURE is False and settings.SECURE_PROXY_SSL_HEADER is None
    assert not Client(HTTP_X_FORWARDED_PROTO="https").get(reverse("healthz")).wsgi_request.is_secure()


# --- Content-Security-Policy: every page works without inline code ----------------------------------


class _Inline(HTMLParser):
    """Everything on a page that a policy without 'unsafe-inline' would block."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=…>")
            if name == "style":
                self.found.append(f"<{tag} style=…>")
            if name in ("href", "src", "action", "formaction") and (value or "").strip().lower().startswith(
                "javascript:"
            ):
                self.found.append(f"<{tag} {name}=javascript:…>")
        if tag == "style":
            self.found.append("<style>")
        if tag == "script" and not named.get("src") and named.get("type") != "application/json":
            self.found.append("<script> without src")


def _html_pages(world: World) -> dict[str, str]:
    service, folder = world.service.pk, world.folder.pk
    return {
        "services": reverse("serving:list"),
        "launcher": reverse("serving:new"),
        "detail": reverse("serving:detail", kwargs={"pk": service}),
        "chat": reverse("serving:chat", kwargs={"pk": service}),
        "modify": reverse("serving:modify", kwargs={"pk": service}),
        "terminate": reverse("serving:terminate", kwargs={"pk": service}),
        "folders": reverse("storage:list"),
        "explorer": reverse("storage:explorer", kwargs={"folder_id": folder}),
        "preview": reverse("storage:preview", kwargs={"folder_id": folder}) + f"?path={world.file_path}",
        "admin": reverse("admin:index"),
        "admin endpoints": reverse("admin:serving_endpoint_changelist"),
        "admin endpoint": reverse("admin:serving_endpoint_change", args=[service]),
    }


def _strict(policy: str) -> None:
    directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
    for name in ("script-src", "style-src"):
        assert directives[name] == ["'self'"], policy
    assert directives["object-src"] == ["'none'"] and directives["frame-ancestors"] == ["'none'"], policy
    assert "'unsafe-eval'" not in policy and "'unsafe-inline'" not in policy


def test_every_page_has_a_strict_policy_and_no_inline_code(personas: dict[str, Any], world: World) -> None:
    client = Client()
    client.force_login(personas["admin"])
    pages = {"login (anonymous)": reverse("login"), **_html_pages(world)}
    for name, url in pages.items():
        response = (Client() if name.endswith("(anonymous)") else client).get(url)
        assert response.status_code == 200, (name, response.status_code)
        _strict(response["Content-Security-Policy"])
        parser = _Inline()
        parser.feed(response.content.decode())
        assert parser.found == [], f"{name} ({url}) has inline code a strict policy blocks: {parser.found}"


def test_the_api_docs_page_gets_only_the_relaxed_policy_it_needs(personas: dict[str, Any]) -> None:
    client = Client()
    client.force_login(personas["owner"])
    policy = client.get(reverse("api-docs"))["Content-Security-Policy"]
    assert "https://cdn.jsdelivr.net" in policy and "frame-ancestors 'none'" in policy
    assert "object-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-eval" not in policy


def test_scripts_never_build_html_from_strings() -> None:
    """Chat output, logs, replica errors and names reach the DOM through the scripts: only as text."""
    sinks = re.compile(r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc")
    for script in sorted((ROOT / "static" / "js").glob("*.js")):
        hits = [line for line in script.read_text().splitlines() if sinks.search(line)]
        assert hits == [], f"{script.name} writes HTML from strings: {hits}"


# --- login rate limiting --------------------------------------------------------------------------


def _user(password: str = "correct horse battery") -> User:
    return User.objects.create_user(f"rl-{uuid.uuid4().hex[:10]}", password=password)


def _login(username: str, password: str, address: str = "127.0.0.1") -> Any:
    return Client(REMOTE_ADDR=address).post(reverse("login"), {"username": username, "password": password})


def test_login_is_blocked_after_repeated_failures(settings: Any) -> None:
    settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW = 3, 900
    user = _user()
    for _ in range(3):
        assert _login(user.username, "wrong").status_code == 200
    blocked = _login(user.username.upper(), "correct horse battery")  # the right one, even: not tried
    assert blocked.status_code == 429
    assert blocked["Retry-After"] == "900"
    assert "Too many failed login attempts" in blocked.content.decode()
    assert "_auth_user_id" not in blocked.wsgi_request.session
    # Per username and address: the same user elsewhere, and another user here, are not blocked.
    assert _login(user.username, "correct horse battery", address="192.0.2.7").status_code == 302
    other = _user()
    assert _login(other.username, "correct horse battery").status_code == 302


def test_a_successful_login_resets_the_count_and_the_window_ends(settings: Any) -> None:
    settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW = 3, 1
    user = _user()
    for _ in range(2):
        assert _login(user.username, "wrong").status_code == 200
    assert _login(user.username, "correct horse battery").status_code == 302
    for _ in range(2):
        assert _login(user.username, "wrong").status_code == 200  # counted from zero again
    assert _login(user.username, "wrong").status_code == 200
    assert _login(user.username, "wrong").status_code == 429
    time.sleep(2.1)
    assert _login(user.username, "correct horse battery").status_code == 302


def test_hostile_usernames_are_counted_not_crashing(settings: Any) -> None:
    settings.LOGIN_FAILURE_LIMIT = 2
    for name in ("x" * 10_000, "a\u0000b", "\u202etxt.exe", "<img src=x onerror=alert(1)>", ""):
        for _ in range(3):
            response = _login(name, "wrong", address="198.51.100.9")
            assert response.status_code in (200, 429)
            assert b"<img src=x onerror" not in response.content


def test_without_its_cache_the_limiter_lets_logins_through(settings: Any) -> None:
    """Redis down must not lock everyone out of the web app (the limiter fails open, and says so)."""
    settings.LOGIN_FAILURE_LIMIT = 1
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
            "OPTIONS": {"socket_connect_timeout": 0.5},
        }
    }
    user = _user()
    for _ in range(3):
        assert _login(user.username, "wrong").status_code == 200
    assert _login(user.username, "correct horse battery").status_code == 302


def test_api_key_failures_are_limited_per_address(settings: Any, world: World) -> None:
    settings.API_KEY_FAILURE_LIMIT = 3
    address = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    wrong = "Token " + world.api_key_secret[:-4] + "AAAA"
    for _ in range(3):
        assert APIClient(REMOTE_ADDR=address).get("/api/v1/services/", HTTP_AUTHORIZATION=wrong).status_code == 401
    throttled = APIClient(REMOTE_ADDR=address).get(
        "/api/v1/services/", HTTP_AUTHORIZATION=f"Token {world.api_key_secret}"
    )
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) > 0
    good = APIClient(REMOTE_ADDR="192.0.2.200").get(
        "/api/v1/services/", HTTP_AUTHORIZATION=f"Token {world.api_key_secret}"
    )
    assert good.status_code == 200


def test_login_guessing_from_many_addresses_is_limited_per_username(settings: Any) -> None:
    """Issue 13, attack 5 (its second half): whoever can change addresses at will (a botnet, or a
    client that could pose as others) gets LOGIN_USERNAME_FAILURE_LIMIT guesses at one user's
    password per window, in all; a successful login in between does not give them more."""
    settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_USERNAME_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW = 3, 5, 900
    user = _user()
    addresses = iter(f"198.51.100.{n}" for n in range(1, 250))
    for _ in range(4):
        assert _login(user.username, "wrong", address=next(addresses)).status_code == 200
    assert _login(user.username, "correct horse battery", address=next(addresses)).status_code == 302
    assert _login(user.username.upper(), "wrong", address=next(addresses)).status_code == 200  # the 5th
    blocked = _login(user.username, "correct horse battery", address=next(addresses))
    assert blocked.status_code == 429 and blocked["Retry-After"] == "900"
    assert "Too many failed login attempts for this username" in blocked.content.decode()
    # Another user, from the same addresses, is not affected.
    assert _login(_user().username, "correct horse battery", address="198.51.100.1").status_code == 302


def _fullwidth(name: str) -> str:
    """``rl-ab12`` in fullwidth forms (U+FF52...): NFKC gives the name back, so Django logs it in."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in name)


def _double_struck(name: str) -> str:
    """Letters and digits as mathematical double-struck ones (U+1D563...), NFKC-equal too."""
    return "".join(
        chr(0x1D552 + ord(c) - ord("a")) if "a" <= c <= "z" else chr(0x1D7D8 + ord(c) - ord("0")) if c.isdigit() else c
        for c in name
    )


def test_unicode_variants_of_a_username_share_its_login_limits(settings: Any) -> None:
    """Django's UsernameField applies NFKC before authenticating, so "alice" in fullwidth or
    double-struck letters are guesses at alice's password: they count against alice's limits, per address and in all."""
    settings.LOGIN_FAILURE_LIMIT, settings.LOGIN_USERNAME_FAILURE_LIMIT, settings.LOGIN_FAILURE_WINDOW = 3, 5, 900
    user = _user()
    for variant in (_fullwidth, _double_struck):
        assert _login(variant(user.username), "correct horse battery", address="192.0.2.1").status_code == 302
    # Per username and address: three variants from one address use up its three guesses.
    for name in (_fullwidth(user.username), _double_struck(user.username), user.username.upper()):
        assert _login(name, "wrong", address="192.0.2.50").status_code == 200
    assert _login(user.username, "correct horse battery", address="192.0.2.50").status_code == 429
    # Per username in all: the variants from other addresses are the 4th and 5th guesses.
    assert _login(_fullwidth(user.username).upper(), "wrong", address="192.0.2.51").status_code == 200
    assert _login(_double_struck(user.username), "wrong", address="192.0.2.52").status_code == 200
    assert _login(user.username, "correct horse battery", address="192.0.2.53").status_code == 429


def _guard_sees(settings: Any, peer: str, forwarded: list[str]) -> tuple[str, list[str]]:
    """(the client address, the X-Forwarded-For headers) the application behind the guard gets."""
    from config.asgi_guards import TrustedProxyHeaders

    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["client"] = scope["client"][0]
        seen["xff"] = [v.decode() for k, v in scope["headers"] if k == b"x-forwarded-for"]

    scope = {
        "type": "http",
        "client": (peer, 40000),
        "headers": [(b"host", b"ms"), *((b"x-forwarded-for", value.encode()) for value in forwarded)],
    }
    async_to_sync(TrustedProxyHeaders(app))(scope, None, None)
    return seen["client"], seen["xff"]


def test_a_clients_own_forwarded_for_is_not_its_address(settings: Any) -> None:
    """Issue 13, attack 5: X-Forwarded-For is believed only from WEB_TRUSTED_PROXIES (none by default),
    and then only as far back as trusted proxies vouch for it."""
    from ipaddress import ip_network

    assert settings.WEB_TRUSTED_PROXIES == ()  # the default: nothing sits in front of daphne
    # From anyone untrusted (loopback included by default) the header is dropped, not believed.
    assert _guard_sees(settings, "127.0.0.1", ["192.0.2.99"]) == ("127.0.0.1", [])
    settings.WEB_TRUSTED_PROXIES = (ip_network("10.0.0.0/24"),)
    assert _guard_sees(settings, "203.0.113.5", ["10.0.0.9, 192.0.2.99"]) == ("203.0.113.5", [])
    # Behind a trusted terminator: the address it saw, not what the client wrote before it.
    assert _guard_sees(settings, "10.0.0.2", ["192.0.2.99, 198.51.100.7"])[0] == "198.51.100.7"
    assert _guard_sees(settings, "10.0.0.2", ["192.0.2.99", "198.51.100.7, 10.0.0.3"])[0] == "198.51.100.7"
    assert _guard_sees(settings, "10.0.0.2", ["2001:DB8::1"])[0] == "2001:db8::1"
    assert _guard_sees(settings, "10.0.0.2", ["[2001:db8::1]:443, 198.51.100.8:5123"])[0] == "198.51.100.8"
    assert _guard_sees(settings, "10.0.0.2", ["192.0.2.99, not-an-address"])[0] == "10.0.0.2"
    assert _guard_sees(settings, "10.0.0.2", ["10.0.0.4"])[0] == "10.0.0.4"  # only proxies: the farthest
    assert _guard_sees(settings, "10.0.0.2", [])[0] == "10.0.0.2"


def test_api_key_guessing_with_a_spoofed_forwarded_for_is_still_limited(settings: Any, world: World) -> None:
    """Issue 13, attack 5 through the ASGI application daphne serves: a new X-Forwarded-For at every
    attempt does not make a new address."""
    from channels.testing import HttpCommunicator

    from config.asgi import application

    settings.API_KEY_FAILURE_LIMIT = 3
    peer = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    wrong = "Token " + world.api_key_secret[:-4] + "AAAA"

    def get(authorization: str, n: int) -> int:
        headers = [(b"authorization", authorization.encode()), (b"x-forwarded-for", f"192.0.2.{n}".encode())]
        communicator = HttpCommunicator(application, "GET", "/api/v1/services/", headers=headers)
        communicator.scope["client"] = (peer, 50000 + n)
        communicator.scope["server"] = ("127.0.0.1", 8000)
        return int(async_to_sync(communicator.get_response)(timeout=10)["status"])

    assert [get(wrong, n) for n in range(3)] == [401, 401, 401]
    assert get(f"Token {world.api_key_secret}", 3) == 429


# --- XSS: every user-provided string a page shows is escaped -----------------------------------------


def _payload(field: str) -> str:
    if field == "service":
        return "<img src=x onerror=sv>"  # a service name holds 24 characters (PostgreSQL enforces it)
    return f"<img src=x onerror=alert(1) data-f={field}>"


def _shown(html: str, field: str) -> bool:
    escaped = _payload(field).replace("<", "&lt;").replace(">", "&gt;")
    in_json = _payload(field).replace("<", "\\u003C").replace(">", "\\u003E")
    return escaped in html or in_json in html


def _plant(world: World, personas: dict[str, Any]) -> None:
    """A hostile string in every user-provided field, written straight to the rows (as a bypassed
    validator, an admin or an older version could have left them): escaping must not rely on input checks."""
    service, folder = world.service, world.folder
    Folder.objects.filter(pk=folder.pk).update(name=_payload("folder"))
    Endpoint.objects.filter(pk=service.pk).update(
        name=_payload("service"),
        environ={_payload("envkey"): _payload("envvalue")},
        image=_payload("image"),
        model_definition_path=_payload("defpath"),
    )
    node = Node.objects.create(name=_payload("node")[:64], address="127.0.0.1")
    Route.objects.filter(pk=world.route.pk).update(
        node=node, status=Route.Status.FAILED_TO_START, error={"message": _payload("routeerror")}
    )
    ServiceEvent.objects.create(endpoint=service, kind="note", message=_payload("event"))
    AutoScalingRule.objects.filter(pk=world.rule.pk).update(
        metric=_payload("metric"), last_decision=_payload("decision")
    )
    ScalingEvent.objects.filter(rule=world.rule).update(reason=_payload("scalereason"), metric=_payload("scalemetric"))
    ResourcePreset.objects.create(name=_payload("preset")[:64], cpu=1, mem=1024**3)
    root = Path(folder.host_path)
    (root / (_payload("file") + ".txt")).write_text("x")
    (root / world.file_path).write_text(_payload("content"))


# Each field must show escaped on at least one page (so the test can not pass by not rendering it).
SHOWN = {
    "folder",
    "service",
    "envkey",
    "envvalue",
    "node",
    "routeerror",
    "event",
    "metric",
    "preset",
    "file",
    "content",
}


def test_hostile_strings_are_escaped_on_every_page(personas: dict[str, Any], world: World) -> None:
    _plant(world, personas)
    owner = Client()
    owner.force_login(personas["owner"])
    admin = Client()
    admin.force_login(personas["admin"])
    seen: set[str] = set()
    for name, url in _html_pages(world).items():
        response = (admin if name.startswith("admin") else owner).get(url)
        assert response.status_code == 200, (name, response.status_code)
        html = response.content.decode()
        assert not re.search(r"<img[^>]*onerror", html, re.IGNORECASE), f"{name} ({url}) does not escape"
        seen |= {field for field in SHOWN if _shown(html, field)}
    assert seen == SHOWN, f"not shown anywhere (so not checked): {sorted(SHOWN - seen)}"


def test_the_json_the_pages_read_is_never_served_as_html(personas: dict[str, Any], world: World) -> None:
    _plant(world, personas)
    owner = Client()
    owner.force_login(personas["owner"])
    for url in (
        "/api/v1/services/",
        f"/api/v1/services/{world.service.pk}/",
        f"/api/v1/services/{world.service.pk}/routes/",
        f"/api/v1/folders/{world.folder.pk}/",
    ):
        response = owner.get(url, HTTP_ACCEPT="text/html")
        assert response.status_code in (200, 404, 406), url
        assert not response["Content-Type"].startswith("text/html") or b"<img src=x onerror" not in response.content
        assert response["X-Content-Type-Options"] == "nosniff"


# --- the chat relay serves what a replica wrote, from the web app's origin ------------------------------


class HostileReplica(BaseHTTPRequestHandler):
    """Answers /models as a page with a script and /chat/completions with JSON echoing the payload."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send("text/html; charset=utf-8", b"<html><script>alert(document.cookie)</script></html>")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"choices": [{"message": {"content": _payload("chat")}}]}).encode()
        self._send("application/json", body)

    def _send(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hostile_replica(settings: Any) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), HostileReplica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.SERVING_PROXY_URL = f"http://127.0.0.1:{server.server_address[1]}"
    yield settings.SERVING_PROXY_URL
    server.shutdown()
    server.server_close()


async def _through_relay(user: Any, path: str, method: str) -> tuple[int, dict[str, str], bytes]:
    client = AsyncClient()
    await client.aforce_login(user)
    if method == "post":
        response = await client.post(path, "{}", content_type="application/json")
    else:
        response = await client.get(path)
    content = b"".join([chunk async for chunk in response.streaming_content])
    return response.status_code, dict(response.items()), content


@pytest.mark.django_db(transaction=True)
def test_the_chat_relay_never_serves_a_replicas_page_or_script(hostile_replica: str, personas: dict[str, Any]) -> None:
    from serving.actions import services
    from tests.factories import SIMPLE_DEFINITION, FolderFactory

    folder = FolderFactory(owner=personas["owner"], name="relay", files={"model-definition.yaml": SIMPLE_DEFINITION})
    service = services.do_create_service(acting_user=personas["owner"], name="relay-xss", folder=folder)
    base = reverse("serving:chat", kwargs={"pk": service.pk}) + "v1/"
    relay = async_to_sync(_through_relay)
    status, headers, content = relay(personas["owner"], base + "models", "get")
    assert status == 200 and b"<script>" in content  # relayed as it came, but as inert text
    assert headers["Content-Type"].startswith("text/plain")
    assert (
        "sandbox" in headers["Content-Security-Policy"] and "default-src 'none'" in headers["Content-Security-Policy"]
    )
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, content = relay(personas["owner"], base + "chat/completions", "post")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert django_settings.CONTENT_SECURITY_POLICY not in headers.values()


# --- make run says so when the web app listens beyond loopback with the default SITE_URL ----------

SITE_CHECK = str(ROOT / "scripts" / "site_check.sh")


@pytest.mark.parametrize(
    ("web_host", "site_url", "allowed_hosts", "expected"),
    [
        ("127.0.0.1", "", "", None),  # the defaults of `make run`
        ("::1", "", "", None),
        ("localhost", "", "", None),
        ("192.0.2.10", "http://192.0.2.10:8000", "192.0.2.10", None),  # SITE_URL set and allowed
        ("192.0.2.10", "", "", "SITE_URL=http://192.0.2.10:9000 ALLOWED_HOSTS=192.0.2.10,localhost,127.0.0.1"),
        ("192.0.2.10", "", "192.0.2.10", "SITE_URL=http://192.0.2.10:9000 make run"),
        ("2001:db8::5", "", "", "SITE_URL=http://[2001:db8::5]:9000 ALLOWED_HOSTS=[2001:db8::5],"),
        ("0.0.0.0", "", "x", "SITE_URL=http://"),  # every address: this machine's first, if it says
    ],
)
def test_make_run_warns_when_listening_beyond_loopback_without_site_url(
    web_host: str, site_url: str, allowed_hosts: str, expected: str | None
) -> None:
    """Issue 13 review, item F: websockets from an address other than SITE_URL's are refused with only
    a server log line, so `WEB_HOST=0.0.0.0 make run` looked working but never updated live."""
    out = subprocess.run(
        [SITE_CHECK, web_host, "9000", site_url, allowed_hosts], capture_output=True, text=True, check=True
    ).stdout
    if expected is None:
        assert out == ""
    else:
        assert "WARNING" in out and expected in out and ":9000" in out, out
    assert "scripts/site_check.sh" in (ROOT / "scripts" / "run.sh").read_text()


@pytest.mark.parametrize(
    ("web_host", "site_url", "allowed_hosts", "expected"),
    [
        # The review's case: ALLOWED_HOSTS at its default (the loopback names) answers 400.
        (
            "0.0.0.0",
            "http://10.0.0.5:8000",
            "",
            "SITE_URL=http://10.0.0.5:8000 ALLOWED_HOSTS=10.0.0.5,localhost,127.0.0.1",
        ),
        ("192.0.2.10", "http://192.0.2.10:8000", "", "ALLOWED_HOSTS=192.0.2.10,localhost,127.0.0.1 make run"),
        # Behind a reverse proxy the web app listens on loopback: SITE_URL's host still has to be allowed.
        ("127.0.0.1", "https://ms.example.com", "other.example.org", "ALLOWED_HOSTS=other.example.org,ms.example.com"),
        ("::", "http://[2001:db8::5]:8000", "", "ALLOWED_HOSTS=[2001:db8::5],localhost,127.0.0.1"),
        ("0.0.0.0", "http://10.0.0.5:8000", "10.0.0.5", None),
        ("0.0.0.0", "http://10.0.0.5:8000", "localhost, 10.0.0.5", None),
        ("0.0.0.0", "https://MS.Example.com/", "ms.example.com", None),  # host names ignore case
        ("127.0.0.1", "https://ms.example.com", ".example.com", None),  # Django's subdomain pattern
        ("127.0.0.1", "https://example.com", ".example.com", None),
        ("127.0.0.1", "https://badexample.com", ".example.com", "ALLOWED_HOSTS=.example.com,badexample.com"),
        ("0.0.0.0", "http://anything:8000", "*", None),
        ("0.0.0.0", "http://[2001:db8::5]:8000", "[2001:db8::5]", None),
        ("0.0.0.0", "http://localhost:8000", "", None),  # the defaults name it
        ("127.0.0.1", "http://127.0.0.1:8000", "", None),
    ],
)
def test_make_run_warns_when_site_url_is_not_an_allowed_host(
    web_host: str, site_url: str, allowed_hosts: str, expected: str | None
) -> None:
    """Review of issue 13: the check stopped as soon as SITE_URL was set, so
    `WEB_HOST=0.0.0.0 SITE_URL=http://10.0.0.5:8000 make run` (ALLOWED_HOSTS at its default) served
    400 Bad Request and said nothing. It says so now, with the ALLOWED_HOSTS that fixes it."""
    out = subprocess.run(
        [SITE_CHECK, web_host, "8000", site_url, allowed_hosts], capture_output=True, text=True, check=True
    ).stdout
    if expected is None:
        assert out == ""
    else:
        assert "WARNING" in out and "400 Bad Request" in out and expected in out, out
