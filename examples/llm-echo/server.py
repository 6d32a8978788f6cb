"""llm-echo: an OpenAI-compatible LLM server written with the Python standard library only.

It "generates" by echoing the last user message back word by word, so a whole serving path
(proxy, tokens, streaming, health checks, autoscaling on its request gauge) can be tried without a
GPU or model weights. It runs on any python3 >= 3.8 with nothing but the standard library.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(both also with "stream": true, as server-sent events), GET /health, GET /metrics (Prometheus text).

Environment:
  MODEL_NAME / BACKEND_MODEL_NAME   the model id reported and echoed (default "llm-echo")
  ECHO_TOKEN_DELAY                  seconds per generated word (default 0.02)
  ECHO_STARTUP_DELAY                seconds after start during which /health answers 503 (default 0)
  ECHO_FAIL_HEALTH_FILE             while this path exists, /health answers 500
  ECHO_ACCESS_LOG=1                 log every request to stderr (quiet by default)
  ECHO_DRAIN_SECONDS                on SIGTERM, grace period for requests in flight (default 5)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        sys.exit(f"llm-echo: {name} must be a number of seconds, got {raw!r}")
    if value < 0:
        sys.exit(f"llm-echo: {name} must not be negative, got {raw!r}")
    return value


MODEL = os.environ.get("MODEL_NAME") or os.environ.get("BACKEND_MODEL_NAME") or "llm-echo"
TOKEN_DELAY = _env_float("ECHO_TOKEN_DELAY", 0.02)
STARTUP_DELAY = _env_float("ECHO_STARTUP_DELAY", 0.0)
DRAIN_SECONDS = _env_float("ECHO_DRAIN_SECONDS", 5.0)
FAIL_FILE = os.environ.get("ECHO_FAIL_HEALTH_FILE", "")
ACCESS_LOG = os.environ.get("ECHO_ACCESS_LOG", "") not in ("", "0", "false", "no")
MAX_BODY = 16 * 1024 * 1024
STARTED = time.monotonic()
CREATED = int(time.time())

# A word with the whitespace after it; leading whitespace is a token of its own, so that
# "".join(tokens) == text exactly.
_TOKEN = re.compile(r"^\s+|\S+\s*")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

_STATUS_LINES = {
    code: f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n".encode()
    for code in (200, 400, 404, 405, 413, 500, 503)
}


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {int(status)} {phrase}\r\n".encode()


class Stats:
    """Request counters behind /metrics; one lock, held for a few instructions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.total = 0
        self.tokens = 0
        self.idle = threading.Condition(self.lock)

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.total += 1

    def end(self, tokens: int) -> None:
        with self.lock:
            self.in_flight -= 1
            self.tokens += tokens
            if not self.in_flight:
                self.idle.notify_all()

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.in_flight, self.total, self.tokens

    def wait_idle(self, timeout: float) -> bool:
        with self.lock:
            return self.idle.wait_for(lambda: not self.in_flight, timeout)


STATS = Stats()


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def count_words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(400, f"'{key}' must be a positive integer, got {value!r}.", key)
        return value
    return None


def parse_completion(chat: bool, body: Any) -> tuple[str, int, list[str], bool]:
    """(prompt text, prompt word count, reply tokens, truncated) of a completion request."""
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(
                400, "'messages' is required and must be a non-empty list.", "messages"
            )
        if not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "Every item of 'messages' must be an object.", "messages")
        prompt_words = sum(count_words(_text_of(m.get("content"))) for m in messages)
        prompt = next(
            (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
    else:
        if "prompt" not in body:
            raise RequestError(400, "'prompt' is required.", "prompt")
        raw = body["prompt"]
        if isinstance(raw, list):
            prompt = " ".join(str(p) for p in raw)
        elif isinstance(raw, str):
            prompt = raw
        else:
            raise RequestError(400, "'prompt' must be a string or a list of strings.", "prompt")
        prompt_words = count_words(prompt)
    tokens = tokenize(prompt)
    limit = _max_tokens(body)
    truncated = limit is not None and len(tokens) > limit
    if truncated:
        tokens = tokens[:limit]
    return prompt, prompt_words, tokens, truncated


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llm-echo/1.0"
    # Every streamed chunk must leave at once: no Nagle delay between small writes.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        if ACCESS_LOG:
            super().log_message(format, *args)

    # --- responses: headers and body in one write, so a keep-alive client never waits ------------

    def _respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = [
            _STATUS_LINES.get(status) or _status_line(status),
            b"Server: llm-echo/1.0\r\nContent-Type: ",
            content_type.encode(),
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        if self.close_connection:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if self.command != "HEAD":
            head.append(body)
        self.wfile.write(b"".join(head))
        if ACCESS_LOG:
            self.log_request(status, len(body))

    def _json(self, status: int, payload: Any) -> None:
        self._respond(status, _dumps(payload).encode())

    def _error(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(status)
        self._json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, unsupported method) in OpenAI's shape too.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._error(code, message or "The request could not be handled.")

    def _read_body(self) -> bytes:
        """The whole request body (Content-Length or chunked), so the connection stays in step."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts, size = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    length = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    raise RequestError(400, "The chunked request body is malformed.") from None
                if length == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                size += length
                if size > MAX_BODY:
                    self.close_connection = True
                    raise RequestError(413, f"The request body is larger than {MAX_BODY} bytes.")
                parts.append(self.rfile.read(length))
                self.rfile.readline(8)
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"Content-Length {raw!r} is not a number of bytes.") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise RequestError(413, f"The request body is larger than {MAX_BODY} bytes.")
        return self.rfile.read(length) if length else b""

    # --- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._health()
        elif path == "/metrics":
            self._metrics()
        elif path in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name == MODEL:
                self._json(200, self._model_card())
            else:
                self._error(
                    404, f"The model {name!r} does not exist; this server serves {MODEL!r}."
                )
        elif path in ("/v1/chat/completions", "/v1/completions"):
            self._error(405, f"Use POST for {path}.")
        else:
            self._error(404, f"There is no route {path}.")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
            if path not in ("/v1/chat/completions", "/v1/completions"):
                if path in ("/health", "/metrics", "/v1/models"):
                    raise RequestError(405, f"Use GET for {path}.")
                raise RequestError(404, f"There is no route {path}.")
            try:
                body = json.loads(raw) if raw.strip() else None
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"The request body is not valid JSON: {exc}.") from None
            if body is None:
                raise RequestError(400, "The request needs a JSON body.")
            chat = path == "/v1/chat/completions"
            _prompt, prompt_words, tokens, truncated = parse_completion(chat, body)
        except RequestError as exc:
            self._error(exc.status, exc.message, param=exc.param)
            return
        model = (
            body.get("model") if isinstance(body.get("model"), str) and body.get("model") else MODEL
        )
        usage = {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_words + len(tokens),
        }
        finish = "length" if truncated else "stop"
        STATS.begin()
        sent = 0
        try:
            if body.get("stream"):
                options = body.get("stream_options")
                with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                sent = self._stream(chat, model, tokens, finish, usage if with_usage else None)
            else:
                if TOKEN_DELAY and tokens:
                    time.sleep(TOKEN_DELAY * len(tokens))
                self._json(200, self._completion(chat, model, "".join(tokens), finish, usage))
                sent = len(tokens)
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            STATS.end(sent)

    # --- bodies ----------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": MODEL,
            "object": "model",
            "created": CREATED,
            "owned_by": "llm-echo",
            "root": MODEL,
        }

    def _health(self) -> None:
        if time.monotonic() - STARTED < STARTUP_DELAY:
            self._json(503, {"status": "loading"})
        elif FAIL_FILE and os.path.exists(FAIL_FILE):
            self._json(500, {"status": "failing", "reason": f"{FAIL_FILE} exists"})
        else:
            self._json(200, {"status": "ok"})

    def _metrics(self) -> None:
        in_flight, total, tokens = STATS.snapshot()
        text = (
            "# HELP llm_echo_requests_waiting Completion requests in flight (being processed).\n"
            "# TYPE llm_echo_requests_waiting gauge\n"
            f"llm_echo_requests_waiting {in_flight}\n"
            "# HELP llm_echo_requests_running Completion requests in flight (being processed).\n"
            "# TYPE llm_echo_requests_running gauge\n"
            f"llm_echo_requests_running {in_flight}\n"
            "# HELP llm_echo_requests_total Completion requests received since start.\n"
            "# TYPE llm_echo_requests_total counter\n"
            f"llm_echo_requests_total {total}\n"
            "# HELP llm_echo_generated_tokens_total Tokens generated since start.\n"
            "# TYPE llm_echo_generated_tokens_total counter\n"
            f"llm_echo_generated_tokens_total {tokens}\n"
        )
        self._respond(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    @staticmethod
    def _completion(
        chat: bool, model: str, text: str, finish: str, usage: dict[str, int]
    ) -> dict[str, Any]:
        if chat:
            return {
                "id": "chatcmpl-" + uuid.uuid4().hex,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        return {
            "id": "cmpl-" + uuid.uuid4().hex,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }

    def _stream(
        self, chat: bool, model: str, tokens: list[str], finish: str, usage: dict[str, int] | None
    ) -> int:
        """Server-sent events, one flushed chunk per token; returns how many tokens were sent."""
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True  # an HTTP/1.0 client reads the stream until we close
        head = [
            b"HTTP/1.1 200 OK\r\nServer: llm-echo/1.0\r\nContent-Type: text/event-stream\r\n",
            b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n",
            b"Transfer-Encoding: chunked\r\n" if chunked else b"Connection: close\r\n",
        ]
        if chunked and self.close_connection:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        write = self.wfile.write

        def event(data: bytes) -> None:
            if chunked:
                write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                write(data)

        # Every chunk shares its envelope: serialise it once, splice each token in.
        kind = "chat.completion.chunk" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        envelope = _dumps(
            {"id": ident, "object": kind, "created": int(time.time()), "model": model}
        )
        prefix = ("data: " + envelope[:-1] + ',"choices":[{"index":0,').encode()
        if chat:
            before, after = b'"delta":{"content":', b'},"logprobs":null,"finish_reason":null}]}\n\n'
            first = b'"delta":{"role":"assistant","content":""}' + after[1:]
            last = b'"delta":{},"logprobs":null,"finish_reason":"%s"}]}\n\n' % finish.encode()
        else:
            before, after = b'"text":', b',"logprobs":null,"finish_reason":null}]}\n\n'
            first = None
            last = b'"text":"","logprobs":null,"finish_reason":"%s"}]}\n\n' % finish.encode()

        write(b"".join(head))
        if ACCESS_LOG:
            self.log_request(200, "-")
        if first is not None:
            event(prefix + first)
        sent = 0
        for token in tokens:
            if TOKEN_DELAY:
                time.sleep(TOKEN_DELAY)
            event(prefix + before + _dumps(token).encode() + after)
            sent += 1
        event(prefix + last)
        if usage is not None:
            tail = {"id": ident, "object": kind, "created": int(time.time()), "model": model}
            event(b"data: " + _dumps({**tail, "choices": [], "usage": usage}).encode() + b"\n\n")
        event(b"data: [DONE]\n\n")
        if chunked:
            write(b"0\r\n\r\n")
        return sent


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # bursts through a proxy must queue, not be refused

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN: slow or hanging without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class Server6(Server):
    address_family = socket.AF_INET6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible echo LLM server.")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    args = parser.parse_args(argv)
    try:
        server = (Server6 if ":" in args.host else Server)((args.host, args.port), Handler)
    except OSError as exc:
        print(
            f"llm-echo: can not listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1

    def stop(signum: int, _frame: Any) -> None:
        # shutdown() waits for serve_forever() to return, so it must not run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"llm-echo serving model {MODEL!r} on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        # Requests in flight get a grace period to finish; idle keep-alive connections do not wait.
        drained = STATS.wait_idle(DRAIN_SECONDS)
        server.server_close()
        print(
            f"llm-echo stopped ({'drained' if drained else 'requests still in flight'})", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
