"""serving.bus.dispatch sends work by task name (nothing imports serving.tasks): the names are the
tasks', and under CELERY_TASK_ALWAYS_EAGER the work runs in place, as apply_async did."""

from __future__ import annotations

from typing import Any

import pytest
from celery import current_app

from serving.bus import dispatch


def test_every_name_dispatch_sends_is_a_task() -> None:
    import serving.tasks  # noqa: F401  (as a worker's autodiscovery does)

    names = [
        getattr(dispatch, n)
        for n in dir(dispatch)
        if n.isupper() and n.startswith(("RECONCILE", "START", "STOP", "VALIDATE"))
    ]
    assert len(names) == 6
    assert all(name in current_app.tasks for name in names), names


def test_under_always_eager_the_work_runs_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.control import lifecycle

    ran: list[Any] = []
    monkeypatch.setattr(lifecycle, "reconcile", ran.append)
    # The app reads its settings with Django's CELERY_ prefix (config/celery.py).
    monkeypatch.setitem(current_app.conf, "CELERY_TASK_ALWAYS_EAGER", True)
    assert current_app.conf.task_always_eager
    dispatch.enqueue_reconcile("some-endpoint")
    assert ran == ["some-endpoint"]
