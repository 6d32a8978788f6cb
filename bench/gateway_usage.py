"""In-process micro-benchmark of what gateway usage costs the proxy per request (issue 17):
keeping an answer's last 4 KiB (per piece received) and counting it at its end (usage parse, cell).

    PYTHONPATH=. python -m bench.gateway_usage   (as a module: bench/proxy.py would hide the proxy package)
"""

from __future__ import annotations

import json
import timeit

from proxy.usage import TAIL, Usage


def keep(tail: bytearray, data: bytes) -> None:  # the same as proxy/upstream.py's
    if len(data) >= TAIL:
        tail[:] = data[-TAIL:]
    else:
        tail += data
        if len(tail) > TAIL:
            del tail[: len(tail) - TAIL]


def main() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}
    body = json.dumps({"id": "x", "choices": [{"message": {"content": "word " * 200}}], "usage": usage}).encode()
    chunk = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"delta":{"content":"word "}}]}\n\n'
    n = 200_000
    for label, data in (("small piece (90 B, a stream's chunk)", chunk), ("64 KiB piece", b"x" * 65536)):
        tail = bytearray(b"y" * TAIL)
        t = timeit.timeit(lambda data=data, tail=tail: keep(tail, data), number=n) / n
        print(f"keep the tail, {label}: {t * 1e9:.0f} ns per piece")
    counter = Usage()
    tail = bytearray(body[-TAIL:])
    t = timeit.timeit(lambda: counter.record("lookup", "endpoint-id", 200, 0.012, tail), number=n) / n
    print(f"count a finished request (parse the 4 KiB tail's usage, add to its cell): {t * 1e6:.2f} us")
    t = timeit.timeit(lambda: counter.record("lookup", "endpoint-id", 200, 0.012, None), number=n) / n
    print(f"count a finished request without a tail: {t * 1e6:.2f} us")


if __name__ == "__main__":
    main()
