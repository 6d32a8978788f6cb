from __future__ import annotations

import pytest

from serving.core import tokens

KEY = "k" * 32


def test_mint_parse_verify() -> None:
    minted = tokens.mint(tokens.ENDPOINT_TOKEN_KIND, KEY)
    parsed = tokens.parse(minted.token)
    assert parsed is not None
    assert parsed.kind == "mst"
    assert parsed.lookup == minted.lookup
    assert tokens.verify(minted.token, minted.digest, KEY)
    assert not tokens.verify(minted.token, minted.digest, "other-key")
    assert minted.token not in minted.digest


def test_tokens_are_unique_and_high_entropy() -> None:
    minted = {tokens.mint("mst", KEY).token for _ in range(200)}
    assert len(minted) == 200
    assert all(len(t) == 3 + 1 + 10 + 1 + 43 for t in minted)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        "mst_",
        "mst_abc_def",
        "mst_" + "a" * 10 + "_" + "b" * 42,
        "m" * 500,
        "mst_ABCDEFGHIJ_" + "a" * 43,
        "mst_abcdefghij_" + "a" * 42 + "\n",
    ],
)
def test_parse_refuses_garbage(bad: str) -> None:
    assert tokens.parse(bad) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("BackendAI abc", "abc"),
        ("Bearer abc", "abc"),
        ("bearer   abc", "abc"),
        ("Token abc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer a b", None),
        (None, None),
        ("", None),
        ("Bearer " + "a" * 1000, None),
    ],
)
def test_from_authorization(header: str | None, expected: str | None) -> None:
    assert tokens.from_authorization(header) == expected
