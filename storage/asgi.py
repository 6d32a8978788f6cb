"""Streamed uploads at the ASGI level (S1.2: "large files streamed to disk, not held in memory").

Why this exists — three layers each hold a whole request body in memory, measured with Django 5.2 and
daphne 4.2:

1. Django's ``ASGIHandler.read_body`` spools the body into ``SpooledTemporaryFile(max_size=
   FILE_UPLOAD_MAX_MEMORY_SIZE)`` before any view runs. With ``FILE_UPLOAD_MAX_MEMORY_SIZE = 0`` the
   file never rolls over to disk (``max_size=0`` means "no limit" to tempfile): the body stays in RAM.
2. daphne, once twisted has spooled the body to a temp file, pushes *all* of it into the app's unbounded
   ``asyncio.Queue`` at once, before the app has run: a 2 GiB upload is 2 GiB of RSS even for an app
   that reads nothing.
3. twisted parses a ``multipart/form-data`` POST into memory (``_parsePOSTFormSubmission``) before
   daphne even sees it.

So ``streaming_uploads(app)`` wraps the HTTP app: ``PUT /api/v1/folders/<id>/files/<path>`` and
``POST /api/v1/folders/<id>/upload/`` are answered here — authenticated exactly as the REST API does
(API key or session + CSRF), authorized by ``access_folder`` — and the body goes from ``receive()``
straight into the folder's temp file through the same actions the Django views use. Under daphne it
also installs ``install_daphne_streaming`` (fixes 2 and 3: the body is handed to the app from twisted's
spool file one chunk at a time). Every other request goes to Django untouched.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import io
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import unquote

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.exceptions import DisallowedHost, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.handlers.asgi import ASGIRequest
from django.db import connections
from django.http import Http404, HttpResponse, QueryDict
from django.http.multipartparser import MultiPartParserError
from django.urls import Resolver404, resolve
from django.utils.datastructures import MultiValueDict
from rest_framework import exceptions as drf_exceptions
from rest_framework.request import Request
from rest_framework.settings import api_settings

from storage import actions, fs
from storage.access import access_folder
from storage.models import Folder
from storage.multipart import FormParser
from storage.quota import Hold

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Bytes handed from the event loop to the writing thread at a time: large enough that the thread hop
# costs nothing next to the write, small enough that memory stays flat.
BATCH = 1024 * 1024
# Bytes twisted reads from a client socket at a time under daphne (see install_daphne_streaming).
RECV_BUFFER = 256 * 1024
STREAMED_ROUTES = {("PUT", "folder-file"), ("POST", "folder-upload")}


class ClientGone(Exception):
    """The client disconnected before the body was complete: nothing is saved."""


class _Refusal(Exception):
    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.body = detail if isinstance(detail, dict) else {"detail": detail}
        self.headers = headers or {}


# --- the wrapper ---------------------------------------------------------------------------------------


def streaming_uploads(app: ASGIApp) -> ASGIApp:
    """Wrap the HTTP ASGI app so that uploads stream into folders (see the module docstring)."""
    if "daphne.server" in sys.modules:
        install_daphne_streaming()

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        route = _streamed_route(scope)
        if route is None:
            await app(scope, receive, send)
            return
        await _handle(scope, receive, send, *route)

    return application


def _streamed_route(scope: Scope) -> tuple[str, dict[str, Any]] | None:
    if scope.get("type") != "http" or scope.get("method") not in ("PUT", "POST"):
        return None
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    try:
        match = resolve(path)
    except Resolver404:
        return None
    if (scope["method"], match.url_name) not in STREAMED_ROUTES:
        return None
    return str(match.url_name), dict(match.kwargs)


async def _handle(scope: Scope, receive: Receive, send: Send, url_name: str, kwargs: dict[str, Any]) -> None:
    request = ASGIRequest(scope, io.BytesIO())
    # The body is ours to stream: make sure nothing (such as a CSRF check reading request.POST)
    # tries to parse it from the empty stand-in.
    request._post = QueryDict()  # type: ignore[attr-defined]
    request._files = MultiValueDict()  # type: ignore[attr-defined]
    try:
        multipart = url_name == "folder-upload"
        user, folder, csrf_deferred = await sync_to_async(_authorize)(request, kwargs["folder_id"], multipart)
        # (What the quota's hold reads from the database, read here: the upload runs in another thread.)
        hold = await sync_to_async(Hold)(folder)
        if not multipart:
            status, body = await _put(request, receive, user, folder, kwargs["path"], hold)
            await _respond(send, status, body)
            return
        status, body = await _multipart(request, receive, user, folder, csrf_deferred, hold)
        after = _next_url(request)
        if after:  # the plain HTML form (no JavaScript) goes back to the explorer
            await _respond(send, 303, body, {"Location": after})
        else:
            await _respond(send, status, body)
    except _Refusal as refusal:
        await _respond(send, refusal.status, refusal.body, refusal.headers)
    except fs.FsError as exc:
        await _respond(send, exc.status, {"detail": exc.message, "path": exc.path, "code": exc.code})
    except ClientGone:
        logger.info("upload to %s abandoned by the client; nothing was saved", scope.get("path"))
    except (MultiPartParserError, RequestDataTooBig, SuspiciousOperation) as exc:
        await _respond(send, 400, {"detail": f"The upload form could not be read: {exc}"})
    except Exception:
        # Temp files are already gone (the uploads abort on any exception); say so instead of a bare 500.
        logger.exception("upload to %s failed", scope.get("path"))
        await _respond(send, 500, {"detail": "The server failed while saving the upload; nothing was saved. Retry."})


async def _respond(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, cls=_JSONEncoder).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"vary", b"Accept, Cookie"),
    ]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class _JSONEncoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:
        from rest_framework.utils.encoders import JSONEncoder

        return JSONEncoder().default(o)


# --- authentication and authorization, exactly as the REST API does it ---------------------------------


def _close_old_connections() -> None:
    """What Django does around every request (request_started/finished), leaving an open transaction
    (a test's) alone: a connection that died or outlived CONN_MAX_AGE is replaced."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


def _next_url(request: ASGIRequest) -> str:
    from django.utils.http import url_has_allowed_host_and_scheme

    after = request.GET.get("next", "")
    if after and url_has_allowed_host_and_scheme(after, allowed_hosts={request.get_host()}):
        return after
    return ""


def _is_csrf_failure(exc: drf_exceptions.APIException) -> bool:
    return isinstance(exc, drf_exceptions.PermissionDenied) and str(exc.detail).startswith("CSRF Failed")


def _authorize(request: ASGIRequest, folder_id: Any, multipart: bool) -> tuple[Any, Folder, bool]:
    """The user (API key, or session + CSRF), the folder they may write, and whether the CSRF check
    waits for the form (a plain HTML form sends its token as a field, after which come the files)."""
    _close_old_connections()
    try:
        try:
            request.get_host()
        except DisallowedHost as exc:
            raise _Refusal(400, str(exc)) from None
        SessionMiddleware(lambda r: HttpResponse()).process_request(request)
        # Kept apart: DRF replaces request.user with AnonymousUser when an authenticator refuses.
        session_user = get_user(request)
        request.user = session_user
        classes: list[Any] = list(api_settings.DEFAULT_AUTHENTICATION_CLASSES)
        authenticators = [cls() for cls in classes]
        drf_request = Request(request, authenticators=authenticators)
        # As for the Django request: DRF's CSRF check reads request.POST, which must not parse our body.
        drf_request._data = drf_request._full_data = QueryDict()  # type: ignore[attr-defined]
        drf_request._files = MultiValueDict()  # type: ignore[attr-defined]
        csrf_deferred = False
        try:
            try:
                user = drf_request.user
            except drf_exceptions.PermissionDenied as exc:
                if not (multipart and _is_csrf_failure(exc) and session_user.is_authenticated):
                    raise
                # Checked against the form's csrfmiddlewaretoken once parsed, before anything is saved.
                user, csrf_deferred = session_user, True
            if not getattr(user, "is_authenticated", False):
                raise drf_exceptions.NotAuthenticated()
        except (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed) as exc:
            # As DRF does: 401 with a challenge when the first authenticator offers one (Token).
            header = authenticators[0].authenticate_header(drf_request) if authenticators else None
            if header:
                raise _Refusal(401, str(exc.detail), {"WWW-Authenticate": header}) from None
            raise _Refusal(403, str(exc.detail)) from None
        except drf_exceptions.APIException as exc:  # CSRF failure for a session
            raise _Refusal(exc.status_code, str(exc.detail)) from None
        try:
            folder = access_folder(user, folder_id, write=True)
        except Http404:
            raise _Refusal(404, "Not found.") from None
        except PermissionDenied:
            raise _Refusal(403, "You do not have permission to perform this action.") from None
        return user, folder, csrf_deferred
    finally:
        _close_old_connections()


# --- the body ------------------------------------------------------------------------------------------


class _Body:
    """Pulls the request body from ``receive`` in batches of about BATCH bytes, for a worker thread."""

    # How often a worker thread waiting for the next batch checks that the event loop still runs.
    POLL = 0.5

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.finished = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    async def next_batch(self) -> list[bytes]:
        # A list, not one joined bytes: joining would copy every byte of the upload once more.
        parts: list[bytes] = []
        size = 0
        while not self.finished and size < BATCH:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                parts.append(chunk)
                size += len(chunk)
            if not message.get("more_body", False):
                self.finished = True
        return parts

    def iter_sync(self) -> Iterator[bytes]:
        """For code running in a worker thread (sync_to_async): each batch is awaited on the event loop.

        Not with async_to_sync: when the server stops mid-upload (SIGTERM, Ctrl-C of make run) the
        loop stops, the batch never comes, and a thread blocked on it forever kept daphne from
        exiting. Here the thread sees the loop stop and gives up as if the client had left."""
        loop = self._loop
        if loop is None:
            fetch = async_to_sync(self.next_batch)
            while not self.finished:
                yield from fetch()
            return
        while not self.finished:
            try:
                future = asyncio.run_coroutine_threadsafe(self.next_batch(), loop)
            except RuntimeError:  # the loop is closed
                raise ClientGone() from None
            while True:
                try:
                    batch = future.result(timeout=self.POLL)
                    break
                except concurrent.futures.TimeoutError:
                    if not loop.is_running():
                        future.cancel()
                        raise ClientGone() from None
            yield from batch


def _content_length(request: ASGIRequest) -> int | None:
    try:
        value = int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    return value if value >= 0 else None


async def _put(
    request: ASGIRequest, receive: Receive, user: Any, folder: Folder, path: str, hold: Hold
) -> tuple[int, Any]:
    body = _Body(receive)
    upload = functools.partial(
        actions.do_upload_file,
        folder,
        path,
        body.iter_sync(),
        acting_user=user,
        content_length=_content_length(request),
        hold=hold,
    )
    # Not thread_sensitive: the write must not queue behind (or block) the requests that use the DB.
    entry, created = await sync_to_async(upload, thread_sensitive=False)()
    return (201 if created else 200), entry.to_dict()


def _check_deferred_csrf(request: ASGIRequest, post: QueryDict) -> None:
    from rest_framework.authentication import SessionAuthentication

    request._post = post  # type: ignore[attr-defined]
    try:
        # The Django request, whose POST now holds the parsed form fields.
        SessionAuthentication().enforce_csrf(request)  # type: ignore[arg-type]
    except drf_exceptions.PermissionDenied as exc:
        raise _Refusal(403, str(exc.detail)) from None


async def _multipart(
    request: ASGIRequest, receive: Receive, user: Any, folder: Folder, csrf_deferred: bool, hold: Hold
) -> tuple[int, Any]:
    directory = request.GET.get("path", "")
    body = _Body(receive)

    def parse_and_commit() -> list[Any]:
        from storage.uploads import FILES_FIELD, FolderUploadHandler

        handler = FolderUploadHandler(folder, directory, django_request=request, hold=hold)
        try:
            form = FormParser(request.META.get("CONTENT_TYPE", ""), handler, settings.DEFAULT_CHARSET)
            post, files = form.parse(body.iter_sync())
            if csrf_deferred:
                _check_deferred_csrf(request, post)
            if not files.getlist(FILES_FIELD):
                raise fs.FsError(f"Choose at least one file to upload (form field '{FILES_FIELD}').")
            uploads = handler.finish(post.get("path", directory) or directory)
            return actions.do_commit_uploads(folder, uploads, acting_user=user)
        finally:
            handler.abort_all()

    results = await sync_to_async(parse_and_commit, thread_sensitive=False)()
    return 201, {"uploaded": [entry.to_dict() for entry, _ in results]}


# --- daphne: hand the body to the app one chunk at a time -------------------------------------------------


class _SpooledBody:
    """Stands in for daphne's per-request queue: the body is read from twisted's spool file on demand.

    daphne puts other messages (``http.disconnect``) with ``put_nowait``; those are queued as before.
    """

    CHUNK = 1024 * 1024

    def __init__(self, spool: Any) -> None:
        self._spool = spool
        self._size = spool.seek(0, io.SEEK_END)
        spool.seek(0)
        self._sent = 0
        self._body_done = False
        self._disconnected = False
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    def put_nowait(self, message: Message) -> None:
        if message.get("type") == "http.request":
            return  # daphne's own copy of the (now empty) body: we send the real one ourselves
        if message.get("type") == "http.disconnect":
            self._disconnected = True
        self._queue.put_nowait(message)

    async def receive(self) -> Message:
        if not self._body_done:
            if self._disconnected:
                self._close()
                return {"type": "http.disconnect"}
            chunk = await asyncio.to_thread(self._spool.read, self.CHUNK) if self._size else b""
            self._sent += len(chunk)
            more = bool(chunk) and self._sent < self._size
            if not more:
                self._close()
            return {"type": "http.request", "body": chunk, "more_body": more}
        return await self._queue.get()

    def _close(self) -> None:
        self._body_done = True
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()


class _LiveBody:
    """A streamed upload under daphne, started as soon as its headers are in (no spool file at all).

    Stands in for twisted's ``request.content`` (``write`` gets each chunk twisted reads from the
    socket) and for daphne's per-request queue (``receive`` hands the chunks to the app). Reading
    from the socket pauses while more than HIGH bytes wait for the app, so memory stays flat and a
    slow disk slows the client down instead of filling RAM. Why it matters: with twisted's spool an
    upload was received whole into TMPDIR before the app saw a byte, so an over-quota 50 GiB upload
    was refused only after 50 GiB had arrived, on a disk the quota does not even watch.
    """

    HIGH = 8 * 1024 * 1024
    LOW = 2 * 1024 * 1024
    SMALL = 64 * 1024

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._complete = False  # twisted has the whole body
        self._sent_last = False  # the app has had the message with more_body False
        self._disconnected = False
        self._discarding = False
        self._wakeup = asyncio.Event()
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self.closed = False

    # -- twisted's side: request.content --

    def write(self, data: bytes) -> None:
        if self._discarding or not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wakeup.set()
        if self._buffered > self.HIGH and not self._paused:
            self._paused = True
            self._transport.pauseProducing()

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0  # twisted and daphne rewind before they read the body; there is nothing to rewind

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""  # daphne's own copy of the body: the app already gets it from us

    def close(self) -> None:
        # twisted closes the content when the connection is lost: if the body was not complete, the
        # app must hear it even if daphne's own disconnect message never comes.
        self.closed = True
        if not self._complete and not self._disconnected:
            self.put_nowait({"type": "http.disconnect"})

    def body_complete(self) -> None:
        self._complete = True
        self._wakeup.set()

    def discard(self) -> None:
        """The app answered before the body was in (a refusal): drop what is left, read no more."""
        self._discarding = True
        self._chunks.clear()
        self._buffered = 0
        self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._transport.resumeProducing()

    # -- daphne's side: the application queue --

    def put_nowait(self, message: Message) -> None:
        if message.get("type") == "http.request":
            return  # daphne's empty copy of the body (see read)
        if message.get("type") == "http.disconnect":
            self._disconnected = True
            self._wakeup.set()
        self._queue.put_nowait(message)

    # -- the app's side --

    async def receive(self) -> Message:
        while not self._sent_last:
            if self._chunks:
                # Big chunks go as they are (joining them would copy every byte once more); small
                # ones (a slow client) are joined, so the app is not woken for every few bytes.
                parts = [self._chunks.popleft()]
                size = len(parts[0])
                while self._chunks and size < self.SMALL:
                    chunk = self._chunks.popleft()
                    parts.append(chunk)
                    size += len(chunk)
                self._buffered -= size
                if self._buffered < self.LOW:
                    self._resume()
                last = self._complete and not self._chunks
                self._sent_last = last
                return {"type": "http.request", "body": b"".join(parts), "more_body": not last}
            if self._complete:
                self._sent_last = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if self._disconnected:
                self._sent_last = True
                return await self._queue.get()
            self._wakeup.clear()
            await self._wakeup.wait()
        return await self._queue.get()


def _early_scope(request: Any, channel: Any) -> Scope | None:
    """The ASGI scope daphne's ``process()`` would build, from what twisted knows once headers are in;
    None when the request is not one of our streamed uploads (or is anything unusual)."""
    method = getattr(channel, "_command", b"")
    raw_uri = getattr(channel, "_path", b"")
    if method not in (b"PUT", b"POST") or not raw_uri or request.requestHeaders.hasHeader(b"Upgrade"):
        return None
    try:
        raw_path, _, query = raw_uri.partition(b"?")
        path = unquote(raw_path.decode("ascii"))
        query.decode("ascii")
    except UnicodeDecodeError:
        return None  # daphne's own checks answer these
    root_path = request.channel.factory.server.root_path
    headers = []
    for name, values in request.requestHeaders.getAllRawHeaders():
        if b"_" in name:  # as daphne does (CVE-2015-0219)
            continue
        for value in values:
            if name.lower() == b"daphne-root-path":
                return None  # rare; daphne's own path handles it
            headers.append((name.lower(), value))
    client = [str(request.client.host), request.client.port] if hasattr(request.client, "host") else None
    scheme = "https" if request.isSecure() else "http"
    server = request.channel.factory.server
    # daphne --proxy-headers: the Procfile no longer passes it (it believed any client's X-Forwarded-For;
    # config/asgi_guards.py reads it from WEB_TRUSTED_PROXIES only), but a daphne started with it gets
    # the same scope for an early-started upload as for any other request.
    if server.proxy_forwarded_address_header:
        from daphne.utils import parse_x_forwarded_for

        client, scheme = parse_x_forwarded_for(
            request.requestHeaders,
            server.proxy_forwarded_address_header,
            server.proxy_forwarded_port_header,
            server.proxy_forwarded_proto_header,
            client,
            scheme,
        )
    host = request.getHost()
    scope: Scope = {
        "type": "http",
        "http_version": getattr(channel, "_version", b"HTTP/1.1").split(b"/")[-1].decode("ascii", "replace"),
        "method": method.decode("ascii"),
        "path": path,
        "raw_path": raw_path,
        "root_path": root_path,
        "scheme": scheme,
        "query_string": query,
        "headers": headers,
        "client": client,
        "server": [str(host.host), host.port] if hasattr(host, "host") else None,
        "asgi": {"version": "3.0"},
    }
    return scope if _streamed_route(scope) is not None else None


class _ResponseFlow:
    """Backpressure for responses: twisted pauses us while the client is slower than the disk.

    Without it daphne writes every ``http.response.body`` into twisted's transport buffer at once, so
    a slow client downloading a 20 GiB model would have the whole file buffered in server memory.
    Registered with the request as a streaming (push) producer, twisted calls ``pauseProducing`` when
    its write buffer is full and ``resumeProducing`` when it has drained; ``send`` waits in between.
    """

    def __init__(self, protocol: Any, send: Send) -> None:
        self._protocol = protocol
        self._send = send
        self._writable = asyncio.Event()
        self._writable.set()
        self._registered = False

    # twisted's IPushProducer interface:
    def pauseProducing(self) -> None:
        self._writable.clear()

    def resumeProducing(self) -> None:
        self._writable.set()

    def stopProducing(self) -> None:  # the connection is gone: never block the app on it
        self._writable.set()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            if getattr(self._protocol, "channel", None) is not None and self._protocol.producer is self:
                self._protocol.unregisterProducer()

    async def send(self, message: Message) -> None:
        if message.get("type") != "http.response.body":
            await self._send(message)
            return
        if not message.get("more_body", False):
            self._unregister()  # before daphne finishes the request, which wants no producer left
            await self._send(message)
            return
        protocol = self._protocol
        if not self._registered and getattr(protocol, "channel", None) is not None and protocol.producer is None:
            protocol.registerProducer(self, True)
            self._registered = True
        await self._send(message)
        await self._writable.wait()


def install_daphne_streaming() -> bool:
    """Make daphne hand request bodies to the app lazily, leave multipart parsing to the app, and apply
    backpressure to responses (see ``_ResponseFlow``).

    A targeted patch of two daphne/twisted behaviours (see the module docstring); it checks the
    internals it relies on and does nothing (logging why) when they are not there.
    """
    try:
        from daphne import http_protocol, server
    except ImportError:
        return False
    server_class: Any = server.Server
    request_class: Any = http_protocol.WebRequest
    if getattr(server_class, "_modelserve_streaming", False):
        return True
    if not (hasattr(server_class, "create_application") and hasattr(server_class, "handle_reply")):
        logger.warning("daphne internals changed: request bodies are not streamed (uploads use memory)")
        return False
    original_create = server_class.create_application
    original_init = request_class.__init__

    def create_application(self: Any, protocol: Any, scope: Scope) -> Any:
        content = getattr(protocol, "content", None)
        if isinstance(content, _LiveBody):
            content.body_complete()  # process() runs once twisted has the whole body
            return content  # the app already runs (started from gotLength)
        if (
            scope.get("type") != "http"
            or not isinstance(protocol, request_class)
            or content is None
            or protocol not in self.connections
            or "application_instance" in self.connections[protocol]
        ):
            return original_create(self, protocol, scope)
        body = _SpooledBody(content)
        # daphne's own loop now reads an empty body (one empty message, which _SpooledBody drops).
        protocol.content = io.BytesIO()
        scope.setdefault("asgi", {"version": "3.0"})
        flow = _ResponseFlow(protocol, functools.partial(self.handle_reply, protocol))
        instance = self.application(scope=scope, receive=body.receive, send=flow.send)
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            instance, loop=asyncio.get_event_loop()
        )
        return body

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # twisted would read a whole multipart body into memory to fill request.args, which daphne
        # never uses; Django (or storage.asgi) parses it in a streaming way instead.
        self._parsePOSTFormSubmission = False

    original_got_length = request_class.gotLength
    original_handle_reply = request_class.handle_reply

    def gotLength(self: Any, length: int | None) -> None:
        original_got_length(self, length)
        try:
            scope = _early_scope(self, self.channel)
        except Exception:  # never let the fast path break a request daphne can serve
            logger.exception("streamed upload: could not build the scope early; daphne will spool it")
            scope = None
        server = self.channel.factory.server
        if scope is None or self not in server.connections or "application_instance" in server.connections[self]:
            return
        # What twisted's requestReceived would set, so an early answer is a well-formed response.
        channel = self.channel
        self.method, self.uri, self.clientproto = channel._command, channel._path, channel._version
        self.path = self.uri.split(b"?", 1)[0]
        self.client_addr, self.server_addr = scope["client"], scope["server"]  # for daphne's access log
        self.client_scheme = scope["scheme"]
        self.content.close()
        body = _LiveBody(channel.transport)
        self.content = body
        self.application_queue = body  # so a lost connection reaches the app as http.disconnect
        flow = _ResponseFlow(self, functools.partial(server.handle_reply, self))
        instance = server.application(scope=scope, receive=body.receive, send=flow.send)
        server.connections[self]["application_instance"] = asyncio.ensure_future(instance)

    def handle_reply(self: Any, message: Message) -> None:
        content = getattr(self, "content", None)
        if (
            isinstance(content, _LiveBody)
            and not content._complete
            and message.get("type") == "http.response.body"
            and not message.get("more_body", False)
        ):
            # Answered before the body was in (a refusal): the rest of the body can not be parsed as
            # the next request, so this connection closes after the answer.
            content.discard()
            self.channel.persistent = False
            self.setHeader(b"connection", b"close")
        original_handle_reply(self, message)

    server_class.create_application = create_application
    request_class.__init__ = __init__
    request_class.gotLength = gotLength
    request_class.handle_reply = handle_reply
    # twisted reads sockets 64 KiB at a time: at upload speeds that is tens of thousands of Python
    # calls per second. 256 KiB reads took a 512 MiB PUT from about 600 to about 800 MiB/s here
    # (bench/upload.py); larger reads gained nothing. Only the web server's connections use it.
    from twisted.internet import tcp

    tcp.Server.bufferSize = RECV_BUFFER
    server_class._modelserve_streaming = True
    return True
