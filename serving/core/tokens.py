"""Pure token maths shared by the web app and the proxy: mint, digest, parse, verify (docs/architecture.md).

A token is ``<kind>_<lookup>_<secret>``: a readable kind (``mst`` endpoint token, ``msk`` API key, ``msg`` gateway key),
a 10-character lookup id stored in clear and indexed, and a 32-byte random secret. Only an
HMAC-SHA256 digest of the whole token is stored, keyed by an installation secret, so a leaked
database gives nothing that works. Lookups go by the lookup id; the digest is compared in constant
time. No Django, no I/O: the proxy imports this module.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

ENDPOINT_TOKEN_KIND = "mst"
API_KEY_KIND = "msk"
GATEWAY_KEY_KIND = "msg"  # a gateway key: the proxy's OpenAI-compatible root, several services (issue 17)
_LOOKUP_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o/1/l: read aloud without mistakes
LOOKUP_LEN = 10
# Tokens are short; anything longer is refused before any hashing (cheap rejection of garbage).
MAX_TOKEN_LEN = 128
_TOKEN_RE = re.compile(r"^(?P<kind>[a-z]{3})_(?P<lookup>[a-z2-9]{10})_(?P<secret>[A-Za-z0-9_-]{43})$")
_SCHEMES = ("backendai", "bearer", "token")


@dataclass(frozen=True)
class MintedToken:
    token: str  # shown once, never stored
    lookup: str
    digest: str


@dataclass(frozen=True)
class ParsedToken:
    kind: str
    lookup: str
    token: str


def digest(token: str, key: str | bytes) -> str:
    key_bytes = key.encode() if isinstance(key, str) else key
    return hmac.new(key_bytes, token.encode(), hashlib.sha256).hexdigest()


def mint(kind: str, key: str | bytes) -> MintedToken:
    lookup = "".join(secrets.choice(_LOOKUP_ALPHABET) for _ in range(LOOKUP_LEN))
    token = f"{kind}_{lookup}_{secrets.token_urlsafe(32)}"
    return MintedToken(token=token, lookup=lookup, digest=digest(token, key))


def parse(token: str) -> ParsedToken | None:
    """The token's parts, or None when it cannot be one of ours (no lookup is then needed)."""
    if not token or len(token) > MAX_TOKEN_LEN:
        return None
    match = _TOKEN_RE.match(token)
    if match is None:
        return None
    return ParsedToken(kind=match["kind"], lookup=match["lookup"], token=token)


def verify(token: str, stored_digest: str, key: str | bytes) -> bool:
    return hmac.compare_digest(digest(token, key), stored_digest)


def from_authorization(header: str | None, schemes: tuple[str, ...] = _SCHEMES) -> str | None:
    """The credential of an ``Authorization`` header with one of our schemes, else None.

    Accepts ``BackendAI <t>`` (the original's scheme, S7.2), ``Bearer <t>`` (what OpenAI clients
    send) and ``Token <t>`` (DRF style), case-insensitive scheme, one space or more.
    """
    if not header or len(header) > MAX_TOKEN_LEN + 32:
        return None
    scheme, _, credential = header.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() not in schemes or not credential or " " in credential:
        return None
    return credential
