"""In a real browser: the services list (live statuses), the launcher (errors by the field, create,
modify), terminate with confirmation, and the Validate dialog streaming a real replica's log."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from serving.actions import services
from serving.bus.events import notify_endpoint_changed
from serving.models import Endpoint, Route
from tests.e2e.conftest import Web, fast_health_checks, off_loop
from tests.live import deadline_ms, wait_for


def row(page: Any, endpoint: Endpoint) -> Any:
    return page.locator(f'tr[data-id="{endpoint.pk}"]')


def test_list_shows_a_service_and_its_status_changes_live(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("llm-echo", name="echo")
    endpoint = services.do_create_service(
        acting_user=personas["owner"], name="echo-live", folder=folder, project=personas["project"]
    )
    page = page_as("owner")
    page.goto("/services/")
    line = row(page, endpoint)
    expect_text(line.locator(".svc-status"), "PROVISIONING")
    expect_text(line.locator(".svc-replicas"), "0 / 1")
    assert endpoint.url in line.locator(".svc-url").inner_text()
    page.wait_for_selector("#services[data-live='1']")

    # A replica turns healthy (as the health checker would record it): the row follows, no reload.
    Route.objects.create(endpoint=endpoint, status=Route.Status.HEALTHY, host="127.0.0.1", port=1)
    off_loop(notify_endpoint_changed, str(endpoint.pk))
    expect_text(line.locator(".svc-status"), "HEALTHY")
    expect_text(line.locator(".svc-replicas"), "1 / 1")

    # A service created elsewhere appears; the stranger's page never shows either.
    other = off_loop(services.do_create_service, acting_user=personas["owner"], name="echo-two", folder=folder)
    expect_text(row(page, other).locator(".svc-name"), "echo-two")
    stranger = page_as("stranger")
    stranger.goto("/services/")
    assert stranger.locator("tr[data-id]").count() == 0
    assert "echo-live" not in stranger.content()
    screenshot(page, "services-list-en")
    # Dates in the user's time zone, copy button for the endpoint address.
    line.locator("button.copy").click()
    expect_text(line.locator("button.copy"), "Copied")
    assert page.evaluate("navigator.clipboard.readText()") == endpoint.url

    ja = page_as("owner", language="ja")
    ja.goto("/services/")
    screenshot(ja, "services-list-ja")
    narrow = page_as("owner", width=390)
    narrow.goto("/services/")
    screenshot(narrow, "services-list-390")


def test_terminate_asks_then_the_row_follows(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("simple-http-server", name="simple")
    endpoint = services.do_create_service(acting_user=personas["owner"], name="to-stop", folder=folder)
    page = page_as("owner")
    page.goto("/services/")
    page.wait_for_selector("#services[data-live='1']")
    row(page, endpoint).get_by_role("link", name=re.compile("Terminate")).click()
    dialog = page.locator("#terminate-dialog")
    assert dialog.is_visible()
    assert "to-stop" in dialog.inner_text()
    screenshot(page, "services-terminate-dialog")
    dialog.get_by_role("button", name="Cancel").click()
    assert not dialog.is_visible()
    endpoint.refresh_from_db()
    assert endpoint.lifecycle == Endpoint.Lifecycle.CREATED
    row(page, endpoint).get_by_role("link", name=re.compile("Terminate")).click()
    dialog.get_by_role("button", name="Terminate").click()
    page.wait_for_url(re.compile(r"/services/$"))
    assert "is being terminated" in page.locator(".messages").inner_text()
    endpoint.refresh_from_db()
    assert endpoint.lifecycle == Endpoint.Lifecycle.DESTROYING


def test_launcher_checks_the_name_as_you_type_and_shows_server_errors(
    web: Web, page_as: Any, example_folder: Any, screenshot: Any
) -> None:
    folder = example_folder("simple-http-server", name="simple")
    page = page_as("owner")
    page.goto(f"/services/new/?folder={folder.pk}")
    name = page.get_by_label("Service name")
    name.fill("ab")
    expect_text(page.locator("#err-name"), "At least 4 characters")
    name.fill("has space")
    expect_text(page.locator("#err-name"), "Only letters")
    name.fill("fine-name")
    expect_text(page.locator("#err-name"), "Looks good")
    # The server's own rules, shown next to their field after submitting.
    page.get_by_label("Memory").fill("a lot")
    page.get_by_role("button", name="Create service").click()
    expect_text(page.locator("#err-resources"), "mem")
    assert page.get_by_label("Service name").input_value() == "fine-name"  # nothing typed is lost
    screenshot(page, "launcher-errors")
    assert not Endpoint.objects.exists()

    # Another folder chosen in the page: its definition's problems say file, field and line.
    broken = example_folder("simple-http-server", name="broken")
    toml = Path(broken.host_path) / "service-definition.toml"
    toml.write_text(toml.read_text().replace('mem = "256mb"', 'mem = "lots"'))
    page.goto(f"/services/new/?folder={folder.pk}")
    page.locator("#f-folder").select_option(str(broken.pk))
    problem = page.locator("#problems li")
    expect_text(problem, "service-definition.toml custom.resource_slots.mem (line ")
    expect_text(problem, "'lots' is not a memory size")


def test_launcher_creates_a_service_from_the_example_folder(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("simple-http-server", name="simple")
    page = page_as("owner")
    page.goto("/folders/?tab=model")
    page.get_by_role("link", name=re.compile("Run this model")).click()
    page.wait_for_url(re.compile(r"/services/new/\?folder="))
    # Pre-filled from service-definition.toml (S3.2).
    assert page.get_by_label("Environment / version (image)").input_value() == "modelserve/python:3.11"
    assert page.get_by_label("Memory").input_value() == "256m"
    assert page.get_by_label("CPU (cores)").input_value() == "0.25"
    screenshot(page, "launcher-en")
    page.get_by_label("Service name").fill("from-browser")
    page.get_by_label("Number of replicas").fill("2")
    page.get_by_role("button", name="Add a variable").click()
    page.locator("input[name=env_key]").last.fill("GREETING")
    page.locator("input[name=env_value]").last.fill("hello")
    page.get_by_role("button", name="Create service").click()
    endpoint = wait_for(lambda: Endpoint.objects.filter(name="from-browser").first(), what="the service")
    page.wait_for_url(re.compile(rf"/services/({endpoint.pk}/)?$"))
    assert endpoint.desired_replicas == 2
    assert endpoint.environ == {"PYTHONUNBUFFERED": "1", "GREETING": "hello"}
    assert endpoint.owner == personas["owner"]

    ja = page_as("owner", language="ja")
    ja.goto(f"/services/new/?folder={folder.pk}")
    screenshot(ja, "launcher-ja")
    # A folder name may be 64 characters: its option must not widen the page past a phone's width.
    example_folder("simple-http-server", name="a-model-folder-with-a-name-as-long-as-the-rules-allow-64-chars-x")
    narrow = page_as("owner", width=390)
    narrow.goto(f"/services/new/?folder={folder.pk}")
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(narrow, "launcher-390")


def test_modify_applies_the_changed_replicas(
    web: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any
) -> None:
    folder = example_folder("simple-http-server", name="simple")
    endpoint = services.do_create_service(acting_user=personas["owner"], name="to-change", folder=folder)
    page = page_as("owner")
    page.goto("/services/")
    row(page, endpoint).get_by_role("link", name=re.compile("Modify")).click()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/modify/"))
    assert page.get_by_label("Service name").input_value() == "to-change"
    screenshot(page, "launcher-modify")
    page.get_by_label("Number of replicas").fill("3")
    page.get_by_role("button", name="Save changes").click()
    wait_for(lambda: Endpoint.objects.get(pk=endpoint.pk).desired_replicas == 3, what="replicas 3")
    endpoint.refresh_from_db()
    assert endpoint.spec_version == 1  # only the replica count changed: no rolling replacement


def test_validate_streams_the_log_until_finished_then_the_service_runs(
    live: Web, page_as: Any, example_folder: Any, screenshot: Any
) -> None:
    folder = example_folder("simple-http-server", name="simple")
    fast_health_checks(folder)
    page = page_as("owner")
    page.goto(f"/services/new/?folder={folder.pk}")
    page.get_by_label("Service name").fill("validated")
    page.get_by_role("button", name="Validate").click()
    dialog = page.locator("#validate-dialog")
    dialog.wait_for(state="visible")
    outcome = page.locator("#validate-outcome")
    outcome.wait_for(state="visible", timeout=deadline_ms(90))
    log = page.locator("#validate-log").inner_text()
    assert "Finished: healthy" in log, log
    assert "preparing /home/work" in log, log  # the pre-start action's log line, streamed
    assert "It works" in outcome.inner_text()
    assert dialog.get_attribute("data-outcome") == "healthy"
    screenshot(page, "launcher-validate")
    page.get_by_role("button", name="Copy log").click()
    assert "Finished: healthy" in page.evaluate("navigator.clipboard.readText()")
    page.get_by_role("button", name="Close").click()

    page.get_by_role("button", name="Create service").click()
    endpoint = wait_for(lambda: Endpoint.objects.filter(name="validated").first(), what="the service")
    page.goto("/services/")
    expect_text(row(page, endpoint).locator(".svc-status"), "HEALTHY", timeout=60)
    expect_text(row(page, endpoint).locator(".svc-replicas"), "1 / 1")


def test_validate_of_a_broken_folder_says_why(live: Web, page_as: Any, example_folder: Any) -> None:
    folder = example_folder("simple-http-server", name="broken")
    path = folder.host_path / "model-definition.yaml"
    path.write_text(path.read_text().replace("- http.server", "- no_such_module_here"))
    page = page_as("owner")
    page.goto(f"/services/new/?folder={folder.pk}")
    page.get_by_label("Service name").fill("broken-one")
    page.get_by_role("button", name="Validate").click()
    outcome = page.locator("#validate-outcome")
    outcome.wait_for(state="visible", timeout=deadline_ms(90))
    assert "It did not work" in outcome.inner_text()
    assert "no_such_module_here" in page.locator("#validate-log").inner_text()


def expect_text(locator: Any, text: str, timeout: float = 15) -> None:
    """Wait until the element's text contains ``text`` (live updates arrive without a reload)."""
    from playwright.sync_api import expect

    expect(locator).to_contain_text(text, timeout=deadline_ms(timeout))
