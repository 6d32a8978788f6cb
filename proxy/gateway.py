"""The OpenAI-compatible gateway at the proxy's root (issue 17): one address for every model.

``POST /v1/chat/completions`` (``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``) goes to the
service that serves the body's ``model``; ``GET /v1/models`` lists the models the caller's gateway
key may call. Keys (``msg_<lookup>_<secret>``, serving/core/tokens.py) reach the proxy like endpoint
tokens: only digests, in the hash ``<prefix>:gateway:keys`` (lookup -> JSON), changed over the routing
table's pub/sub channel (``{"gateway_key": lookup, "entry": ...}``), so a revoked key is refused within
a second (serving/bus/routing.py writes both).

Finding ``model`` without buffering a large body: the body is held anyway until a replica connection
is attached (proxy/exchange.py), so the gateway looks at what has arrived so far. A whole body up to
``SNIFF_LIMIT`` is decoded with the C JSON parser; a body still arriving is scanned for the top-level
``"model"`` key by ``find_model`` (a small tokenizer that skips values with regular expressions), at
most once each time what arrived doubles, so the scanning costs O(n) in all. A body that passes
``SNIFF_LIMIT`` bytes without a top-level ``model`` is answered 400 in OpenAI's error shape.
"""

from __future__ import annotations

import json
import json.scanner
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.table import Endpoint

SNIFF_LIMIT = 64 * 1024
# The paths routed by the body's model; /v1/models is answered by the proxy itself.
MODEL_PATHS = frozenset((b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses"))
MODELS_PATH = b"/v1/models"

_WS = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(rb"-?[0-9][0-9eE.+-]*|true|false|null")
# Inside a nested value: runs of anything that is not a string or a bracket are skipped in one match.
_NESTED = re.compile(rb'[^"\[\]{}]+')

MORE = "more"  # find_model: the body so far ends before the answer
ABSENT = "absent"  # ... the top-level object has no string "model"
INVALID = "invalid"  # ... not a JSON object


def find_model(buf: bytes) -> str | tuple[str]:
    """The top-level ``"model"`` string of a JSON object that ``buf`` begins, or ``(MORE,)``,
    ``(ABSENT,)``, ``(INVALID,)`` (tuples, so no model name is mistaken for a verdict)."""
    n = len(buf)
    i = _WS.match(buf, 0).end()  # type: ignore[union-attr]
    if i >= n:
        return (MORE,)
    if buf[i : i + 1] != b"{":
        return (INVALID,)
    i += 1
    while True:
        i = _WS.match(buf, i).end()  # type: ignore[union-attr]
        if i >= n:
            return (MORE,)
        c = buf[i : i + 1]
        if c == b"}":
            return (ABSENT,)
        if c == b",":
            i += 1
            continue
        if c != b'"':
            return (INVALID,)
        m = _STRING.match(buf, i)
        if m is None:
            return (MORE,)
        key = m.group()
        i = _WS.match(buf, m.end()).end()  # type: ignore[union-attr]
        if i >= n:
            return (MORE,)
        if buf[i : i + 1] != b":":
            return (INVALID,)
        i = _WS.match(buf, i + 1).end()  # type: ignore[union-attr]
        if i >= n:
            return (MORE,)
        if key == b'"model"':
            if buf[i : i + 1] != b'"':
                return (INVALID,)
            m = _STRING.match(buf, i)
            if m is None:
                return (MORE,)
            try:
                value = json.loads(m.group())
            except ValueError:
                return (INVALID,)
            return value if isinstance(value, str) and value else (INVALID,)
        i = _skip_value(buf, i)
        if i < 0:
            return (MORE,) if i == -1 else (INVALID,)


def _skip_value(buf: bytes, i: int) -> int:
    """The index after the JSON value at ``i``; -1 when the buffer ends first, -2 when invalid."""
    c = buf[i : i + 1]
    if c == b'"':
        m = _STRING.match(buf, i)
        return m.end() if m is not None else -1
    if c not in (b"{", b"["):
        m = _SCALAR.match(buf, i)
        if m is None:
            rest = buf[i:]
            return -1 if any(word.startswith(rest) for word in (b"true", b"false", b"null")) else -2
        return m.end() if m.end() < len(buf) else -1
    depth = 0
    n = len(buf)
    while i < n:
        c = buf[i : i + 1]
        if c in (b"{", b"["):
            depth += 1
            i += 1
        elif c in (b"}", b"]"):
            depth -= 1
            i += 1
            if depth == 0:
                return i
        elif c == b'"':
            m = _STRING.match(buf, i)
            if m is None:
                return -1
            i = m.end()
        else:
            i = _NESTED.match(buf, i).end()  # type: ignore[union-attr]
    return -1


def model_of_body(buf: bytes, complete: bool) -> str | tuple[str]:
    """``find_model`` with the C parser's speed for a complete body (the usual case).

    A body is usually whole when its first piece is looked at, before the request is known to have
    ended (the parser reports the body, then its end): a buffer that ends with ``}`` is tried with the
    C parser first. When it parses as an object, that object's ``model`` is the answer whatever may
    follow (after a whole object, more bytes would make the body invalid JSON, for the replica to
    refuse)."""
    if not complete and buf.rstrip()[-1:] != b"}":
        return find_model(buf)
    body = _parse(buf)
    if not isinstance(body, dict):
        return find_model(buf) if not complete else (INVALID,)
    model = body.get("model")
    if model is None:
        return (ABSENT,)
    return model if isinstance(model, str) and model else (INVALID,)


# The C scanner that json.loads ends in, called directly: json.loads(bytes) spends most of its time
# on a small body before it (detecting the encoding, decoding, two Python layers): 1.4 us vs 5.9 us
# for a chat request (bench/proxy.py's gateway row).
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # (typeshed: its context is a decoder)


def _parse(buf: bytes) -> object:
    """The JSON value ``buf`` holds, or None when it holds none (not JSON, or trailing bytes)."""
    try:
        text = buf.decode()
        obj, end = _scan(text, len(text) - len(text.lstrip()))
    except (ValueError, StopIteration):
        try:  # anything unusual (a BOM, UTF-16): as json.loads reads it
            return json.loads(buf)
        except ValueError:
            return None
    if end != len(text) and text[end:].strip():
        return None
    return obj


@dataclass(frozen=True, slots=True)
class GatewayKey:
    """A gateway key as the proxy sees it (no secret: a digest)."""

    lookup: str
    digest: str
    expires: float
    services: frozenset[str]  # endpoint ids; empty: every service of its scope
    projects: frozenset[str]  # the scope: a project key's project, or a user key's projects
    owner: str  # a user key's user id ("" for a project key)
    # Limits (0: none), enforced by proxy/limits.py.
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrency: int = 0

    @classmethod
    def from_entry(cls, lookup: str, entry: dict[str, Any]) -> GatewayKey:
        return cls(
            lookup=lookup,
            digest=str(entry["digest"]),
            expires=float(entry["expires"]),
            services=frozenset(str(s) for s in entry.get("services") or ()),
            projects=frozenset(str(p) for p in entry.get("projects") or ()),
            owner=str(entry.get("owner") or ""),
            requests_per_minute=int(entry.get("requests_per_minute") or 0),
            tokens_per_minute=int(entry.get("tokens_per_minute") or 0),
            max_concurrency=int(entry.get("max_concurrency") or 0),
        )

    def may_call(self, endpoint: Endpoint) -> bool:
        if self.services:
            return endpoint.id in self.services
        if endpoint.project and endpoint.project in self.projects:
            return True
        return bool(self.owner) and endpoint.owner == self.owner


@dataclass(frozen=True, slots=True)
class Alias:
    """A model alias (serving/bus/routing.py build_alias_entry): one name, several services by weight."""

    id: str
    name: str
    project: str
    owner: str
    backends: tuple[tuple[str, int], ...]  # (endpoint id, weight), in the order given

    @classmethod
    def from_entry(cls, alias_id: str, entry: dict[str, Any]) -> Alias:
        return cls(
            id=alias_id,
            name=str(entry["name"]),
            project=str(entry.get("project") or ""),
            owner=str(entry.get("owner") or ""),
            backends=tuple((str(b["service"]), max(0, int(b["weight"]))) for b in entry.get("backends") or ()),
        )


def models_body(names: list[tuple[str, str]]) -> bytes:
    """OpenAI's model list: ``names`` are (model, owner label)."""
    return json.dumps(
        {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": o} for n, o in names]},
        separators=(",", ":"),
    ).encode()


def openai_error(message: str, kind: str, code: str) -> bytes:
    """OpenAI's error shape: ``{"error": {"message", "type", "code"}}`` (what its clients parse)."""
    return json.dumps({"error": {"message": message, "type": kind, "code": code, "param": None}}).encode()
