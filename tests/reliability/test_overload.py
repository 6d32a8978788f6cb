"""Fault 8 of "Reliability" (issue 9): more concurrent requests than the replicas can take.

One llm-echo replica that takes 0.5 s a request, behind a proxy that admits 4 requests in flight per
healthy route (PROXY_QUEUE_LIMIT). Far more clients than that: the excess is refused at once with 429
and ``Retry-After`` (a bounded queue, not an unbounded pile), the proxy's memory stays flat however
many clients come, and every request gets an answer in bounded time. With no replica at all, 503 and
``Retry-After``.
"""

from __future__ import annotations

import json
from typing import Any

from tests.live import wait_for
from tests.reliability.conftest import converged, create_service, echo_folder, monotonic, report_line
from tests.reliability.load import Load

QUEUE_LIMIT = 4
WORDS = 10
TOKEN_DELAY = 0.05  # so a request takes WORDS x TOKEN_DELAY = 0.5 s
BODY = json.dumps({"model": "llm-echo", "prompt": " ".join(["word"] * WORDS)}).encode()


def proxy_in_flight(system: Any, slug: str) -> int:
    for line in system.proxy_metrics().splitlines():
        if line.startswith(f'modelserve_proxy_in_flight{{endpoint="{slug}"}}'):
            return int(float(line.split()[1]))
    return 0


def test_fault8_overload_gets_429_with_retry_after_memory_bounded_nothing_hangs(
    live: Any, api: Any, personas: dict[str, Any]
) -> None:
    system = live(proxy_env={"PROXY_QUEUE_LIMIT": str(QUEUE_LIMIT), "PROXY_IDLE_TIMEOUT": "10"})
    folder = echo_folder(personas["owner"])
    created = create_service(api, folder, replicas=1, environ={"ECHO_TOKEN_DELAY": str(TOKEN_DELAY)})
    sid, slug = created["id"], created["slug"]
    wait_for(lambda: converged(api, sid, 1), timeout=60, what="1 healthy replica")
    wait_for(lambda: len(system.proxy_routes(slug)) == 1, timeout=5, what="the proxy to route to it")
    url = created["url"] + "v1/completions"
    post = {"method": "POST", "body": BODY, "headers": {"Content-Type": "application/json"}}

    # Warm up (imports, pools), then the baseline.
    with Load(url, concurrency=2, **post) as warm:
        warm.wait_requests(6)
    rss_before = system.proxy_rss_kib()

    # 10x more clients than the endpoint admits, for a few seconds.
    started = monotonic()
    with Load(url, concurrency=10 * QUEUE_LIMIT, pause=0.02, timeout=30, **post) as load:
        load.wait_requests(20, timeout=60)
    elapsed = monotonic() - started
    # Then a flood of connections: 400 clients at once, each retrying at once when refused.
    flood = Load(url, concurrency=400, pause=0.0, timeout=30, max_requests=8000, **post).start()
    flood.wait_done(timeout=120)
    rss_after = system.proxy_rss_kib()
    wait_for(lambda: proxy_in_flight(system, slug) == 0, timeout=15, what="nothing left in flight in the proxy")

    report = load.report
    everything = report.outcomes + flood.report.outcomes
    statuses = {o.status for o in everything}
    refused = [o for o in everything if o.status == 429]
    growth_mib = (rss_after - rss_before) / 1024
    report_line(
        "fault 8: overload",
        report,
        None,
        f"over {elapsed:.1f} s; then a flood: {flood.report.summary()}; proxy RSS {rss_before // 1024} -> "
        f"{rss_after // 1024} MiB",
    )
    assert statuses <= {200, 429}, report.by_status() + flood.report.by_status()
    assert refused and all(o.retry_after and int(o.retry_after) >= 1 for o in refused)
    # The bounded queue: never more admitted at once than the limit, so each admitted request took
    # about its own 0.5 s, and refusals are immediate.
    admitted = [o for o in everything if o.ok]
    assert admitted and max(o.elapsed for o in admitted) < 5.0, max(o.elapsed for o in admitted)
    assert max(o.elapsed for o in refused) < 2.0
    assert not [o for o in everything if o.status is None], "a request got no answer"
    assert growth_mib < 40, f"the proxy grew by {growth_mib:.0f} MiB under overload"

    # No replica at all: 503 with Retry-After, at once, for everyone.
    assert api("owner").patch(f"/api/v1/services/{sid}/", {"replicas": 0}, format="json").status_code == 200
    wait_for(lambda: not system.proxy_routes(slug), timeout=30, what="the proxy to have no route")
    none_left = Load(url, concurrency=20, pause=0.01, max_requests=400, **post).start()
    none_left.wait_done(timeout=60)
    assert len(none_left.report) == 400
    for outcome in none_left.report.outcomes:
        assert outcome.status == 503 and outcome.retry_after, outcome
    print(f"  no replica: {none_left.report.summary()}")
