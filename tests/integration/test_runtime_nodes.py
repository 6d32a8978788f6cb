"""Several nodes, per-route logs, the proxies' failure reports and rolling updates, with real workers,
real replicas on the local engine and (where traffic matters) the real proxy (issues 5 and 6)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from serving.models import Endpoint, Node, Route, RouteMember, ServiceEvent
from storage.models import Folder
from tests.factories import SIMPLE_DEFINITION, FolderFactory
from tests.live import LiveSystem, wait_for

# Probed rarely, so only a proxy's report (not the schedule) can notice a dead replica quickly.
SLOW_PROBE_DEFINITION = SIMPLE_DEFINITION.replace("interval: 0.2", "interval: 1.5")


def service(api: Any, folder: Folder, **extra: Any) -> dict[str, Any]:
    body = {"name": "svc-nodes", "folder": str(folder.pk), "replicas": 2, **extra}
    response = api("owner").post("/api/v1/services/", body, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def get(api: Any, service_id: str) -> dict[str, Any]:
    return api("owner").get(f"/api/v1/services/{service_id}/").json()


def healthy_routes(api: Any, service_id: str, count: int) -> list[dict[str, Any]] | None:
    routes = [r for r in get(api, service_id)["routes"] if r["status"] == "healthy"]
    return routes if len(routes) == count else None


def engine_of(node: str) -> Any:
    from serving.node.engines.local.engine import LocalEngine

    return LocalEngine(state_dir=Path(settings.ENGINE_STATE_DIR) / f"local-{node}")


def replicas_in_engine(node: str, service_id: str) -> list[Any]:
    return [i for i in engine_of(node).list() if i.labels.get("serving.endpoint") == service_id and i.state != "exited"]


def kill_replica(node: str, container_id: str) -> None:
    """SIGKILL the sandbox behind the platform's back, as a crash would."""
    pid_file = Path(engine_of(node).state_dir) / container_id / "pid"
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


@pytest.fixture
def folder(personas: dict[str, Any]) -> Folder:
    return FolderFactory(
        owner=personas["owner"],
        name="simple",
        files={"model-definition.yaml": SIMPLE_DEFINITION, "index.html": "hello from the model folder"},
    )


class Load:
    """A few client threads calling a URL in a loop; every answer's status (or exception) is kept."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.results: list[int | str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    answer.read()
                    self.results.append(int(answer.status))
            except urllib.error.HTTPError as exc:
                self.results.append(int(exc.code))
            except OSError as exc:
                self.results.append(f"{exc.__class__.__name__}: {exc}")
            time.sleep(0.005)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)

    def failed(self) -> list[int | str]:
        return [r for r in self.results if r != 200]


def in_routing_table(slug: str) -> set[str]:
    from serving.bus.routing import get_redis, table_key

    raw = get_redis().hget(table_key(), slug)
    return {r["id"] for r in json.loads(raw)["routes"]} if raw else set()


# --- several nodes -------------------------------------------------------------------------------


def test_spread_capacity_limits_and_route_logs(
    live_factory: Callable[..., LiveSystem], api: Any, folder: Folder
) -> None:
    live_factory(nodes={"a": {"NODE_CPU": "2"}, "b": {"NODE_CPU": "1"}})
    sid = service(api, folder, replicas=3, resources={"cpu": 1, "mem": "256m"})["id"]
    routes = wait_for(lambda: healthy_routes(api, sid, 3), timeout=40, what="3 healthy routes")
    # Spread: one per node first; the third goes where a CPU is still free.
    assert Counter(r["node"] for r in routes) == {"a": 2, "b": 1}

    # Per-route logs come from the route's node.
    on_b = next(r for r in routes if r["node"] == "b")

    def three_lines() -> dict[str, Any] | None:
        body: dict[str, Any] = api("owner").get(f"/api/v1/services/{sid}/routes/{on_b['id']}/logs/?tail=3").json()
        return body if len(body.get("lines", [])) == 3 and body["truncated"] else None

    answer = wait_for(three_lines, timeout=10, what="the last 3 of more log lines")
    assert answer["route"] == on_b["id"] and answer["node"] == "b" and answer["truncated"] is True
    assert any("GET / HTTP/1.1" in line for line in answer["lines"]), answer  # the health checks' requests
    full = api("owner").get(f"/api/v1/services/{sid}/routes/{on_b['id']}/logs/").json()
    assert 3 < len(full["lines"]) <= 200
    assert api("stranger").get(f"/api/v1/services/{sid}/routes/{on_b['id']}/logs/").status_code == 404
    assert api("owner").get(f"/api/v1/services/{sid}/routes/{on_b['id']}/logs/?tail=0").status_code == 400

    # A fourth replica does not fit anywhere: the error says what was asked and what is free.
    api("owner").patch(f"/api/v1/services/{sid}/", {"replicas": 4}, format="json")
    error = wait_for(
        lambda: next((r["error"] for r in get(api, sid)["routes"] if r["status"] == "failed_to_start"), None),
        timeout=20,
        what="a route that did not fit",
    )
    assert "Not enough resources" in error and "cpu 1" in error
    assert "node a" in error and "node b" in error
    assert healthy_routes(api, sid, 3)


def test_lost_node_routes_move_and_its_orphans_are_swept_when_it_returns(
    live_factory: Callable[..., LiveSystem], api: Any, folder: Folder
) -> None:
    system = live_factory(nodes={"a": {}, "b": {}})
    sid = service(api, folder, replicas=2)["id"]
    routes = wait_for(lambda: healthy_routes(api, sid, 2), timeout=40, what="2 healthy routes")
    assert sorted(r["node"] for r in routes) == ["a", "b"]
    on_b = next(r for r in routes if r["node"] == "b")

    # Node b's worker stops; its replica keeps running (as a container outlives its agent).
    system.stop("node-b")
    started = time.monotonic()
    answer = api("owner").get(f"/api/v1/services/{sid}/routes/{on_b['id']}/logs/")
    assert answer.status_code == 503 and "Node b is not answering" in answer.json()["detail"]
    assert time.monotonic() - started < 2.0  # known at once, no wait for a timeout
    assert len(replicas_in_engine("b", sid)) == 1

    # After NODE_LOST_AFTER the node is lost and its route is recreated on node a. Its replica (still
    # running: only its worker stopped) serves until the replacement is healthy, never fewer than 2.
    wait_for(lambda: Node.objects.get(name="b").lost_at is not None, timeout=30, what="node b lost")
    lost_after = time.monotonic() - started
    fewest = 2

    def both_on_a() -> list[dict[str, Any]] | None:
        nonlocal fewest
        healthy = [r for r in get(api, sid)["routes"] if r["status"] == "healthy"]
        fewest = min(fewest, len(healthy))
        return healthy if len(healthy) == 2 and all(r["node"] == "a" for r in healthy) else None

    moved = wait_for(both_on_a, timeout=30, what="both routes healthy on node a")
    print(
        f"\n[fault 6: node b's worker stopped] lost after {lost_after:.1f} s (NODE_LOST_AFTER 5 s), both replicas "
        f"healthy on node a {time.monotonic() - started:.1f} s after the stop; fewest healthy meanwhile: {fewest}"
    )
    assert fewest == 2, "a healthy replica of the lost node left traffic before its replacement was ready"
    assert on_b["id"] not in {r["id"] for r in moved}
    forgotten = ServiceEvent.objects.get(endpoint_id=sid, kind="route_forgotten", route_id=on_b["id"])
    assert "node b was lost" in forgotten.message

    # Node b comes back: its old replica has no route any more and is stopped by its sweep.
    system.start_node("b")
    wait_for(lambda: Node.objects.get(name="b").lost_at is None, timeout=30, what="node b back")
    wait_for(lambda: not replicas_in_engine("b", sid), timeout=20, what="the orphan on node b stopped")
    assert healthy_routes(api, sid, 2)


# --- cluster mode (S4.1) ------------------------------------------------------------------------

# A server that shows its environment: the cluster variables of each member, read over HTTP.
ENV_ECHO_SERVER = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        env = {k: v for k, v in os.environ.items() if k.startswith("BACKENDAI_")}
        body = json.dumps(env).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""
ENV_ECHO_DEFINITION = SIMPLE_DEFINITION.replace(
    '[python3, -m, http.server, --directory, /models, "8000"]', "[python3, /models/echo_env.py]"
)


def fetch_text(url: str) -> str:
    """The body at ``url``, waiting for a member that runs but may not listen yet (a sub's route is
    healthy once main is and the sub's sandbox runs)."""

    def attempt() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return str(answer.read().decode())
        except OSError:
            return None

    return str(wait_for(attempt, timeout=10, what=f"an answer from {url}"))


def fetch_json(url: str) -> dict[str, Any]:
    """The JSON at ``url``, waiting like fetch_text."""
    return dict(json.loads(fetch_text(url)))


def test_multi_node_cluster_one_member_per_node_main_serves_a_dead_sub_replaces_the_route(
    live_factory: Callable[..., LiveSystem], api: Any, personas: dict[str, Any]
) -> None:
    system = live_factory(nodes={"a": {}, "b": {}})
    proxy = system.start_proxy()
    folder = FolderFactory(
        owner=personas["owner"],
        name="env-echo",
        files={"model-definition.yaml": ENV_ECHO_DEFINITION, "echo_env.py": ENV_ECHO_SERVER},
    )
    created = service(
        api, folder, replicas=1, open_to_public=True, cluster_mode="multi-node", cluster_size=2, resources={"cpu": 1}
    )
    sid, slug = created["id"], created["slug"]
    [route] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=40, what="a healthy cluster route")
    main, sub = route["members"]
    assert (main["host_name"], main["role"], sub["host_name"], sub["role"]) == ("main1", "main", "sub1", "sub")
    assert {main["node"], sub["node"]} == {"a", "b"} and main["node"] == route["node"]
    assert sub["status"] == "running" and main["address"] == f"{route['host']}:{route['port']}"

    # Each member has its role and its peers; the sub knows where main is.
    common = {
        "BACKENDAI_CLUSTER_SIZE": "2",
        "BACKENDAI_CLUSTER_HOSTS": "main1,sub1",
        "BACKENDAI_CLUSTER_REPLICAS": "main:1,sub:1",
    }
    assert fetch_json(f"http://{main['address']}/") == {
        **common,
        "BACKENDAI_CLUSTER_ROLE": "main",
        "BACKENDAI_CLUSTER_IDX": "1",
        "BACKENDAI_CLUSTER_HOST": "main1",
    }
    assert fetch_json(f"http://{sub['address']}/") == {
        **common,
        "BACKENDAI_CLUSTER_ROLE": "sub",
        "BACKENDAI_CLUSTER_IDX": "1",
        "BACKENDAI_CLUSTER_HOST": "sub1",
        "BACKENDAI_CLUSTER_MAIN_ADDR": main["address"],
        "BACKENDAI_CLUSTER_ADDRS": f"main1={main['address']}",
    }
    # Only main is in the routing table, and the proxy's traffic reaches main.
    wait_for(lambda: in_routing_table(slug) == {route["id"]}, timeout=5, what="the route in the routing table")
    assert all(fetch_json(f"{proxy}/e/{slug}/")["BACKENDAI_CLUSTER_ROLE"] == "main" for _ in range(5))

    # The sub dies: the whole route fails and is replaced; its main is stopped too.
    old_main_container = Route.objects.get(pk=route["id"]).container_id
    sub_container = RouteMember.objects.get(route_id=route["id"]).container_id
    kill_replica(sub["node"], sub_container)

    def replaced() -> dict[str, Any] | None:
        routes = healthy_routes(api, sid, 1)
        return routes[0] if routes and routes[0]["id"] != route["id"] else None

    new_route = wait_for(replaced, timeout=40, what="a replacement cluster route")
    assert {m["node"] for m in new_route["members"]} == {"a", "b"}
    assert not Route.objects.filter(pk=route["id"]).exists()
    exited = ServiceEvent.objects.get(endpoint_id=sid, kind="route_exited", route_id=route["id"])
    assert "Cluster member sub1" in exited.message
    wait_for(
        lambda: old_main_container not in {i.replica_id for i in replicas_in_engine(main["node"], sid)},
        timeout=20,
        what="the old main stopped",
    )
    assert len(replicas_in_engine("a", sid)) == len(replicas_in_engine("b", sid)) == 1

    # Terminate stops every member on every node.
    assert api("owner").delete(f"/api/v1/services/{sid}/").status_code in (200, 202, 204)
    wait_for(
        lambda: Endpoint.objects.get(pk=sid).lifecycle == Endpoint.Lifecycle.DESTROYED,
        timeout=30,
        what="the service destroyed",
    )
    wait_for(
        lambda: not replicas_in_engine("a", sid) and not replicas_in_engine("b", sid),
        timeout=20,
        what="no member left on any node",
    )


# Every member runs it: /whoami says which member answers, /peer is a sub asking main (by its host
# name and by BACKENDAI_CLUSTER_MAIN_ADDR), /fetch tries any address from inside the replica.
PEER_SERVER = """\
import json, os, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read().decode()
    except Exception as exc:
        return "failed: %s" % exc

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/peer":
            body = json.dumps({
                "by_name": get("http://main1:8000/whoami"),
                "by_main_addr": get("http://%s/whoami" % os.environ.get("BACKENDAI_CLUSTER_MAIN_ADDR", "")),
            })
        elif url.path == "/fetch":
            body = get(query["url"])
        else:
            body = os.environ.get("BACKENDAI_CLUSTER_HOST", "")
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""
PEER_DEFINITION = SIMPLE_DEFINITION.replace(
    '[python3, -m, http.server, --directory, /models, "8000"]', "[python3, /models/peer.py]"
)


def firewall_rules() -> str:
    return subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="cluster peering on the local engine needs root (network namespaces)")
@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed (apt-get install iptables)")
def test_multi_node_cluster_sub_reaches_main_by_name_and_address_and_another_service_can_not(
    live_factory: Callable[..., LiveSystem], api: Any, personas: dict[str, Any]
) -> None:
    live_factory(nodes={"a": {}, "b": {}})
    folder = FolderFactory(
        owner=personas["owner"],
        name="peers",
        files={"model-definition.yaml": PEER_DEFINITION, "peer.py": PEER_SERVER},
    )
    sid = service(api, folder, replicas=1, cluster_mode="multi-node", cluster_size=2, resources={"cpu": 1})["id"]
    other = service(api, folder, name="svc-other", replicas=1, resources={"cpu": 1})["id"]
    [route] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=40, what="a healthy cluster route")
    [outsider] = wait_for(
        lambda: healthy_routes(api, other, 1), timeout=40, what="a healthy replica of another service"
    )
    main, sub = route["members"]
    assert main["node"] != sub["node"]

    # The sub, on the other node, opens connections to main: by host name and by the address it got.
    assert json.loads(fetch_text(f"http://{sub['address']}/peer")) == {"by_name": "main1", "by_main_addr": "main1"}
    # Main reaches its sub by name too.
    assert fetch_text(f"http://{main['address']}/fetch?url=http://sub1:8000/whoami") == "sub1"
    # A replica of another service on this machine can not connect to a member.
    for address in (main["address"], sub["address"]):
        answer = fetch_text(f"http://{outsider['host']}:{outsider['port']}/fetch?url=http://{address}/whoami")
        assert answer.startswith("failed:"), answer
    assert route["id"] in firewall_rules()

    # Terminated: no rule, namespace or link of the cluster remains on the machine.
    members = [engine_of(n).list() for n in ("a", "b")]
    networks = [
        json.loads((Path(engine_of(n).state_dir) / i.replica_id / "spec.json").read_text())["network"]
        for n, infos in zip(("a", "b"), members, strict=True)
        for i in infos
        if i.labels.get("serving.route") == route["id"]
    ]
    assert len(networks) == 2
    assert api("owner").delete(f"/api/v1/services/{sid}/").status_code in (200, 202, 204)
    # Gone from the engines altogether: an exited member is still being cleaned up (its namespace
    # and rules go just before its state directory), so "not running" is not enough here.
    wait_for(
        lambda: not any(i.labels.get("serving.endpoint") == sid for n in ("a", "b") for i in engine_of(n).list()),
        timeout=30,
        what="no member left on any node",
    )
    assert route["id"] not in firewall_rules()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for network in networks:
        assert network["netns"] not in namespaces
        assert not Path(f"/sys/class/net/{network['host_if']}").exists()


def test_cluster_route_with_a_member_on_a_lost_node_moves_and_every_leftover_member_is_swept(
    live_factory: Callable[..., LiveSystem], api: Any, folder: Folder
) -> None:
    system = live_factory(nodes={"a": {}, "b": {}, "c": {}})
    sid = service(api, folder, replicas=1, cluster_mode="multi-node", cluster_size=2, resources={"cpu": 1})["id"]
    [route] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=40, what="a healthy cluster route")
    main_node, sub_node = (m["node"] for m in route["members"])
    old_main = Route.objects.get(pk=route["id"]).container_id

    # The sub's node goes silent: the replica counts as lost (a half cluster is no replica) and is
    # recreated on the nodes that are alive; it serves until then, and is forgotten after.
    system.stop(f"node-{sub_node}")
    wait_for(lambda: Node.objects.get(name=sub_node).lost_at is not None, timeout=30, what="the sub's node lost")

    def moved() -> dict[str, Any] | None:
        routes = healthy_routes(api, sid, 1)
        return routes[0] if routes and routes[0]["id"] != route["id"] else None

    new_route = wait_for(moved, timeout=40, what="the cluster route recreated on alive nodes")
    assert sub_node not in {m["node"] for m in new_route["members"]}
    wait_for(lambda: not Route.objects.filter(pk=route["id"]).exists(), timeout=20, what="the lost route forgotten")
    forgotten = ServiceEvent.objects.get(endpoint_id=sid, kind="route_forgotten", route_id=route["id"])
    assert f"the node {sub_node} of its cluster member sub1 was lost" in forgotten.message
    # Its main (on a node that is alive) has no route any more: that node's sweep stops it.
    wait_for(
        lambda: old_main not in {i.replica_id for i in replicas_in_engine(main_node, sid)},
        timeout=20,
        what="the old main swept",
    )
    # The sub's node comes back and sweeps the old sub.
    system.start_node(sub_node)
    wait_for(lambda: Node.objects.get(name=sub_node).lost_at is None, timeout=30, what="the sub's node back")
    wait_for(
        lambda: {i.labels.get("serving.route") for i in replicas_in_engine(sub_node, sid)} <= {new_route["id"]},
        timeout=20,
        what="the old sub swept",
    )
    assert healthy_routes(api, sid, 1)


def test_multi_node_cluster_larger_than_the_nodes_fails_with_what_was_asked_and_what_is_free(
    live_factory: Callable[..., LiveSystem], api: Any, folder: Folder
) -> None:
    live_factory(nodes={"a": {"NODE_CPU": "2"}, "b": {"NODE_CPU": "2"}})
    sid = service(api, folder, replicas=1, cluster_mode="multi-node", cluster_size=3, resources={"cpu": 1})["id"]
    error = wait_for(
        lambda: next((r["error"] for r in get(api, sid)["routes"] if r["status"] == "failed_to_start"), None),
        timeout=20,
        what="a cluster route that did not fit",
    )
    assert "cluster size 3 needs 3 distinct nodes" in error and "only 2 have that" in error
    assert "node a: cpu 2" in error and "node b: cpu 2" in error

    # Single-node mode puts every member on one node, when one has room for all of them.
    sid = service(
        api, folder, name="single", replicas=1, cluster_mode="single-node", cluster_size=2, resources={"cpu": 1}
    )["id"]
    [route] = wait_for(lambda: healthy_routes(api, sid, 1), timeout=40, what="a healthy single-node cluster route")
    assert [m["node"] for m in route["members"]] == [route["node"]] * 2
    assert [m["status"] for m in route["members"]] == ["healthy", "running"]


# --- the data plane tells the control plane -----------------------------------------------------


def test_proxy_report_removes_a_killed_replica_in_well_under_a_second(
    live_factory: Callable[..., LiveSystem], api: Any, personas: dict[str, Any]
) -> None:
    # The node's own sync runs only every 5 s and probes every 1.5 s with 3 retries: anything faster
    # than that is the proxy's report.
    system = live_factory(NODE_HEARTBEAT_INTERVAL="5", NODE_LOST_AFTER="30")
    proxy = system.start_proxy()
    folder = FolderFactory(
        owner=personas["owner"], name="slow-probe", files={"model-definition.yaml": SLOW_PROBE_DEFINITION}
    )
    created = service(api, folder, replicas=2, open_to_public=True)
    sid, slug = created["id"], created["slug"]
    routes = wait_for(lambda: healthy_routes(api, sid, 2), timeout=40, what="2 healthy routes")
    wait_for(lambda: len(in_routing_table(slug)) == 2, timeout=5, what="2 routes in the routing table")

    victim = Route.objects.get(pk=routes[0]["id"])
    with Load(f"{proxy}/e/{slug}/") as load:
        wait_for(lambda: len(load.results) > 50, timeout=10, what="load before the kill")
        kill_replica("local", victim.container_id)
        killed_at = time.monotonic()
        wait_for(lambda: str(victim.pk) not in in_routing_table(slug), timeout=5, interval=0.01, what="out of routing")
        removed_after = time.monotonic() - killed_at
        mark = len(load.results)
        wait_for(lambda: len(load.results) > mark + 50, timeout=10, what="load after the kill")
    print(f"killed replica out of the routing table after {removed_after * 1000:.0f} ms")
    assert removed_after < 0.6, f"the killed replica left the routing table only after {removed_after:.2f} s"
    assert Route.objects.filter(pk=victim.pk, status="healthy").count() == 0
    assert load.failed() == [], Counter(map(str, load.failed()))
    assert "reported failing by a proxy" in system.log("node-local")
    # And it is replaced as usual.
    wait_for(lambda: healthy_routes(api, sid, 2), timeout=30, what="a replacement replica")


# --- rolling update ------------------------------------------------------------------------------


def test_rolling_update_under_load_loses_no_request(
    live_factory: Callable[..., LiveSystem], api: Any, folder: Folder
) -> None:
    system = live_factory(nodes={"a": {}, "b": {}})
    proxy = system.start_proxy()
    created = service(api, folder, replicas=2, open_to_public=True)
    sid, slug = created["id"], created["slug"]
    old = {r["id"] for r in wait_for(lambda: healthy_routes(api, sid, 2), timeout=40, what="2 healthy routes")}
    wait_for(lambda: len(in_routing_table(slug)) == 2, timeout=5, what="2 routes in the routing table")

    with Load(f"{proxy}/e/{slug}/index.html", clients=3) as load:
        wait_for(lambda: len(load.results) > 30, timeout=10, what="load before the update")
        healthy_seen: list[int] = []
        response = api("owner").patch(f"/api/v1/services/{sid}/", {"environ": {"GENERATION": "2"}}, format="json")
        assert response.status_code == 200 and response.json()["spec_version"] == 2

        def replaced() -> bool:
            routes = list(Route.objects.filter(endpoint_id=sid))
            healthy_seen.append(sum(r.status == "healthy" for r in routes))
            return len(routes) == 2 and all(r.spec_version == 2 and r.status == "healthy" for r in routes)

        wait_for(replaced, timeout=60, interval=0.05, what="every replica replaced")
        mark = len(load.results)
        wait_for(lambda: len(load.results) > mark + 30, timeout=10, what="load after the update")
    new = {str(r.pk) for r in Route.objects.filter(endpoint_id=sid)}
    assert not new & old
    assert min(healthy_seen) >= 2, "fewer healthy replicas than asked for during the update"
    assert load.failed() == [], Counter(map(str, load.failed()))
    assert len(load.results) > 100
    assert Endpoint.objects.get(pk=sid).spec_version == 2
