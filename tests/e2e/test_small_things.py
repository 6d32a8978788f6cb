"""In a real browser, the small things people expect (issue 20): a dark theme that follows the system
setting, a skip link to the main content, and a services list sortable and filterable in place.
(The chat's figures per reply are checked with a live llm-echo in test_chat.py.)"""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

from serving.actions import services
from serving.models import Endpoint, Route
from tests.e2e.conftest import Web

BACKGROUND = "getComputedStyle(document.body).backgroundColor"


def names(page: Any) -> list[str]:
    return page.locator("#services tbody tr:visible .svc-name a").all_inner_texts()


def test_the_dark_theme_follows_the_system_setting(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    services.do_create_service(acting_user=personas["owner"], name="dark-one", folder=folder)
    page = page_as("owner")
    page.goto("/services/")
    assert page.evaluate(BACKGROUND) == "rgb(246, 247, 249)"
    page.emulate_media(color_scheme="dark")
    assert page.evaluate(BACKGROUND) == "rgb(18, 21, 27)"
    assert page.evaluate("getComputedStyle(document.querySelector('table.grid')).color") == "rgb(228, 232, 239)"
    screenshot(page, "dark-services-list")
    page.goto(f"/services/new/?folder={folder.pk}")
    screenshot(page, "dark-launcher")
    page.goto("/folders/")
    screenshot(page, "dark-folders")
    ja = page_as("owner", language="ja")
    ja.emulate_media(color_scheme="dark")
    ja.goto("/services/")
    assert ja.evaluate(BACKGROUND) == "rgb(18, 21, 27)"
    screenshot(ja, "dark-services-list-ja")


def test_the_skip_link_is_the_first_stop_and_moves_focus_to_the_content(
    web: Web, page_as: Any, screenshot: Any
) -> None:
    # (The login page puts the caret in its username field instead: the skip link is a Shift+Tab away.)
    for who, url in (("owner", "/services/"), ("teammate", "/folders/")):
        page = page_as(who)
        page.goto(url)
        link = page.get_by_role("link", name="Skip to content")
        expect(link).not_to_be_in_viewport()
        page.keyboard.press("Tab")
        expect(link).to_be_focused()
        expect(link).to_be_in_viewport()
        if who == "owner":
            screenshot(page, "skip-link")
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "content"
        # The next Tab goes on inside the content, not back to the header.
        page.keyboard.press("Tab")
        assert page.evaluate("document.getElementById('content').contains(document.activeElement)")
    ja = page_as("owner", language="ja")
    ja.goto("/services/")
    ja.keyboard.press("Tab")
    expect(ja.get_by_role("link", name="本文へスキップ")).to_be_focused()


def test_the_services_list_sorts_and_filters_in_place(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    owner = personas["owner"]
    made = {
        name: services.do_create_service(acting_user=owner, name=name, folder=folder)
        for name in ("beta-chat", "alpha-web", "gamma-llm")
    }
    Endpoint.objects.filter(pk=made["gamma-llm"].pk).update(runtime="vllm")
    Route.objects.create(endpoint=made["alpha-web"], status=Route.Status.HEALTHY, host="127.0.0.1", port=1)
    page = page_as("owner")
    page.goto("/services/")
    page.wait_for_selector("#services[data-live='1']")
    assert names(page) == ["gamma-llm", "alpha-web", "beta-chat"]  # newest first

    header = page.locator("#services thead th").filter(has=page.locator("a[data-sort=name]"))
    page.locator("a[data-sort=name]").click()
    assert names(page) == ["alpha-web", "beta-chat", "gamma-llm"]
    expect(header).to_have_attribute("aria-sort", "ascending")
    page.locator("a[data-sort=name]").click()
    assert names(page) == ["gamma-llm", "beta-chat", "alpha-web"]
    expect(header).to_have_attribute("aria-sort", "descending")
    assert "sort=-name" in page.url
    page.locator("a[data-sort=status]").click()  # provisioning before healthy
    assert names(page)[-1] == "alpha-web"

    # Find: by name, runtime or status, as you type.
    search = page.get_by_label("Find")
    search.fill("vllm")
    assert names(page) == ["gamma-llm"]
    expect(page.locator("#filter-count")).to_have_text("1 of 3 services shown")
    search.fill("HEALTHY")
    assert names(page) == ["alpha-web"]
    search.fill("nothing-like-this")
    assert names(page) == []
    expect(page.locator("#services-none-match")).to_be_visible()
    search.fill("a")
    assert len(names(page)) == 3
    screenshot(page, "services-sorted-filtered")

    # By status without a reload; back to any status brings the others back (from the REST list).
    search.fill("")
    page.locator("#filter-status").select_option("HEALTHY")
    expect(page.locator("#services tbody tr")).to_have_count(1)
    assert names(page) == ["alpha-web"]
    page.locator("#filter-status").select_option("")
    expect(page.locator("#services tbody tr")).to_have_count(3)
    assert "status=" not in page.url

    # The URL it leaves behind renders the same list without the script (?sort=, ?q=).
    search.fill("web")
    reloaded = page_as("owner")
    reloaded.goto(page.url)
    assert names(reloaded) == ["alpha-web"]
    expect(reloaded.get_by_label("Find")).to_have_value("web")
    # Clearing the search brings back the rows the server left out.
    reloaded.wait_for_selector("#services[data-live='1']")
    reloaded.get_by_label("Find").fill("")
    expect(reloaded.locator("#services tbody tr:visible")).to_have_count(3)


# The placeholder written into the box as its value: Chromium scrolls the text when it does not fit
# (the room left beside the search field's clear button), exactly where the placeholder is cut.
PLACEHOLDER_OVERFLOW = """(input) => {
  input.value = input.placeholder;
  const overflow = [input.scrollWidth, input.clientWidth];
  input.value = '';
  return overflow;
}"""


def test_the_services_filter_shows_its_whole_placeholder(web: Web, page_as: Any) -> None:
    """It said "name, runtime or statu" in English at 1280 px: the box was narrower than its hint."""
    for language in ("en", "ja"):
        page = page_as("owner", language=language)
        page.goto("/services/")
        needed, room = page.locator("#filter-q").evaluate(PLACEHOLDER_OVERFLOW)
        assert needed <= room, f"{language}: the placeholder needs {needed} px, the box gives {room}"
