"""Issue 13's attacks against the real processes: the web app as the Procfile starts it (daphne) and
the data plane (``python -m proxy``) on loopback ports, driven by a client that sends what a browser
sends (Origin, Referer, cookies, a browser's User-Agent). Each test fails on the code before the fix.

* Attack 2: a page a replica serves through the proxy has the web app's host name on the proxy's
  port; with the victim's session cookie it opened the victim's service socket (environment, logs).
* Attack 5: daphne ran with ``--proxy-headers``, so a new X-Forwarded-For at every attempt made a new
  "client address" and the login limit never counted past one.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from django.test import Client

from accounts.models import User
from tests.live import LiveSystem
from tests.security.world import build_world

pytestmark = pytest.mark.django_db(transaction=True)

BROWSER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en-US,en;q=0.9",
}
PASSWORD = "correct horse battery staple"


def run(coro: Any) -> Any:
    # A loop of its own in a thread, as the websocket security tests do.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., LiveSystem]]:
    """``processes(SETTING="value", ...)``: a LiveSystem whose processes get those settings (the test
    starts the ones it needs); every process is stopped at the end."""
    started: list[LiveSystem] = []

    def make(**overrides: str) -> LiveSystem:
        started.append(LiveSystem(tmp_path, **overrides))
        return started[-1]

    try:
        yield make
    finally:
        for live in started:
            live.stop_all()


def _session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


async def _open_socket(web: str, path: str, origin: str, session: str) -> tuple[bool, Any]:
    """(opened, the first message or the refusal's HTTP status), as a browser page of ``origin``."""
    ws_url = "ws" + web.removeprefix("http") + path
    async with aiohttp.ClientSession(headers=BROWSER_HEADERS, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        http.cookie_jar.update_cookies({"sessionid": session}, response_url=aiohttp.client.URL(web))
        try:
            async with http.ws_connect(ws_url, origin=origin, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                return True, await ws.receive_json(timeout=10)
        except aiohttp.WSServerHandshakeError as refused:
            return False, refused.status


def test_a_replica_page_on_the_proxy_port_can_not_read_a_victims_service_socket(
    personas: dict[str, Any], processes: Callable[..., LiveSystem]
) -> None:
    world = build_world(personas["owner"], personas["project"])
    system = processes()
    proxy = system.start_proxy()
    web = system.start_web()
    # Same host name, the proxy's port: where every replica's pages are served.
    proxy_origin = f"http://127.0.0.1:{urlsplit(proxy).port}"
    session = _session_cookie(personas["owner"])
    path = f"/ws/services/{world.service.pk}/"

    opened, answer = run(_open_socket(web, path, proxy_origin, session))
    assert (opened, answer) == (False, 403), f"a page of {proxy_origin} read the owner's service: {answer}\n" + (
        system.logs()
    )
    # The web app's own page, with the same cookie, gets the service.
    opened, answer = run(_open_socket(web, path, web, session))
    assert opened and answer["type"] == "service" and answer["service"]["id"] == str(world.service.pk)
    # The refusal says, in the web app's log, which origin and which setting.
    assert f"origin '{proxy_origin}' is not one of WEB_ORIGINS" in system.log("web")


async def _login_attempts(web: str, username: str, forwarded_for: list[str], password: str) -> list[int]:
    """One login per X-Forwarded-For value, each as a browser would post the login form."""
    statuses = []
    async with aiohttp.ClientSession(headers=BROWSER_HEADERS, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for index, address in enumerate(forwarded_for):
            async with http.get(f"{web}/accounts/login/") as page:
                token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', await page.text())
                assert token, "the login page has no CSRF token"
            form = {"csrfmiddlewaretoken": token.group(1), "username": username}
            form["password"] = password if index == len(forwarded_for) - 1 else "wrong guess"
            headers = {"Origin": web, "Referer": f"{web}/accounts/login/", "X-Forwarded-For": address}
            async with http.post(f"{web}/accounts/login/", data=form, headers=headers, allow_redirects=False) as sent:
                statuses.append(sent.status)
    return statuses


def _user_with_password(settings: Any) -> User:
    # The daphne process verifies with Django's default hashers, not the suite's fast MD5.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    user = User.objects.create(username=f"e2e-{uuid.uuid4().hex[:8]}")
    user.set_password(PASSWORD)
    user.save()
    return user


def test_a_spoofed_forwarded_for_does_not_reset_the_login_limit(
    settings: Any, processes: Callable[..., LiveSystem]
) -> None:
    """Three wrong guesses, each "from" another X-Forwarded-For, then the right password from yet
    another: the fourth attempt is refused (429) without the password being tried. (The per-username
    limit is set out of reach: this is about the per-address one.)"""
    user = _user_with_password(settings)
    system = processes(LOGIN_FAILURE_LIMIT="3", LOGIN_USERNAME_FAILURE_LIMIT="1000")
    web = system.start_web()
    spoofed = [f"198.51.100.{n}" for n in range(1, 5)]
    statuses = run(_login_attempts(web, user.username, spoofed, PASSWORD))
    assert statuses == [200, 200, 200, 429], system.logs()


def test_behind_a_trusted_proxy_only_the_address_it_saw_counts(
    settings: Any, processes: Callable[..., LiveSystem]
) -> None:
    """With WEB_TRUSTED_PROXIES naming the terminator (here loopback), what the client wrote to the
    left of the terminator's entry is ignored: guesses from one real client are counted together,
    and another real client behind the same terminator is not blocked by them."""
    user = _user_with_password(settings)
    system = processes(LOGIN_FAILURE_LIMIT="3", LOGIN_USERNAME_FAILURE_LIMIT="1000", WEB_TRUSTED_PROXIES="127.0.0.1")
    web = system.start_web()
    attacker = [f"192.0.2.{n}, 203.0.113.66" for n in range(1, 5)]
    assert run(_login_attempts(web, user.username, attacker, PASSWORD)) == [200, 200, 200, 429], system.logs()
    assert run(_login_attempts(web, user.username, ["203.0.113.77"], PASSWORD)) == [302], system.logs()
