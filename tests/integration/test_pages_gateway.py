"""The gateway keys page (issue 17) per persona: create (the secret shown once), the form's errors,
revoke, and a key's usage table with its CSV link; strangers get 404 like the API."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from serving.actions import gateway as gateway_actions
from serving.actions import services
from serving.core import tokens
from serving.models import Endpoint, GatewayKey, GatewayUsage
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db
LIST = reverse("serving:gateway-keys")


@pytest.fixture
def folder_of_owner(personas: dict[str, Any]) -> Folder:
    """A folder of the owner's own, in no project."""
    return FolderFactory(owner=personas["owner"], name="own", files={"model-definition.yaml": SIMPLE_DEFINITION})


@pytest.fixture
def service(personas: dict[str, Any]) -> Endpoint:
    folder: Folder = FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )
    return services.do_create_service(
        acting_user=personas["owner"], name="echo-one", folder=folder, project=personas["project"]
    )


def make_key(personas: dict[str, Any], who: str = "owner", **extra: Any) -> GatewayKey:
    key, _secret = gateway_actions.do_create_gateway_key(
        acting_user=personas[who], name=f"{who}-key", expires_at=timezone.now() + dt.timedelta(days=3), **extra
    )
    return key


def test_create_shows_the_secret_once_with_services_and_limits(
    browser: Any, service: Endpoint, personas: dict[str, Any]
) -> None:
    assert browser(None).get(LIST).status_code == 302
    page = browser("owner").get(LIST)
    assert page.status_code == 200
    body = page.content.decode()
    assert "No gateway keys yet." in body and f'value="{service.pk}"' in body  # the service is offered

    expiry = (timezone.localdate() + dt.timedelta(days=10)).isoformat()
    made = browser("owner").post(
        LIST,
        {
            "name": "ci",
            "services": [str(service.pk)],
            "expires_on": expiry,
            "requests_per_minute": "600",
            "tokens_per_minute": "",
            "max_concurrency": "4",
        },
    )
    assert made.status_code == 201
    key = GatewayKey.objects.get(name="ci")
    assert key.owner == personas["owner"] and list(key.services.all()) == [service]
    assert (key.requests_per_minute, key.tokens_per_minute, key.max_concurrency) == (600, None, 4)
    assert key.expires_at.date().isoformat() == expiry
    html = made.content.decode()
    secret = re.search(r'id="new-key-value">([^<]+)<', html)
    assert secret is not None
    parsed = tokens.parse(secret.group(1))
    assert parsed is not None and parsed.lookup == key.lookup
    assert "600 requests/min" in html and "4 concurrent" in html and key.prefix in html
    # Never again: the list shows the prefix only.
    again = browser("owner").get(LIST).content.decode()
    assert secret.group(1) not in again and key.prefix in again and "echo-one" in again

    # Empty services: every service ("all"), default expiry (90 days), no limits.
    assert browser("teammate").post(LIST, {"name": "mine", "expires_on": ""}).status_code == 201
    mine = GatewayKey.objects.get(name="mine")
    assert mine.owner == personas["teammate"] and not mine.services.exists()
    assert mine.expires_at > timezone.now() + dt.timedelta(days=89)
    listing = browser("teammate").get(LIST).content.decode()
    assert "mine" in listing and "no limits" in listing and ">all<" in listing
    assert "ci" not in re.findall(r'<a href="[^"]+">([^<]+)</a>', listing)  # the owner's key is not theirs


def test_form_errors_are_sentences_next_to_the_field(browser: Any, service: Endpoint) -> None:
    yesterday = (timezone.localdate() - dt.timedelta(days=1)).isoformat()
    response = browser("owner").post(LIST, {"name": "late", "expires_on": yesterday})
    assert response.status_code == 400
    assert "The expiry date must be in the future." in response.content.decode()
    response = browser("owner").post(LIST, {"name": "x", "expires_on": "next week"})
    assert response.status_code == 400 and "Enter a date such as 2030-12-31." in response.content.decode()
    response = browser("owner").post(LIST, {"name": "", "requests_per_minute": "0"})
    assert response.status_code == 400
    html = response.content.decode()
    assert 'id="err-name">' in html
    # Each sentence next to its own field, not in a list above the form.
    assert 'id="err-requests_per_minute">Ensure this value is greater than or equal to 1.' in html
    # A stranger may not choose the owner's service: the API's sentence, and no key.
    response = browser("stranger").post(LIST, {"name": "theirs", "services": [str(service.pk)]})
    assert response.status_code == 400 and "you may not call it" in response.content.decode()
    assert not GatewayKey.objects.exists()


def test_revoke_per_persona(browser: Any, personas: dict[str, Any], django_capture_on_commit_callbacks: Any) -> None:
    project_key = make_key(personas, "teammate", project=personas["project"])
    own = make_key(personas, "owner")
    revoke = lambda key: reverse("serving:gateway-key-revoke", kwargs={"gateway_key_id": key.pk})  # noqa: E731
    assert browser("stranger").post(revoke(own)).status_code == 404
    assert browser("teammate").post(revoke(own)).status_code == 404
    assert browser("stranger").get(revoke(own)).status_code == 405
    # The owner manages the project: they revoke the teammate's project key too.
    with django_capture_on_commit_callbacks(execute=True):
        done = browser("owner").post(revoke(project_key), follow=True)
    assert done.status_code == 200 and f"{project_key.prefix}… revoked" in done.content.decode()
    project_key.refresh_from_db()
    assert project_key.revoked_at is not None and not project_key.is_active()
    assert browser("admin").post(revoke(own)).status_code == 302
    own.refresh_from_db()
    assert own.revoked_at is not None
    listing = browser("owner").get(LIST).content.decode()
    assert listing.count("revoked</span>") == 2 and "Revoke key" not in listing


def test_usage_table_per_persona(browser: Any, service: Endpoint, personas: dict[str, Any]) -> None:
    key = make_key(personas, "owner", services=[service], requests_per_minute=60)
    usage_url = reverse("serving:gateway-key", kwargs={"gateway_key_id": key.pk})
    empty = browser("owner").get(usage_url)
    assert empty.status_code == 200 and "No usage yet." in empty.content.decode()
    GatewayUsage.objects.create(
        key=key,
        endpoint=service,
        day=dt.date(2026, 3, 4),
        requests=10,
        prompt_tokens=1234,
        completion_tokens=567,
        errors=2,
        latency={"0.01": 10},  # all ten in (5 ms, 10 ms]: p50 7.5 ms, p95 9.75 ms
    )
    html = browser("owner").get(usage_url).content.decode()
    row = re.search(r"<tbody>(.*?)</tbody>", html, re.S)
    assert row is not None
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
    assert cells == ["2026-03-04", "echo-one", "10", "1234", "567", "2", "7.5", "9.75"]
    assert "60 requests/min" in html
    csv_url = reverse("gateway-key-usage", kwargs={"gateway_key_id": key.pk}) + "?format=csv"
    assert f'href="{csv_url}"' in html
    csv = browser("owner").get(csv_url)
    assert csv.status_code == 200 and "2026-03-04" in csv.content.decode()
    assert browser("admin").get(usage_url).status_code == 200
    assert browser("teammate").get(usage_url).status_code == 404  # a personal key: not a teammate's
    assert browser("stranger").get(usage_url).status_code == 404
    assert browser(None).get(usage_url).status_code == 302


def test_navigation_links_the_page(browser: Any) -> None:
    html = browser("stranger").get(reverse("home"), follow=True).content.decode()
    assert f'href="{LIST}"' in html
    page = browser("stranger").get(LIST).content.decode()
    assert f'<a href="{LIST}" aria-current="page">' in page


def test_the_page_in_japanese(browser: Any, personas: dict[str, Any]) -> None:
    make_key(personas, "owner", tokens_per_minute=1000)
    client = browser("owner")
    client.post(reverse("set_language"), {"language": "ja"})
    html = client.get(LIST).content.decode()
    assert "ゲートウェイキーの作成" in html and "1000 トークン/分" in html and "Create key" not in html


def test_project_keys_from_the_page_per_persona(
    browser: Any, service: Endpoint, personas: dict[str, Any], folder_of_owner: Folder
) -> None:
    project = personas["project"]
    # The owner choice offers the user and the projects they are a member of (the API's rule).
    form = browser("teammate").get(LIST).content.decode()
    assert f'<option value="{project.pk}">Project team</option>' in form and "Me (teammate)" in form
    assert f'<optgroup label="Project team"><option value="{service.pk}">echo-one</option>' in form
    assert f'<option value="{project.pk}"' not in browser("stranger").get(LIST).content.decode()

    # A member (not a manager) may make the project's key, as through the API.
    made = browser("teammate").post(
        LIST, {"name": "team-nb", "project": str(project.pk), "services": [str(service.pk)]}
    )
    assert made.status_code == 201, made.content.decode()
    key = GatewayKey.objects.get(name="team-nb")
    assert key.project == project and key.owner == personas["teammate"] and list(key.services.all()) == [service]
    assert "Gateway key team-nb created for project team." in made.content.decode()
    assert browser("owner").post(LIST, {"name": "team-all", "project": str(project.pk)}).status_code == 201

    def owners(who: str) -> dict[str, str]:
        html = browser(who).get(LIST).content.decode()
        names = re.findall(r'<a href="/services/gateway-keys/[^"]+/">([^<]+)</a>', html)
        cells = re.findall(r'class="key-owner">([^<]*)</td>', html)
        return dict(zip(names, cells, strict=True))

    # The project is named; the project's manager sees both keys, the member only the one they made.
    assert owners("owner") == {
        "team-all": "project team (made by owner)",
        "team-nb": "project team (made by teammate)",
    }
    assert owners("teammate") == {"team-nb": "project team (made by teammate)"}
    assert owners("stranger") == {}
    assert set(owners("admin")) == {"team-all", "team-nb"}

    # Revoke: the member their own, not the manager's (404); the manager the member's.
    revoke = lambda k: reverse("serving:gateway-key-revoke", kwargs={"gateway_key_id": k.pk})  # noqa: E731
    team_all = GatewayKey.objects.get(name="team-all")
    assert browser("teammate").post(revoke(team_all)).status_code == 404
    assert browser("stranger").post(revoke(key)).status_code == 404
    assert browser("teammate").post(revoke(key)).status_code == 302
    assert browser("owner").post(revoke(team_all)).status_code == 302
    assert GatewayKey.objects.filter(revoked_at__isnull=True).count() == 0


def test_project_key_errors_are_the_apis_sentences(
    browser: Any, api: Any, service: Endpoint, personas: dict[str, Any], folder_of_owner: Folder
) -> None:
    project = personas["project"]
    mine = services.do_create_service(acting_user=personas["owner"], name="mine-only", folder=folder_of_owner)
    # A project the user is not in: the API's sentence, under the owner field.
    page = browser("stranger").post(LIST, {"name": "sneaky", "project": str(project.pk)})
    through_api = api("stranger").post(
        "/api/v1/gateway-keys/", {"name": "sneaky", "project": project.pk}, format="json"
    )
    sentence = through_api.json()["project"][0]
    assert page.status_code == 400 and through_api.status_code == 400
    html = page.content.decode()
    assert re.search(r'id="err-project">[^<]*' + re.escape(sentence), html)
    assert 'id="gk-project" name="project" aria-describedby="hint-project err-project" aria-invalid="true"' in html
    # A service outside the project: the action's sentence, under the services field.
    page = browser("owner").post(LIST, {"name": "mixed", "project": str(project.pk), "services": [str(mine.pk)]})
    through_api = api("owner").post(
        "/api/v1/gateway-keys/", {"name": "mixed", "project": project.pk, "services": [str(mine.pk)]}, format="json"
    )
    assert page.status_code == 400 and through_api.status_code == 400
    sentence = "Service 'mine-only' is not in project 'team': a project's key calls only the project's services."
    assert sentence in str(through_api.json())
    assert re.search(r'id="err-services">[^<]*' + re.escape(sentence.replace("'", "&#x27;")), page.content.decode())
    # Not a number: the field's own sentence; the form keeps what was typed.
    page = browser("owner").post(LIST, {"name": "typed", "project": "team"})
    assert page.status_code == 400 and "A valid integer is required." in page.content.decode()
    assert 'value="typed"' in page.content.decode()
    assert not GatewayKey.objects.exists()
