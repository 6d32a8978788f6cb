"""The proxy's in-memory routing table and route choice (proxy/table.py), without Redis."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from proxy.table import Endpoint, Table

ROOT = Path(__file__).resolve().parents[2]


def entry(slug: str = "s", routes: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"id-{slug}",
        "slug": slug,
        "name": slug,
        "public": False,
        "status": "HEALTHY",
        "routes": routes if routes is not None else [{"id": "r1", "host": "10.0.0.1", "port": 8000, "weight": 1}],
        "tokens": {"abcdefghij": {"digest": "d" * 64, "expires": 2e9}},
        **extra,
    }


def test_apply_builds_endpoints_and_keeps_objects_across_updates() -> None:
    table = Table("redis://unused", "ms", 10)
    table.apply("s", entry())
    endpoint = table.endpoints["s"]
    route = endpoint.routes[0]
    route.in_flight = 3  # a request in flight holds these objects
    assert endpoint.tokens == {"abcdefghij": ("d" * 64, 2e9)}
    assert endpoint.capacity == 1 and not endpoint.public

    routes = [
        {"id": "r1", "host": "10.0.0.1", "port": 8000, "weight": 2},
        {"id": "r2", "host": "10.0.0.2", "port": 8000, "weight": 1},
    ]
    table.apply("s", entry(routes=routes, public=True, tokens={}))
    assert table.endpoints["s"] is endpoint
    assert endpoint.routes[0] is route and route.in_flight == 3 and route.weight == 2
    assert endpoint.public and endpoint.tokens == {} and endpoint.capacity == 2

    # A route whose address changed is a new route; the old one is retired (its pool closed).
    table.apply("s", entry(routes=[{"id": "r1", "host": "10.0.0.9", "port": 8000, "weight": 1}]))
    assert endpoint.routes[0] is not route and route.gone

    table.apply("s", None)
    assert "s" not in table.endpoints and endpoint.status == "TERMINATING" and endpoint.routes == []


def test_zero_weight_routes_get_no_traffic_and_bad_entries_are_skipped() -> None:
    table = Table("redis://unused", "ms", 10)
    table.apply("s", entry(routes=[{"id": "r1", "host": "h", "port": 1, "weight": 0}]))
    assert table.endpoints["s"].routes == []
    table.apply("bad", {"routes": [{"host": "h"}]})  # no id, no port: ignored, not fatal
    assert "bad" not in table.endpoints


def test_full_load_replaces_the_table_and_skips_unchanged_entries() -> None:
    table = Table("redis://unused", "ms", 10)
    raw_a = json.dumps(entry("a")).encode()
    table.load({b"a": raw_a, b"b": json.dumps(entry("b")).encode(), b"broken": b"{not json"})
    assert set(table.endpoints) == {"a", "b"} and table.loaded
    a = table.endpoints["a"]
    a.status = "touched"
    table.load({b"a": raw_a})  # unchanged bytes: not re-applied
    assert set(table.endpoints) == {"a"} and a.status == "touched"


def test_pubsub_messages() -> None:
    table = Table("redis://unused", "ms", 10)
    assert table.handle_message(json.dumps({"slug": "s", "entry": entry()}).encode()) is False
    assert "s" in table.endpoints
    assert table.handle_message(json.dumps({"slug": "s", "entry": None}).encode()) is False
    assert "s" not in table.endpoints
    assert table.handle_message(b'{"resync": true}') is True
    assert table.handle_message(b"garbage") is False


def test_weighted_choice_follows_weights_and_load() -> None:
    random.seed(7)
    table = Table("redis://unused", "ms", 10)
    routes = [
        {"id": "light", "host": "h", "port": 1, "weight": 1},
        {"id": "heavy", "host": "h", "port": 2, "weight": 3},
    ]
    table.apply("s", entry(routes=routes))
    endpoint = table.endpoints["s"]
    picks = Counter(endpoint.pick(0.0).id for _ in range(8000))  # type: ignore[union-attr]
    assert 0.70 < picks["heavy"] / 8000 < 0.80, picks

    # Power of two choices: two different routes are compared, so the loaded one loses every time.
    heavy = endpoint.routes[1]
    heavy.in_flight = 100
    picks = Counter(endpoint.pick(0.0).id for _ in range(4000))  # type: ignore[union-attr]
    assert picks == {"light": 4000}, picks


def test_routes_marked_down_are_skipped_and_failed_ones_excluded() -> None:
    table = Table("redis://unused", "ms", 10)
    routes = [{"id": "a", "host": "h", "port": 1, "weight": 1}, {"id": "b", "host": "h", "port": 2, "weight": 1}]
    table.apply("s", entry(routes=routes))
    endpoint: Endpoint = table.endpoints["s"]
    a, b = endpoint.routes
    assert a.mark_down(now=100.0, base=2.0) is True
    assert a.mark_down(now=100.5, base=2.0) is False  # already down: reported once
    assert all(endpoint.pick(101.0) is b for _ in range(50))
    assert endpoint.pick(101.0, exclude=[b]) is a  # a mark is a guess: tried when nothing else is left
    assert endpoint.pick(101.0, exclude=[a, b]) is None
    assert endpoint.pick(200.0) in (a, b)


def test_the_proxy_never_imports_django() -> None:
    code = (
        "import sys, proxy.app, proxy.downstream, proxy.exchange, proxy.upstream, proxy.__main__; "
        "assert 'django' not in sys.modules, 'django imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- revisions (issue 16) -----------------------------------------------------------------------------


def _revision_routes() -> list[dict[str, Any]]:
    return [
        {"id": "a1", "host": "10.0.0.1", "port": 8000, "weight": 1, "revision": 1},
        {"id": "a2", "host": "10.0.0.2", "port": 8000, "weight": 1, "revision": 1},
        {"id": "b1", "host": "10.0.0.3", "port": 8000, "weight": 1, "revision": 2},
    ]


def test_split_by_revision_share_is_exact_then_by_weight_within() -> None:
    table = Table("redis://unused", "ms", 10)
    table.apply("s", entry(routes=_revision_routes(), shares={"1": 90, "2": 10}))
    endpoint = table.endpoints["s"]
    seen = Counter(endpoint.choose(0.0).id for _ in range(10_000))  # type: ignore[union-attr]
    assert seen["b1"] == 1000  # smooth weighted round robin: exact over any 100 requests
    assert 4000 < seen["a1"] < 5000 and seen["a1"] + seen["a2"] == 9000
    # A table update keeps the round robin's place: still exact across it.
    table.apply("s", entry(routes=_revision_routes(), shares={"1": 90, "2": 10}, name="again"))
    assert Counter(endpoint.choose(0.0).id for _ in range(100))["b1"] == 10  # type: ignore[union-attr]


def test_a_revision_without_routes_gives_its_turn_to_the_others() -> None:
    table = Table("redis://unused", "ms", 10)
    table.apply("s", entry(routes=_revision_routes()[:2], shares={"1": 50, "2": 50}))
    endpoint = table.endpoints["s"]
    assert {endpoint.choose(0.0).id for _ in range(50)} == {"a1", "a2"}  # type: ignore[union-attr]


def test_pinned_revision_and_no_split_when_one_revision_holds_all() -> None:
    table = Table("redis://unused", "ms", 10)
    table.apply("s", entry(routes=_revision_routes(), shares={"1": 100}))
    endpoint = table.endpoints["s"]
    assert endpoint.split is not None  # revision 2 has routes but no share: it gets none
    assert {endpoint.choose(0.0).id for _ in range(50)} == {"a1", "a2"}  # type: ignore[union-attr]
    assert {endpoint.choose(0.0, pinned=2).id for _ in range(5)} == {"b1"}  # type: ignore[union-attr]
    assert endpoint.choose(0.0, pinned=7) is None
    table.apply("s", entry(routes=_revision_routes()[:2], shares={"1": 100}))
    assert endpoint.split is None  # the usual pick, at no cost
    table.apply("s", entry(routes=_revision_routes()))  # rolling: no shares
    assert endpoint.split is None and endpoint.by_revision[2].routes[0].id == "b1"
