"""Revisions, pure (serving.core.revisions): diffs, shares, the checks of a rollout and a split."""

from __future__ import annotations

import pytest

from serving.actions.validators import REPLACING_FIELDS
from serving.core import revisions as r


def test_config_fields_are_the_replacing_fields() -> None:
    assert set(r.CONFIG_FIELDS) == set(REPLACING_FIELDS)


def test_diff_line_names_what_changed_and_hides_secrets() -> None:
    old = {"image": "a:1", "environ": {"MODE": "x", "API_KEY": "s1"}}
    new = {"image": "a:2", "environ": {"MODE": "y", "API_KEY": "s2"}}
    line = r.diff_line(old, new)
    assert line == "image: 'a:1' -> 'a:2'; environ: API_KEY, MODE changed"
    assert "s2" not in line
    assert r.diff_line(None, new) == "First revision."
    assert r.diff(old, new)[0] == {"field": "image", "old": "a:1", "new": "a:2"}


@pytest.mark.parametrize(("desired", "share", "want"), [(2, 10, 1), (2, 90, 2), (10, 25, 3), (4, 0, 0), (0, 50, 0)])
def test_replicas_for_share(desired: int, share: int, want: int) -> None:
    assert r.replicas_for_share(desired, share) == want


def test_check_traffic() -> None:
    assert r.check_traffic({"1": 90, "2": 10}, {1, 2}) == {1: 90, 2: 10}
    assert r.check_traffic({"1": 100, "2": 0}, {1, 2}) == {1: 100}
    with pytest.raises(r.RolloutError, match="add up to 95; make them add up to 100"):
        r.check_traffic({"1": 90, "2": 5}, {1, 2})
    with pytest.raises(r.RolloutError, match="no revision 7; its revisions are 1, 2"):
        r.check_traffic({"7": 100}, {1, 2})
    with pytest.raises(r.RolloutError, match="whole percent"):
        r.check_traffic({"1": 90.5, "2": 9.5}, {1, 2})


def test_check_rollout() -> None:
    assert r.check_rollout(None) == ("rolling", 100)
    assert r.check_rollout({"strategy": "canary", "percent": 10}) == ("canary", 10)
    assert r.check_rollout({"strategy": "blue_green"}) == ("blue_green", 0)
    with pytest.raises(r.RolloutError, match="percent"):
        r.check_rollout({"strategy": "canary"})
    with pytest.raises(r.RolloutError, match="Unknown rollout strategy 'big_bang'"):
        r.check_rollout({"strategy": "big_bang"})


def test_error_rate_verdict() -> None:
    assert r.error_rate_verdict((10, 5), (100, 0), 0.05, 20) is None  # too few requests yet
    assert r.error_rate_verdict((100, 4), (100, 0), 0.05, 20) is None
    verdict = r.error_rate_verdict((100, 30), (900, 9), 0.05, 20)
    assert verdict is not None and "30.0% (30 of 100 requests)" in verdict and "1.0% (9 of 900)" in verdict
