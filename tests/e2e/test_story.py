"""The whole story, as a user lives it, in a real browser against the live system (real workers, the
local engine, the real proxy), once in English and once in Japanese.

Log in through the form; create a model folder; upload examples/llm-echo through the page's upload
control; Run this model; Validate and watch the log reach Finished, healthy; create the service and
wait for HEALTHY; generate a token (shown once); chat with the service and see the reply stream in;
add an autoscaling rule; modify the replicas to 2 and see 2 healthy routes; terminate after the
confirmation and see the service leave the list. Every page on the way is saved as a screenshot
(``story-<language>-NN-<page>.png``).

Elements are found by id, role, data attribute or CSS, never by English text, so that the Japanese
run works whatever the translations say.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from playwright.sync_api import expect

from serving.models import AutoScalingRule, Endpoint, EndpointToken, Route
from storage.models import Folder
from tests.e2e.conftest import ROOT, Web, fast_health_checks
from tests.live import deadline_ms, wait_for

PASSWORD = "a-story-password-1"
EXAMPLE = ROOT / "examples" / "llm-echo"
QUESTION = "every word of this question comes back one after another"


@pytest.fixture
def story(live: Web, settings: Any) -> Web:
    """``live`` plus the data plane, and a web process that knows the proxy's address (the endpoint
    URLs it hands out and the chat's relay go through it), as test_chat.py does."""
    proxy = live.system.start_proxy()
    settings.SERVING_PROXY_URL = proxy
    live.system.stop("web")
    live.system.env["SERVING_PROXY_URL"] = proxy
    live.url = live.system.start_web()
    return live


def set_real_password(user: Any) -> None:
    """The test settings hash with MD5 (fast); the web process knows the real hashers only."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(PASSWORD, hasher.salt())
    user.save(update_fields=["password"])


@pytest.mark.parametrize("language", ["en", "ja"])
def test_the_whole_story(story: Web, page_as: Any, personas: dict[str, Any], screenshot: Any, language: str) -> None:
    started = time.monotonic()
    step = iter(range(1, 100))

    def shot(page: Any, name: str) -> None:
        screenshot(page, f"story-{language}-{next(step):02d}-{name}")

    owner = personas["owner"]
    set_real_password(owner)
    page = page_as(None, language=language)
    page.set_default_timeout(20_000)

    # --- Log in through the form (the folders page sends an anonymous visitor there first).
    page.goto("/folders/?tab=model")
    page.wait_for_url(re.compile(r"/accounts/login/"))
    expect(page.locator("html")).to_have_attribute("lang", language)
    page.locator("#id_username").fill("owner")
    page.locator("#id_password").fill(PASSWORD)
    shot(page, "login")
    page.locator("main form[method=post] button[type=submit]").click()
    page.wait_for_url(re.compile(r"/folders/\?tab=model$"))
    expect(page.locator(".topbar .who")).to_have_text("owner")

    # --- A model-mode folder, created in the folder explorer.
    shot(page, "folders")
    page.locator("#folder-name").fill("echo-model")
    expect(page.locator("#folder-mode")).to_have_value("model")  # the Models tab preselects it
    page.locator("#folder-mode").select_option("model")
    page.locator(".create-folder button[type=submit]").click()
    folder = wait_for(lambda: Folder.objects.filter(name="echo-model").first(), what="the folder")
    assert folder.usage_mode == Folder.UsageMode.MODEL
    page.wait_for_url(re.compile(rf"/folders/{folder.pk}/"))
    expect(page.locator("#upload-files")).to_be_attached()
    expect(page.locator("#run a.button")).to_have_count(0)  # empty: nothing to run yet
    shot(page, "explorer-empty")

    # --- Upload the example's files through the page's upload control.
    files = sorted(str(p) for p in EXAMPLE.iterdir() if p.is_file())
    page.locator("#upload-files").set_input_files(files)
    page.locator("#upload-form button[type=submit]").click()
    expect(page.locator("#upload-progress li.ok")).to_have_count(len(files))
    expect(page.locator("#upload-progress li.failed")).to_have_count(0)
    shot(page, "explorer-uploading")
    # The page refreshes itself when every upload is done: the files are listed, and it can run.
    expect(page.locator("table.files tbody tr")).to_have_count(len(files), timeout=deadline_ms(10))
    run = page.locator("#run a.button.primary")
    expect(run).to_be_visible()
    expect(page.locator("#run table.problems")).to_have_count(0)
    for name in ("model-definition.yaml", "service-definition.toml", "server.py"):
        assert (folder.host_path / name).read_bytes() == (EXAMPLE / name).read_bytes()
    # Modified times in the reader's time zone (the browser's), not the server's UTC.
    stamp = page.locator("table.files tbody time").first
    expect(stamp).to_have_attribute("data-local", "1")
    assert stamp.text_content() != stamp.evaluate("e => e.getAttribute('datetime')")
    shot(page, "explorer-uploaded")
    # On a phone the files stack as cards: nothing runs off the screen.
    narrow = page_as("owner", language=language, width=390)
    narrow.goto(page.url)
    wide = narrow.evaluate(  # what sticks out, should the check fail
        "[...document.querySelectorAll('main *')].filter(e => e.getBoundingClientRect().right > 391)"
        ".map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"
    )
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 390, wide
    shot(narrow, "explorer-390")
    narrow.close()
    # Seconds, not minutes, between health checks (the story must not wait on the defaults).
    fast_health_checks(folder)

    # --- Run this model: the launcher, pre-filled from service-definition.toml.
    run.click()
    page.wait_for_url(re.compile(rf"/services/new/\?folder={folder.pk}"))
    expect(page.locator("#f-folder")).to_have_value(str(folder.pk))
    expect(page.locator("#f-image")).to_have_value("modelserve/python:3.11")
    expect(page.locator("#f-mem")).to_have_value("256m")
    delay = page.locator("#env-rows .env-row").filter(has=page.locator("input[name=env_key][value=ECHO_TOKEN_DELAY]"))
    expect(delay.locator("input[name=env_value]")).to_have_value("0.02")
    delay.locator("input[name=env_value]").fill("0.1")  # slow enough to watch the reply stream in
    page.locator("#f-name").fill("echo-story")
    expect(page.locator("#err-name")).not_to_be_empty()  # checked as you type
    shot(page, "launcher")

    # --- Validate: the dialog streams the events and the container log until Finished, healthy.
    page.locator("#validate-button").click()
    dialog = page.locator("#validate-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#validate-outcome")).to_be_visible(timeout=deadline_ms(60))
    expect(dialog).to_have_attribute("data-outcome", "healthy")
    expect(page.locator("#validate-outcome")).to_have_class(re.compile(r"\bok\b"))
    log = page.locator("#validate-log").inner_text()
    assert "Finished: healthy" in log, log
    shot(page, "launcher-validated")
    page.locator("#validate-close").click()
    expect(dialog).to_be_hidden()
    assert not Endpoint.objects.exists()  # validating creates nothing

    # --- Create the service; its page turns HEALTHY by itself (websocket, no reload).
    page.locator("#launcher button[type=submit]").click()
    endpoint = wait_for(lambda: Endpoint.objects.filter(name="echo-story").first(), what="the service")
    assert endpoint.environ["ECHO_TOKEN_DELAY"] == "0.1"
    assert endpoint.url.startswith(story.system.env["SERVING_PROXY_URL"])
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/$"))
    expect(page.locator(".messages li.success")).to_be_visible()
    shot(page, "service-created")
    expect(page.locator("#svc-status")).to_have_class(re.compile(r"status-healthy"), timeout=deadline_ms(45))
    expect(page.locator("#routes tbody tr .status-healthy")).to_have_count(1)
    expect(page.locator("#routes tbody tr .r-node")).to_have_text("local")
    shot(page, "service-healthy")

    # --- A token: shown once in full, then only masked.
    page.locator("#token-form button[type=submit]").click()
    secret = page.locator("#new-token-value").inner_text().strip()
    token = wait_for(lambda: EndpointToken.objects.filter(endpoint=endpoint).first(), what="the token")
    assert secret.startswith(token.prefix + "_")
    expect(page.locator(f"tr[data-token='{token.pk}'] code")).to_have_text(f"{token.prefix}_••••••••")
    shot(page, "service-token")
    page.goto(f"/services/{endpoint.pk}/")
    expect(page.locator("#new-token")).to_have_count(0)
    assert secret not in page.content()

    # --- LLM Chat Test with that token: the reply streams in through the proxy.
    page.locator(f".head-actions a[href='/services/{endpoint.pk}/chat/']").click()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/chat/$"))
    expect(page.locator("#model")).to_have_value("llm-echo")
    page.locator("#service-token").fill(secret)
    page.locator("#service-token").dispatch_event("change")
    page.locator("#prompt").fill(QUESTION)
    page.locator("#send").click()
    page.wait_for_function(
        """(full) => {
            const r = document.querySelector('.msg-assistant.streaming .msg-text');
            return r && r.textContent.length > 0 && r.textContent.length < full.length;
        }""",
        arg=QUESTION,
    )
    shot(page, "chat-streaming")
    reply = page.locator(".msg-assistant").last
    expect(reply.locator(".msg-text")).to_have_text(QUESTION)
    expect(reply).not_to_have_class(re.compile("streaming"))
    expect(page.locator("#chat-error")).to_be_hidden()
    expect(page.locator(".msg-user")).to_have_count(1)
    shot(page, "chat")

    # --- Back to the service: an autoscaling rule.
    page.go_back()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/$"))
    page.locator("details.add-rule > summary").click()
    page.locator("#rf-new-metric").fill("llm_echo_requests_waiting")
    page.locator("#rf-new-threshold").fill("50")  # a rule that does not fire during the story
    page.locator("#rf-new-max").fill("3")
    shot(page, "rule-form")
    page.locator("details.add-rule button[type=submit]").click()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/#rules$"))
    rule = wait_for(lambda: AutoScalingRule.objects.filter(endpoint=endpoint).first(), what="the rule")
    assert (rule.metric, rule.threshold, rule.max_replicas, rule.enabled) == (
        "llm_echo_requests_waiting",
        50.0,
        3,
        True,
    )
    expect(page.locator(f"tr[data-rule='{rule.pk}']")).to_be_visible()
    shot(page, "rule-added")

    # --- Modify: 2 replicas; the second one turns healthy on the page.
    page.locator(f".head-actions a[href='/services/{endpoint.pk}/modify/']").click()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/modify/$"))
    expect(page.locator("#f-name")).to_have_value("echo-story")
    page.locator("#f-replicas").fill("2")
    shot(page, "modify")
    page.locator("#launcher button[type=submit]").click()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/$"))
    expect(page.locator("#routes tbody tr .status-healthy")).to_have_count(2, timeout=deadline_ms(45))
    expect(page.locator("#svc-status")).to_have_class(re.compile(r"status-healthy"))
    endpoint.refresh_from_db()
    assert endpoint.desired_replicas == 2
    assert endpoint.spec_version == 1  # only the replica count changed: no rolling replacement
    assert Route.objects.filter(endpoint=endpoint, status=Route.Status.HEALTHY).count() == 2
    shot(page, "service-two-replicas")

    # --- Terminate, after the confirmation; it leaves the list.
    page.locator(".head-actions a.terminate").click()
    confirm = page.locator("#terminate-dialog")
    expect(confirm).to_be_visible()
    shot(page, "terminate-confirm")
    confirm.locator("button.cancel").click()
    expect(confirm).to_be_hidden()
    endpoint.refresh_from_db()
    assert endpoint.lifecycle == Endpoint.Lifecycle.CREATED
    page.locator(".head-actions a.terminate").click()
    confirm.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/services/$"))
    # While its replicas stop, the row offers nothing that no longer works (no chat, modify, terminate).
    expect(page.locator(f"#services tr[data-id='{endpoint.pk}'] .svc-actions a:visible")).to_have_count(0)
    shot(page, "services-terminating")
    expect(page.locator(f"#services tr[data-id='{endpoint.pk}']")).to_have_count(0, timeout=deadline_ms(30))
    expect(page.locator("#services-empty")).to_be_visible()
    wait_for(lambda: not Route.objects.filter(endpoint=endpoint).exists(), timeout=30, what="the replicas to stop")
    shot(page, "services-after")

    elapsed = time.monotonic() - started
    print(f"the story in {language} took {elapsed:.1f} s")
