"""The gateway's control-plane side (issue 17): served model names on services, gateway keys through
the API for every persona, and what reaches the proxies' table in Redis."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from serving.bus import routing
from serving.bus.routing import build_entry
from serving.core import tokens
from serving.models import Endpoint, GatewayKey
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )


def create(api: Any, folder: Folder, name: str = "svc-one", **extra: Any) -> Any:
    body = {"name": name, "folder": str(folder.pk), "replicas": 1, "project": folder.project_id, **extra}
    return api("owner").post("/api/v1/services/", body, format="json")


def test_model_names_default_set_modify_and_reach_the_entry(api: Any, folder: Folder) -> None:
    plain = create(api, folder).json()
    assert plain["model_names"] == []
    assert build_entry(Endpoint.objects.get(pk=plain["id"]), [], [])["models"] == ["svc-one"]
    named = create(api, folder, name="svc-two", environ={"MODEL_NAME": "llama-8b"}).json()
    assert build_entry(Endpoint.objects.get(pk=named["id"]), [], [])["models"] == ["llama-8b"]
    listed = create(api, folder, name="svc-three", model_names=["qwen-7b", "qwen"]).json()
    entry = build_entry(Endpoint.objects.get(pk=listed["id"]), [], [])
    assert entry["models"] == ["qwen-7b", "qwen"] and entry["project"] == str(folder.project_id)

    changed = api("owner").patch(f"/api/v1/services/{listed['id']}/", {"model_names": ["qwen-14b"]}, format="json")
    assert changed.status_code == 200, changed.json()
    assert changed.json()["model_names"] == ["qwen-14b"]


def test_model_names_are_unique_per_project_with_a_sentence(api: Any, folder: Folder) -> None:
    create(api, folder, model_names=["shared"])
    taken = create(api, folder, name="svc-two", model_names=["shared"])
    assert taken.status_code == 400
    assert "already serves 'shared'" in json.dumps(taken.json())
    # A default name (MODEL_NAME, else the service's name) is not held to it: two services of one
    # folder (staging and production) share their default, and the gateway picks a healthy one.
    same_default = create(api, folder, name="svc-three", environ={"MODEL_NAME": "shared"})
    assert same_default.status_code == 201, same_default.json()
    bad = create(api, folder, name="svc-four", model_names=["has space"])
    assert bad.status_code == 400 and "is not a model name" in json.dumps(bad.json())


def test_gateway_keys_for_every_persona(
    api: Any, folder: Folder, personas: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    service = create(api, folder).json()
    with django_capture_on_commit_callbacks(execute=True):
        made = api("owner").post(
            "/api/v1/gateway-keys/",
            {"name": "ci", "services": [service["id"]], "requests_per_minute": 600},
            format="json",
        )
    assert made.status_code == 201, made.json()
    body = made.json()
    parsed = tokens.parse(body["key"])
    assert parsed is not None and parsed.kind == "msg"
    assert body["services"] == [service["id"]] and body["requests_per_minute"] == 600
    # Only a digest is stored and published.
    row = GatewayKey.objects.get(pk=body["id"])
    assert body["key"] not in json.dumps(list(GatewayKey.objects.values()), default=str)
    published = json.loads(routing.get_redis().hget(routing.gateway_keys_key(), row.lookup))
    assert published["services"] == [service["id"]] and published["digest"] == row.digest
    # ... with the limits the proxies enforce (proxy/limits.py); none set: null, no limit
    assert published["requests_per_minute"] == 600
    assert published["tokens_per_minute"] is None and published["max_concurrency"] is None

    listed = api("owner").get("/api/v1/gateway-keys/").json()
    assert [k["id"] for k in listed] == [body["id"]] and "key" not in listed[0]
    assert api("admin").get("/api/v1/gateway-keys/").json()[0]["id"] == body["id"]
    assert api("stranger").get("/api/v1/gateway-keys/").json() == []
    assert api("teammate").get("/api/v1/gateway-keys/").json() == []
    assert api(None).get("/api/v1/gateway-keys/").status_code in (401, 403)
    assert api("stranger").delete(f"/api/v1/gateway-keys/{body['id']}/").status_code == 404
    assert api("teammate").delete(f"/api/v1/gateway-keys/{body['id']}/").status_code == 404

    # A stranger can not make a key for a service they may not call.
    refused = api("stranger").post("/api/v1/gateway-keys/", {"name": "x", "services": [service["id"]]}, format="json")
    assert refused.status_code == 400 and "may not call it" in json.dumps(refused.json())

    with django_capture_on_commit_callbacks(execute=True):
        assert api("owner").delete(f"/api/v1/gateway-keys/{body['id']}/").status_code == 204
    assert routing.get_redis().hget(routing.gateway_keys_key(), row.lookup) is None
    assert api("owner").get(f"/api/v1/gateway-keys/{body['id']}/").json()["active"] is False


def test_project_key_scope_and_full_publish(api: Any, folder: Folder, personas: dict[str, Any]) -> None:
    create(api, folder)
    made = api("teammate").post(
        "/api/v1/gateway-keys/", {"name": "team", "project": personas["project"].pk}, format="json"
    )
    assert made.status_code == 201, made.json()
    routing.publish_all()
    row = GatewayKey.objects.get(pk=made.json()["id"])
    entry = json.loads(routing.get_redis().hget(routing.gateway_keys_key(), row.lookup))
    assert entry["projects"] == [str(personas["project"].pk)] and entry["owner"] == "" and entry["services"] == []
    refused = api("stranger").post(
        "/api/v1/gateway-keys/", {"name": "x", "project": personas["project"].pk}, format="json"
    )
    assert refused.status_code == 400


def test_model_aliases_for_every_persona_and_in_the_proxies_table(
    api: Any, folder: Folder, personas: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    one = create(api, folder, model_names=["llama-local"]).json()
    two = create(api, folder, name="svc-two", model_names=["llama-cloud"]).json()
    project = personas["project"].pk
    body = {
        "name": "llama",
        "project": project,
        "backends": [{"service": one["id"], "weight": 9}, {"service": two["id"], "weight": 1}],
    }
    assert api("teammate").post("/api/v1/model-aliases/", body, format="json").status_code == 403
    assert api("stranger").post("/api/v1/model-aliases/", body, format="json").status_code == 400  # no project
    with django_capture_on_commit_callbacks(execute=True):
        made = api("owner").post("/api/v1/model-aliases/", body, format="json")
    assert made.status_code == 201, made.json()
    alias = made.json()
    assert alias["backends"] == [{"service": one["id"], "weight": 9}, {"service": two["id"], "weight": 1}]
    entry = json.loads(routing.get_redis().hget(routing.aliases_key(), alias["id"]))
    assert entry == {
        "name": "llama",
        "project": str(project),
        "owner": str(personas["owner"].pk),
        "backends": [{"service": one["id"], "weight": 9}, {"service": two["id"], "weight": 1}],
    }

    url = f"/api/v1/model-aliases/{alias['id']}/"
    assert api("teammate").get(url).status_code == 200
    assert api("stranger").get(url).status_code == 404
    assert api("stranger").get("/api/v1/model-aliases/").json() == []
    assert api("teammate").patch(url, {"name": "x"}, format="json").status_code == 403
    assert api("admin").get(url).status_code == 200

    # Names are unique per project, alias and service alike, each way, with a sentence.
    again = api("owner").post("/api/v1/model-aliases/", body, format="json")
    assert again.status_code == 400 and "exists already" in json.dumps(again.json())
    clash = api("owner").post("/api/v1/model-aliases/", {**body, "name": "llama-local"}, format="json")
    assert clash.status_code == 400 and "already serves 'llama-local'" in json.dumps(clash.json())
    service_clash = create(api, folder, name="svc-three", model_names=["llama"])
    assert service_clash.status_code == 400 and "The alias 'llama'" in json.dumps(service_clash.json())
    heavy = api("owner").patch(url, {"backends": [{"service": one["id"], "weight": 5000}]}, format="json")
    assert heavy.status_code == 400
    unknown = api("owner").patch(url, {"backends": [{"service": str(uuid.uuid4()), "weight": 1}]}, format="json")
    assert unknown.status_code == 400 and "No such service" in json.dumps(unknown.json())

    with django_capture_on_commit_callbacks(execute=True):
        changed = api("owner").patch(url, {"backends": [{"service": two["id"], "weight": 2}]}, format="json")
    assert changed.status_code == 200, changed.json()
    entry = json.loads(routing.get_redis().hget(routing.aliases_key(), alias["id"]))
    assert entry["backends"] == [{"service": two["id"], "weight": 2}]
    routing.publish_all()
    assert json.loads(routing.get_redis().hget(routing.aliases_key(), alias["id"]))["name"] == "llama"

    assert api("teammate").delete(url).status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        assert api("owner").delete(url).status_code == 204
    assert routing.get_redis().hget(routing.aliases_key(), alias["id"]) is None
