"""In a real browser: a canary release and its rollback on the service page (issue 16). The canary
is started through the REST API from the logged-in page (as a script of the user's would); the
Revisions panel follows live (websocket), then Rollback asks for confirmation in a dialog and
leaves all traffic on revision 1."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

from serving.actions import services
from serving.bus.events import notify_endpoint_changed
from serving.models import Endpoint, Route, ServiceEvent
from tests.e2e.conftest import Web, off_loop
from tests.live import wait_for

PATCH = """async ([url, body]) => {
  const token = document.querySelector("input[name=csrfmiddlewaretoken]").value;
  const response = await fetch(url, {
    method: "PATCH", credentials: "same-origin", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRFToken": token},
  });
  return response.status;
}"""


def test_canary_then_rollback_from_the_page(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="echo-revs", folder=folder, project=personas["project"], replicas=2
    )
    for port in (41011, 41012):
        Route.objects.create(
            endpoint=endpoint, spec_version=1, status=Route.Status.HEALTHY, host="127.0.0.1", port=port
        )
    page = page_as("owner")
    page.goto(f"/services/{endpoint.pk}/")
    panel = page.locator("#revisions")
    expect(panel.locator("#revisions-table tbody tr")).to_have_count(1)
    expect(panel.locator('tr[data-revision="1"] .rev-share')).to_have_text("100%")
    expect(page.locator("#rollback-button")).to_have_count(0)
    expect(page.locator("#live-state")).to_contain_text("update live")

    # The canary: revision 2 (a new environment) gets 10 % of requests, through the API.
    body = {"environ": {"MODE": "canary"}, "rollout": {"strategy": "canary", "percent": 10}}
    assert page.evaluate(PATCH, [f"/api/v1/services/{endpoint.pk}/", body]) == 200
    # Its replica turns healthy (no workers run here: the route is written as the reconcile would).
    Route.objects.create(endpoint=endpoint, spec_version=2, status=Route.Status.HEALTHY, host="127.0.0.1", port=41013)
    off_loop(notify_endpoint_changed, str(endpoint.pk))

    # The panel follows without a reload: both revisions, the bar, the rollout, the diff.
    expect(panel.locator("#revisions-table tbody tr")).to_have_count(2)
    expect(panel.locator('tr[data-revision="1"] .rev-share')).to_have_text("90%")
    expect(panel.locator('tr[data-revision="2"] .rev-share')).to_have_text("10%")
    expect(panel.locator('tr[data-revision="2"] .rev-replicas')).to_have_text("1 healthy of 1")
    expect(panel.locator("#rollout")).to_contain_text("Canary in progress: revision 2 gets 10% of requests")
    expect(panel.locator(".share-bar rect")).to_have_count(2)
    expect(panel.locator("table.diff")).to_contain_text("MODE")
    screenshot(page, "service-revisions-canary")
    panel.screenshot(path="/tmp/revpage-panel-canary.png")

    # Rollback asks first; Cancel changes nothing.
    page.locator("#rollback-button").click()
    dialog = page.locator("#revision-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("h2")).to_have_text("Roll back to revision 1?")
    page.screenshot(path="/tmp/revpage-dialog.png")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    assert Endpoint.objects.get(pk=endpoint.pk).traffic == {"1": 90, "2": 10}

    page.locator("#rollback-button").click()
    dialog.get_by_role("button", name="Roll back").click()
    expect(page.locator(".messages")).to_contain_text("Rolled back from revision 2 to revision 1.")
    expect(panel.locator('tr[data-revision="1"] .rev-share')).to_have_text("100%")
    expect(panel.locator('tr[data-revision="2"] .rev-share')).to_have_text("0%")
    expect(panel.locator("#rollout")).to_have_count(0)
    expect(panel.locator(".share-bar rect")).to_have_count(1)
    wait_for(
        lambda: Endpoint.objects.get(pk=endpoint.pk).traffic == {"1": 100},
        timeout=10,
        what="all traffic back on revision 1",
    )
    after = Endpoint.objects.get(pk=endpoint.pk)
    assert (after.spec_version, after.rollout, after.environ) == (1, {}, endpoint.environ)
    assert ServiceEvent.objects.filter(endpoint=endpoint, kind="rolled_back", actor=personas["owner"]).exists()
    panel.screenshot(path="/tmp/revpage-panel-after.png")


def test_teammate_sees_the_panel_without_buttons(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any]
) -> None:
    folder = example_folder("llm-echo", name="echo")
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="echo-read", folder=folder, project=personas["project"]
    )
    services.do_modify_service(
        endpoint,
        acting_user=personas["owner"],
        changes={"environ": {"MODE": "two"}},
        rollout={"strategy": "canary", "percent": 25},
    )
    page = page_as("teammate", language="ja")
    page.goto(f"/services/{endpoint.pk}/")
    panel = page.locator("#revisions")
    expect(panel.locator("h2")).to_have_text("リビジョン")
    expect(panel.locator('tr[data-revision="2"] .rev-share')).to_have_text("25%")
    expect(panel.locator("a.revision-move")).to_have_count(0)
    expect(page.locator("#revision-dialog")).to_have_count(0)
