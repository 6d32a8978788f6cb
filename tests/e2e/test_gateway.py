"""In a real browser: the gateway on the pages (issue 17). The service page's Usage panel (empty: how
to call the gateway; then the days and the busiest keys), and a project's key made from the Gateway
keys page by a project member, its secret shown once and the key listed with its project, in both
themes and in Japanese."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from django.utils import timezone
from playwright.sync_api import expect

from serving.actions import gateway as gateway_actions
from serving.actions import services
from serving.core import tokens
from serving.models import GatewayKey, GatewayUsage
from tests.e2e.conftest import Web


def test_usage_panel_and_a_project_key(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="echo-gw", folder=folder, project=personas["project"]
    )
    page = page_as("teammate")
    page.goto(f"/services/{endpoint.pk}/#usage")
    panel = page.locator("#usage")
    expect(panel.locator("#usage-empty")).to_have_text("No gateway requests in this window yet.")
    # The proxy's /v1 address (the live server's own setting) and the name the example serves.
    expect(panel).to_contain_text(re.compile(r'http://[\w.:]+/v1 with "model": "llm-echo" and a gateway key'))

    # Two keys' use today and two days ago (UTC): the page sums them per day and names the keys.
    ci, _secret = gateway_actions.do_create_gateway_key(
        acting_user=personas["owner"], name="ci-batch", expires_at=timezone.now() + dt.timedelta(days=3)
    )
    notebook, _secret = gateway_actions.do_create_gateway_key(
        acting_user=personas["teammate"],
        name="notebook",
        project=personas["project"],
        expires_at=timezone.now() + dt.timedelta(days=3),
    )
    today = timezone.now().date()
    for key, day, requests, latency in (
        (ci, today, 40, {"0.05": 30, "0.1": 10}),
        (notebook, today, 12, {"0.25": 12}),
        (notebook, today - dt.timedelta(days=2), 25, {"0.1": 25}),
    ):
        GatewayUsage.objects.create(
            key=key,
            endpoint=endpoint,
            day=day,
            requests=requests,
            prompt_tokens=requests * 11,
            completion_tokens=requests * 7,
            errors=1 if key == notebook else 0,
            latency=latency,
        )
    page.reload()
    summary = panel.locator("#usage-summary")
    expect(summary).to_contain_text("77 requests through the gateway: 847 prompt and 539 completion tokens, 2 errors")
    first_day = panel.locator("table.svc-usage tbody tr").first
    expect(first_day.locator("td").nth(0)).to_have_text(today.isoformat())
    expect(first_day.locator("td").nth(1)).to_have_text("52")
    expect(panel.locator("table.usage-keys tbody tr")).to_have_count(2)
    expect(panel.locator("table.usage-keys tbody tr").first).to_contain_text("ci-batch")
    expect(panel.locator("table.usage-keys tbody tr").nth(1)).to_contain_text("project team (made by teammate)")
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(screenshot(page, "service-usage").with_name("service-usage-panel.png")))
    page.emulate_media(color_scheme="dark")
    panel.screenshot(path=str(screenshot(page, "service-usage-dark").with_name("service-usage-panel-dark.png")))
    page.emulate_media(color_scheme="light")

    # On a phone: each day a stack of labelled cells, the bar and the idle days left out.
    phone = page_as("teammate", width=390)
    phone.goto(f"/services/{endpoint.pk}/#usage")
    expect(phone.locator("#usage table.svc-usage td.bar-col").first).to_be_hidden()
    expect(phone.locator("#usage table.svc-usage tbody tr:visible")).to_have_count(2)
    phone.locator("#usage").screenshot(
        path=str(screenshot(phone, "service-usage-phone").with_name("service-usage-panel-phone.png"))
    )

    # A project member makes the project's key from the Gateway keys page.
    keys = page_as("teammate")
    keys.goto("/services/gateway-keys/")
    keys.get_by_label("Name").fill("team-notebook")
    keys.get_by_label("Owner").select_option(label="Project team")
    keys.get_by_label("Services").select_option(label="echo-gw")
    keys.get_by_role("button", name="Create key").click()
    expect(keys.locator("#new-key-value")).to_be_visible()
    secret = keys.locator("#new-key-value").inner_text()
    made = GatewayKey.objects.get(name="team-notebook")
    parsed = tokens.parse(secret)
    assert parsed is not None and parsed.lookup == made.lookup
    assert made.project == personas["project"] and list(made.services.all()) == [endpoint]
    row = keys.locator(f'tr[data-key="{made.pk}"]')
    expect(row.locator(".key-owner")).to_have_text("project team (made by teammate)")
    screenshot(keys, "gateway-project-key")
    keys.emulate_media(color_scheme="dark")
    screenshot(keys, "gateway-project-key-dark")

    # The project's manager sees it, named by its project, and may revoke it.
    manager = page_as("owner")
    manager.goto("/services/gateway-keys/")
    row = manager.locator(f'tr[data-key="{made.pk}"]')
    expect(row.locator(".key-owner")).to_have_text("project team (made by teammate)")
    row.locator("summary").click()
    row.get_by_role("button", name="Revoke key").click()
    expect(manager.locator(f'tr[data-key="{made.pk}"]')).to_have_class(re.compile("token-revoked"))
    made.refresh_from_db()
    assert made.revoked_at is not None

    # In Japanese: the panel and the owner choice.
    ja = page_as("teammate", language="ja")
    ja.goto(f"/services/{endpoint.pk}/#usage")
    expect(ja.locator("#h-usage")).to_contain_text("ゲートウェイの利用状況")
    expect(ja.locator("#h-usage")).to_contain_text("直近 14 日")
    ja.locator("#usage").screenshot(
        path=str(screenshot(ja, "service-usage-ja").with_name("service-usage-panel-ja.png"))
    )
    ja.goto("/services/gateway-keys/")
    expect(ja.locator("#gk-project option").first).to_contain_text("自分")
    screenshot(ja, "gateway-keys-ja")
