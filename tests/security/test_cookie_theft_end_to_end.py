"""Issue 13, item 1: a public service's owner must not collect the web app's cookies of its callers.

With the default addresses (web on :8000, proxy on :8080, one host name) a browser sends the web
app's cookies to the proxy too: cookies are scoped by host name, not by port. So a victim who opens
a public service's URL would hand their ``sessionid`` and ``csrftoken`` to the replica, that is to
the service's owner. These tests run the real chain: the service is created through the API, its
routing entry is built by serving/bus/routing.py and read by the real proxy process from Redis, and the
replica is a real server that reports the headers it received.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from serving.bus import routing
from serving.models import Endpoint, Route
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.integration import test_proxy as live_proxy

pytestmark = pytest.mark.django_db

# A replica that reports the request headers it got, and tries to set cookies on the caller:
# the platform's session and CSRF cookies (a session fixation), and one of its own.
COOKIE_REPLICA = r"""
import sys
from aiohttp import web

async def headers(request):
    response = web.json_response({"headers": dict(request.headers)})
    if request.query.get("set"):
        for name in request.query["set"].split(","):
            response.headers.add("Set-Cookie", f"{name}=from-the-replica; Path=/")
    return response

app = web.Application()
app.router.add_get("/headers", headers)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

# What a browser logged in to the web app sends with a request to the same host name.
BROWSER_COOKIES = "sessionid=victim-session-123; csrftoken=victim-csrf-456; django_language=ja"


class CookieReplica:
    def __init__(self) -> None:
        self.port = live_proxy.free_port()
        self.proc = live_proxy.spawn([sys.executable, "-c", COOKIE_REPLICA, str(self.port)])
        live_proxy.wait_for(
            lambda: live_proxy.answers(f"http://127.0.0.1:{self.port}/headers"), what="the cookie replica"
        )


@pytest.fixture(scope="module")
def proxy() -> Iterator[live_proxy.Proxy]:
    p = live_proxy.Proxy()
    yield p
    p.close()


@pytest.fixture(scope="module")
def replica() -> Iterator[CookieReplica]:
    r = CookieReplica()
    yield r
    live_proxy.stop(r.proc)


def _public_service(api: Any, owner: Any, replica: CookieReplica, **fields: Any) -> Endpoint:
    """A public service created through the API, with one healthy route at ``replica``."""
    folder = FolderFactory(owner=owner, files={"model-definition.yaml": SIMPLE_DEFINITION})
    response = api("owner").post(
        "/api/v1/services/",
        {"name": f"cookies-{folder.name}"[:24], "folder": str(folder.pk), "open_to_public": True, **fields},
        format="json",
    )
    assert response.status_code == 201, response.content
    endpoint = Endpoint.objects.get(pk=response.json()["id"])
    Route.objects.create(
        endpoint=endpoint, node=None, status=Route.Status.HEALTHY, host="127.0.0.1", port=replica.port, error={}
    )
    return endpoint


def _publish(proxy: live_proxy.Proxy, endpoint: Endpoint) -> None:
    """What serving/bus/routing.py publishes, into this proxy's private key prefix."""
    entry = routing.build_entry(endpoint, list(endpoint.routes.all()), [])
    proxy.redis.hset(f"{proxy.prefix}:routing", endpoint.slug, json.dumps(entry))
    proxy.redis.publish(f"{proxy.prefix}:routing:updates", json.dumps({"slug": endpoint.slug, "entry": entry}))
    live_proxy.wait_for(
        lambda: proxy.call(endpoint.slug, "headers")[0] == 200, what="the proxy to route the new service"
    )


def _call_as_browser(
    proxy: live_proxy.Proxy, endpoint: Endpoint, cookies: str, set_cookies: str = "", *, own_host: bool = False
) -> tuple[dict[str, str], list[str]]:
    """The replica's view of the request's headers, and the Set-Cookie headers the browser got;
    ``own_host``: called at <slug>.<SERVING_DOMAIN>, else at the proxy's /e/<slug>/."""
    path = "headers" + (f"?set={set_cookies}" if set_cookies else "")
    headers = {"Cookie": cookies}
    url = proxy.url(endpoint.slug, path)
    if own_host:
        url, headers["Host"] = f"http://127.0.0.1:{proxy.port}/{path}", f"{endpoint.slug}.{live_proxy.DOMAIN}"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        seen = json.load(response)["headers"]
        return {k.lower(): v for k, v in seen.items()}, response.headers.get_all("Set-Cookie") or []


def test_public_service_owner_does_not_steal_the_callers_session_and_csrf_cookies(
    api: Any, personas: dict[str, Any], proxy: live_proxy.Proxy, replica: CookieReplica
) -> None:
    endpoint = _public_service(api, personas["owner"], replica)
    assert endpoint.forward_cookies is False  # the default
    _publish(proxy, endpoint)

    seen, set_cookies = _call_as_browser(
        proxy, endpoint, BROWSER_COOKIES + "; theme=dark", set_cookies="sessionid,csrftoken,appcookie"
    )

    assert "cookie" not in seen, f"the replica received the caller's cookies: {seen.get('cookie')}"
    assert not any("victim" in value for value in seen.values())
    # Nor can the replica plant cookies on the caller's browser (a session fixation on the web app).
    assert set_cookies == []


def test_forward_cookies_passes_the_apps_cookie_but_never_the_platform_session(
    api: Any, personas: dict[str, Any], proxy: live_proxy.Proxy, replica: CookieReplica, settings: Any
) -> None:
    settings.SERVING_DOMAIN = live_proxy.DOMAIN  # forward_cookies needs a host name per service
    # The platform's cookie names as this installation configures them, not only Django's defaults.
    with override_settings(
        SESSION_COOKIE_NAME="ms_session", CSRF_COOKIE_NAME="ms_csrf", LANGUAGE_COOKIE_NAME="ms_lang"
    ):
        endpoint = _public_service(api, personas["owner"], replica, forward_cookies=True)
        assert api("owner").get(f"/api/v1/services/{endpoint.pk}/").json()["forward_cookies"] is True
        _publish(proxy, endpoint)

    seen, set_cookies = _call_as_browser(
        proxy,
        endpoint,
        BROWSER_COOKIES + "; appsession=app-value-789; ms_session=victim-custom; MS_CSRF=victim-case",
        set_cookies="appsession,sessionid,ms_session,csrftoken",
        own_host=True,
    )

    assert seen.get("cookie") == "appsession=app-value-789"
    assert not any("victim" in value for value in seen.values())
    assert [c.split(";")[0] for c in set_cookies] == ["appsession=from-the-replica"]
    # At the proxy's shared /e/<slug>/ address every service has one origin: nothing passes there.
    seen, set_cookies = _call_as_browser(proxy, endpoint, "appsession=app-value-789", set_cookies="appsession")
    assert "cookie" not in seen and set_cookies == []


def test_turning_forward_cookies_off_applies_at_the_proxy(
    api: Any, personas: dict[str, Any], proxy: live_proxy.Proxy, replica: CookieReplica, settings: Any
) -> None:
    settings.SERVING_DOMAIN = live_proxy.DOMAIN
    endpoint = _public_service(api, personas["owner"], replica, forward_cookies=True)
    _publish(proxy, endpoint)
    assert _call_as_browser(proxy, endpoint, "appsession=a", own_host=True)[0].get("cookie") == "appsession=a"

    response = api("owner").patch(f"/api/v1/services/{endpoint.pk}/", {"forward_cookies": False}, format="json")
    assert response.status_code == 200, response.content
    endpoint.refresh_from_db()
    _publish(proxy, endpoint)
    live_proxy.wait_for(
        lambda: "cookie" not in _call_as_browser(proxy, endpoint, "appsession=a", own_host=True)[0],
        what="the proxy to stop forwarding cookies",
    )


def test_a_replica_can_not_plant_the_platform_session_with_a_nameless_cookie(
    api: Any, personas: dict[str, Any], proxy: live_proxy.Proxy, replica: CookieReplica, settings: Any
) -> None:
    # 'Set-Cookie: =sessionid=x' is stored by browsers as a nameless cookie and sent back as
    # 'sessionid=x': the attacker's session in the victim's browser (a login CSRF).
    settings.SERVING_DOMAIN = live_proxy.DOMAIN
    endpoint = _public_service(api, personas["owner"], replica, forward_cookies=True)
    _publish(proxy, endpoint)
    _, set_cookies = _call_as_browser(
        proxy, endpoint, "appsession=a", set_cookies=",=sessionid,appsession", own_host=True
    )
    assert [c.split(";")[0] for c in set_cookies] == ["appsession=from-the-replica"]


def test_forward_cookies_is_refused_when_services_share_one_origin(
    api: Any, personas: dict[str, Any], settings: Any
) -> None:
    # Path-based addresses (SERVING_PROXY_URL/e/<slug>/, the default) put every service on one
    # origin: a cookie one service sets would reach, and be readable by, every other tenant's.
    settings.SERVING_DOMAIN = ""
    folder = FolderFactory(owner=personas["owner"], files={"model-definition.yaml": SIMPLE_DEFINITION})
    body = {"name": "cookies-shared", "folder": str(folder.pk), "forward_cookies": True}
    for path in ("/api/v1/services/", "/api/v1/services/validate/"):
        response = api("owner").post(path, body, format="json")
        assert response.status_code == 400, response.content
        assert "SERVING_DOMAIN" in " ".join(response.json()["forward_cookies"])
    assert not Endpoint.objects.filter(name="cookies-shared").exists()

    body["forward_cookies"] = False
    created = api("owner").post("/api/v1/services/", body, format="json")
    assert created.status_code == 201, created.content
    url = f"/api/v1/services/{created.json()['id']}/"
    response = api("owner").patch(url, {"forward_cookies": True}, format="json")
    assert response.status_code == 400 and "SERVING_DOMAIN" in str(response.json()["forward_cookies"])
    assert api("owner").get(url).json()["forward_cookies"] is False


def test_a_service_that_forwarded_cookies_before_the_rule_stops_at_the_proxy(
    personas: dict[str, Any], settings: Any
) -> None:
    settings.SERVING_DOMAIN = ""
    folder = FolderFactory(owner=personas["owner"], files={"model-definition.yaml": SIMPLE_DEFINITION})
    endpoint = Endpoint.objects.create(
        name="cookies-old", owner=personas["owner"], model_folder=folder, forward_cookies=True
    )
    assert routing.build_entry(endpoint, [], [])["forward_cookies"] is False
    settings.SERVING_DOMAIN = "models.example.net"
    assert routing.build_entry(endpoint, [], [])["forward_cookies"] is True


# --- make run says so when web and proxy share a host name -----------------------------------------

HOST_CHECK = str(live_proxy.ROOT / "scripts" / "host_check.sh")


@pytest.mark.parametrize(
    ("web", "proxy_url", "domain", "warns"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8080", "", True),  # the defaults of `make run`
        ("https://Ms.Example.com", "https://ms.example.com:8443/", "", True),
        ("http://[::1]:8000", "http://[::1]:8080", "", True),
        ("https://ms.example.com", "https://models.example.com", "", False),
        ("https://ms.example.com", "https://models.example.net", "models.example.net", False),
        ("https://ms.models.example.net", "https://models.example.net", "models.example.net", True),
    ],
)
def test_make_run_warns_when_web_and_proxy_share_a_host_name(
    web: str, proxy_url: str, domain: str, warns: bool
) -> None:
    import subprocess

    out = subprocess.run([HOST_CHECK, web, proxy_url, domain], capture_output=True, text=True, check=True).stdout
    assert ("WARNING" in out) is warns, out
    assert "scripts/host_check.sh" in (live_proxy.ROOT / "scripts" / "run.sh").read_text()
