"""The revisions REST contract (issue 16) with every persona; bad input gets a sentence naming the fix."""

from __future__ import annotations

from typing import Any

import pytest

from serving.models import Endpoint, Revision, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "v2.yaml": SIMPLE_DEFINITION},
    )


@pytest.fixture
def sid(api: Any, folder: Folder) -> str:
    body = {"name": "svc-one", "folder": str(folder.pk), "replicas": 2, "project": folder.project_id}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return str(response.json()["id"])


def canary(api: Any, who: str, sid: str, percent: Any = 10) -> Any:
    body = {"environ": {"MODE": "two"}, "rollout": {"strategy": "canary", "percent": percent}}
    return api(who).patch(f"/api/v1/services/{sid}/", body, format="json")


def test_create_and_modify_make_revisions_with_author_and_diff(api: Any, sid: str) -> None:
    first = api("owner").get(f"/api/v1/services/{sid}/revisions/").json()
    assert [(r["number"], r["share"], r["current"], r["summary"]) for r in first] == [(1, 100, True, "First revision.")]
    # Scaling changes no configuration: no revision.
    api("owner").patch(f"/api/v1/services/{sid}/", {"replicas": 3}, format="json")
    assert Revision.objects.filter(endpoint_id=sid).count() == 1
    assert canary(api, "teammate", sid).status_code == 403  # a project member reads, its owner writes
    assert canary(api, "admin", sid).status_code == 200
    shown = api("owner").get(f"/api/v1/services/{sid}/revisions/2/").json()
    assert shown["created_by"] == "admin" and shown["share"] == 10 and shown["config"]["environ"] == {"MODE": "two"}
    assert shown["summary"] == "environ: MODE changed"
    assert api("owner").get(f"/api/v1/services/{sid}/revisions/9/").status_code == 404


@pytest.mark.parametrize(
    ("who", "read", "write"), [("owner", 200, 202), ("teammate", 200, 403), ("stranger", 404, 404), ("admin", 200, 202)]
)
def test_personas(api: Any, sid: str, who: str, read: int, write: int) -> None:
    canary(api, "owner", sid)
    assert api(who).get(f"/api/v1/services/{sid}/revisions/").status_code == read
    assert api(who).post(f"/api/v1/services/{sid}/revisions/2/promote/").status_code == write
    assert api(who).post(f"/api/v1/services/{sid}/revisions/rollback/").status_code == write
    shares = api(who).patch(f"/api/v1/services/{sid}/revisions/traffic/", {"1": 70, "2": 30}, format="json")
    assert shares.status_code == (200 if write == 202 else write)
    if write == 202:
        assert Endpoint.objects.get(pk=sid).traffic == {"1": 70, "2": 30}
        kinds = set(ServiceEvent.objects.filter(endpoint_id=sid).values_list("kind", flat=True))
        assert {"promoted", "rolled_back", "traffic_set"} <= kinds


def test_promote_and_rollback_move_the_service_between_revisions(api: Any, sid: str) -> None:
    canary(api, "owner", sid)
    api("owner").post(f"/api/v1/services/{sid}/revisions/2/promote/")
    endpoint = Endpoint.objects.get(pk=sid)
    assert (endpoint.spec_version, endpoint.traffic, endpoint.environ) == (2, {"2": 100}, {"MODE": "two"})
    api("owner").post(f"/api/v1/services/{sid}/revisions/rollback/")
    endpoint.refresh_from_db()
    assert (endpoint.spec_version, endpoint.traffic, endpoint.environ) == (1, {"1": 100}, {})
    # A change after the rollback is revision 3: numbers are never reused.
    api("owner").patch(f"/api/v1/services/{sid}/", {"environ": {"MODE": "three"}}, format="json")
    assert Endpoint.objects.get(pk=sid).spec_version == 3


def test_bad_input_says_what_to_fix(api: Any, sid: str) -> None:
    assert "whole number from 1 to 99" in str(canary(api, "owner", sid, percent=150).json())
    wrong = api("owner").patch(
        f"/api/v1/services/{sid}/", {"replicas": 1, "rollout": {"strategy": "canary", "percent": 5}}, format="json"
    )
    assert wrong.status_code == 400 and "leave the rollout out" in str(wrong.json())
    canary(api, "owner", sid)
    url = f"/api/v1/services/{sid}/revisions/traffic/"
    assert "make them add up to 100" in str(api("owner").patch(url, {"1": 50, "2": 10}, format="json").json())
    assert "has no revision 4" in str(api("owner").patch(url, {"4": 100}, format="json").json())
    first = api("owner").post(f"/api/v1/services/{sid}/revisions/rollback/")
    assert first.status_code == 202
    again = api("owner").post(f"/api/v1/services/{sid}/revisions/rollback/")
    assert again.status_code == 400 and "there is none to roll back to" in str(again.json())
