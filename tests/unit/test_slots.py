from __future__ import annotations

import pytest

from serving.core import slots


def test_normalize_units() -> None:
    assert slots.normalize({"cpu": "2", "mem": "8g", "cuda.shares": "0.5"}) == {
        "cpu": 2.0,
        "mem": float(8 * 1024**3),
        "cuda.shares": 0.5,
    }


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"cpu": "many"}, "cpu"),
        ({"cpu": -1}, "cpu"),
        ({"mem": "lots"}, "mem"),
        ({"gpu": 1}, "gpu"),
        ({"cpu": True}, "cpu"),
        ({"cpu": float("nan")}, "cpu"),
    ],
)
def test_normalize_errors_name_the_key(raw: dict[str, object], field: str) -> None:
    with pytest.raises(slots.SlotError, match=field):
        slots.normalize(raw)


def test_fits_and_shortfall() -> None:
    free = {"cpu": 2.0, "mem": 4.0}
    assert slots.fits({"cpu": 2.0, "mem": 4.0}, free)
    assert not slots.fits({"cpu": 2.5}, free)
    assert not slots.fits({"cuda.shares": 0.5}, free)
    assert slots.shortfall({"cpu": 3.0, "mem": 1.0}, free) == {"cpu": 1.0}


def test_describe() -> None:
    assert (
        slots.describe({"mem": float(1024**3), "cpu": 1.0, "cuda.shares": 0.5}) == "cpu 1, mem 1.0 GiB, cuda.shares 0.5"
    )
