"""The service page's Revisions panel (issue 16), per persona: the revisions with their shares (a
bar), the rollout in progress, the diff of two revisions, and Promote / Rollback with confirmation
through the same actions as the API. Teammates read; only the service's managers change it."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from serving.actions import services
from serving.models import Endpoint, Route, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="revs",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )


@pytest.fixture
def canary(personas: dict[str, Any], folder: Folder) -> Endpoint:
    """A service of 2 replicas whose revision 2 (MODE=two) is a 10 % canary beside revision 1."""
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="rev-one", folder=folder, project=personas["project"], replicas=2
    )
    endpoint = services.do_modify_service(
        endpoint,
        acting_user=personas["owner"],
        changes={"environ": {"MODE": "two", "API_KEY": "s3cret"}},
        rollout={"strategy": "canary", "percent": 10},
    )
    Route.objects.create(endpoint=endpoint, spec_version=1, status=Route.Status.HEALTHY)
    Route.objects.create(endpoint=endpoint, spec_version=1, status=Route.Status.HEALTHY)
    Route.objects.create(endpoint=endpoint, spec_version=2, status=Route.Status.PROVISIONING)
    return endpoint


def page(endpoint: Endpoint) -> str:
    return reverse("serving:detail", kwargs={"pk": endpoint.pk})


def promote(endpoint: Endpoint, number: int) -> str:
    return reverse("serving:revision-promote", kwargs={"pk": endpoint.pk, "number": number})


def rollback(endpoint: Endpoint) -> str:
    return reverse("serving:revision-rollback", kwargs={"pk": endpoint.pk})


def panel(html: str) -> str:
    return html.split('id="revisions"', 1)[1].split("</section>", 1)[0]


def test_owner_sees_revisions_shares_rollout_diff_and_buttons(browser: Any, canary: Endpoint) -> None:
    html = browser("owner").get(page(canary)).content.decode()
    shown = panel(html)
    # Both revisions, their change, author, replicas (healthy of running) and share.
    assert 'data-revision="1"' in shown and 'data-revision="2"' in shown
    assert "First revision." in shown and "environ: API_KEY, MODE changed" in shown
    assert "2 healthy of 2" in shown and "0 healthy of 1" in shown
    assert ">90%<" in shown and ">10%<" in shown
    # The bar: one segment per revision with a share, widths in percent of the bar.
    assert 'x="0" y="0" width="90"' in shown and 'x="90" y="0" width="10"' in shown
    assert "Canary in progress: revision 2 gets 10% of requests, revision 1 the rest." in shown
    # The diff of the two newest revisions by default: the environment, field by field.
    assert "From revision 1 to revision 2" in shown
    assert "<code>{}</code>" in shown and "MODE" in shown
    # Promote on both (neither has all traffic), rollback to 1, each a confirmation first.
    assert promote(canary, 1) in shown and promote(canary, 2) in shown
    assert rollback(canary) in shown and "Roll back to revision 1" in shown
    assert 'id="revision-dialog"' in html


def test_compare_takes_two_revisions_and_says_when_they_are_the_same(browser: Any, canary: Endpoint) -> None:
    html = browser("owner").get(page(canary) + "?from=2&to=2").content.decode()
    assert "Revisions 2 and 2 have the same configuration." in panel(html)
    # An unknown number falls back to the two newest rather than failing.
    html = browser("owner").get(page(canary) + "?from=7&to=x").content.decode()
    assert "From revision 1 to revision 2" in panel(html)
    # The panel alone (the script's live refresh) keeps the choice.
    alone = browser("owner").get(reverse("serving:revisions", kwargs={"pk": canary.pk}) + "?from=2&to=1")
    assert alone.status_code == 200
    assert "From revision 2 to revision 1" in alone.content.decode()


def test_teammate_reads_the_panel_without_buttons_and_is_refused_the_posts(browser: Any, canary: Endpoint) -> None:
    client = browser("teammate")
    shown = panel(client.get(page(canary)).content.decode())
    assert 'data-revision="2"' in shown and ">10%<" in shown
    assert promote(canary, 2) not in shown and rollback(canary) not in shown
    assert client.get(reverse("serving:revisions", kwargs={"pk": canary.pk})).status_code == 200
    for address in (promote(canary, 2), rollback(canary)):
        assert client.get(address).status_code == 403
        assert client.post(address).status_code == 403
    canary.refresh_from_db()
    assert canary.traffic == {"1": 90, "2": 10}


def test_stranger_gets_404_and_anonymous_goes_to_login(browser: Any, canary: Endpoint) -> None:
    assert browser("stranger").get(reverse("serving:revisions", kwargs={"pk": canary.pk})).status_code == 404
    for address in (promote(canary, 2), rollback(canary)):
        assert browser("stranger").get(address).status_code == 404
        assert browser("stranger").post(address).status_code == 404
        response = browser(None).post(address)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    canary.refresh_from_db()
    assert canary.traffic == {"1": 90, "2": 10}


def test_owner_confirms_then_rolls_back_to_revision_one(browser: Any, canary: Endpoint) -> None:
    client = browser("owner")
    asked = client.get(rollback(canary))
    assert asked.status_code == 200
    assert "Roll back to revision 1?" in asked.content.decode()
    canary.refresh_from_db()
    assert canary.traffic == {"1": 90, "2": 10}  # asking changes nothing
    done = client.post(rollback(canary), follow=True)
    assert done.redirect_chain[-1][0].endswith("#revisions")
    assert "Rolled back from revision 2 to revision 1." in done.content.decode()
    canary.refresh_from_db()
    assert (canary.spec_version, canary.traffic, canary.rollout, canary.environ) == (1, {"1": 100}, {}, {})
    event = ServiceEvent.objects.filter(endpoint=canary, kind="rolled_back").get()
    assert event.actor.username == "owner" and event.data["automatic"] is False
    # Revision 1 now has all traffic: no Promote for it, and no rollout shown.
    shown = panel(done.content.decode())
    assert promote(canary, 1) not in shown and promote(canary, 2) in shown and "Canary in progress" not in shown


def test_admin_promotes_the_canary(browser: Any, canary: Endpoint) -> None:
    client = browser("admin")
    assert "Promote revision 2?" in client.get(promote(canary, 2)).content.decode()
    done = client.post(promote(canary, 2), follow=True)
    assert "Revision 2 promoted" in done.content.decode()
    canary.refresh_from_db()
    assert (canary.spec_version, canary.traffic) == (2, {"2": 100})
    assert ServiceEvent.objects.filter(endpoint=canary, kind="promoted", actor__username="admin").exists()
    assert client.post(promote(canary, 9)).status_code == 404


def test_rollback_of_a_first_revision_says_there_is_none(
    browser: Any, personas: dict[str, Any], folder: Folder
) -> None:
    alone = services.do_create_service(acting_user=personas["owner"], name="rev-alone", folder=folder)
    client = browser("owner")
    shown = panel(client.get(page(alone)).content.decode())
    assert rollback(alone) not in shown and "compare-form" not in shown
    done = client.post(rollback(alone), follow=True)
    assert "there is none to roll back to" in done.content.decode()
    asked = client.get(rollback(alone), follow=True)
    assert "there is none to roll back to" in asked.content.decode()


def test_terminated_service_shows_revisions_read_only(browser: Any, canary: Endpoint, personas: dict[str, Any]) -> None:
    services.do_terminate_service(canary, acting_user=personas["owner"])
    shown = panel(browser("owner").get(page(canary)).content.decode())
    assert 'data-revision="2"' in shown
    assert promote(canary, 2) not in shown and rollback(canary) not in shown
