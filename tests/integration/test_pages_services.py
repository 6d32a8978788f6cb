"""Services list, launcher (create / modify), terminate and Validate pages, per persona (Django test client),
and the live services-list websocket."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from serving.actions import services
from serving.bus.events import notify_endpoint_changed
from serving.models import Endpoint, ServiceEvent
from serving.web.consumers import websocket_urlpatterns
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import deadline_for

SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"

[custom.resource_slots]
cpu = 0.5
mem = "256m"

[custom.environ]
MODEL_NAME = "simple"
"""


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )


@pytest.fixture
def service(personas: dict[str, Any], folder: Folder) -> Endpoint:
    return services.do_create_service(
        acting_user=personas["owner"], name="web-one", folder=folder, project=personas["project"]
    )


def form(folder: Folder, **overrides: Any) -> dict[str, Any]:
    data = {
        "name": "my-service",
        "folder": str(folder.pk),
        "runtime": "custom",
        "model_mount": "/models",
        "model_definition_path": "model-definition.yaml",
        "replicas": "1",
        "image": "",
        "resource_group": "default",
        "resource_mode": "custom",
        "cpu": "0.5",
        "mem": "256m",
        "accelerator": "cuda.shares",
        "accelerator_amount": "",
        "cluster_mode": "single-node",
        "cluster_size": "1",
        "env_key": ["GREETING", ""],
        "env_value": ["hello", ""],
        "mount_folder": [""],
        "mount_target": [""],
        "project": "",
    }
    data.update(overrides)
    return data


# --- list --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "sees"), [("owner", True), ("teammate", True), ("stranger", False), ("admin", True)])
def test_list_shows_what_each_persona_may_see(browser: Any, service: Endpoint, who: str, sees: bool) -> None:
    response = browser(who).get("/services/")
    assert response.status_code == 200
    page = response.content.decode()
    assert ("web-one" in page) is sees
    if sees:
        assert service.url in page
        assert f"/services/{service.pk}/" in page


def test_list_actions_follow_write_access(browser: Any, service: Endpoint) -> None:
    owner_page = browser("owner").get("/services/").content.decode()
    assert f"/services/{service.pk}/modify/" in owner_page
    assert f"/services/{service.pk}/terminate/" in owner_page
    assert f"/services/{service.pk}/chat/" in owner_page  # MODEL_NAME from the folder: an LLM-style server
    teammate_page = browser("teammate").get("/services/").content.decode()
    assert f"/services/{service.pk}/modify/" not in teammate_page  # a member, not a manager


def test_list_filters(browser: Any, service: Endpoint, personas: dict[str, Any]) -> None:
    client = browser("teammate")
    assert "web-one" not in client.get("/services/?scope=mine").content.decode()
    project = personas["project"]
    assert "web-one" in client.get(f"/services/?scope=project:{project.pk}").content.decode()
    assert "web-one" in client.get("/services/?status=PROVISIONING").content.decode()
    assert "web-one" not in client.get("/services/?status=HEALTHY").content.decode()


def _names(page: str) -> list[str]:
    return re.findall(r'<tr data-id="[^"]+" data-can-write="1?" data-name="([^"]+)"', page)


@pytest.mark.parametrize("who", ["owner", "teammate", "admin"])
def test_list_sorts_and_finds_without_javascript(
    browser: Any, service: Endpoint, folder: Folder, personas: dict[str, Any], who: str
) -> None:
    """?sort= and ?q= on the server (the page's script does the same in place); the stranger sees none."""
    services.do_scale(service, 2, acting_user=personas["owner"])
    for name in ("Alpha-llm", "zeta-web"):
        services.do_create_service(acting_user=personas["owner"], name=name, folder=folder, project=personas["project"])
    Endpoint.objects.filter(name="Alpha-llm").update(runtime="vllm")
    client = browser(who)
    newest_first = _names(client.get("/services/").content.decode())
    assert newest_first == ["zeta-web", "Alpha-llm", "web-one"]
    assert _names(client.get("/services/?sort=name").content.decode()) == ["Alpha-llm", "web-one", "zeta-web"]
    assert _names(client.get("/services/?sort=-name").content.decode()) == ["zeta-web", "web-one", "Alpha-llm"]
    assert _names(client.get("/services/?sort=created").content.decode()) == ["web-one", "Alpha-llm", "zeta-web"]
    assert _names(client.get("/services/?sort=-replicas").content.decode())[0] == "web-one"  # 0 / 2 before 0 / 1
    assert _names(client.get("/services/?sort=nonsense").content.decode()) == newest_first
    # The header links the other direction of the current sort and says which one it is.
    page = client.get("/services/?sort=name&status=PROVISIONING").content.decode()
    header = (
        '<th scope="col" aria-sort="ascending">'
        '<a class="sort" data-sort="name" href="?sort=-name&amp;status=PROVISIONING"'
    )
    assert header in page
    # Find: name, runtime or status, any case, every word.
    assert _names(client.get("/services/?q=ALPHA").content.decode()) == ["Alpha-llm"]
    assert _names(client.get("/services/?q=vllm").content.decode()) == ["Alpha-llm"]
    assert len(_names(client.get("/services/?q=provisioning").content.decode())) == 3
    assert _names(client.get("/services/?q=web+one").content.decode()) == ["web-one"]
    empty = client.get("/services/?q=nothing-like-this").content.decode()
    assert _names(empty) == [] and "No service matches these filters." in empty
    assert _names(browser("stranger").get("/services/?q=web&sort=name").content.decode()) == []


def test_every_page_starts_with_a_skip_link_to_the_main_content(browser: Any, service: Endpoint) -> None:
    for who, url in (("owner", "/services/"), ("owner", f"/services/{service.pk}/"), (None, "/accounts/login/")):
        page = browser(who).get(url).content.decode()
        body = page.split("<body>", 1)[1]
        first = re.search(r"<(a|button|input|select|textarea)\b[^>]*>", body)
        assert first is not None and first.group(0) == '<a class="skip-link" href="#content">', (url, first)
        assert '<main id="content" tabindex="-1">' in page
    ja = browser("owner")
    ja.cookies["django_language"] = "ja"
    assert "本文へスキップ" in ja.get("/services/").content.decode()


def test_anonymous_goes_to_login(browser: Any, service: Endpoint) -> None:
    pages = ("/services/", "/services/new/", f"/services/{service.pk}/modify/", f"/services/{service.pk}/terminate/")
    for url in pages:
        response = browser(None).get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_home_is_the_services_list(browser: Any, personas: dict[str, Any]) -> None:
    response = browser("owner").get("/")
    assert response.status_code == 302
    assert response["Location"] == "/services/"


def test_nav_points_to_the_services_list(browser: Any, personas: dict[str, Any]) -> None:
    page = browser("owner").get("/services/").content.decode()
    assert 'href="/services/" aria-current="page"' in page


# --- launcher ----------------------------------------------------------------------------------


def test_launcher_prefills_from_run_this_model(browser: Any, folder: Folder) -> None:
    response = browser("owner").get(f"/services/new/?folder={folder.pk}&runtime=custom")
    assert response.status_code == 200
    page = response.content.decode()
    assert f'<option value="{folder.pk}" selected>' in page
    assert 'value="modelserve/python:3.11"' in page
    assert 'value="256m"' in page and 'value="0.5"' in page
    assert 'value="MODEL_NAME"' in page and 'value="simple"' in page


def test_launcher_says_where_a_definition_file_is_wrong(browser: Any, personas: dict[str, Any]) -> None:
    """File, field and line, as the folder page says them, not the message alone."""
    broken = FolderFactory(
        owner=personas["owner"],
        name="broken",
        files={
            "model-definition.yaml": SIMPLE_DEFINITION,
            "service-definition.toml": "[custom.environment]\nimage = 'x'\narchitecture = 'x86_64'\n"
            "[custom.resource_slots]\nmem = 'lots'\n",
        },
    )
    page = browser("owner").get(f"/services/new/?folder={broken.pk}&runtime=custom").content.decode()
    assert "<code>service-definition.toml</code> <code>custom.resource_slots.mem</code> (line 5:1): " in page
    ja = browser("owner").get(f"/services/new/?folder={broken.pk}&runtime=custom", HTTP_ACCEPT_LANGUAGE="ja")
    assert "(5 行目:1)" in ja.content.decode()


def test_folder_list_run_this_model_opens_the_launcher(browser: Any, folder: Folder) -> None:
    page = browser("owner").get("/folders/?tab=model").content.decode()
    assert f"/services/new/?folder={folder.pk}" in page


def test_launcher_offers_only_model_folders_and_mounts_only_general_ones(
    browser: Any, folder: Folder, personas: dict[str, Any]
) -> None:
    FolderFactory(owner=personas["owner"], name="datasets", usage_mode=Folder.UsageMode.DATA)
    page = browser("owner").get("/services/new/").content.decode()
    folder_select = page.split('name="folder"', 1)[1].split("</select>", 1)[0]
    assert "simple" in folder_select and "datasets" not in folder_select
    mount_select = page.split('name="mount_folder"', 1)[1].split("</select>", 1)[0]
    assert "datasets" in mount_select and ">simple" not in mount_select


def test_launcher_shows_a_bad_name_next_to_the_field(browser: Any, folder: Folder) -> None:
    response = browser("owner").post("/services/new/", form(folder, name="ab"))
    assert response.status_code == 200  # the form again, with the errors
    page = response.content.decode()
    error = page.split('id="err-name"', 1)[1].split("</p>", 1)[0]
    assert "4 to 24" in error or "at least 4" in error.lower()
    assert not Endpoint.objects.exists()


def test_launcher_shows_action_errors_next_to_the_field(browser: Any, folder: Folder) -> None:
    response = browser("owner").post("/services/new/", form(folder, mem="lots"))
    assert response.status_code == 200  # the form again, with the errors
    error = response.content.decode().split('id="err-resources"', 1)[1].split("</p>", 1)[0]
    assert "mem" in error
    response = browser("owner").post("/services/new/", form(folder, env_key=["1BAD"], env_value=["x"]))
    error = response.content.decode().split('id="err-environ"', 1)[1].split("</p>", 1)[0]
    assert "1BAD" in error


def test_launcher_creates_through_the_api_path(browser: Any, folder: Folder, personas: dict[str, Any]) -> None:
    response = browser("owner").post("/services/new/", form(folder, project=str(personas["project"].pk)))
    assert response.status_code == 302
    endpoint = Endpoint.objects.get(name="my-service")
    assert response["Location"].rstrip("/").endswith(str(endpoint.pk)) or response["Location"] == "/services/"
    assert endpoint.owner == personas["owner"]
    assert endpoint.project == personas["project"]
    assert endpoint.environ == {"MODEL_NAME": "simple", "GREETING": "hello"}
    assert endpoint.resources == {"cpu": 0.5, "mem": 256 * 1024**2}
    assert endpoint.image == "modelserve/python:3.11"
    assert ServiceEvent.objects.filter(endpoint=endpoint, kind="created").exists()


def test_launcher_sets_and_modify_clears_forward_cookies(browser: Any, folder: Folder, settings: Any) -> None:
    settings.SERVING_DOMAIN = "models.example.net"  # forward_cookies needs a host name per service
    client = browser("owner")
    assert 'name="forward_cookies"' in client.get("/services/new/").content.decode()
    assert client.post("/services/new/", form(folder, forward_cookies="on")).status_code == 302
    endpoint = Endpoint.objects.get(name="my-service")
    assert endpoint.forward_cookies is True
    page = client.get(f"/services/{endpoint.pk}/modify/").content.decode()
    assert 'id="f-cookies" name="forward_cookies" checked' in page
    assert "callers&#x27; cookies reach the replicas" in client.get(f"/services/{endpoint.pk}/").content.decode()
    response = client.post(f"/services/{endpoint.pk}/modify/", form(folder))  # the box unticked
    assert response.status_code == 302, response.content.decode()[:2000]
    endpoint.refresh_from_db()
    assert endpoint.forward_cookies is False
    assert ServiceEvent.objects.get(endpoint=endpoint, kind="modified").data["changes"]["forward_cookies"] is False


def test_launcher_refuses_forward_cookies_without_serving_domain(browser: Any, folder: Folder, settings: Any) -> None:
    settings.SERVING_DOMAIN = ""
    response = browser("owner").post("/services/new/", form(folder, forward_cookies="on"))
    assert response.status_code == 200
    assert "set SERVING_DOMAIN" in response.content.decode()
    assert not Endpoint.objects.filter(name="my-service").exists()


def test_launcher_refuses_a_stranger_s_folder(browser: Any, folder: Folder) -> None:
    response = browser("stranger").post("/services/new/", form(folder))
    assert response.status_code == 200  # the form again, with the errors
    assert "No such folder" in response.content.decode().split('id="err-folder"', 1)[1].split("</p>", 1)[0]


def test_launcher_defaults_endpoint(browser: Any, folder: Folder) -> None:
    response = browser("owner").get(f"/services/new/defaults/?folder={folder.pk}&runtime=custom")
    assert response.status_code == 200
    body = response.json()
    assert body["image"] == "modelserve/python:3.11" and body["mem"] == "256m"
    assert body["environ"] == [["MODEL_NAME", "simple"]]
    assert browser("stranger").get(f"/services/new/defaults/?folder={folder.pk}").status_code == 404


def test_validate_returns_field_errors(browser: Any, folder: Folder) -> None:
    response = browser("owner").post("/services/new/validate/", form(folder, name="x"))
    assert response.status_code == 200  # the form again, with the errors
    assert "name" in response.json()["errors"]


# --- modify ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "code"), [("owner", 200), ("teammate", 403), ("stranger", 404), ("admin", 200)])
def test_modify_page_per_persona(browser: Any, service: Endpoint, who: str, code: int) -> None:
    response = browser(who).get(f"/services/{service.pk}/modify/")
    assert response.status_code == code
    if code == 200:
        page = response.content.decode()
        assert 'value="web-one"' in page
        assert 'value="256m"' in page


def test_modify_applies_only_the_changed_fields(browser: Any, service: Endpoint) -> None:
    client = browser("owner")
    page = client.get(f"/services/{service.pk}/modify/")
    assert page.status_code == 200
    data = form(
        service.model_folder,
        name="web-one",
        replicas="3",
        cpu="0.5",
        mem="256m",
        image="modelserve/python:3.11",
        env_key=["MODEL_NAME"],
        env_value=["simple"],
        project=str(service.project_id),
    )
    response = client.post(f"/services/{service.pk}/modify/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    service.refresh_from_db()
    assert service.desired_replicas == 3
    assert service.spec_version == 1  # nothing that replaces replicas changed
    event = ServiceEvent.objects.filter(endpoint=service, kind="modified").get()
    assert event.data["changes"] == {"desired_replicas": 3}


def test_modify_shows_errors_next_to_the_field(browser: Any, service: Endpoint) -> None:
    data = form(service.model_folder, name="web-one", replicas="99", project=str(service.project_id))
    response = browser("owner").post(f"/services/{service.pk}/modify/", data)
    assert response.status_code == 200  # the form again, with the errors
    assert "64" in response.content.decode().split('id="err-replicas"', 1)[1].split("</p>", 1)[0]


# --- terminate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("who", "code"), [("owner", 200), ("teammate", 403), ("stranger", 404), ("admin", 200)])
def test_terminate_asks_first(browser: Any, service: Endpoint, who: str, code: int) -> None:
    response = browser(who).get(f"/services/{service.pk}/terminate/")
    assert response.status_code == code
    service.refresh_from_db()
    assert service.lifecycle == Endpoint.Lifecycle.CREATED


def test_terminate_stops_the_service(browser: Any, service: Endpoint) -> None:
    assert browser("stranger").post(f"/services/{service.pk}/terminate/").status_code == 404
    response = browser("owner").post(f"/services/{service.pk}/terminate/")
    assert response.status_code == 302
    service.refresh_from_db()
    assert service.lifecycle == Endpoint.Lifecycle.DESTROYING


# --- live list over the websocket --------------------------------------------------------------

application = URLRouter(websocket_urlpatterns)


@pytest.mark.django_db(transaction=True)
def test_services_list_socket_sends_changes_only_to_who_may_see(personas: dict[str, Any]) -> None:
    folder = FolderFactory(owner=personas["owner"], name="m", files={"model-definition.yaml": SIMPLE_DEFINITION})
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="live-one", folder=folder, project=personas["project"]
    )

    async def scenario() -> dict[str, Any]:
        sockets = {}
        for who in ("owner", "teammate", "stranger", "admin"):
            communicator = WebsocketCommunicator(application, "/ws/services/")
            communicator.scope["user"] = personas[who]
            connected, _ = await communicator.connect(timeout=deadline_for(5))
            assert connected
            sockets[who] = communicator
        anonymous = WebsocketCommunicator(application, "/ws/services/")
        from django.contrib.auth.models import AnonymousUser

        anonymous.scope["user"] = AnonymousUser()
        connected, _ = await anonymous.connect(timeout=deadline_for(5))
        assert not connected
        from channels.db import database_sync_to_async

        await database_sync_to_async(notify_endpoint_changed)(str(endpoint.pk))
        got: dict[str, Any] = {}
        for who in ("owner", "teammate", "admin"):
            got[who] = await sockets[who].receive_json_from(timeout=deadline_for(5))
        got["stranger"] = await sockets["stranger"].receive_nothing(timeout=0.5)
        for communicator in sockets.values():
            await communicator.disconnect()
        return got

    # In a thread of its own: a browser session (tests/e2e) may hold an event loop in this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        got = pool.submit(asyncio.run, scenario()).result()
    assert got["owner"]["type"] == "service"
    assert got["owner"]["service"]["name"] == "live-one"
    assert got["owner"]["service"]["can_write"] is True
    assert got["teammate"]["service"]["can_write"] is False
    assert got["admin"]["service"]["id"] == str(endpoint.pk)
    assert got["stranger"] is True  # received nothing


def test_launcher_explains_the_cluster_fields(browser: Any, folder: Folder) -> None:
    html = browser("owner").get(f"/services/new/?folder={folder.pk}").content.decode()
    hint = html.split('id="cluster-hint">')[1].split("</p>", maxsplit=1)[0]
    assert "Multi-node puts each container on a different node" in hint
    assert "single-node puts them all on one node" in hint
    assert 'aria-describedby="err-cluster_size cluster-hint"' in html


def test_service_page_says_logged_out_not_gone_when_the_socket_closes_4401(browser: Any, service: Endpoint) -> None:
    """Review of issue 13: the service socket of a page whose session ended closed 4404 after a
    "gone", so the page said the service was terminated. It closes 4401 now (as the list does), and
    the page has a sentence for that, in English and Japanese, which its script shows on 4401."""
    from django.conf import settings

    page = browser("owner").get(f"/services/{service.pk}/").content.decode()
    assert 'data-i18n-logged-out="You were logged out; log in again to see live updates."' in page
    ja = browser("owner").get(f"/services/{service.pk}/", HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    assert "ログアウトされました" in ja
    script = (settings.BASE_DIR / "static" / "js" / "detail.js").read_text(encoding="utf-8")
    assert "event.code === 4401 ? t.i18nLoggedOut : t.i18nGone" in script


def test_services_list_stops_reconnecting_and_says_logged_out_when_the_socket_closes_4401(browser: Any) -> None:
    """The list socket closes 4401 when the session ends; the list kept saying "reconnecting" and
    retried for ever. It has the same sentence as the service page now and stops on 4401."""
    from django.conf import settings

    page = browser("owner").get("/services/").content.decode()
    assert 'data-i18n-logged-out="You were logged out; log in again to see live updates."' in page
    ja = browser("owner").get("/services/", HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    assert "ログアウトされました" in ja
    script = (settings.BASE_DIR / "static" / "js" / "services.js").read_text(encoding="utf-8")
    assert "isFinal: (event) => event.code === 4401" in script and "finalText: text.loggedOut" in script


@pytest.mark.parametrize("domain", ["", "models.example.net"])
def test_launcher_says_forward_cookies_needs_serving_domain(
    browser: Any, folder: Folder, settings: Any, domain: str
) -> None:
    """Review of issue 13: the help of "Forward cookies" did not say it needs SERVING_DOMAIN, so an
    owner on an installation without it learnt only from the refusal after submitting."""
    settings.SERVING_DOMAIN = domain
    html = browser("owner").get(f"/services/new/?folder={folder.pk}").content.decode()
    help_text = html.split('id="f-cookies-help">')[1].split("</small>", maxsplit=1)[0]
    assert "Needs SERVING_DOMAIN (each service on a host name of its own)" in help_text
    assert ("SERVING_DOMAIN is not set on this installation" in help_text) is (not domain)
    ja = browser("owner").get(f"/services/new/?folder={folder.pk}", HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    ja_help = ja.split('id="f-cookies-help">')[1].split("</small>", maxsplit=1)[0]
    assert "SERVING_DOMAIN が必要です" in ja_help
    assert ("SERVING_DOMAIN が設定されていないため" in ja_help) is (not domain)
