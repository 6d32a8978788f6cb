"""The services REST contract (docs/architecture.md) with every persona."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from serving.models import Endpoint, EndpointToken, Route, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db

SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"

[custom.resource_slots]
cpu = 1
mem = "512m"

[custom.environ]
GREETING = "hello"
"""


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": SERVICE_DEFINITION},
    )


def create(api: Any, who: str, folder: Folder, **extra: Any) -> Any:
    body = {"name": "svc-one", "folder": str(folder.pk), "runtime": "custom", "replicas": 2, **extra}
    return api(who).post("/api/v1/services/", body, format="json")


def test_create_reads_back_the_contract(api: Any, folder: Folder) -> None:
    response = create(api, "owner", folder, project=folder.project_id)
    assert response.status_code == 201, response.json()
    body = response.json()
    for key in ("id", "name", "url", "status", "desired_replicas", "routes"):
        assert key in body
    assert body["desired_replicas"] == 2
    assert body["url"].endswith(f"/e/{body['slug']}/")
    assert body["status"] == "PROVISIONING"
    # Defaults from service-definition.toml (S3.2).
    assert body["image"] == "modelserve/python:3.11"
    assert body["resources"]["mem"] == 512 * 1024**2
    assert body["environ"]["GREETING"] == "hello"
    assert ServiceEvent.objects.filter(endpoint_id=body["id"], kind="created").exists()


def test_explicit_values_override_the_service_definition(api: Any, folder: Folder) -> None:
    response = create(
        api, "owner", folder, image="other:1", resources={"cpu": 2, "mem": "1g"}, environ={"GREETING": "x"}
    )
    body = response.json()
    assert (body["image"], body["resources"]["cpu"], body["environ"]["GREETING"]) == ("other:1", 2.0, "x")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"name": "abc"}, "name"),
        ({"name": "x" * 25}, "name"),
        ({"name": "bad name!"}, "name"),
        ({"runtime": "nope"}, "runtime"),
        ({"replicas": -1}, "replicas"),
        ({"replicas": 65}, "replicas"),
        ({"resources": {"mem": "lots"}}, "resources"),
        ({"environ": {"1BAD": "x"}}, "environ"),
        ({"environ": {"A": "x" * (128 * 1024)}}, "environ"),
        ({"environ": {f"V{i}": "x" * (100 * 1024) for i in range(11)}}, "environ"),
        ({"resources": {"mem": 1}}, "resources"),  # 1 byte: meant "1g"
        ({"model_mount": "relative"}, "model_mount"),
        ({"model_mount": "/proc"}, "model_mount"),
        ({"preset": "nope"}, "preset"),
    ],
)
def test_bad_input_names_the_field(api: Any, folder: Folder, extra: dict[str, Any], field: str) -> None:
    response = create(api, "owner", folder, **extra)
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert not Endpoint.objects.exists()


def test_every_problem_is_reported_at_once_under_its_field(api: Any, folder: Folder) -> None:
    """One submit shows every error, not one per round trip (the launcher puts each by its field)."""
    body = {
        "name": "ab",
        "environ": {"1BAD": "x"},
        "resources": {"cpu": "lots"},
        "model_mount": "relative",
    }
    response = create(api, "owner", folder, **body)
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) >= {"name", "environ", "resources", "model_mount"}, errors
    assert "4 to 24 characters" in errors["name"][0]
    # A field the serializer refuses comes with the name's error too.
    errors = create(api, "owner", folder, name="ab", replicas=-1).json()
    assert set(errors) == {"name", "replicas"}, errors
    assert not Endpoint.objects.exists()


def test_folder_must_be_a_model_folder_and_extra_mounts_must_not(api: Any, folder: Folder, personas: Any) -> None:
    # (A project data folder: with the project's model folder, a private one is refused, see
    # tests/security/test_project_folder_definition.py.)
    data = FolderFactory(
        owner=personas["owner"], project=personas["project"], usage_mode=Folder.UsageMode.DATA, name="data"
    )
    response = create(api, "owner", data)
    assert response.status_code == 400
    assert "model folder" in response.json()["folder"][0]
    other_model = FolderFactory(owner=personas["owner"], name="model2")
    response = create(api, "owner", folder, extra_mounts=[{"folder": str(other_model.pk), "target": "/data"}])
    assert response.status_code == 400
    assert "can not be an additional mount" in str(response.json())
    response = create(api, "owner", folder, extra_mounts=[{"folder": str(data.pk), "target": "/home/work/data"}])
    assert response.status_code == 201
    assert response.json()["extra_mounts"] == [{"folder": str(data.pk), "target": "/home/work/data"}]


def test_name_unique_per_owner_until_destroyed(api: Any, folder: Folder) -> None:
    assert create(api, "owner", folder).status_code == 201
    second = create(api, "owner", folder)
    assert second.status_code == 400
    assert "already have a service" in second.json()["name"][0]
    Endpoint.objects.update(lifecycle=Endpoint.Lifecycle.DESTROYED)
    assert create(api, "owner", folder).status_code == 201


def test_stranger_cannot_use_someone_elses_folder(api: Any, folder: Folder) -> None:
    response = create(api, "stranger", folder)
    assert response.status_code == 400
    assert "folder" in response.json()


@pytest.mark.parametrize(
    ("who", "read", "write"),
    [("owner", 200, 200), ("teammate", 200, 403), ("stranger", 404, 404), ("admin", 200, 200)],
)
def test_persona_matrix(api: Any, folder: Folder, who: str, read: int, write: int) -> None:
    service = create(api, "owner", folder, project=folder.project_id).json()
    url = f"/api/v1/services/{service['id']}/"
    assert api(who).get(url).status_code == read
    listed = [s["id"] for s in api(who).get("/api/v1/services/").json()]
    assert (service["id"] in listed) == (read == 200)
    assert api(who).patch(url, {"replicas": 3}, format="json").status_code == write
    for sub in ("tokens/", "rules/", "events/", "scaling-events/"):
        assert api(who).get(url + sub).status_code == read
    assert api(who).post(url + "clear-errors/").status_code == (202 if write == 200 else write)
    assert api(who).delete(url).status_code == (202 if write == 200 else write)


def test_anonymous_gets_401_or_403(api: Any, folder: Folder) -> None:
    assert api(None).get("/api/v1/services/").status_code in (401, 403)


def test_modify_applies_only_changed_fields_and_bumps_version_for_replacing_ones(api: Any, folder: Folder) -> None:
    service = create(api, "owner", folder).json()
    url = f"/api/v1/services/{service['id']}/"
    body = api("owner").patch(url, {"replicas": 4}, format="json").json()
    assert (body["desired_replicas"], body["spec_version"]) == (4, 1)
    body = api("owner").patch(url, {"environ": {"A": "1"}}, format="json").json()
    assert (body["environ"], body["spec_version"]) == ({"A": "1"}, 2)
    body = api("owner").patch(url, {"environ": {"A": "1"}}, format="json").json()
    assert body["spec_version"] == 2  # unchanged value: nothing applied
    kinds = list(ServiceEvent.objects.filter(endpoint_id=service["id"]).values_list("kind", flat=True))
    assert kinds.count("modified") == 2


def test_terminate_revokes_tokens_and_marks_terminating(api: Any, folder: Folder) -> None:
    service = create(api, "owner", folder).json()
    url = f"/api/v1/services/{service['id']}/"
    token = api("owner").post(url + "tokens/", {}, format="json").json()
    response = api("owner").delete(url)
    assert response.status_code == 202
    assert response.json()["status"] == "TERMINATING"
    assert EndpointToken.objects.get(pk=token["id"]).revoked_at is not None
    # Terminating, not yet destroyed: still readable, and terminating again is harmless.
    assert api("owner").get(url).json()["status"] == "TERMINATING"
    assert api("owner").delete(url).status_code == 202


def test_tokens_shown_once_and_stored_as_digest(api: Any, folder: Folder) -> None:
    service = create(api, "owner", folder, project=folder.project_id).json()
    url = f"/api/v1/services/{service['id']}/tokens/"
    expires = (timezone.now() + timedelta(days=7)).isoformat()
    created = api("teammate").post(url, {"expires_at": expires}, format="json")
    assert created.status_code == 201
    body = created.json()
    assert body["token"].startswith("mst_")
    row = EndpointToken.objects.get(pk=body["id"])
    assert body["token"] not in (row.digest, row.lookup)
    listed = api("owner").get(url).json()
    assert "token" not in listed[0]
    assert listed[0]["prefix"] == body["token"][: len(listed[0]["prefix"])]
    past = api("owner").post(url, {"expires_at": "2000-01-01T00:00:00Z"}, format="json")
    assert past.status_code == 400
    assert "future" in str(past.json())
    # Revoke: the creator (teammate) may; a stranger sees 404.
    assert api("stranger").delete(f"{url}{body['id']}/").status_code == 404
    assert api("teammate").delete(f"{url}{body['id']}/").status_code == 204
    assert EndpointToken.objects.get(pk=body["id"]).revoked_at is not None


def test_token_last_use_is_batched_from_the_proxies(api: Any, folder: Folder) -> None:
    """The proxies batch last-use times in Redis (tests/integration/test_proxy.py checks that side);
    the beat task moves them onto the tokens, forward only, and empties the batch."""
    from serving import tasks
    from serving.bus import routing

    service = create(api, "owner", folder).json()
    url = f"/api/v1/services/{service['id']}/tokens/"
    token = api("owner").post(url, {}, format="json").json()
    lookup = EndpointToken.objects.get(pk=token["id"]).lookup
    assert api("owner").get(url).json()[0]["last_used_at"] is None

    used_at = timezone.now().replace(microsecond=0) - timedelta(minutes=1)
    redis = routing.get_redis()
    redis.hset(routing.token_usage_key(), mapping={lookup: str(used_at.timestamp()), "unknown-lookup": "1.0"})
    tasks.record_token_usage()
    assert redis.exists(routing.token_usage_key()) == 0
    listed = api("owner").get(url).json()[0]
    assert listed["last_used_at"] is not None
    assert EndpointToken.objects.get(pk=token["id"]).last_used_at == used_at

    # A late, older batch never moves the time back.
    redis.hset(routing.token_usage_key(), lookup, str((used_at - timedelta(hours=1)).timestamp()))
    tasks.record_token_usage()
    assert EndpointToken.objects.get(pk=token["id"]).last_used_at == used_at


def test_rules_validation_names_the_field(api: Any, folder: Folder) -> None:
    service = create(api, "owner", folder).json()
    url = f"/api/v1/services/{service['id']}/rules/"
    rule = {
        "direction": "out",
        "source": "proxy",
        "metric": "in_flight",
        "comparator": "GREATER_THAN",
        "threshold": 5,
        "step": 1,
        "min_replicas": 1,
        "max_replicas": 3,
        "cooldown": 60,
    }
    created = api("owner").post(url, rule, format="json")
    assert created.status_code == 201, created.json()
    for bad, field in (
        ({"step": 0}, "step"),
        ({"min_replicas": 5}, "min_replicas"),
        ({"threshold": "x"}, "threshold"),
        ({"comparator": "EQUAL"}, "comparator"),
    ):
        response = api("owner").post(url, {**rule, **bad}, format="json")
        assert response.status_code == 400
        assert field in response.json()
    rule_url = f"{url}{created.json()['id']}/"
    assert api("owner").patch(rule_url, {"enabled": False}, format="json").json()["enabled"] is False
    assert api("teammate").patch(rule_url, {"enabled": True}, format="json").status_code in (403, 404)
    assert api("owner").delete(rule_url).status_code == 204


def test_clear_errors_removes_failed_routes(api: Any, folder: Folder) -> None:
    service = create(api, "owner", folder).json()
    endpoint = Endpoint.objects.get(pk=service["id"])
    Route.objects.create(endpoint=endpoint, status=Route.Status.FAILED_TO_START, error={"message": "boom"})
    Endpoint.objects.filter(pk=endpoint.pk).update(retries=5)
    body = api("owner").get(f"/api/v1/services/{endpoint.pk}/").json()
    assert body["status"] == "UNHEALTHY"
    assert body["routes"][0]["error"] == "boom"
    body = api("owner").post(f"/api/v1/services/{endpoint.pk}/clear-errors/").json()
    assert body["retries"] == 0
    assert body["routes"][0]["status"] == "terminating"


def test_schema_and_docs_are_served(api: Any, client: Any) -> None:
    assert api("owner").get("/api/schema/").status_code == 200
    schema = api("owner").get("/api/schema/?format=json").json()
    # Scripts and generated clients learn how to send an API key from the schema.
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": schema["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert {"apiKey": []} in schema["paths"]["/api/v1/services/"]["get"]["security"]


def test_an_api_path_no_view_matches_answers_json(api: Any, client: Any) -> None:
    """``/api/v1/services/garbage/`` (not a UUID): the API's error shape, not the site's HTML 404."""
    for who in ("owner", None):
        response = api(who).get("/api/v1/services/garbage/")
        assert response.status_code == 404
        assert response["Content-Type"] == "application/json"
        assert response.json()["detail"].startswith("No API endpoint at /api/v1/services/garbage/")
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
    icon = client.get("/favicon.ico")
    assert icon.status_code == 301 and icon["Location"].endswith("img/favicon.svg")


def test_the_folders_environment_defaults_count_towards_the_kernels_limit(api: Any, personas: Any) -> None:
    """600 KiB typed in the launcher is fine alone; with 500 KiB of the folder's defaults merged in,
    no process could be started with it: refused at create, not at every start."""
    big = "x" * (100 * 1024)
    toml = "[custom.environment]\nimage = 'modelserve/python:3.11'\narchitecture = 'x86_64'\n[custom.environ]\n"
    toml += "".join(f"D{i} = '{big}'\n" for i in range(5))
    folder = FolderFactory(
        owner=personas["owner"],
        name="heavy",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": toml},
    )
    assert create(api, "owner", folder, name="light", environ={"U0": "x"}).status_code == 201
    response = create(api, "owner", folder, name="heavy", environ={f"U{i}": big for i in range(6)})
    assert response.status_code == 400
    assert "The environment variables add up to" in response.json()["environ"][0]


def test_a_resource_group_no_node_serves_is_refused(api: Any, folder: Folder) -> None:
    """Else its replicas would wait for a node for ever (a typo, say)."""
    from django.utils import timezone

    from serving.models import Node

    response = create(api, "owner", folder, resource_group="gpu-nodes")
    assert response.status_code == 400
    assert response.json()["resource_group"] == [
        "No node serves resource group 'gpu-nodes'; the groups are: default. "
        "A node joins a group with NODE_RESOURCE_GROUP=gpu-nodes."
    ]
    Node.objects.create(name="g1", resource_group="gpu-nodes", heartbeat_at=timezone.now())
    created = create(api, "owner", folder, resource_group="gpu-nodes")
    assert created.status_code == 201
    moved = api("owner").patch(f"/api/v1/services/{created.json()['id']}/", {"resource_group": "gpu"}, format="json")
    assert moved.status_code == 400 and "the groups are: default, gpu-nodes" in moved.json()["resource_group"][0]
