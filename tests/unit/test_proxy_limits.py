"""The pure pieces of the gateway keys' limits (proxy/limits.py); the lease scheme itself is tested
with real proxies and Redis in tests/integration/test_gateway_limits.py."""

from __future__ import annotations

from proxy.limits import Budget, reset_text, tokens_used


def test_tokens_used_reads_the_last_usage_of_a_json_body_or_a_stream() -> None:
    body = (
        b'{"id":"x","choices":[{"message":{"content":"usage"}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    )
    assert tokens_used(body) == 7
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5}}\n\ndata: [DONE]\n\n'
    )
    assert tokens_used(stream) == 7
    assert tokens_used(b'{"usage":{"input_tokens":1,"output_tokens":2}}') == 3  # /v1/responses
    assert tokens_used(b'data: {"usage":null}') == 0
    assert tokens_used(b'{"usage":{"total_tokens":') == 0  # cut: nothing charged


def test_reset_text_is_openais_duration() -> None:
    assert reset_text(0.25) == "250ms"
    assert reset_text(1.2) == "2s"
    assert reset_text(360) == "6m0s"


def test_a_budgets_slice_and_credit() -> None:
    budget = Budget("r", 600)
    assert (budget.slice, budget.allowance) == (12, 3)  # 3 on credit: 0.5% of 600 per proxy
    budget.roll(5)
    budget.lease = 2
    budget.use(3)
    assert (budget.lease, budget.debt, budget.local) == (0, 1, 3)
    budget.roll(6)  # a new minute starts clean
    assert (budget.lease, budget.debt, budget.local) == (0, 0, 0)
