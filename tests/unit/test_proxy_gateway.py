"""Finding a gateway request's model in its body (proxy/gateway.py), whole or still arriving."""

from __future__ import annotations

import json

import pytest

from proxy.gateway import ABSENT, INVALID, MORE, find_model, model_of_body

CHAT = json.dumps({"messages": [{"role": "user", "content": '{"model": "not this"}'}], "model": "m-1"}).encode()


@pytest.mark.parametrize("complete", [True, False])
def test_the_top_level_model_of_a_whole_body(complete: bool) -> None:
    assert model_of_body(CHAT, complete) == "m-1"
    assert model_of_body(b' {"model": "x"} \r\n', complete) == "x"
    assert model_of_body('{"model":"caf\u00e9"}'.encode(), complete) == "caf\u00e9"
    assert model_of_body(b'{"model":"\\u00e9"}', complete) == "\u00e9"
    assert model_of_body(b'\xef\xbb\xbf{"model":"bom"}', complete) == "bom"
    # a model named only inside a nested value is not the request's
    assert model_of_body(b'{"tools": [{"model": "nested"}], "n": 1}', complete) == (ABSENT,)
    assert model_of_body(b'{"model": 3}', complete) == (INVALID,)
    assert model_of_body(b'{"model": ""}', complete) == (INVALID,)
    assert model_of_body(b"[1, 2]", complete) == (INVALID,)


def test_a_body_still_arriving() -> None:
    # Cut anywhere before its model's end, a body needs more; the C parser's fast path must not
    # mistake a prefix that happens to end with "}" for the whole body.
    for cut in range(1, CHAT.index(b'"m-1"') + 5):
        assert model_of_body(CHAT[:cut], False) == (MORE,), CHAT[:cut]
    assert model_of_body(b'{"model": "early", "messages": [{"role": "user"}', False) == "early"
    assert model_of_body(b'{"model": "x"} trailing', False) == "x"  # the replica refuses the rest
    assert model_of_body(b'{"model": "x"} trailing', True) == (INVALID,)
    assert model_of_body(b"", True) == (INVALID,)


def test_find_model_matches_the_c_parser() -> None:
    assert find_model(CHAT) == "m-1"
    assert find_model(b'{"a": {"model": "no"}, "b": [1, "x", null], "model": "yes"}') == "yes"
    assert find_model(b'{"a": true}') == (ABSENT,)
    assert find_model(b"nope") == (INVALID,)
