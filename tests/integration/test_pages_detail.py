"""The service page and its forms (clear errors, tokens, autoscaling rules), per persona: owner,
teammate (project member), stranger (404), anonymous (to the login page) and admin (operator)."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from typing import Any

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from serving.actions import rules as rule_actions
from serving.actions import services
from serving.actions import tokens as token_actions
from serving.bus import events
from serving.models import (
    AutoScalingRule,
    Endpoint,
    EndpointToken,
    Node,
    Route,
    RouteMember,
    ScalingEvent,
    ServiceCache,
    ServiceEvent,
)
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory

LLM_SERVICE_DEFINITION = """\
[custom.environment]
image = "modelserve/python:3.11"
architecture = "x86_64"

[custom.environ]
MODEL_NAME = "echo-model"
"""


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="echo",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "service-definition.toml": LLM_SERVICE_DEFINITION},
    )


@pytest.fixture
def service(personas: dict[str, Any], folder: Folder) -> Endpoint:
    return services.do_create_service(
        acting_user=personas["owner"], name="echo-one", folder=folder, project=personas["project"]
    )


def page(service: Endpoint) -> str:
    return reverse("serving:detail", kwargs={"pk": service.pk})


def url(name: str, service: Endpoint, **kwargs: Any) -> str:
    return reverse(f"serving:{name}", kwargs={"pk": service.pk, **kwargs})


# --- the page ------------------------------------------------------------------------------------


def test_owner_sees_settings_routes_snippets_and_every_control(browser: Any, service: Endpoint) -> None:
    Route.objects.create(
        endpoint=service,
        status=Route.Status.FAILED_TO_START,
        error={"kind": "definition", "message": "model-definition.yaml: models[0].service.port is required"},
    )
    response = browser("owner").get(page(service))
    assert response.status_code == 200
    html = response.content.decode()
    assert "echo-one" in html
    assert service.url in html
    # The snippets carry the header a private service needs and the model the server names.
    assert "Authorization: BackendAI $API_TOKEN" in html
    assert f"{service.url}v1/chat/completions" in html
    assert "echo-model" in html
    assert 'base_url="' + service.url + 'v1"' in html.replace("&quot;", '"')
    assert "models[0].service.port is required" in html
    for target in ("modify", "terminate", "clear-errors", "chat", "token-create", "rule-create"):
        assert url(target, service) in html, target
    assert "modelserve/python:3.11" in html  # settings: the image
    assert "Service &#x27;echo-one&#x27; created" in html or "echo-one&#x27; created" in html  # event log


def test_the_settings_say_which_model_names_the_gateway_routes_here(browser: Any, service: Endpoint) -> None:
    html = browser("teammate").get(page(service)).content.decode()
    assert "Model names at the gateway" in html
    assert "echo-model (the default: MODEL_NAME, else the service&#x27;s name)" in html
    Endpoint.objects.filter(pk=service.pk).update(model_names=["echo-large", "echo"])
    html = browser("owner").get(page(service)).content.decode()
    assert "echo-large, echo" in html and "the default: MODEL_NAME" not in html


def test_teammate_reads_and_may_issue_tokens_but_not_change(browser: Any, service: Endpoint) -> None:
    response = browser("teammate").get(page(service))
    assert response.status_code == 200
    html = response.content.decode()
    assert url("token-create", service) in html
    for target in ("modify", "terminate", "clear-errors", "rule-create"):
        assert url(target, service) not in html, target


def test_stranger_gets_404_and_anonymous_goes_to_login(browser: Any, service: Endpoint) -> None:
    assert browser("stranger").get(page(service)).status_code == 404
    response = browser(None).get(page(service))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert browser("admin").get(page(service)).status_code == 200
    assert url("modify", service) in browser("admin").get(page(service)).content.decode()


def test_public_service_snippets_need_no_token(browser: Any, personas: dict[str, Any], folder: Folder) -> None:
    public = services.do_create_service(
        acting_user=personas["owner"], name="open-one", folder=folder, open_to_public=True
    )
    html = browser("owner").get(page(public)).content.decode()
    assert "Authorization: BackendAI" not in html.split('id="snippet-curl"')[1].split("</pre>")[0]
    assert "no token needed" in html


def test_user_text_is_escaped(browser: Any, service: Endpoint) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    Route.objects.create(endpoint=service, status=Route.Status.UNHEALTHY, error={"message": hostile})
    events.record_event(service, "note", hostile)
    html = browser("owner").get(page(service)).content.decode()
    assert hostile not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def members_of(html: str, route: Route) -> list[str]:
    """The member lines of one route's row, as text (tags dropped, whitespace folded)."""
    row = html.split(f'<tr data-id="{route.pk}">')[1].split("</tr>", maxsplit=1)[0]
    items = re.findall(r"<li class=\"member[^\"]*\"[^>]*>(.*?)</li>", row, flags=re.S)
    return [" ".join(re.sub(r"<[^>]+>", " ", item).split()) for item in items]


def test_cluster_routes_list_their_members_and_a_plain_route_does_not(
    browser: Any, personas: dict[str, Any], folder: Folder
) -> None:
    cluster = services.do_create_service(
        acting_user=personas["owner"],
        name="clustered",
        folder=folder,
        cluster_mode="multi-node",
        cluster_size=3,
        resources={"cpu": 1},
    )
    node_a, node_b, node_c = (Node.objects.create(name=name) for name in ("a", "b", "c"))
    route = Route.objects.create(
        endpoint=cluster, node=node_a, status=Route.Status.HEALTHY, host="127.0.0.1", port=41001
    )
    RouteMember.objects.create(
        route=route, idx=1, node=node_b, status=RouteMember.Status.RUNNING, host="127.0.0.1", port=41002
    )
    RouteMember.objects.create(
        route=route,
        idx=2,
        node=node_c,
        status=RouteMember.Status.FAILED,
        error={"message": "sub2 <exited> with code 3"},
    )
    html = browser("owner").get(page(cluster)).content.decode()
    assert members_of(html, route) == [
        "main1 · node a · healthy",
        "sub1 · node b · running",
        "sub2 · node c · failed sub2 &lt;exited&gt; with code 3",
    ]
    assert 'class="member member-failed"' in html
    assert "Multi-node cluster: 3 containers per replica, each on its own node" in html
    # In Japanese too.
    ja = browser("owner")
    ja.cookies[settings.LANGUAGE_COOKIE_NAME] = "ja"
    html_ja = ja.get(page(cluster)).content.decode()
    assert "マルチノード" in html_ja
    assert "ノード b" in " ".join(members_of(html_ja, route))

    # A replica of one container looks as before: no member list, no cluster line.
    plain = services.do_create_service(acting_user=personas["owner"], name="plain-one", folder=folder)
    single = Route.objects.create(
        endpoint=plain, node=node_a, status=Route.Status.HEALTHY, host="127.0.0.1", port=41003
    )
    html = browser("owner").get(page(plain)).content.decode()
    assert members_of(html, single) == []
    assert '<ul class="r-members" aria-label="Cluster members" hidden>' in " ".join(html.split())
    assert 'id="svc-cluster" hidden' in html


def cache_rows(html: str) -> list[tuple[str, str, str]]:
    """(node, size, bytes) of each row of the page's writable-cache table."""
    table = re.search(r'<table class="grid caches".*?</table>', html, re.S)
    if table is None:
        return []
    return re.findall(
        r'<tr><td data-label="[^"]*">([^<]*)</td><td class="num" data-label="[^"]*" data-bytes="(\d+)">([^<]*)</td>',
        table.group(0),
    )


def test_the_writable_cache_size_per_node_per_persona(browser: Any, service: Endpoint) -> None:
    # Before any node measured it, the page says so instead of an empty table.
    html = browser("owner").get(page(service)).content.decode()
    assert cache_rows(html) == []
    assert "No node has measured it yet." in html
    gpu_b, gpu_a = Node.objects.create(name="gpu-b"), Node.objects.create(name="gpu-a")
    measured = dt.datetime(2026, 3, 4, 5, 6, tzinfo=dt.UTC)
    ServiceCache.objects.create(endpoint=service, node=gpu_b, bytes=3 * 1024**3, measured_at=measured)
    ServiceCache.objects.create(endpoint=service, node=gpu_a, bytes=1536, measured_at=measured)
    # Another service's cache on the same node is not this one's.
    other = services.do_create_service(acting_user=service.owner, name="echo-two", folder=service.model_folder)
    ServiceCache.objects.create(endpoint=other, node=gpu_a, bytes=7, measured_at=measured)
    for who in ("owner", "teammate", "admin"):
        html = browser(who).get(page(service)).content.decode()
        assert [(n, b) for n, b, _ in cache_rows(html)] == [("gpu-a", "1536"), ("gpu-b", str(3 * 1024**3))], who
        sizes = [" ".join(size.replace("\xa0", " ").split()) for _, _, size in cache_rows(html)]
        assert sizes == ["1.5 KB", "3.0 GB"], who
        assert 'datetime="2026-03-04T05:06:00+00:00"' in html, who
        assert "No node has measured it yet." not in html
    assert browser("stranger").get(page(service)).status_code == 404
    ja = browser("owner")
    ja.cookies[settings.LANGUAGE_COOKIE_NAME] = "ja"
    html_ja = ja.get(page(service)).content.decode()
    assert "書き込み可能なキャッシュ" in html_ja
    assert "所有者のストレージ上限に含まれます" in html_ja
    assert [n for n, _, _ in cache_rows(html_ja)] == ["gpu-a", "gpu-b"]


# --- clear errors and retry ----------------------------------------------------------------------


def test_clear_errors_per_persona(browser: Any, service: Endpoint) -> None:
    failed = Route.objects.create(endpoint=service, status=Route.Status.FAILED_TO_START, error={"message": "boom"})
    Endpoint.objects.filter(pk=service.pk).update(retries=5)
    assert browser(None).post(url("clear-errors", service)).status_code == 302
    assert browser("stranger").post(url("clear-errors", service)).status_code == 404
    assert browser("teammate").post(url("clear-errors", service)).status_code == 403
    assert browser("owner").get(url("clear-errors", service)).status_code == 405
    response = browser("owner").post(url("clear-errors", service), follow=True)
    assert response.redirect_chain[-1][0] == page(service)
    assert "Cleared the errors of 1 replica(s)" in response.content.decode()
    failed.refresh_from_db()
    service.refresh_from_db()
    assert failed.status == Route.Status.TERMINATING
    assert service.retries == 0
    assert ServiceEvent.objects.filter(endpoint=service, kind="errors_cleared").exists()


# --- tokens --------------------------------------------------------------------------------------


def test_generate_token_shows_it_once_with_the_chosen_expiry(browser: Any, service: Endpoint) -> None:
    day = timezone.localdate() + dt.timedelta(days=10)
    response = browser("owner").post(url("token-create", service), {"expires_on": day.isoformat(), "tz": "Asia/Tokyo"})
    assert response.status_code == 201
    token = EndpointToken.objects.get(endpoint=service)
    html = response.content.decode()
    secret = re.search(r'id="new-token-value">([^<]+)<', html)
    assert secret is not None
    assert secret.group(1).startswith(token.prefix)
    # Valid through the chosen day in the browser's time zone.
    tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")
    assert token.expires_at == dt.datetime.combine(day, dt.time(23, 59, 59), tzinfo=tokyo)
    # The list shows it masked; the full token is never shown again.
    later = browser("owner").get(page(service)).content.decode()
    assert f"{token.prefix}_••••••••" in later
    assert secret.group(1) not in later


def test_token_errors_are_words_next_to_the_field(browser: Any, service: Endpoint) -> None:
    yesterday = (timezone.localdate() - dt.timedelta(days=1)).isoformat()
    response = browser("owner").post(url("token-create", service), {"expires_on": yesterday})
    assert response.status_code == 400
    assert "The expiry date must be in the future." in response.content.decode()
    response = browser("owner").post(url("token-create", service), {"expires_on": "next week"})
    assert response.status_code == 400
    assert "Enter a date such as" in response.content.decode()
    assert not EndpointToken.objects.exists()


def test_token_personas(browser: Any, service: Endpoint, personas: dict[str, Any]) -> None:
    assert browser(None).post(url("token-create", service)).status_code == 302
    assert browser("stranger").post(url("token-create", service)).status_code == 404
    assert browser("teammate").post(url("token-create", service)).status_code == 201  # default expiry: 30 days
    mine = EndpointToken.objects.get(created_by=personas["teammate"])
    assert mine.expires_at > timezone.now() + dt.timedelta(days=29)
    owners, _secret = token_actions.do_issue_token(
        service, acting_user=personas["owner"], expires_at=dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    )
    # The event log says when it expires as people read it, without isoformat's microseconds.
    said = service.events.filter(kind="token_issued").latest("id").message
    assert said == f"Token {owners.prefix}… issued, expires 2031-05-06 07:08 UTC.", said
    # A teammate revokes their own token, not the owner's; the owner (a manager) may revoke any.
    revoke = lambda token: url("token-revoke", service, token_id=token.pk)  # noqa: E731
    assert browser("stranger").post(revoke(mine)).status_code == 404
    assert browser("teammate").post(revoke(owners)).status_code == 404
    assert browser("teammate").post(revoke(mine)).status_code == 302
    assert browser("owner").post(revoke(owners)).status_code == 302
    mine.refresh_from_db()
    owners.refresh_from_db()
    assert mine.revoked_at is not None and owners.revoked_at is not None
    assert "revoked" in browser("owner").get(page(service)).content.decode()


# --- autoscaling rules ---------------------------------------------------------------------------

RULE = {
    "direction": "out",
    "source": "inference",
    "metric": "llm_echo_requests_waiting",
    "comparator": "GREATER_THAN",
    "threshold": "2",
    "step": "1",
    "min_replicas": "1",
    "max_replicas": "4",
    "cooldown": "60",
    "aggregation": "avg",
    "window": "30",
    "enabled": "on",
}


def test_rules_add_edit_toggle_delete(browser: Any, service: Endpoint) -> None:
    owner = browser("owner")
    response = owner.post(url("rule-create", service), RULE, follow=True)
    assert response.status_code == 200
    rule = AutoScalingRule.objects.get(endpoint=service)
    assert (rule.metric, rule.threshold, rule.step, rule.max_replicas, rule.enabled) == (
        "llm_echo_requests_waiting",
        2.0,
        1,
        4,
        True,
    )
    assert "Autoscaling rule saved" in response.content.decode()
    assert owner.post(url("rule-update", service, rule_id=rule.pk), {**RULE, "threshold": "5"}).status_code == 302
    rule.refresh_from_db()
    assert rule.threshold == 5.0
    assert owner.post(url("rule-toggle", service, rule_id=rule.pk), {"enabled": "0"}).status_code == 302
    rule.refresh_from_db()
    assert rule.enabled is False
    assert "Enable" in owner.get(page(service)).content.decode()
    assert owner.post(url("rule-toggle", service, rule_id=rule.pk), {"enabled": "1"}).status_code == 302
    rule.refresh_from_db()
    assert rule.enabled is True
    ScalingEvent.objects.create(
        endpoint=service, rule=rule, metric="inference:llm_echo_requests_waiting", observed=3.5,
        old_replicas=1, new_replicas=2, acted=True, reason="llm_echo_requests_waiting 3.5 > 2",
    )  # fmt: skip
    assert "llm_echo_requests_waiting 3.5 &gt; 2" in owner.get(page(service)).content.decode()  # decision log
    assert owner.post(url("rule-delete", service, rule_id=rule.pk)).status_code == 302
    assert not AutoScalingRule.objects.exists()
    assert ScalingEvent.objects.filter(endpoint=service).exists()  # decisions stay
    kinds = set(ServiceEvent.objects.filter(endpoint=service).values_list("kind", flat=True))
    assert {"rule_created", "rule_changed", "rule_deleted"} <= kinds


def test_rule_errors_show_next_to_the_fields_and_keep_the_values(browser: Any, service: Endpoint) -> None:
    owner = browser("owner")
    response = owner.post(url("rule-create", service), {**RULE, "min_replicas": "5", "max_replicas": "2"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "The minimum must not exceed the maximum replicas." in html
    assert 'value="llm_echo_requests_waiting"' in html  # what the user typed is kept
    response = owner.post(url("rule-create", service), {**RULE, "step": "0", "metric": " "})
    html = response.content.decode()
    assert "The step must not be 0" in html
    assert "Name the metric" in html or "This field may not be blank." in html
    assert not AutoScalingRule.objects.exists()


def test_rule_personas(browser: Any, service: Endpoint, personas: dict[str, Any]) -> None:
    rule = rule_actions.do_save_rule(
        AutoScalingRule(endpoint=service),
        acting_user=personas["owner"],
        changes={k: v for k, v in RULE.items() if k != "enabled"} | {"threshold": 2.0, "step": 1},
    )
    for who, code in ((None, 302), ("stranger", 404), ("teammate", 403)):
        client = browser(who)
        assert client.post(url("rule-create", service), RULE).status_code == code
        assert client.post(url("rule-update", service, rule_id=rule.pk), RULE).status_code == code
        assert client.post(url("rule-toggle", service, rule_id=rule.pk), {"enabled": "0"}).status_code == code
        assert client.post(url("rule-delete", service, rule_id=rule.pk)).status_code == code
    assert AutoScalingRule.objects.filter(pk=rule.pk, enabled=True).count() == 1
    assert browser("admin").post(url("rule-toggle", service, rule_id=rule.pk), {"enabled": "0"}).status_code == 302


def test_terminated_service_page_is_read_only(browser: Any, service: Endpoint, personas: dict[str, Any]) -> None:
    services.do_terminate_service(service, acting_user=personas["owner"])
    response = browser("owner").get(page(service))
    assert response.status_code == 200
    html = response.content.decode()
    assert "being terminated" in html
    for target in ("modify", "clear-errors", "token-create", "rule-create"):
        assert url(target, service) not in html, target
