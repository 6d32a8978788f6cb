"""The pure reconciliation planner (S4.3-S4.6)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from serving.core.planning import (
    PROVISION_TIMEOUT,
    STOP_GIVE_UP_AFTER,
    STOP_RESEND_AFTER,
    STRANDED_GRACE,
    EndpointView,
    RouteView,
    plan,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_counter = iter(range(10_000))


def route(status: str, version: int = 1, *, alive: bool = True, age: float = 10.0, idle: float = 1.0) -> RouteView:
    n = next(_counter)
    return RouteView(
        id=f"r{n}",
        status=status,
        spec_version=version,
        node_alive=alive,
        created_at=NOW - timedelta(seconds=age),
        updated_at=NOW - timedelta(seconds=idle),
    )


def ep(desired: int, version: int = 1, *, lifecycle: str = "created", gave_up: bool = False) -> EndpointView:
    return EndpointView(lifecycle=lifecycle, desired=desired, spec_version=version, gave_up=gave_up)


def test_creates_missing_replicas() -> None:
    assert plan(ep(3), [route("healthy")], NOW).create == 2


def test_nothing_to_do_when_matching() -> None:
    assert plan(ep(2), [route("healthy"), route("degraded")], NOW).is_empty()


def test_scale_in_drains_unhealthy_first_then_not_ready_then_newest() -> None:
    old_healthy = route("healthy", age=100)
    new_healthy = route("healthy", age=5)
    starting = route("provisioning")
    result = plan(ep(1, gave_up=True), [old_healthy, new_healthy, starting], NOW)
    assert result.drain == [starting.id, new_healthy.id]


def test_unhealthy_replica_is_replaced() -> None:
    bad = route("unhealthy")
    result = plan(ep(2), [route("healthy"), bad], NOW)
    assert result.drain == [bad.id]
    assert result.create == 1


def test_gave_up_keeps_unhealthy_and_creates_nothing() -> None:
    bad = route("unhealthy")
    result = plan(ep(2, gave_up=True), [bad, route("failed_to_start")], NOW)
    assert result.is_empty()


def test_failed_routes_do_not_count_and_are_replaced_until_give_up() -> None:
    result = plan(ep(1), [route("failed_to_start")], NOW)
    assert result.create == 1
    assert plan(ep(1, gave_up=True), [route("failed_to_start")], NOW).create == 0


def test_routes_on_lost_nodes_are_forgotten_and_replaced() -> None:
    lost = route("healthy", alive=False)
    result = plan(ep(1), [lost], NOW)
    assert result.forget == [lost.id]
    assert result.create == 1


def test_healthy_replica_on_a_lost_node_serves_until_its_replacement_is_healthy() -> None:
    """A lost node is a silent *worker*; its replicas most likely still serve (they outlive it)."""
    lost_at = NOW - timedelta(seconds=5)
    stranded = replace(route("healthy", alive=False), lost_since=lost_at)
    first = plan(ep(1), [stranded], NOW)
    assert (first.forget, first.create) == ([], 1)  # kept in traffic, a replacement is made
    starting = route("degraded")
    assert plan(ep(1), [stranded, starting], NOW).is_empty()
    ready = route("healthy")
    assert plan(ep(1), [stranded, ready], NOW).forget == [stranded.id]
    # Not forever: after the grace it goes even with no healthy replacement.
    late = NOW + STRANDED_GRACE
    assert plan(ep(1), [stranded, starting], late).forget == [stranded.id]


def test_only_healthy_current_replicas_are_kept_on_a_lost_node() -> None:
    lost_at = NOW - timedelta(seconds=5)
    sick = replace(route("unhealthy", alive=False), lost_since=lost_at)
    old = replace(route("healthy", 1, alive=False), lost_since=lost_at)
    assert plan(ep(1), [sick], NOW).forget == [sick.id]
    assert plan(ep(1, version=2), [old], NOW).forget == [old.id]
    assert plan(ep(1, lifecycle="destroying"), [replace(old, spec_version=1)], NOW).destroyed


def test_terminating_route_stop_is_resent_then_forgotten() -> None:
    slow = route("terminating", idle=STOP_RESEND_AFTER.total_seconds() + 1)
    stuck = route("terminating", idle=STOP_GIVE_UP_AFTER.total_seconds() + 1)
    result = plan(ep(0), [slow, stuck], NOW)
    assert result.resend_stop == [slow.id]
    assert result.forget == [stuck.id]


def test_provisioning_that_never_starts_fails() -> None:
    stale = route("provisioning", age=PROVISION_TIMEOUT.total_seconds() + 1)
    result = plan(ep(1), [stale], NOW)
    assert result.fail == [stale.id]
    assert result.create == 1


def test_terminate_drains_all_then_destroys() -> None:
    live = [route("healthy"), route("provisioning"), route("unhealthy")]
    result = plan(ep(2, lifecycle="destroying"), [*live, route("terminating")], NOW)
    assert sorted(result.drain) == sorted(r.id for r in live)
    assert not result.destroyed
    failed = route("failed_to_start")
    done = plan(ep(2, lifecycle="destroying"), [failed], NOW)
    assert done.destroyed
    assert done.forget == [failed.id]


def test_terminate_with_lost_node_still_ends_destroyed() -> None:
    result = plan(ep(1, lifecycle="destroying"), [route("healthy", alive=False)], NOW)
    assert result.destroyed


def test_rolling_update_one_at_a_time_never_below_desired_healthy() -> None:
    """Replace 2 old replicas: create 1 new, drain 1 old once it is healthy, and so on."""
    old = [route("healthy", 1, age=100), route("healthy", 1, age=90)]
    step1 = plan(ep(2, version=2), old, NOW)
    assert (step1.create, step1.drain) == (1, [])
    new1 = route("degraded", 2)
    step2 = plan(ep(2, version=2), [*old, new1], NOW)
    assert (step2.create, step2.drain) == (0, [])
    new1 = route("healthy", 2)
    step3 = plan(ep(2, version=2), [*old, new1], NOW)
    assert step3.drain == [old[0].id]
    assert step3.create == 1
    new2 = route("healthy", 2)
    step4 = plan(ep(2, version=2), [old[1], new1, new2], NOW)
    assert step4.drain == [old[1].id]
    assert step4.create == 0


def test_rolling_update_drains_old_replicas_that_do_not_serve_at_once() -> None:
    broken_old = route("unhealthy", 1)
    result = plan(ep(1, version=2), [broken_old], NOW)
    assert result.drain == [broken_old.id]
    assert result.create == 1


# --- cluster mode (serving.core.cluster) --------------------------------------------------------------


def test_cluster_route_whose_subs_never_all_run_is_replaced_after_the_provision_timeout() -> None:
    waiting = replace(route("degraded"), members_waiting_since=NOW - PROVISION_TIMEOUT - timedelta(seconds=1))
    result = plan(ep(1), [waiting], NOW)
    assert result.drain == [waiting.id] and result.create == 1


def test_cluster_route_whose_subs_are_still_starting_is_left_alone() -> None:
    starting = replace(route("degraded"), members_waiting_since=NOW - timedelta(seconds=5))
    assert plan(ep(1), [starting], NOW).is_empty()


def test_cluster_route_with_a_member_on_a_lost_node_is_treated_as_lost() -> None:
    # _views folds the members' nodes into node_alive: a healthy one is stranded (serves during the
    # grace while a replacement is created), anything else is forgotten.
    healthy = replace(route("healthy", alive=False), lost_since=NOW - timedelta(seconds=1))
    degraded = replace(route("degraded", alive=False), lost_since=NOW - timedelta(seconds=1))
    result = plan(ep(2), [healthy, degraded], NOW)
    assert result.forget == [degraded.id]
    assert result.create == 2


# --- revisions: split mode (issue 16) ---------------------------------------------------------------


def split(
    desired: int, version: int, traffic: dict[int, int], *, staged: int = 0, gave_up: bool = False
) -> EndpointView:
    return EndpointView(
        lifecycle="created",
        desired=desired,
        spec_version=version,
        gave_up=gave_up,
        traffic=tuple(sorted(traffic.items())),
        staged=staged,
    )


def test_canary_starts_beside_the_stable_revision_with_enough_replicas_for_its_share() -> None:
    old = [route("healthy", 1), route("healthy", 1)]
    result = plan(split(2, 2, {1: 90, 2: 10}), old, NOW)
    assert (result.create, result.create_for, result.drain) == (1, {}, [])
    canary = route("healthy", 2)
    assert plan(split(2, 2, {1: 90, 2: 10}), [*old, canary], NOW).is_empty()


def test_a_revision_without_share_is_drained_only_once_the_others_have_theirs_healthy() -> None:
    old = [route("healthy", 1), route("healthy", 1)]
    starting = route("degraded", 2)
    result = plan(split(2, 2, {2: 100}), [*old, starting, route("healthy", 2)], NOW)
    assert result.drain == [] and result.create == 0
    done = plan(split(2, 2, {2: 100}), [*old, route("healthy", 2), route("healthy", 2)], NOW)
    assert sorted(done.drain) == sorted(r.id for r in old)


def test_rollback_restarts_the_stable_revision_when_its_replicas_are_gone() -> None:
    result = plan(split(2, 1, {1: 100}), [route("healthy", 2), route("failed_to_start", 3)], NOW)
    assert result.create == 2
    assert result.forget  # the failed rows of a revision that left go with it


def test_replicas_of_another_revision_are_created_for_it() -> None:
    result = plan(split(2, 2, {1: 50, 2: 50}), [route("healthy", 2)], NOW)
    assert result.create_for == {1: 1} and result.create == 0


def test_blue_green_stages_every_replica_then_switches() -> None:
    old = [route("healthy", 1), route("healthy", 1)]
    first = plan(split(2, 2, {1: 100}, staged=2), old, NOW)
    assert (first.create, first.drain, first.switch_to) == (2, [], 0)
    half = plan(split(2, 2, {1: 100}, staged=2), [*old, route("healthy", 2), route("degraded", 2)], NOW)
    assert half.switch_to == 0 and half.drain == []
    ready = plan(split(2, 2, {1: 100}, staged=2), [*old, route("healthy", 2), route("healthy", 2)], NOW)
    assert ready.switch_to == 2 and ready.drain == []


def test_a_canary_that_fails_to_start_is_aborted_with_the_numbers() -> None:
    old = [route("healthy", 1), route("healthy", 1)]
    failed = [route("failed_to_start", 2), route("failed_to_start", 2)]
    result = plan(split(2, 2, {1: 90, 2: 10}), [*old, failed[0]], NOW)
    assert not result.abort and result.create == 1  # one failure: try again
    result = plan(split(2, 2, {1: 90, 2: 10}), [*old, *failed], NOW)
    assert result.abort == "2 of its replicas did not become healthy (2 failed to start)"


def test_no_traffic_split_is_todays_rolling_plan() -> None:
    """The split fields' defaults leave every rolling step as it was."""
    old = [route("healthy", 1, age=100), route("healthy", 1, age=90)]
    assert plan(ep(2, version=2), old, NOW) == plan(split(2, 2, {}), old, NOW)
