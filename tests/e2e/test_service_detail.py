"""In a real browser: the service page. Routes follow the service live (websocket), a route's error
and log open in dialogs, a token is generated and copied once, autoscaling rules are added, edited,
disabled and deleted, errors are cleared, and the service is terminated after a confirmation. The
last test runs a real llm-echo replica and reads its log through the page."""

from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from playwright.sync_api import expect

from serving.actions import services
from serving.bus.events import notify_endpoint_changed, record_event
from serving.core import logs
from serving.models import AutoScalingRule, Endpoint, EndpointToken, Node, Route, RouteMember
from tests.e2e.conftest import ARTIFACTS, Web, _engine_ready, fast_health_checks, off_loop
from tests.live import deadline_ms, wait_for


def test_service_page_routes_live_tokens_rules_terminate(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="echo-page", folder=folder, project=personas["project"]
    )
    page = page_as("owner")
    page.goto(f"/services/{endpoint.pk}/")
    expect(page.locator("h1")).to_contain_text("echo-page")
    expect(page.locator("#svc-status")).to_have_text("PROVISIONING")
    expect(page.locator("#snippet-curl")).to_contain_text("Authorization: BackendAI $API_TOKEN")
    expect(page.locator("#snippet-python")).to_contain_text(f'base_url="{endpoint.url}v1"')
    expect(page.locator("#live-state")).to_contain_text("update live")

    # A replica appears and turns healthy, another fails: the table follows without a reload.
    Route.objects.create(endpoint=endpoint, status=Route.Status.HEALTHY, host="127.0.0.1", port=41001)
    failed = Route.objects.create(
        endpoint=endpoint,
        status=Route.Status.FAILED_TO_START,
        error={
            "kind": "definition",
            "message": "model-definition.yaml: models[0].service.port: required",
            "log_tail": "starting\n<b>not bold</b>\nexit 1",
        },
    )
    # The failed replica is a cluster whose sub could not start: its row lists both members, the
    # sub's error in words.
    RouteMember.objects.create(
        route=failed,
        idx=1,
        node=Node.objects.create(name="node-b"),
        status=RouteMember.Status.FAILED,
        error={"message": "sub1 exited with code 3 before main was reachable"},
    )
    off_loop(notify_endpoint_changed, str(endpoint.pk))
    expect(page.locator("#routes tbody tr")).to_have_count(2)
    members = page.locator(f'#routes tr[data-id="{failed.pk}"] .r-members li')
    expect(members).to_have_text(["main1 · no node yet · failed to start", re.compile(r"^sub1 · node node-b · failed")])
    expect(members.nth(1).locator(".m-error")).to_have_text("sub1 exited with code 3 before main was reachable")
    expect(members.nth(1).locator(".m-error")).to_be_visible()
    page.locator("#routes-section").screenshot(path=str(ARTIFACTS / "service-cluster-member-error.png"))
    expect(page.locator("#svc-status")).to_have_text("HEALTHY")
    row = page.locator(f'#routes tr[data-id="{failed.pk}"]')
    expect(row.locator(".r-status")).to_have_text("FAILED TO START")
    expect(row.locator(".r-error")).to_contain_text("models[0].service.port: required")
    expect(page.locator("#routes")).to_contain_text("127.0.0.1:41001")

    row.get_by_role("button", name="Details").click()
    dialog = page.locator("#error-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("definition")
    screenshot(page, "service-route-error")
    dialog.get_by_role("button", name="Close").click()
    row.get_by_role("button", name="Logs").click()
    logs = page.locator("#logs-dialog")
    expect(logs.locator(".logs-lines")).to_contain_text("<b>not bold</b>")  # text, never HTML
    logs.get_by_role("button", name="Close").click()
    expect(logs).to_be_hidden()

    # Clear errors and retry.
    page.get_by_role("button", name="Clear errors and retry").click()
    expect(page.locator(".messages")).to_contain_text("Cleared the errors of 1 replica(s)")
    failed.refresh_from_db()
    assert failed.status == Route.Status.TERMINATING

    # A token: generated with an expiry date, shown once, copied; the list shows it masked.
    page.locator("#token-expiry").fill("2031-01-15")
    page.get_by_role("button", name="Generate token").click()
    secret = page.locator("#new-token-value").inner_text()
    token = EndpointToken.objects.get(endpoint=endpoint)
    assert secret.startswith(token.prefix + "_")
    assert token.expires_at.isoformat() == "2031-01-15T22:59:59+00:00"  # the end of that day in Berlin
    assert page.url.endswith(f"/services/{endpoint.pk}/#tokens")  # a reload does not post again
    page.locator("#new-token").get_by_role("button", name=re.compile("Copy")).click()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    expect(page.locator("table.tokens")).to_contain_text(f"{token.prefix}_••••••••")
    screenshot(page, "service-token-new")

    # Autoscaling rules: add, edit, disable, delete.
    page.locator("details.add-rule > summary").click()
    form = page.locator("details.add-rule form")
    form.get_by_label("Metric name").fill("llm_echo_requests_waiting")
    form.get_by_label("Threshold").fill("2")
    form.get_by_label("Maximum replicas").fill("3")
    form.get_by_role("button", name="Add rule").click()
    expect(page.locator(".messages")).to_contain_text("Autoscaling rule saved")
    rule = AutoScalingRule.objects.get(endpoint=endpoint)
    assert (rule.metric, rule.threshold, rule.max_replicas, rule.source) == (
        "llm_echo_requests_waiting",
        2.0,
        3,
        "inference",
    )
    line = page.locator(f'tr[data-rule="{rule.pk}"]')
    line.locator("summary", has_text="Edit").click()
    line.get_by_label("Threshold").fill("4")
    line.get_by_role("button", name="Save rule").click()
    expect(page.locator(".messages")).to_contain_text("Autoscaling rule saved")
    rule.refresh_from_db()
    assert rule.threshold == 4.0
    page.locator(f'tr[data-rule="{rule.pk}"]').get_by_role("button", name="Disable").click()
    expect(page.locator(f'tr[data-rule="{rule.pk}"]')).to_contain_text("disabled")
    screenshot(page, "service-page-en")
    page.locator(f'tr[data-rule="{rule.pk}"] summary', has_text="Delete").click()
    page.get_by_role("button", name="Delete rule").click()
    expect(page.locator(".messages")).to_contain_text("Autoscaling rule deleted")
    assert not AutoScalingRule.objects.filter(endpoint=endpoint).exists()

    # Japanese and a phone-sized screen, then terminate (after a confirmation).
    ja = page_as("owner", language="ja")
    ja.goto(f"/services/{endpoint.pk}/")
    screenshot(ja, "service-page-ja")
    narrow = page_as("owner", width=390)
    narrow.goto(f"/services/{endpoint.pk}/")
    screenshot(narrow, "service-page-390")

    page.get_by_role("link", name="Terminate").click()
    confirm = page.locator("#terminate-dialog")
    expect(confirm).to_be_visible()
    screenshot(page, "service-terminate-dialog")
    confirm.get_by_role("button", name="Cancel").click()
    endpoint.refresh_from_db()
    assert endpoint.lifecycle == Endpoint.Lifecycle.CREATED
    page.get_by_role("link", name="Terminate").click()
    confirm.get_by_role("button", name="Terminate").click()
    page.wait_for_url(re.compile(r"/services/$"))
    endpoint.refresh_from_db()
    assert endpoint.lifecycle != Endpoint.Lifecycle.CREATED


def test_an_event_s_request_id_is_shown_and_copied(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any]
) -> None:
    folder = example_folder("llm-echo", name="echo")
    with logs.bound(request_id="e2e-created-1"):  # as the web app's middleware binds it
        endpoint = services.do_create_service(acting_user=personas["owner"], name="echo-rid", folder=folder)
    page = page_as("owner")
    page.goto(f"/services/{endpoint.pk}/")
    note = page.locator("#events tr", has_text="created").locator(".request-id")
    expect(note.locator("code")).to_have_text("e2e-created-1")
    note.get_by_role("button", name="Copy").click()
    expect(note.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == "e2e-created-1"

    # The table rebuilt live from the API (the page's script): the same note, copyable too.
    off_loop(record_event, endpoint, "note", "written while the page is open", request_id="e2e-live-2")
    off_loop(notify_endpoint_changed, str(endpoint.pk))
    live = page.locator("#events tr", has_text="written while the page is open").locator(".request-id")
    expect(live.locator("code")).to_have_text("e2e-live-2")
    live.get_by_role("button", name="Copy").click()
    expect(live.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == "e2e-live-2"
    # An event of the platform's own doing has no note.
    off_loop(record_event, endpoint, "tick", "written by a tick", request_id="")
    off_loop(notify_endpoint_changed, str(endpoint.pk))
    expect(page.locator("#events tr", has_text="written by a tick")).to_have_count(1)
    expect(page.locator("#events tr", has_text="written by a tick").locator(".request-id")).to_have_count(0)


def test_teammate_and_stranger(web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any]) -> None:
    folder = example_folder("simple-http-server", name="simple")
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="shared-one", folder=folder, project=personas["project"]
    )
    teammate = page_as("teammate")
    teammate.goto(f"/services/{endpoint.pk}/")
    expect(teammate.get_by_role("button", name="Generate token")).to_be_visible()
    assert teammate.get_by_role("link", name="Modify").count() == 0
    assert teammate.get_by_role("button", name="Clear errors and retry").count() == 0
    stranger = page_as("stranger")
    response = stranger.goto(f"/services/{endpoint.pk}/")
    assert response is not None and response.status == 404
    assert "shared-one" not in stranger.content()
    stranger.console_errors.clear()  # the 404 itself is the expected answer


def test_a_real_replica_turns_healthy_and_its_log_opens(
    live: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    fast_health_checks(folder)
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="echo-real", folder=folder, environ={"ECHO_ACCESS_LOG": "1"}
    )
    page = page_as("owner")
    page.goto(f"/services/{endpoint.pk}/")
    expect(page.locator("#svc-status")).to_have_text("HEALTHY", timeout=deadline_ms(45))
    route = wait_for(lambda: Route.objects.filter(endpoint=endpoint, status="healthy").first(), what="a healthy route")
    row = page.locator(f'#routes tr[data-id="{route.pk}"]')
    expect(row.locator(".r-node")).to_have_text("local")
    row.get_by_role("button", name="Logs").click()
    logs = page.locator("#logs-dialog")
    lines = logs.locator(".logs-lines")
    # llm-echo logs every request (ECHO_ACCESS_LOG=1): the health checks are in its log.
    expect(lines).to_contain_text("GET /health", timeout=deadline_ms(15))
    expect(logs.get_by_label("Follow")).to_be_checked()
    expect(logs.locator(".logs-state")).to_contain_text("Following the log live")

    # A line the replica writes now appears in the open dialog, without reopening or refreshing it.
    marker = f"/written-while-open-{uuid.uuid4().hex[:8]}"
    call_replica(route, marker)
    expect(lines).to_contain_text(f"GET {marker}", timeout=deadline_ms(10))
    screenshot(page, "service-route-log")
    logs.get_by_role("button", name="Copy log").click()
    expect(logs.get_by_role("button", name="Copied")).to_be_visible()
    assert marker in page.evaluate("navigator.clipboard.readText()")

    # The view stays at the bottom as lines come (a health check every 0.5 s) ...
    wait_for(lambda: lines.evaluate("e => e.scrollHeight > e.clientHeight + 40"), timeout=30, what="a long log")
    at_bottom = "e => e.scrollHeight - e.scrollTop - e.clientHeight < 24"
    wait_for(lambda: lines.evaluate(at_bottom), timeout=5, what="the view at the bottom")
    # ... unless the reader scrolled up: then new lines do not pull the view away.
    lines.evaluate("e => { e.scrollTop = 0; }")
    marker = f"/while-scrolled-up-{uuid.uuid4().hex[:8]}"
    call_replica(route, marker)
    expect(lines).to_contain_text(f"GET {marker}", timeout=deadline_ms(10))
    assert lines.evaluate("e => e.scrollTop") == 0

    # Follow off: no new lines; the dialog closed: the node ends the follow (its lease is gone).
    logs.get_by_label("Follow").uncheck()
    expect(logs.locator(".logs-state")).to_contain_text("Not following since")
    marker = f"/not-followed-{uuid.uuid4().hex[:8]}"
    call_replica(route, marker)
    logs.get_by_label("Follow").check()
    expect(lines).to_contain_text(f"GET {marker}", timeout=deadline_ms(10))  # the tail, read again
    assert follow_leases(), "the open dialog holds a lease"
    logs.get_by_role("button", name="Close").click()
    wait_for(lambda: not follow_leases(), timeout=10, what="the follow's lease to go with the dialog")
    expect(page.locator("#events")).to_contain_text("created")


def call_replica(route: Route, path: str) -> None:
    with contextlib.suppress(urllib.error.HTTPError):  # a 404 is logged like any request
        urllib.request.urlopen(f"http://{route.host}:{route.port}{path}", timeout=5).close()


def follow_leases() -> list[bytes]:
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return list(client.scan_iter(match=f"{settings.REDIS_PREFIX}:log-follow:*:lease"))
    finally:
        client.close()


def test_metric_charts_draw_the_last_ten_minutes_and_say_when_there_is_no_data(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    """The charts against the metrics API's answer shape (served here by the browser's request
    interception, so that the drawing is checked whatever the platform collects)."""
    import json
    import time

    folder = example_folder("simple-http-server", name="simple")
    endpoint = services.do_create_service(acting_user=personas["owner"], name="charted", folder=folder)
    metrics_url = f"/api/v1/services/{endpoint.pk}/metrics/"
    now = time.time()
    series = {
        "proxy": {
            "proxy:rps": [[now - 590 + i * 29, 2 + (i % 5)] for i in range(21)],
            "proxy:in_flight": [[now - 60, 1], [now - 30, 3], [now - 5, 2]],
            "proxy:p95_ms": [],
        },
        "kernel": {
            "kernel:cpu_percent": [[now - 20, 35.5], [now - 10, 40]],
            "kernel:mem_bytes": [[now - 10, 256 * 1024**2]],
            "kernel:mem_percent": [[now - 10, 50]],
        },
    }
    page = page_as("owner")

    def metrics(route: Any) -> None:
        source = route.request.url.split("source=")[1].split("&")[0]
        route.fulfill(status=200, content_type="application/json", body=json.dumps({"series": series[source]}))

    page.route(re.compile(r"/metrics/\?source="), metrics)
    page.goto(f"/services/{endpoint.pk}/")
    if not page.locator("#metrics").get_attribute("data-url"):
        # No metrics API on this platform yet: the page says so, then uses one when it is there.
        expect(page.locator("#metrics-state")).to_have_text("Metrics are not collected on this platform yet.")
        assert page.locator("figure.chart .chart-empty:visible").count() == 5
        page.locator("#metrics").evaluate("(section, url) => { section.dataset.url = url; }", metrics_url)
    rps = page.locator('figure[data-chart="rps"]')
    expect(rps).to_have_attribute("data-points", "21")
    expect(rps.locator("path.chart-line")).to_have_count(1)
    expect(rps.locator(".chart-empty")).to_be_hidden()
    expect(page.locator('figure[data-chart="in_flight"] .chart-value')).to_have_text("2")
    expect(page.locator('figure[data-chart="cpu"] .chart-value')).to_have_text("40%")
    expect(page.locator('figure[data-chart="mem"] .chart-value')).to_have_text("256.0 MiB")
    p95 = page.locator('figure[data-chart="p95"]')
    expect(p95.locator(".chart-empty")).to_be_visible()
    expect(p95.locator(".chart-empty")).to_have_text("no data yet")
    expect(page.locator("#metrics-state")).to_have_text("Updates every 5 seconds.")
    shot = screenshot(page, "service-page-charts")
    page.locator("#metrics").screenshot(path=str(shot.with_name("service-charts.png")))


def test_a_multi_node_cluster_shows_its_members_on_their_nodes_live(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    """Two node workers (a, b) and a multi-node cluster of size 2: the route's row lists main and
    sub, each on its own node, as they start; a sub that dies takes its replica with it, and the
    replacement's members appear in the open page without a reload."""
    from tests.integration.conftest import _stop_every_replica

    reason = _engine_ready()
    if reason:
        pytest.skip(reason)
    system = web.system
    system.start_control()
    system.start_node("a")
    system.start_node("b")
    system.start_beat()
    try:
        for name in ("a", "b"):
            wait_for(
                lambda name=name: Node.objects.filter(name=name, heartbeat_at__isnull=False).exists(),  # type: ignore[misc]
                timeout=30,
                what=f"node {name!r} to register",
            )
        folder = example_folder("simple-http-server", name="simple")
        fast_health_checks(folder)
        endpoint = off_loop(
            services.do_create_service,
            acting_user=personas["owner"],
            name="cluster-two",
            folder=folder,
            cluster_mode="multi-node",
            cluster_size=2,
            resources={"cpu": 1},
        )
        page = page_as("owner")
        page.goto(f"/services/{endpoint.pk}/")
        expect(page.locator("#svc-cluster")).to_have_text(
            "Multi-node cluster: 2 containers per replica, each on its own node"
        )
        expect(page.locator("#svc-status")).to_have_text("HEALTHY", timeout=deadline_ms(45))
        route = Route.objects.get(endpoint=endpoint, status=Route.Status.HEALTHY)
        sub = RouteMember.objects.select_related("node").get(route=route)
        assert route.node is not None and sub.node is not None and {route.node.name, sub.node.name} == {"a", "b"}
        members = page.locator(f'#routes tr[data-id="{route.pk}"] .r-members li')
        expect(members).to_have_text(
            [f"main1 · node {route.node.name} · healthy", f"sub1 · node {sub.node.name} · running"]
        )
        screenshot(page, "service-cluster-members")

        # The sub dies: the whole replica is replaced, and the page shows the new one's members.
        from tests.integration.test_runtime_nodes import kill_replica

        kill_replica(sub.node.name, sub.container_id)
        expect(page.locator(f'#routes tr[data-id="{route.pk}"]')).to_have_count(0, timeout=deadline_ms(45))
        new_route = wait_for(
            lambda: Route.objects.filter(endpoint=endpoint, status=Route.Status.HEALTHY).exclude(pk=route.pk).first(),
            timeout=45,
            what="a replacement cluster route",
        )
        row = page.locator(f'#routes tr[data-id="{new_route.pk}"]')
        expect(row.locator(".r-members li .m-host")).to_have_text(["main1", "sub1"], timeout=deadline_ms(15))
        expect(row.locator(".r-members li .m-status")).to_have_text(["healthy", "running"], timeout=deadline_ms(15))

        # Each member's log: the dialog's picker chooses the container, followed live on its own node.
        new_sub = RouteMember.objects.select_related("node").get(route=new_route)
        row.get_by_role("button", name="Logs").click()
        logs = page.locator("#logs-dialog")
        picker = logs.get_by_label("Container")
        expect(picker.locator("option")).to_have_text(
            [f"main1 (node {new_route.node.name})", f"sub1 (node {new_sub.node.name})"]  # type: ignore[union-attr]
        )
        expect(logs.locator(".logs-lines")).to_contain_text(
            "GET / HTTP", timeout=deadline_ms(15)
        )  # main's health checks
        picker.select_option("sub1")
        expect(logs.locator(".logs-state")).to_contain_text("Following the log live", timeout=deadline_ms(15))
        expect(logs.locator(".logs-lines")).to_contain_text("preparing /home/work")
        expect(logs.locator(".logs-lines")).not_to_contain_text("GET / HTTP")  # no one checks a sub's health
        screenshot(page, "service-cluster-member-log")
        logs.get_by_role("button", name="Close").click()

        ja = page_as("owner", language="ja")
        ja.goto(f"/services/{endpoint.pk}/")
        expect(ja.locator("#svc-cluster")).to_contain_text("マルチノードクラスター")
        expect(ja.locator(f'#routes tr[data-id="{new_route.pk}"] .r-members li').first).to_contain_text("ノード")
        screenshot(ja, "service-cluster-members-ja")
        narrow = page_as("owner", width=390)
        narrow.goto(f"/services/{endpoint.pk}/")
        expect(narrow.locator(f'#routes tr[data-id="{new_route.pk}"] .r-members li')).to_have_count(2)
        shot = screenshot(narrow, "service-cluster-members-390")
        narrow.locator("#routes-section").screenshot(path=str(shot.with_name("service-cluster-routes-390.png")))
    finally:
        for name in ("beat", "control", "node-a", "node-b"):
            system.stop(name)
        _stop_every_replica()
