"""In a real browser: LLM Chat Test (S8) against a real llm-echo replica (local engine) through the
real proxy. A private service first asks for a token; a chat token is generated; the model list comes
from GET /v1/models; the reply streams in word by word; Stop, Clear and several turns work; a wrong
token (401), no healthy replica (503) and a server that can not be reached are said in words."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from serving.actions import services
from serving.actions import tokens as token_actions
from serving.models import EndpointToken, Route
from tests.e2e.conftest import Web, fast_health_checks, off_loop
from tests.live import deadline_ms, free_port, wait_for

# What the browser console may report here: the refusals this test provokes on purpose.
EXPECTED_CONSOLE = re.compile(r"401|503|ERR_CONNECTION_REFUSED|Failed to load resource")


def send(page: Any, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


@pytest.mark.allow_console_errors
def test_chat_streams_from_llm_echo_through_the_proxy(
    live: Web, page_as: Any, example_folder: Any, personas: dict[str, Any], screenshot: Any, settings: Any
) -> None:
    # The data plane, and a web process that knows its address (the endpoint URL the relay calls).
    proxy = live.system.start_proxy()
    settings.SERVING_PROXY_URL = proxy
    live.system.stop("web")
    live.system.env["SERVING_PROXY_URL"] = proxy
    live.url = live.system.start_web()

    folder = example_folder("llm-echo", name="echo")
    fast_health_checks(folder)
    endpoint = services.do_create_service(
        acting_user=personas["owner"],
        name="echo-chat",
        folder=folder,
        project=personas["project"],
        environ={"MODEL_NAME": "llm-echo", "ECHO_TOKEN_DELAY": "0.12"},
    )
    wait_for(
        lambda: Route.objects.filter(endpoint=endpoint, status=Route.Status.HEALTHY).exists(),
        timeout=45,
        what="a healthy llm-echo replica",
    )

    # Opened from the service page, with the service's model selected.
    page = page_as("owner")
    page.goto(f"/services/{endpoint.pk}/")
    page.get_by_role("link", name="LLM Chat Test").click()
    page.wait_for_url(re.compile(rf"/services/{endpoint.pk}/chat/$"))
    expect(page.locator("#model")).to_have_value("llm-echo")
    expect(page.locator("#chat-status")).to_contain_text("needs a token")

    # Without a token the proxy refuses; the page says what to do, and the question waits to be sent again.
    send(page, "hello?")
    expect(page.locator("#chat-error")).to_contain_text("This service needs a token")
    expect(page.locator("#prompt")).to_have_value("hello?")
    assert page.locator(".msg").count() == 0
    page.locator("#prompt").fill("")

    # A chat token: short-lived, listed with the service's tokens; the model list loads with it.
    page.get_by_role("button", name="Generate a chat token").click()
    expect(page.locator("#chat-status")).to_contain_text("1 model(s) available")
    expect(page.locator("#chat-error")).to_be_hidden()
    token = EndpointToken.objects.get(endpoint=endpoint)
    assert (token.expires_at - token.created_at).total_seconds() == pytest.approx(3600, abs=5)
    assert page.locator("#service-token").input_value().startswith(token.prefix)

    # The reply streams in word by word (llm-echo echoes the question).
    question = "streaming words arrive one after another in the browser"
    send(page, question)
    reply = page.locator(".msg-assistant").last
    page.wait_for_function(
        """(full) => {
            const r = document.querySelector('.msg-assistant.streaming .msg-text');
            return r && r.textContent.length > 0 && r.textContent.length < full.length;
        }""",
        arg=question,
    )
    expect(reply.locator(".msg-text")).to_have_text(question)
    expect(reply).not_to_have_class(re.compile("streaming"))
    expect(page.locator("#chat-status")).to_have_text("Reply complete.")

    # Under the reply: time to first token and tokens per second (issue 20), from the server's usage
    # (llm-echo sends it when asked with stream_options). One word every 0.12 s: about 8 tokens/s.
    figures = reply.locator(".msg-stats")
    expect(figures).to_contain_text(re.compile(r"First token after [\d,]+ ms · [\d.]+ tokens/s · \d+ tokens"))
    assert figures.get_attribute("data-counted") == "usage"
    assert int(figures.get_attribute("data-tokens") or 0) == len(question.split())
    assert 0 < int(figures.get_attribute("data-ttft-ms") or 0) < deadline_ms(10)
    assert 3 < float(figures.get_attribute("data-tps") or 0) < 12
    screenshot(page, "chat-figures")
    page.emulate_media(color_scheme="dark")
    screenshot(page, "chat-figures-dark")
    page.emulate_media(color_scheme="light")
    # In Japanese, on a page of its own with the same token.
    ja_chat = page_as("owner", language="ja")
    ja_chat.goto(f"/services/{endpoint.pk}/chat/")
    ja_chat.locator("#service-token").fill(page.locator("#service-token").input_value())
    ja_chat.locator("#service-token").dispatch_event("change")
    expect(ja_chat.locator("#chat-status")).to_contain_text("1")
    send(ja_chat, "two words")
    ja_figures = ja_chat.locator(".msg-assistant .msg-stats")
    expect(ja_figures).to_contain_text(re.compile(r"最初のトークンまで .* トークン/秒"))
    screenshot(ja_chat, "chat-figures-ja")

    # A second turn, then Stop in the middle of a long reply.
    send(page, "second turn")
    expect(page.locator(".msg-assistant").last.locator(".msg-text")).to_have_text("second turn")
    assert page.locator(".msg-user").count() == 2
    screenshot(page, "chat-en")
    long = " ".join(f"word{i}" for i in range(60))
    send(page, long)
    expect(page.locator(".msg-assistant.streaming .msg-text")).to_contain_text("word2")
    page.get_by_role("button", name="Stop").click()
    stopped = page.locator(".msg-assistant").last
    expect(stopped).to_contain_text("(stopped)")
    expect(page.locator("#chat-status")).to_have_text("Stopped.")
    assert len(stopped.locator(".msg-text").inner_text()) < len(long)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    # Clear empties the conversation.
    page.get_by_role("button", name="Clear").click()
    assert page.locator(".msg").count() == 0

    # A wrong token: the proxy's 401, in words.
    page.locator("#service-token").fill("mst_nottherightone_abc")
    send(page, "who am I?")
    expect(page.locator("#chat-error")).to_contain_text("refused the token (401)")

    # Another OpenAI-compatible server that is not there (S8.2): said in words, not a silent failure.
    page.get_by_label("Another OpenAI-compatible server").check()
    page.locator("#base-url").fill(f"http://127.0.0.1:{free_port()}/v1")
    page.locator("#base-url").dispatch_event("change")
    expect(page.locator("#chat-error")).to_contain_text("Could not reach")
    expect(page.locator("#model-typed")).to_be_visible()
    page.get_by_label("Service echo-chat").check()

    # No replica left: the proxy's 503, in words.
    off_loop(services.do_scale, endpoint, 0, acting_user=personas["owner"])
    wait_for(lambda: not Route.objects.filter(endpoint=endpoint).exists(), timeout=30, what="the replica to be removed")
    _second, secret2 = off_loop(
        token_actions.do_issue_token, endpoint, acting_user=personas["owner"], expires_at=token.expires_at
    )
    page.locator("#service-token").fill(secret2)
    page.locator("#service-token").dispatch_event("change")
    expect(page.locator("#model")).to_have_value("llm-echo")
    send(page, "anyone there?")
    expect(page.locator("#chat-error")).to_contain_text("No healthy replica (503)", timeout=deadline_ms(10))
    expect(page.locator("#prompt")).to_have_value("anyone there?")
    screenshot(page, "chat-error-503")

    ja = page_as("owner", language="ja")
    ja.goto(f"/services/{endpoint.pk}/chat/")
    screenshot(ja, "chat-ja")
    narrow = page_as("owner", width=390)
    narrow.goto(f"/services/{endpoint.pk}/chat/")
    screenshot(narrow, "chat-390")

    unexpected = [e for p in (page, ja, narrow) for e in p.console_errors if not EXPECTED_CONSOLE.search(e)]
    assert not unexpected, unexpected
