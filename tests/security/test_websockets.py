"""The websocket routes of the access matrix, through the real ASGI application (config.asgi: origin
check, session cookie, the consumers), with every persona: a stranger's connect is refused, a
stranger's socket never receives another user's service, and another site's page can not connect,
not even a replica's page served by the proxy on the web app's own host name (issue 13, attack 2)."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from serving.bus.events import notify_endpoint_changed
from serving.web.consumers import websocket_urlpatterns
from tests.live import deadline_for
from tests.security import rules as r
from tests.security.world import World, build_world

pytestmark = pytest.mark.django_db(transaction=True)


def _application() -> Any:
    from config.asgi import application

    return application


def cookie_of(persona: str, personas: dict[str, Any]) -> str:
    if persona == "anonymous":
        return ""
    client = Client()
    client.force_login(personas[persona])
    return f"sessionid={client.cookies['sessionid'].value}"


def ws_path(route: str, world: World) -> str:
    values = world.kwargs()
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(values[m.group(1)]), route)


def web_origin() -> str:
    """The origin the web app's own pages have (SITE_URL's)."""
    return str(settings.WEB_ORIGINS[0])


def run(coro: Any) -> Any:
    # In a thread of its own: a browser session (tests/e2e) may hold an event loop in this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def attempt(path: str, cookie: str, origin: str | None = None) -> tuple[bool, Any, Any]:
    """(connected, close code or subprotocol, the first message or None)."""
    headers = [(b"origin", (origin or web_origin()).encode())]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    communicator = WebsocketCommunicator(_application(), path, headers=headers)
    connected, detail = await communicator.connect(timeout=deadline_for(5))
    first = None
    if connected:
        if not await communicator.receive_nothing(timeout=0.3):
            first = await communicator.receive_json_from(timeout=deadline_for(1))
        await communicator.disconnect()
    return connected, detail, first


def test_every_websocket_route_with_every_persona(personas: dict[str, Any]) -> None:
    world = build_world(personas["owner"], personas["project"])
    build_world(personas["stranger"], None)
    cookies = {persona: cookie_of(persona, personas) for persona in r.PERSONAS}
    problems: list[str] = []
    for pattern in websocket_urlpatterns:
        route = str(pattern.pattern)
        access = r.WS_RULES[route]
        path = ws_path(route, world)
        for persona in r.PERSONAS:
            expected = r.REFUSED if persona == "anonymous" else access[persona]
            connected, detail, first = run(attempt(path, cookies[persona]))
            if expected == r.OK and not connected:
                problems.append(f"{path} as {persona}: refused ({detail}), expected to connect")
            elif expected != r.OK:
                if connected:
                    problems.append(f"{path} as {persona}: connected, expected to be refused")
                elif detail not in (4401, 4404):
                    problems.append(f"{path} as {persona}: closed with {detail}, expected 4401 or 4404")
            if persona in ("stranger", "anonymous") and first is not None and world.leaked(str(first)):
                problems.append(f"{path} as {persona}: received {world.leaked(str(first))}")
    assert not problems, "\n".join(problems)


def test_a_strangers_list_socket_hears_nothing_of_others(personas: dict[str, Any]) -> None:
    world = build_world(personas["owner"], personas["project"])
    cookies = {who: cookie_of(who, personas) for who in ("stranger", "teammate")}

    async def scenario() -> dict[str, Any]:
        sockets = {}
        for who, cookie in cookies.items():
            communicator = WebsocketCommunicator(
                _application(),
                "/ws/services/",
                headers=[(b"origin", web_origin().encode()), (b"cookie", cookie.encode())],
            )
            connected, _ = await communicator.connect(timeout=deadline_for(5))
            assert connected, who
            sockets[who] = communicator
        await database_sync_to_async(notify_endpoint_changed)(str(world.service.pk))
        got = {
            "teammate": await sockets["teammate"].receive_json_from(timeout=deadline_for(5)),
            "stranger_silent": await sockets["stranger"].receive_nothing(timeout=0.5),
        }
        for communicator in sockets.values():
            await communicator.disconnect()
        return got

    got = run(scenario())
    assert got["teammate"]["service"]["id"] == str(world.service.pk)
    assert got["stranger_silent"] is True


@pytest.mark.parametrize("origin", ["http://evil.example", "null"])
def test_another_sites_page_can_not_open_a_socket(personas: dict[str, Any], origin: str) -> None:
    """Cross-site websocket hijacking: the owner's cookie, sent by a page of another origin."""
    world = build_world(personas["owner"], personas["project"])
    connected, _, _ = run(attempt(f"/ws/services/{world.service.pk}/", cookie_of("owner", personas), origin=origin))
    assert not connected


def test_a_route_is_not_followed_through_another_service(personas: dict[str, Any]) -> None:
    """The route id is checked against the service in the path: a stranger who owns a service of
    their own can not read the owner's replica log by putting that route under it."""
    world = build_world(personas["owner"], personas["project"])
    world.route.error = {"log_tail": "owner-only-log-line"}
    world.route.save(update_fields=["error"])
    theirs = build_world(personas["stranger"], None)
    path = f"/ws/services/{theirs.service.pk}/routes/{world.route.pk}/logs/"
    connected, detail, first = run(attempt(path, cookie_of("stranger", personas)))
    assert (connected, detail, first) == (False, 4404, None)
    # The owner, through the right service, reads it.
    connected, _, first = run(
        attempt(f"/ws/services/{world.service.pk}/routes/{world.route.pk}/logs/", cookie_of("owner", personas))
    )
    assert connected and first == {"type": "lines", "lines": ["owner-only-log-line"]}


def _proxy_port_origins() -> list[str]:
    """Where a replica's page is served from: the proxy, on the web app's host names."""
    from urllib.parse import urlsplit

    port = urlsplit(settings.SERVING_PROXY_URL).port or 80
    return [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]


@pytest.mark.parametrize("route", [str(p.pattern) for p in websocket_urlpatterns])
def test_a_replica_page_served_through_the_proxy_can_not_open_a_socket(personas: dict[str, Any], route: str) -> None:
    """Issue 13, attack 2: a page a tenant's replica serves through the proxy has the web app's host
    name on the proxy's port; the victim's browser sends it the web app's session cookie, so the
    Origin check must compare the port too, on every websocket route."""
    world = build_world(personas["owner"], personas["project"])
    path = ws_path(route, world)
    cookie = cookie_of("owner", personas)
    for origin in _proxy_port_origins():
        connected, detail, first = run(attempt(path, cookie, origin=origin))
        assert (connected, first) == (False, None), f"{path} opened from {origin}: {detail} {first}"
    # The same browser on the web app's own pages still connects (the owner may read all of these).
    connected, detail, _ = run(attempt(path, cookie))
    assert connected, f"{path} from {web_origin()}: {detail}"


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1", "https://127.0.0.1:8000", "http://127.0.0.1:8000.evil"])
def test_only_the_exact_web_origins_open_a_socket(personas: dict[str, Any], origin: str | None) -> None:
    """No Origin, the default port, another scheme, a longer host: none is the web app's origin."""
    world = build_world(personas["owner"], personas["project"])
    headers = [(b"cookie", cookie_of("owner", personas).encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))

    async def connect() -> bool:
        communicator = WebsocketCommunicator(_application(), f"/ws/services/{world.service.pk}/", headers=headers)
        connected, _ = await communicator.connect(timeout=deadline_for(5))
        await communicator.disconnect()
        return bool(connected)

    assert run(connect()) is False


def test_every_web_origin_opens_a_socket_and_passes_the_csrf_check(personas: dict[str, Any]) -> None:
    """The websockets and Django's CSRF check trust the same origins: WEB_ORIGINS."""
    world = build_world(personas["owner"], personas["project"])
    assert settings.CSRF_TRUSTED_ORIGINS == settings.WEB_ORIGINS
    for origin in settings.WEB_ORIGINS:
        connected, detail, _ = run(attempt(f"/ws/services/{world.service.pk}/", cookie_of("owner", personas), origin))
        assert connected, f"{origin}: {detail}"
    client = Client(enforce_csrf_checks=True)
    client.force_login(personas["owner"])
    client.get("/services/")
    token = client.cookies["csrftoken"].value
    for origin, allowed in [(_proxy_port_origins()[0], False), (settings.WEB_ORIGINS[0], True)]:
        response = client.post(
            "/accounts/logout/", HTTP_ORIGIN=origin, HTTP_X_CSRFTOKEN=token, HTTP_HOST="127.0.0.1:8000"
        )
        assert (response.status_code != 403) is allowed, (origin, response.status_code)


def test_a_demoted_operators_open_sockets_stop_showing_other_users_services(personas: dict[str, Any]) -> None:
    """Issue 13, attack 8 on the service sockets: they send only on a change, and check access
    then, but with the user loaded at connect; an operator demoted since kept seeing every service
    (environment included) for as long as the page stayed open."""
    world = build_world(personas["owner"], personas["project"])
    admin = personas["admin"]
    cookie = cookie_of("admin", personas)

    async def scenario() -> tuple[Any, Any, Any, Any]:
        service = WebsocketCommunicator(
            _application(),
            f"/ws/services/{world.service.pk}/",
            headers=[(b"origin", web_origin().encode()), (b"cookie", cookie.encode())],
        )
        listing = WebsocketCommunicator(
            _application(), "/ws/services/", headers=[(b"origin", web_origin().encode()), (b"cookie", cookie.encode())]
        )
        assert (await service.connect(timeout=deadline_for(5)))[0] and (await listing.connect(timeout=deadline_for(5)))[
            0
        ]
        assert (await service.receive_json_from(timeout=deadline_for(5)))["type"] == "service"
        admin.is_superuser = False
        await database_sync_to_async(admin.save)(update_fields=["is_superuser"])
        await database_sync_to_async(notify_endpoint_changed)(str(world.service.pk))
        got = (
            await service.receive_json_from(timeout=deadline_for(5)),
            await service.receive_output(timeout=deadline_for(5)),
            await listing.receive_json_from(timeout=deadline_for(5)),
        )
        await listing.disconnect()
        return (*got, None)

    gone, closed, listed, _ = run(scenario())
    assert gone == {"type": "gone"} and closed == {"type": "websocket.close", "code": 4404}
    assert listed == {"type": "gone", "id": str(world.service.pk)}


def test_a_demoted_operators_validation_socket_stops_streaming(
    personas: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, attack 8 on the validation log: an operator watching another user's run, demoted
    since, gets no more of it once the socket re-checks (every ACCESS_CHECK seconds)."""
    from serving.bus import dryrun as validation
    from serving.bus import logfollow

    monkeypatch.setattr(logfollow, "ACCESS_CHECK", 0.0)
    world = build_world(personas["owner"], personas["project"])
    admin = personas["admin"]
    cookie = cookie_of("admin", personas)

    async def scenario() -> tuple[Any, Any, Any]:
        socket = WebsocketCommunicator(
            _application(),
            f"/ws/validations/{world.validation_id}/",
            headers=[(b"origin", web_origin().encode()), (b"cookie", cookie.encode())],
        )
        assert (await socket.connect(timeout=deadline_for(5)))[0]
        await database_sync_to_async(validation.publish)(world.validation_id, "log", line="before")
        before = await socket.receive_json_from(timeout=deadline_for(5))
        admin.is_superuser = False
        await database_sync_to_async(admin.save)(update_fields=["is_superuser"])
        await database_sync_to_async(validation.publish)(world.validation_id, "log", line="secret after")
        return (
            before,
            await socket.receive_json_from(timeout=deadline_for(5)),
            await socket.receive_output(timeout=deadline_for(5)),
        )

    before, ended, closed = run(scenario())
    assert before["line"] == "before"
    assert ended["kind"] == "revoked" and "can no longer read this validation" in ended["message"]
    assert "secret after" not in str(ended) and closed == {"type": "websocket.close", "code": 4404}


@pytest.mark.parametrize("how", ["logged out", "password changed"])
def test_service_sockets_end_when_their_session_does(
    personas: dict[str, Any], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Issue 13 review, item C: the service, list and validation sockets re-checked the user but not
    the session, so after a logout (or a password change, which ends every other session) an open
    page kept receiving the service as the API shows it, environment (secrets) included."""
    from serving.bus import dryrun as validation
    from serving.bus import logfollow

    monkeypatch.setattr(logfollow, "ACCESS_CHECK", 0.0)
    owner = personas["owner"]
    world = build_world(owner, personas["project"])
    browser = Client()
    browser.force_login(owner)
    headers = [
        (b"origin", web_origin().encode()),
        (b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode()),
    ]

    def end_the_session() -> None:
        if how == "logged out":
            assert browser.post("/accounts/logout/").status_code == 302
        else:
            owner.set_password("a new password, elsewhere")
            owner.save(update_fields=["password"])

    async def scenario() -> dict[str, Any]:
        service = WebsocketCommunicator(_application(), f"/ws/services/{world.service.pk}/", headers=headers)
        listing = WebsocketCommunicator(_application(), "/ws/services/", headers=headers)
        run_log = WebsocketCommunicator(_application(), f"/ws/validations/{world.validation_id}/", headers=headers)
        for socket in (service, listing, run_log):
            assert (await socket.connect(timeout=deadline_for(5)))[0]
        assert (await service.receive_json_from(timeout=deadline_for(5)))["type"] == "service"
        # Before: a change reaches both service sockets, a log line the validation socket.
        await database_sync_to_async(notify_endpoint_changed)(str(world.service.pk))
        assert (await service.receive_json_from(timeout=deadline_for(5)))["type"] == "service"
        assert (await listing.receive_json_from(timeout=deadline_for(5)))["type"] == "service"
        while not await listing.receive_nothing(timeout=0.3):  # once per group it is in (owner, project)
            assert (await listing.receive_json_from(timeout=deadline_for(1)))["type"] == "service"
        await database_sync_to_async(validation.publish)(world.validation_id, "log", line="before")
        assert (await run_log.receive_json_from(timeout=deadline_for(5)))["line"] == "before"

        await database_sync_to_async(end_the_session)()
        await database_sync_to_async(notify_endpoint_changed)(str(world.service.pk))
        await database_sync_to_async(validation.publish)(world.validation_id, "log", line="secret after")
        return {
            "service": [
                await service.receive_output(timeout=deadline_for(5)),
                await service.receive_nothing(timeout=0.3),
            ],
            "listing": await listing.receive_output(timeout=deadline_for(5)),
            "run_log": [await run_log.receive_output(timeout=deadline_for(5)) for _ in range(2)],
        }

    got = run(scenario())
    # Logged out, not "gone" (review of issue 13): the same close code as the list, and no "gone"
    # message first, so the service page says to log in again rather than that the service was terminated.
    assert got["service"] == [{"type": "websocket.close", "code": 4401}, True]
    assert got["listing"] == {"type": "websocket.close", "code": 4401}
    assert "can no longer read this validation" in got["run_log"][0]["text"]
    assert got["run_log"][1] == {"type": "websocket.close", "code": 4404}
    assert not world.leaked(str(got)) and "secret after" not in str(got)
