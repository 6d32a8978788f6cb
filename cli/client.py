"""HTTP to the REST API with the standard library: JSON calls, streamed uploads, streamed text."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

USER_AGENT = "modelserve-cli/0.1"
CHUNK = 1024 * 1024


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class ApiError(Exception):
    """An answer that is not a success, or no answer: ``message`` is a sentence for the user."""

    def __init__(self, message: str, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body


def describe(body: Any) -> str:
    """The API's error body as one sentence: ``{"detail": "..."}`` or ``{"field": ["problem"]}``."""
    if isinstance(body, dict):
        if set(body) == {"detail"} or ("detail" in body and isinstance(body["detail"], str)):
            return str(body["detail"])
        parts = []
        for field, problems in body.items():
            text = "; ".join(str(p) for p in problems) if isinstance(problems, list) else describe(problems)
            parts.append(text if field in ("detail", "non_field_errors") else f"{field}: {text}")
        return " ".join(parts)
    if isinstance(body, list):
        return "; ".join(describe(item) for item in body)
    return str(body)


class Client:
    def __init__(self, url: str, api_key: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(f"{url!r} is not a web app URL; give one such as http://127.0.0.1:8000.")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.base_path = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    # --- plumbing -----------------------------------------------------------------------------------

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Token {self.api_key}", "User-Agent": USER_AGENT, **(extra or {})}

    def _path(self, path: str, query: dict[str, Any] | None = None) -> str:
        full = f"{self.base_path}/api/v1/{path.lstrip('/')}"
        if query:
            full += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        return full

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        connection = self._connection(self.timeout if timeout is None else timeout)
        try:
            connection.request(method, path, body=body, headers=self._headers(headers))
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise ApiError(f"Can not reach the web app at {self.url}: {_reason(exc)}.") from None
        return connection, response

    def _fail(self, response: http.client.HTTPResponse, raw: bytes) -> ApiError:
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace").strip()[:300] or response.reason
        message = describe(body)
        if response.status == 401:
            message = (
                f"The web app refused the API key: {message} Run `modelserve login` with a valid key "
                "(or set MODELSERVE_API_KEY)."
            )
        return ApiError(message, response.status, body)

    # --- calls ---------------------------------------------------------------------------------------

    def call(self, method: str, path: str, data: Any = None, query: dict[str, Any] | None = None) -> Any:
        """One JSON request; the parsed answer (None for 204), or ApiError with the API's sentence."""
        payload = None if data is None else json.dumps(data).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection, response = self._send(method, self._path(path, query), payload, headers)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"The web app at {self.url} stopped answering: {_reason(exc)}.") from None
        finally:
            connection.close()
        if response.status >= 400:
            raise self._fail(response, raw)
        if response.status == 204 or not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(f"{self.url} answered {method} {path} with something that is not JSON; is it modelserve?")

    def get(self, endpoint: str, /, **query: Any) -> Any:
        return self.call("GET", endpoint, query=query or None)

    def upload(
        self, folder_id: str, path: str, handle: Readable, size: int, progress: Callable[[int], None]
    ) -> dict[str, Any]:
        """PUT ``size`` bytes of the file as they are read (never the whole file in memory);
        ``progress(n)`` after every chunk sent. The answer is the stored file's entry."""
        target = self._path(f"folders/{folder_id}/files/{quote(path, safe='/')}")
        connection = self._connection(self.timeout)
        try:
            connection.putrequest("PUT", target)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            for name, value in self._headers({**headers, "Accept": "application/json"}).items():
                connection.putheader(name, value)
            connection.endheaders()
            sent = 0
            try:
                while sent < size and (chunk := handle.read(min(CHUNK, size - sent))):
                    connection.send(chunk)
                    sent += len(chunk)
                    progress(len(chunk))
            except OSError:
                pass  # the server refused before the end (quota, rights): its answer says why
            else:
                if sent < size:
                    raise ApiError(f"{path} shrank while it was uploaded; nothing was kept of it. Push again.")
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"Uploading {path} to {self.url} failed: {_reason(exc)}.") from None
        finally:
            connection.close()
        if response.status >= 400:
            raise self._fail(response, raw)
        result: dict[str, Any] = json.loads(raw)
        return result

    def stream_lines(self, path: str, query: dict[str, Any]) -> Iterator[str]:
        """A streamed ``text/plain`` answer, line by line as it arrives (no read timeout)."""
        connection, response = self._send("GET", self._path(path, query), timeout=None)
        try:
            if response.status >= 400:
                raise self._fail(response, response.read())
            while True:
                line = response.readline()
                if not line:
                    return
                yield line.decode(errors="replace").rstrip("\n")
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"The log stream from {self.url} broke: {_reason(exc)}.") from None
        finally:
            connection.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is it running, and is the URL right?)"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    return str(exc) or type(exc).__name__
