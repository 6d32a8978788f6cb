"""llm-echo: an OpenAI-compatible server with only the standard library (see README.md)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = os.environ.get("MODEL_NAME") or os.environ.get("BACKEND_MODEL_NAME") or "llm-echo"
TOKEN_DELAY = float(os.environ.get("ECHO_TOKEN_DELAY", "0.02"))
STARTED = time.monotonic()
STARTUP_DELAY = float(os.environ.get("ECHO_STARTUP_DELAY", "0"))
FAIL_FILE = os.environ.get("ECHO_FAIL_HEALTH_FILE", "")
ACCESS_LOG = os.environ.get("ECHO_ACCESS_LOG") == "1"

_lock = threading.Lock()
_in_flight = 0
_total = 0


def _count(delta: int) -> None:
    global _in_flight, _total
    with _lock:
        _in_flight += delta
        if delta > 0:
            _total += 1


def _words(text: str, limit: int | None) -> list[str]:
    parts = text.split(" ")
    tokens = [p + (" " if i < len(parts) - 1 else "") for i, p in enumerate(parts)]
    return tokens[:limit] if limit else tokens


def _last_user_message(messages: list[dict[str, object]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llm-echo/1.0"

    def log_message(self, format: str, *args: object) -> None:
        if ACCESS_LOG:
            super().log_message(format, *args)

    # --- helpers ---------------------------------------------------------------------------------

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _body(self) -> dict[str, object] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._error(400, "The request body is not valid JSON.")
            return None
        if not isinstance(body, dict):
            self._error(400, "The request body must be a JSON object.")
            return None
        return body

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, chunks: list[dict[str, object]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, chunk in enumerate(chunks):
            if i and TOKEN_DELAY:
                time.sleep(TOKEN_DELAY)
            self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # --- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if time.monotonic() - STARTED < STARTUP_DELAY:
                self._json(503, {"status": "loading"})
            elif FAIL_FILE and os.path.exists(FAIL_FILE):
                self._json(500, {"status": "failing"})
            else:
                self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": MODEL, "object": "model", "created": int(time.time()), "owned_by": "llm-echo"}],
                },
            )
        elif path == "/metrics":
            with _lock:
                in_flight, total = _in_flight, _total
            text = (
                "# HELP llm_echo_requests_waiting Requests being processed right now.\n"
                "# TYPE llm_echo_requests_waiting gauge\n"
                f"llm_echo_requests_waiting {in_flight}\n"
                "# HELP llm_echo_requests_running Requests being processed right now.\n"
                "# TYPE llm_echo_requests_running gauge\n"
                f"llm_echo_requests_running {in_flight}\n"
                "# HELP llm_echo_requests_total Completion requests received.\n"
                "# TYPE llm_echo_requests_total counter\n"
                f"llm_echo_requests_total {total}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
        else:
            self._error(404, f"No route {path}.", "not_found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"No route {path}.", "not_found")
            return
        body = self._body()
        if body is None:
            return
        chat = path == "/v1/chat/completions"
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                self._error(400, "'messages' must be a non-empty list.")
                return
            prompt = _last_user_message(messages)  # type: ignore[arg-type]
        else:
            prompt = body.get("prompt", "")
            prompt = " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)
        max_tokens = body.get("max_tokens")
        words = _words(prompt or "(empty)", max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None)
        model = str(body.get("model") or MODEL)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        _count(+1)
        try:
            if body.get("stream"):
                self._stream(self._stream_chunks(chat, ident, created, model, words))
            else:
                if TOKEN_DELAY:
                    time.sleep(TOKEN_DELAY * len(words))
                self._json(200, self._full(chat, ident, created, model, words, prompt))
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            _count(-1)

    def _stream_chunks(
        self, chat: bool, ident: str, created: int, model: str, words: list[str]
    ) -> list[dict[str, object]]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        chunks: list[dict[str, object]] = []
        if chat:
            chunks.append(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
            )
        for word in words:
            choice: dict[str, object] = (
                {"index": 0, "delta": {"content": word}, "finish_reason": None}
                if chat
                else {"index": 0, "text": word, "finish_reason": None}
            )
            chunks.append({"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]})
        final: dict[str, object] = (
            {"index": 0, "delta": {}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "finish_reason": "stop"}
        )
        chunks.append({"id": ident, "object": kind, "created": created, "model": model, "choices": [final]})
        return chunks

    def _full(
        self, chat: bool, ident: str, created: int, model: str, words: list[str], prompt: str
    ) -> dict[str, object]:
        text = "".join(words)
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(words),
            "total_tokens": len(prompt.split()) + len(words),
        }
        if chat:
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    # SIGTERM: stop accepting and exit cleanly (the platform drains replicas this way).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"llm-echo serving model {MODEL!r} on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
