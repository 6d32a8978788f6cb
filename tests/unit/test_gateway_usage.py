"""The pure pieces of gateway usage: reading an answer's usage (proxy/usage.py), the proxy's cells,
the Redis fields' parsing and the quantiles (serving/core/usage.py). The whole path is tested with
the real proxy in tests/integration/test_gateway_usage.py."""

from __future__ import annotations

from proxy import metrics
from proxy.usage import LABELS, Usage, usage_of
from serving.core import usage as figures


def test_usage_of_reads_bodies_streams_and_nested_details() -> None:
    body = (
        b'{"choices":[{"message":{"content":"usage"}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    )
    assert usage_of(body) == (3, 4)
    nested = b'"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens":1}}'
    assert usage_of(nested) == (9, 1)
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5}}\n\ndata: [DONE]\n\n'
    )
    assert usage_of(stream) == (2, 5)
    assert usage_of(b'{"usage":{"input_tokens":1,"output_tokens":2}}') == (1, 2)  # /v1/responses
    assert usage_of(b'{"data":[],"usage":{"prompt_tokens":6,"total_tokens":6}}') == (6, 0)  # embeddings
    assert usage_of(b'data: {"usage":null}\n\ndata: [DONE]') == (0, 0)
    assert usage_of(b'{"usage":{"total_tokens":') == (0, 0)  # cut: nothing counted
    assert usage_of(b"") == (0, 0)


def test_cells_count_per_key_service_and_day_and_errors_carry_no_tokens() -> None:
    usage = Usage()
    usage.record("k1", "s1", 200, 0.03, bytearray(b'"usage":{"prompt_tokens":3,"completion_tokens":4}'))
    usage.record("k1", "s1", 200, 0.2, bytearray(b'"usage":{"prompt_tokens":1,"completion_tokens":1}'))
    usage.record("k1", "s1", 500, 0.001, bytearray(b'"usage":{"prompt_tokens":99,"completion_tokens":99}'))
    usage.record("k1", "s2", 200, 1.0, None)
    cells = usage.take()
    assert not usage.cells and len(cells) == 2
    (key, service, day), cell = next(iter(cells.items()))
    assert (key, service, len(day)) == ("k1", "s1", 10)
    fields = cell.fields("s1")
    assert fields["s1:requests"] == 3 and fields["s1:errors"] == 1
    assert (fields["s1:prompt"], fields["s1:completion"]) == (4, 5)
    assert fields["s1:le:0.05"] == 1 and fields["s1:le:0.25"] == 1 and fields["s1:le:0.001"] == 1
    usage.give_back(cells)
    usage.give_back(cells)
    assert usage.cells[(key, service, day)].requests == 6  # a failed push counts again with the next


def test_the_fold_parses_the_proxys_fields_and_reads_quantiles() -> None:
    assert figures.BOUNDS == metrics.BOUNDS and figures.LABELS == LABELS
    parsed = figures.parse_fields(
        {"s1:requests": 4, "s1:prompt": 10, "s1:le:0.1": 2, "s1:le:0.25": 2, "s2:errors": 1, "junk": 5, "s1:le:x": 1}
    )
    assert parsed["s1"].requests == 4 and parsed["s1"].prompt == 10 and parsed["s2"].errors == 1
    assert parsed["s1"].latency == {"0.1": 2, "0.25": 2}
    assert figures.quantile(parsed["s1"].latency, 0.5) == 0.1
    assert 0.1 < figures.quantile(parsed["s1"].latency, 0.95) <= 0.25
    assert figures.quantile({}, 0.5) is None
    assert figures.quantile({"inf": 3}, 0.5) == 300.0
    assert figures.merge_latency({"0.1": 1}, {"0.1": 2, "inf": 1}) == {"0.1": 3, "inf": 1}
