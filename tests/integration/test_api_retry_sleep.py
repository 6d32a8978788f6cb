"""The retry policy and scale-to-zero fields through the API, the launcher and the routing entry."""

from __future__ import annotations

from typing import Any

import pytest

from serving.bus.routing import build_entry
from serving.models import Endpoint, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.integration.test_pages_services import form

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )


def create(api: Any, folder: Folder, **extra: Any) -> Any:
    body = {"name": "svc-one", "folder": str(folder.pk), "replicas": 1, "project": folder.project_id, **extra}
    return api("owner").post("/api/v1/services/", body, format="json")


def test_defaults_inference_and_never_sleeps(api: Any, folder: Folder) -> None:
    body = create(api, folder).json()
    assert (body["retry_policy"], body["idle_timeout"]) == ("inference", None)
    endpoint = Endpoint.objects.get(pk=body["id"])
    entry = build_entry(endpoint, [], [])
    assert entry["retry_policy"] == "inference" and entry["scale_to_zero"] is False


def test_set_at_create_and_carried_to_the_proxy(api: Any, folder: Folder) -> None:
    body = create(api, folder, retry_policy="safe", idle_timeout=600).json()
    assert (body["retry_policy"], body["idle_timeout"]) == ("safe", 600)
    entry = build_entry(Endpoint.objects.get(pk=body["id"]), [], [])
    assert entry["retry_policy"] == "safe" and entry["scale_to_zero"] is True


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("retry_policy", "sometimes", "choose safe"),
        ("idle_timeout", 0, "at least 1"),
        ("idle_timeout", -5, "never sleeps"),
        ("idle_timeout", "soon", "whole number of seconds"),
        ("idle_timeout", 10**9, "at most"),
    ],
)
def test_bad_values_get_a_sentence_under_their_field(
    api: Any, folder: Folder, field: str, value: Any, says: str
) -> None:
    response = create(api, folder, **{field: value})
    assert response.status_code == 400
    assert says in " ".join(response.json()[field]), response.json()


@pytest.mark.parametrize(("who", "code"), [("owner", 200), ("teammate", 403), ("stranger", 404), ("admin", 200)])
def test_modify_per_persona(api: Any, folder: Folder, who: str, code: int) -> None:
    service = create(api, folder).json()
    url = f"/api/v1/services/{service['id']}/"
    response = api(who).patch(url, {"retry_policy": "all", "idle_timeout": 30}, format="json")
    assert response.status_code == code
    endpoint = Endpoint.objects.get(pk=service["id"])
    if code == 200:
        assert (endpoint.retry_policy, endpoint.idle_timeout, endpoint.spec_version) == ("all", 30, 1)
        changes = ServiceEvent.objects.get(endpoint=endpoint, kind="modified").data["changes"]
        assert changes == {"retry_policy": "all", "idle_timeout": 30}
        # Back to never sleeping: null.
        assert api(who).patch(url, {"idle_timeout": None}, format="json").json()["idle_timeout"] is None
    else:
        assert (endpoint.retry_policy, endpoint.idle_timeout) == ("inference", None)


def test_a_sleeping_service_reads_as_sleeping_not_as_an_error(api: Any, folder: Folder) -> None:
    service = create(api, folder, idle_timeout=60).json()
    Endpoint.objects.filter(pk=service["id"]).update(desired_replicas=0, slept_at="2026-01-01T00:00:00Z")
    assert api("owner").get(f"/api/v1/services/{service['id']}/").json()["status"] == "SLEEPING"
    Endpoint.objects.filter(pk=service["id"]).update(slept_at=None)  # scaled to 0 by hand: not asleep
    assert api("owner").get(f"/api/v1/services/{service['id']}/").json()["status"] == "READY"


def test_launcher_sets_and_modify_changes_them(browser: Any, folder: Folder) -> None:
    client = browser("owner")
    page = client.get("/services/new/").content.decode()
    assert 'name="retry_policy"' in page and 'name="idle_timeout"' in page
    assert client.post("/services/new/", form(folder, retry_policy="safe", idle_timeout="120")).status_code == 302
    endpoint = Endpoint.objects.get(name="my-service")
    assert (endpoint.retry_policy, endpoint.idle_timeout) == ("safe", 120)
    detail = client.get(f"/services/{endpoint.pk}/").content.decode()
    assert "safe: idempotent requests only" in detail and "after 120 s without a request" in detail
    page = client.get(f"/services/{endpoint.pk}/modify/").content.decode()
    assert '<option value="safe" selected>' in page and 'value="120"' in page
    response = client.post(f"/services/{endpoint.pk}/modify/", form(folder, retry_policy="inference", idle_timeout=""))
    assert response.status_code == 302, response.content.decode()[:2000]
    endpoint.refresh_from_db()
    assert (endpoint.retry_policy, endpoint.idle_timeout) == ("inference", None)
    response = client.post("/services/new/", form(folder, name="other-one", idle_timeout="0"))
    assert response.status_code == 200 and "at least 1" in response.content.decode()
