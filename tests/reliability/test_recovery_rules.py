"""The recovery rules the fault tests rely on, checked in milliseconds (no processes).

* a provisioning route no node claimed gets its start re-sent (planning.START_RESEND_AFTER);
* the proxy keeps its last table when Redis comes back without the table (proxy/table.py);
* the fault hook is inert unless its variable names the step (serving/failpoints.py);
* a validation whose worker died is finished as failed once overdue (validation.finish_if_abandoned).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proxy.table import Table
from serving.core.planning import PROVISION_TIMEOUT, START_RESEND_AFTER, EndpointView, RouteView, plan
from tests.live import ROOT

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def provisioning(*, started: bool, idle: float, age: float | None = None) -> RouteView:
    return RouteView(
        id=f"r-{started}-{idle}",
        status="provisioning",
        spec_version=1,
        node_alive=True,
        created_at=NOW - timedelta(seconds=age if age is not None else idle),
        updated_at=NOW - timedelta(seconds=idle),
        started=started,
    )


def test_unclaimed_provisioning_route_gets_its_start_resent_once_per_period() -> None:
    endpoint = EndpointView(lifecycle="created", desired=1, spec_version=1, gave_up=False)
    waiting = START_RESEND_AFTER.total_seconds()
    fresh = provisioning(started=False, idle=waiting - 1)
    assert plan(endpoint, [fresh], NOW).is_empty()
    stale = provisioning(started=False, idle=waiting + 1)
    result = plan(endpoint, [stale], NOW)
    assert result.resend_start == [stale.id] and result.create == 0 and not result.fail
    # A route its node is starting (claimed) is left alone; one past the start timeout fails.
    assert plan(endpoint, [provisioning(started=True, idle=waiting + 1)], NOW).is_empty()
    overdue = provisioning(started=False, idle=waiting + 1, age=PROVISION_TIMEOUT.total_seconds() + 1)
    assert plan(endpoint, [overdue], NOW).fail == [overdue.id]


def _entry(slug: str) -> bytes:
    return json.dumps(
        {"id": slug, "slug": slug, "public": True, "routes": [{"id": "r", "host": "127.0.0.1", "port": 1}]}
    ).encode()


def test_table_is_kept_when_redis_holds_no_complete_table() -> None:
    table = Table("redis://unused", "t", 10.0)
    table.load({b"a": _entry("a"), b"b": _entry("b")})
    table.load({}, complete=False)  # Redis restarted empty: nothing removed
    assert set(table.endpoints) == {"a", "b"}
    table.load({b"c": _entry("c")}, complete=False)  # entries written since are applied
    assert set(table.endpoints) == {"a", "b", "c"}
    table.load({b"b": _entry("b")})  # the control plane wrote the whole table again
    assert set(table.endpoints) == {"b"}


def test_fault_hook_is_inert_unless_named() -> None:
    code = "from serving import failpoints; failpoints.crash_point('x.y'); print('survived')"
    env = {k: v for k, v in os.environ.items() if k != "MODELSERVE_CRASH_AT"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert (run.returncode, run.stdout.strip()) == (0, "survived")
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "MODELSERVE_CRASH_AT": "other,x.y"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 86 and "survived" not in run.stdout and "crashing at x.y" in run.stderr


@pytest.mark.django_db
def test_overdue_validation_is_finished_as_failed(settings: Any) -> None:
    from serving.bus import dryrun as validation
    from serving.bus import routing

    run_id = validation.new_id()
    validation.save_request(validation.ValidationRequest(id=run_id, user_id=1, node="local", config={}, timeout=5.0))
    validation.publish(run_id, "lifecycle", message="Validation queued.")
    started = routing.get_redis()
    started.set(f"{settings.REDIS_PREFIX}:validation:{run_id}:started", time.time())
    assert not validation.finish_if_abandoned(run_id)  # still within its timeout
    started.set(
        f"{settings.REDIS_PREFIX}:validation:{run_id}:started", time.time() - 5 - validation.ABANDONED_AFTER - 1
    )
    assert validation.finish_if_abandoned(run_id)
    last = validation.history(run_id)[-1]
    assert last["kind"] == "finished" and last["outcome"] == "failed"
    assert validation.finish_if_abandoned(run_id)  # finished stays finished, nothing published again
    assert validation.history(run_id)[-1]["seq"] == last["seq"]


@pytest.mark.django_db
def test_a_start_claimed_before_the_worker_began_is_redone_and_its_replica_stopped(
    personas: dict[str, Any], monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    from django.utils import timezone

    from serving.bus import dispatch
    from serving.models import Endpoint, Node, Route
    from serving.node import routes
    from serving.node.engines.base import LABEL_ROUTE

    settings.NODE_NAME = "local"
    local = Node.objects.create(name="local", heartbeat_at=timezone.now())
    endpoint = Endpoint.objects.create(name="svc-recover", owner=personas["owner"])
    worker_began = timezone.now()
    interrupted = Route.objects.create(endpoint=endpoint, node=local, status="provisioning", container_id="starting")
    Route.objects.filter(pk=interrupted.pk).update(updated_at=worker_began - timedelta(seconds=5))
    under_way = Route.objects.create(endpoint=endpoint, node=local, status="provisioning", container_id="starting")
    Route.objects.filter(pk=under_way.pk).update(updated_at=worker_began + timedelta(seconds=1))

    class Engine:
        stopped: list[str] = []

        def list(self, labels: dict[str, str] | None = None) -> list[Any]:
            replicas = [
                type("Info", (), {"replica_id": f"c-{r.pk}", "labels": {LABEL_ROUTE: str(r.pk)}})()
                for r in (interrupted, under_way)
            ]
            return [i for i in replicas if not labels or all(i.labels.get(k) == v for k, v in labels.items())]

        def stop(self, replica_id: str, grace: float = 0) -> None:
            self.stopped.append(replica_id)

    engine = Engine()
    sent: list[str] = []
    monkeypatch.setattr("serving.node.engine._engine", engine)
    monkeypatch.setattr(dispatch, "send_start", lambda route: sent.append(str(route.pk)))
    assert routes.recover_interrupted_starts(worker_began) == 1
    assert engine.stopped == [f"c-{interrupted.pk}"] and sent == [str(interrupted.pk)]
    assert Route.objects.get(pk=interrupted.pk).container_id == ""  # claimable again
    assert Route.objects.get(pk=under_way.pk).container_id == "starting"  # a start under way: untouched


@pytest.mark.django_db
def test_a_running_validation_replica_is_no_orphan_even_with_a_route_label(
    monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """The Docker engine labels every container with a route (a validation's gets its container
    name); the node's sync must leave a validation's replica to the validation sweep, which keeps it
    until the run is finished, instead of stopping it as an orphan seconds into the run."""
    from serving.bus import dryrun as validation
    from serving.bus import routing
    from serving.node import agent
    from serving.node.engines.base import LABEL_NODE, LABEL_ROUTE, LABEL_VALIDATION

    settings.NODE_NAME = "local"
    run_id = validation.new_id()
    validation.save_request(validation.ValidationRequest(id=run_id, user_id=1, node="local", config={}, timeout=60))
    routing.get_redis().set(f"{settings.REDIS_PREFIX}:validation:{run_id}:started", time.time())
    validation.publish(run_id, "lifecycle", message="Replica started; waiting for it to be healthy.")
    info = type(
        "Info",
        (),
        {
            "replica_id": "c-validation",
            "labels": {LABEL_NODE: "local", LABEL_ROUTE: "ms-c1d17a2e5536", LABEL_VALIDATION: run_id},
        },
    )()

    class Engine:
        stopped: list[str] = []

        def list(self, labels: dict[str, str] | None = None) -> list[Any]:
            return [info] if not labels or all(info.labels.get(k) == v for k, v in labels.items()) else []

        def stop(self, replica_id: str, grace: float = 0) -> None:
            self.stopped.append(replica_id)

    engine = Engine()
    monkeypatch.setattr("serving.node.engine._engine", engine)
    assert agent.sync()["orphans"] == 0 and engine.stopped == []  # the run is under way: kept
    validation.publish(run_id, "finished", outcome="healthy", message="ok")
    assert agent.sync()["orphans"] == 1 and engine.stopped == ["c-validation"]  # over: removed once
