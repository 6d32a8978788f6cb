"""Issue 13, item 10: a teammate must not reach a manager's private folders through a shared model folder.

Every member of a project may write a project folder's files, and whoever writes a model folder's
``model-definition.yaml`` decides what its services run (start command, pre-start actions). A
service also mounts its owner's private folders, read-write. So a manager's service with a
project-shared model folder and a private mount would run a teammate's code next to the manager's
private data. The rule (Endpoint.shared_definition_problem): a service that mounts private folders
may only use a model folder its owner alone can write. Create, validate and modify refuse anything
else, for the API, the launcher and the admin alike, and a replica of a service configured before
the rule does not start.
"""

from __future__ import annotations

from typing import Any

import pytest

from serving.actions import services
from serving.models import Endpoint, Route
from serving.node import replicas
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db

FILES = {"model-definition.yaml": SIMPLE_DEFINITION}


@pytest.fixture
def folders(personas: dict[str, Any]) -> dict[str, Folder]:
    owner, project = personas["owner"], personas["project"]
    general = Folder.UsageMode.GENERAL
    return {
        "shared_model": FolderFactory(owner=owner, project=project, name="team-model", files=FILES),
        "private_model": FolderFactory(owner=owner, name="my-model", files=FILES),
        "private_data": FolderFactory(owner=owner, name="my-secrets", usage_mode=general),
        "project_data": FolderFactory(owner=owner, project=project, name="team-data", usage_mode=general),
        "teammate_data": FolderFactory(owner=personas["teammate"], name="mate-secrets", usage_mode=general),
        "admin_data": FolderFactory(owner=personas["admin"], name="ops-secrets", usage_mode=general),
    }


def body(model: Folder, *mounts: Folder, name: str = "svc-one") -> dict[str, Any]:
    return {
        "name": name,
        "folder": str(model.pk),
        "extra_mounts": [{"folder": str(m.pk), "target": f"/home/work/{m.name}"} for m in mounts],
    }


def refusal(response: Any) -> str:
    assert response.status_code == 400, response.content
    return " ".join(response.json()["folder"])


def test_teammate_can_not_reach_the_managers_private_folder_through_a_shared_model_definition(
    api: Any, folders: dict[str, Folder]
) -> None:
    # The premise: a teammate may rewrite the shared folder's model definition.
    written = api("teammate").put(
        f"/api/v1/folders/{folders['shared_model'].pk}/files/model-definition.yaml",
        data=SIMPLE_DEFINITION.replace("http.server", "cat /home/work/my-secrets/*"),
        content_type="application/octet-stream",
    )
    assert written.status_code in (200, 201), written.content

    # So the manager's service may not run that definition with their private folder mounted.
    for path in ("/api/v1/services/", "/api/v1/services/validate/"):
        message = refusal(
            api("owner").post(path, body(folders["shared_model"], folders["private_data"]), format="json")
        )
        assert "'team-model'" in message and "every member of project 'team'" in message
        assert "private folders 'my-secrets' of 'owner'" in message
        assert "only 'owner' can write" in message and "project folders" in message  # how to fix it
    assert not Endpoint.objects.exists()


@pytest.mark.parametrize(
    ("who", "model", "mounts", "allowed"),
    [
        ("owner", "private_model", ["private_data"], True),  # the owner alone writes both
        ("owner", "shared_model", ["project_data"], True),  # nothing private to reach
        ("owner", "shared_model", [], True),
        ("owner", "shared_model", ["project_data", "private_data"], False),
        ("teammate", "shared_model", ["teammate_data"], False),  # the manager could reach the teammate's
        ("teammate", "private_model", [], None),  # not theirs: no such folder
        ("stranger", "shared_model", [], None),
        ("admin", "shared_model", ["admin_data"], False),  # operators are not exempt: it is their data
        ("admin", "private_model", ["admin_data"], False),  # another user's model folder: they write it
    ],
)
def test_private_mounts_need_a_model_folder_only_the_owner_writes(
    api: Any, folders: dict[str, Folder], who: str, model: str, mounts: list[str], allowed: bool | None
) -> None:
    # The mounts' owner is named (not "you"): here, whoever creates the service.
    response = api(who).post("/api/v1/services/", body(folders[model], *(folders[m] for m in mounts)), format="json")
    if allowed:
        assert response.status_code == 201, response.content
    elif allowed is None:
        assert response.status_code == 400 and "No such folder" in str(response.json()["folder"])
    else:
        assert f"only {who!r} can write" in refusal(response)


def test_modify_can_not_switch_to_a_shared_model_folder_or_add_a_private_mount(
    api: Any, personas: dict[str, Any], folders: dict[str, Folder]
) -> None:
    private = api("owner").post(
        "/api/v1/services/", body(folders["private_model"], folders["private_data"]), format="json"
    )
    shared = api("owner").post(
        "/api/v1/services/", body(folders["shared_model"], folders["project_data"], name="svc-two"), format="json"
    )
    assert private.status_code == shared.status_code == 201
    to_shared = {"folder": str(folders["shared_model"].pk)}
    add_private = {
        "extra_mounts": body(folders["private_model"], folders["project_data"], folders["private_data"])["extra_mounts"]
    }
    for who in ("owner", "admin"):  # the admin reads whose folders they are, not "you"
        assert "only 'owner' can write" in refusal(
            api(who).patch(f"/api/v1/services/{private.json()['id']}/", to_shared, format="json")
        )
        assert "only 'owner' can write" in refusal(
            api(who).patch(f"/api/v1/services/{shared.json()['id']}/", add_private, format="json")
        )
    assert Endpoint.objects.get(pk=private.json()["id"]).model_folder == folders["private_model"]
    assert len(Endpoint.objects.get(pk=shared.json()["id"]).extra_mounts) == 1
    # The admin site saves through do_modify_service: the same rule.
    with pytest.raises(services.ValidationError, match="only 'owner' can write"):
        services.do_modify_service(
            Endpoint.objects.get(pk=private.json()["id"]),
            acting_user=personas["admin"],
            changes={"model_folder": folders["shared_model"]},
        )


def test_manager_can_not_mount_their_private_folder_on_a_teammates_service(
    api: Any, personas: dict[str, Any], folders: dict[str, Folder]
) -> None:
    """The other way round: the teammate alone writes their model folder, so the manager's private
    folder must not be mounted next to it (the manager may modify the project's services)."""
    mate_model = FolderFactory(owner=personas["teammate"], name="mate-model", files=FILES)
    created = api("teammate").post(
        "/api/v1/services/", {**body(mate_model), "project": personas["project"].pk}, format="json"
    )
    assert created.status_code == 201, created.content
    mount = {"extra_mounts": body(mate_model, folders["private_data"])["extra_mounts"]}
    message = refusal(api("owner").patch(f"/api/v1/services/{created.json()['id']}/", mount, format="json"))
    assert "its owner 'teammate'" in message and "'my-secrets' of 'owner'" in message
    # Said to the manager about their own folder: "only 'owner'", never "only you" (it is not theirs).
    assert "only 'owner' can write" in message and "you" not in message
    # The teammate's own private data next to their own model folder is theirs to mount.
    own = {"extra_mounts": body(mate_model, folders["teammate_data"])["extra_mounts"]}
    assert api("teammate").patch(f"/api/v1/services/{created.json()['id']}/", own, format="json").status_code == 200


def test_launcher_page_shows_the_rule_next_to_the_folder(personas: dict[str, Any], folders: dict[str, Folder]) -> None:
    from django.test import Client

    client = Client()
    client.force_login(personas["owner"])
    response = client.post(
        "/services/new/",
        {
            "name": "svc-page",
            "folder": str(folders["shared_model"].pk),
            "runtime": "custom",
            "mount_folder": [str(folders["private_data"].pk)],
            "mount_target": ["/home/work/secrets"],
        },
    )
    assert response.status_code == 200  # the form again
    error = response.content.decode().split('id="err-folder"', 1)[1].split("</p>", 1)[0]
    assert "only &#x27;owner&#x27; can write" in error
    assert not Endpoint.objects.exists()


def test_a_service_configured_before_the_rule_starts_no_replica(
    personas: dict[str, Any], folders: dict[str, Folder]
) -> None:
    endpoint = Endpoint.objects.create(
        name="legacy",
        owner=personas["owner"],
        project=personas["project"],
        model_folder=folders["shared_model"],
        extra_mounts=[{"folder": str(folders["private_data"].pk), "target": "/home/work/secrets"}],
    )
    route = Route.objects.create(endpoint=endpoint, node=None, status=Route.Status.PROVISIONING, error={})
    with pytest.raises(replicas.SpecError) as info:
        replicas.build_spec(route)
    assert info.value.kind == "folder" and "only 'owner' can write" in str(info.value)
    # A replica's error is seen by every member of the project: whose, not which, private folders.
    assert "private folders of 'owner'" in str(info.value) and "secrets" not in str(info.value)


def _legacy(personas: dict[str, Any], folders: dict[str, Folder]) -> Endpoint:
    """A service configured before the rule: project-shared model folder, private mount."""
    return Endpoint.objects.create(
        name="legacy",
        owner=personas["owner"],
        project=personas["project"],
        model_folder=folders["shared_model"],
        extra_mounts=[{"folder": str(folders["private_data"].pk), "target": "/home/work/secrets"}],
    )


@pytest.mark.parametrize(
    "change", [{"environ": {"A": "1"}}, {"image": "modelserve/python:3.12"}, {"resources": {"cpu": 2}}]
)
def test_modify_of_a_legacy_service_that_replaces_replicas_is_refused(
    api: Any, personas: dict[str, Any], folders: dict[str, Folder], change: dict[str, Any]
) -> None:
    """Issue 13 review, item D: the rule ran only when the folders changed, so an environment or image
    change of a service configured before it placed replicas that all failed at start."""
    endpoint = _legacy(personas, folders)
    message = refusal(api("owner").patch(f"/api/v1/services/{endpoint.pk}/", change, format="json"))
    assert "only 'owner' can write" in message
    endpoint.refresh_from_db()
    assert endpoint.spec_version == 1 and endpoint.environ == {}
    # What replaces no replica still applies (e.g. the name, or opening it to the public).
    response = api("owner").patch(f"/api/v1/services/{endpoint.pk}/", {"open_to_public": True}, format="json")
    assert response.status_code == 200, response.content


def test_a_legacy_service_is_not_scaled_up_but_may_scale_down(
    api: Any, personas: dict[str, Any], folders: dict[str, Folder]
) -> None:
    endpoint = _legacy(personas, folders)
    response = api("owner").patch(f"/api/v1/services/{endpoint.pk}/", {"replicas": 3}, format="json")
    assert response.status_code == 400 and "only 'owner' can write" in str(response.json()["desired_replicas"])
    with pytest.raises(services.ValidationError, match="only 'owner' can write"):
        services.do_scale(endpoint, 2, acting_user=personas["owner"])
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 1
    assert services.do_scale(endpoint, 0, acting_user=personas["owner"]) is True
    assert api("owner").patch(f"/api/v1/services/{endpoint.pk}/", {"replicas": 1}, format="json").status_code == 400


@pytest.mark.parametrize("owners", [1, 2])
def test_autoscaling_records_the_refusal_instead_of_scaling_a_legacy_service(
    personas: dict[str, Any], folders: dict[str, Folder], monkeypatch: pytest.MonkeyPatch, owners: int
) -> None:
    """Review of issue 13: with two owners' private folders the refusal sentence was longer than the
    255 characters a decision keeps, so the stored state never equalled the next tick's decision and
    every tick wrote one more row, cut before the part that says how to fix it. The decision is now
    short and written once; the service's events keep the whole sentence, once too."""
    from datetime import UTC, datetime

    from serving.bus import metrics
    from serving.control import autoscaling
    from serving.models import AutoScalingRule, ScalingEvent, ServiceEvent

    monkeypatch.setattr("serving.bus.dispatch.enqueue_reconcile", lambda endpoint_id: None)
    endpoint = _legacy(personas, folders)
    if owners == 2:
        endpoint.extra_mounts = [
            *endpoint.extra_mounts,
            {"folder": str(folders["teammate_data"].pk), "target": "/home/work/mate"},
        ]
        endpoint.save(update_fields=["extra_mounts"])
        assert len(endpoint.shared_definition_problem(name_folders=False) or "") > 255  # the premise
    rule = AutoScalingRule.objects.create(
        endpoint=endpoint,
        direction="out",
        source="proxy",
        metric="in_flight",
        comparator="GREATER_THAN",
        threshold=5,
        step=1,
        min_replicas=1,
        max_replicas=3,
        cooldown=30,
        window=20,
    )
    t0 = 1_800_000_000.0
    metrics.record([metrics.Point("proxy", str(endpoint.pk), "in_flight", t0 + 8, 9.0)], now=t0 + 8)
    for tick in (10, 12, 14, 16):
        assert autoscaling.tick(datetime.fromtimestamp(t0 + tick, tz=UTC)) == 0
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 1
    decision = ScalingEvent.objects.get(endpoint=endpoint, rule=rule)  # recorded once, not per tick
    assert not decision.acted and (decision.old_replicas, decision.new_replicas) == (1, 1)
    assert decision.reason == autoscaling.SHARED_DEFINITION_REFUSAL
    rule.refresh_from_db()
    assert rule.last_decision == autoscaling.SHARED_DEFINITION_REFUSAL
    [line] = ServiceEvent.objects.filter(endpoint=endpoint, kind="scale_refused")  # once too
    assert "Model folder 'team-model' can be changed by every member of project" in line.message
    assert "or mount project folders instead." in line.message  # the fix, whole
    assert "secrets" not in line.message  # every member reads the events: no folder names
