"""A service's gateway usage (issue 17's pages): the service page's Usage panel and
``GET /api/v1/services/{id}/usage/`` (per UTC day over every key, or per key; ``?days=``,
``?format=csv``), per persona, with the numbers checked against the ``GatewayUsage`` rows made here,
and once through a real proxy."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.urls import reverse
from django.utils import timezone

from serving.actions import gateway as gateway_actions
from serving.actions import services
from serving.control import usage
from serving.models import Endpoint, GatewayKey, GatewayUsage
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.integration.test_gateway_usage import chats, serve
from tests.integration.test_proxy import KEY, Backend, Proxy, backends, wait_for

__all__ = ["backends"]  # the fixture, imported for its use here

pytestmark = pytest.mark.django_db
NONE = "\N{EN DASH}"  # what a cell shows for a latency of a day without requests


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        project=personas["project"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION},
    )


@pytest.fixture
def service(personas: dict[str, Any], folder: Folder) -> Endpoint:
    return services.do_create_service(
        acting_user=personas["owner"], name="echo-usage", folder=folder, project=personas["project"]
    )


def make_key(personas: dict[str, Any], who: str, name: str, **extra: Any) -> tuple[GatewayKey, str]:
    return gateway_actions.do_create_gateway_key(
        acting_user=personas[who], name=name, expires_at=timezone.now() + dt.timedelta(days=3), **extra
    )


def today() -> dt.date:
    return timezone.now().date()  # UTC: the rows' days are UTC days


def fill(personas: dict[str, Any], service: Endpoint, folder: Folder) -> dict[str, Any]:
    """Two keys' rows on the service (today and 3 days ago), one outside the 14 days, and one on
    another service: what the panel must sum, and what it must leave out."""
    mine, mine_secret = make_key(personas, "owner", "ci-batch")
    theirs, theirs_secret = make_key(personas, "teammate", "notebook", project=personas["project"])
    other = services.do_create_service(
        acting_user=personas["owner"], name="other-svc", folder=folder, project=personas["project"]
    )
    now = today()
    # mine today: 10 requests in (5 ms, 10 ms]; theirs today: 10 in (50 ms, 100 ms]. Merged, p50 is
    # the 10th of 20 (10 ms, the top of the first bucket) and p95 the 19th (in the second: 95 ms).
    GatewayUsage.objects.create(
        key=mine, endpoint=service, day=now, requests=10, prompt_tokens=100, completion_tokens=50, errors=1,
        latency={"0.01": 10},
    )  # fmt: skip
    GatewayUsage.objects.create(
        key=theirs, endpoint=service, day=now, requests=10, prompt_tokens=300, completion_tokens=200, errors=0,
        latency={"0.1": 10},
    )  # fmt: skip
    GatewayUsage.objects.create(
        key=theirs, endpoint=service, day=now - dt.timedelta(days=3), requests=7, prompt_tokens=70,
        completion_tokens=7, errors=2, latency={"0.25": 7},
    )  # fmt: skip
    GatewayUsage.objects.create(
        key=mine, endpoint=service, day=now - dt.timedelta(days=20), requests=999, prompt_tokens=999,
        completion_tokens=999, errors=999, latency={"1": 999},
    )  # fmt: skip
    GatewayUsage.objects.create(
        key=mine, endpoint=other, day=now, requests=555, prompt_tokens=555, completion_tokens=555, errors=5
    )
    return {"mine": mine, "theirs": theirs, "secrets": [mine_secret, theirs_secret]}


def panel(html: str) -> str:
    found = re.search(r'<section class="card section" aria-labelledby="h-usage" id="usage">(.*?)</section>', html, re.S)
    assert found is not None, "the service page has no Usage panel"
    return found.group(1)


def cells(table_html: str) -> list[list[str]]:
    body = re.search(r"<tbody>(.*?)</tbody>", table_html, re.S)
    assert body is not None
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S)
    return [
        [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows
    ]


def test_the_panel_sums_the_rows_per_day_and_names_the_busiest_keys(
    browser: Any, personas: dict[str, Any], service: Endpoint, folder: Folder
) -> None:
    made = fill(personas, service, folder)
    url = reverse("serving:detail", kwargs={"pk": service.pk})
    html = browser("owner").get(url).content.decode()
    usage_html = panel(html)
    days_table, keys_table = re.findall(r"<table.*?</table>", usage_html, re.S)
    days = cells(days_table)
    assert len(days) == 14  # every day of the window, newest first, idle days as zeros
    assert days[0] == [today().isoformat(), "20", "", "400", "250", "1", "10.0", "95.0"]
    assert days[3] == [(today() - dt.timedelta(days=3)).isoformat(), "7", "", "70", "7", "2", "175.0", "242.5"]
    assert days[1] == [(today() - dt.timedelta(days=1)).isoformat(), "0", "", "0", "0", "0", NONE, NONE]
    assert days[13][0] == (today() - dt.timedelta(days=13)).isoformat()
    # The busiest day's bar is full; the others in proportion.
    assert 'width="100.0"' in days_table and 'width="35.0"' in days_table
    summary = re.search(r'id="usage-summary">([^<]*)<', usage_html)
    assert summary is not None
    assert summary.group(1).startswith(
        "27 requests through the gateway: 470 prompt and 257 completion tokens, 3 errors"
    )
    # The keys: the busiest first, by name and prefix; never a secret, nothing from the other service.
    keys = cells(keys_table)
    assert keys == [
        [f"notebook {made['theirs'].prefix}_••••", "project team (made by teammate)", "17", "577", "2"],
        [f"ci-batch {made['mine'].prefix}_••••", "owner", "10", "150", "1"],
    ]
    assert all(secret not in html for secret in made["secrets"])
    csv_link = reverse("service-usage", kwargs={"service_id": service.pk}) + "?format=csv"
    assert f'href="{csv_link}"' in usage_html

    # The teammate reads the service: the same panel. An operator too. A stranger: the page's 404.
    assert panel(browser("teammate").get(url).content.decode()) == usage_html
    assert panel(browser("admin").get(url).content.decode()) == usage_html
    assert browser("stranger").get(url).status_code == 404
    assert browser(None).get(url).status_code == 302


def test_the_empty_panel_says_how_to_call_the_gateway(
    browser: Any, service: Endpoint, personas: dict[str, Any]
) -> None:
    key, _secret = make_key(personas, "owner", "unused", services=[service])
    usage_html = panel(browser("owner").get(reverse("serving:detail", kwargs={"pk": service.pk})).content.decode())
    assert "No gateway requests in this window yet." in usage_html
    assert f"<code>{django_settings.SERVING_PROXY_URL}/v1</code>" in usage_html
    assert '<code>"model": "echo-usage"</code>' in usage_html  # its model name at the gateway
    assert f'href="{reverse("serving:gateway-keys")}"' in usage_html
    assert "<table" not in usage_html and key.name not in usage_html


def test_the_panel_in_japanese(browser: Any, personas: dict[str, Any], service: Endpoint, folder: Folder) -> None:
    client = browser("teammate")
    client.post(reverse("set_language"), {"language": "ja"})
    url = reverse("serving:detail", kwargs={"pk": service.pk})
    empty = panel(client.get(url).content.decode())
    assert "ゲートウェイ" in empty and "No gateway requests" not in empty
    fill(personas, service, folder)
    full = panel(client.get(url).content.decode())
    assert "Keys that used it most" not in full and "Per day, over every key" not in full
    assert "project team (made by teammate)" not in full


def test_the_api_per_day_per_key_and_csv_per_persona(
    api: Any, personas: dict[str, Any], service: Endpoint, folder: Folder
) -> None:
    made = fill(personas, service, folder)
    url = f"/api/v1/services/{service.pk}/usage/"
    assert api(None).get(url).status_code == 401
    assert api("stranger").get(url).status_code == 404
    for who in ("owner", "teammate", "admin"):
        answer = api(who).get(url)
        assert answer.status_code == 200, (who, answer.content)
    body = api("teammate").get(url).json()
    assert len(body) == 14 and body[0] == {
        "day": today().isoformat(),
        "requests": 20,
        "prompt_tokens": 400,
        "completion_tokens": 250,
        "errors": 1,
        "p50_ms": 10.0,
        "p95_ms": 95.0,
    }
    assert body[1]["requests"] == 0 and body[1]["p50_ms"] is None
    # A longer window reaches the old row; a shorter one leaves out three days ago.
    assert sum(row["requests"] for row in api("owner").get(url + "?days=30").json()) == 27 + 999
    short = api("owner").get(url + "?days=3").json()
    assert [row["day"] for row in short] == [(today() - dt.timedelta(days=n)).isoformat() for n in range(3)]
    assert sum(row["requests"] for row in short) == 20
    keys = api("owner").get(url + "?by=key").json()
    assert [(k["key_name"], k["key_prefix"], k["owner"], k["project"], k["requests"]) for k in keys] == [
        ("notebook", made["theirs"].prefix, "teammate", "team", 17),
        ("ci-batch", made["mine"].prefix, "owner", None, 10),
    ]
    assert all(secret not in str(keys) for secret in made["secrets"])
    # CSV: the same rows, one line each.
    answer = api("owner").get(url + "?format=csv&days=7")
    assert answer.status_code == 200 and answer["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.content.decode())))
    assert len(rows) == 7 and rows[0]["day"] == today().isoformat() and rows[0]["prompt_tokens"] == "400"
    by_key = list(csv.DictReader(io.StringIO(api("owner").get(url + "?format=csv&by=key").content.decode())))
    assert [row["key_name"] for row in by_key] == ["notebook", "ci-batch"]
    # Bad parameters: a sentence naming the parameter and the fix.
    for query, words in (
        ("?days=0", "days must be at least 1"),
        ("?days=400", "days can be at most 366"),
        ("?days=week", "days must be a whole number of days"),
        ("?by=hour", "by must be day or key"),
    ):
        answer = api("owner").get(url + query)
        assert answer.status_code == 400 and words in str(answer.json()), (query, answer.content)
    assert api("stranger").get(url + "?format=csv").status_code == 404


def test_a_terminated_service_keeps_its_usage_readable(
    api: Any, personas: dict[str, Any], service: Endpoint, folder: Folder
) -> None:
    fill(personas, service, folder)
    services.do_terminate_service(service, acting_user=personas["owner"])
    body = api("owner").get(f"/api/v1/services/{service.pk}/usage/").json()
    assert body[0]["requests"] == 20


def test_through_a_real_proxy_the_panel_and_the_api_show_what_the_replica_reported(
    api: Any, browser: Any, folder: Folder, backends: Callable[..., Backend], settings: Any
) -> None:
    proxy = Proxy()
    try:
        settings.REDIS_PREFIX, settings.TOKEN_HMAC_KEY = proxy.prefix, KEY
        model, service, key = serve(api, folder, proxy, backends)
        requests, prompt, completion = chats(proxy, key, model)

        def folded() -> bool:
            usage.fold()
            return sum(r.requests for r in GatewayUsage.objects.filter(endpoint_id=service)) >= requests

        wait_for(folded, what="the usage to reach the database")
        day = api("teammate").get(f"/api/v1/services/{service}/usage/?days=1").json()
        assert len(day) == 1
        assert (day[0]["requests"], day[0]["prompt_tokens"], day[0]["completion_tokens"], day[0]["errors"]) == (
            requests,
            prompt,
            completion,
            0,
        )
        assert 0 < day[0]["p50_ms"] <= day[0]["p95_ms"]
        [row] = api("owner").get(f"/api/v1/services/{service}/usage/?by=key").json()
        assert row["key_name"] == "usage" and row["requests"] == requests and key not in str(row)
        html = browser("owner").get(reverse("serving:detail", kwargs={"pk": service})).content.decode()
        days = cells(re.findall(r"<table.*?</table>", panel(html), re.S)[0])
        assert days[0][:6] == [today().isoformat(), str(requests), "", str(prompt), str(completion), "0"]
        assert key not in html
    finally:
        proxy.close()
