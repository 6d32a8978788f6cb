"""Bytes held for uploads in progress, and each user's storage limit (issue 13, "quota").

A folder's usage on disk counts only files in place: an upload streams into a temp file that
``FolderFS.usage`` skips, so two parallel uploads each saw the whole free quota. Now every upload
request holds the bytes it is about to write, in Redis, before it writes them: its declared
Content-Length at once (a multipart request: its whole body's), or, when it declares none, a few MiB
ahead of what it has written (``fs.STREAM_AHEAD``). One Lua script
purges expired holds, sums the others' and grants the request its share or refuses it, atomically,
for two scopes at once: the folder (its quota) and the folder's owner (``USER_STORAGE_LIMIT``, or the
user's own ``storage_limit``: the sum over every folder they own, project folders included).

A hold lives ``UPLOAD_HOLD_SECONDS`` and is renewed while bytes arrive, so an upload whose process
crashed frees its share by itself. A request's hold is released when it ends (saved or not), after
its files are in place: in between they count twice, which refuses too much for an instant, never
too little. The owner's limit is checked once more just before the files move in (their other
folders may have grown meanwhile; each folder's own quota is checked under its lock by storage.fs).

Without Redis nothing can be held, so an upload is refused with a sentence saying so (the folder
is unchanged), rather than letting parallel uploads past every limit.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db.models import Sum

from accounts.models import User
from serving.models import Endpoint, ServiceCache
from storage.fs import FolderFS, QuotaExceeded, StorageUnavailable, format_bytes
from storage.models import Folder

# KEYS: per scope (folder, then user) a hash id -> bytes and a sorted set id -> expiry (ms).
# ARGV: id, need, want, now (ms), expires (ms), key ttl (ms), folder allowed, user allowed (-1: none).
# Returns {0, granted} or {scope (1 folder, 2 user), bytes the others hold}.
_HOLD = """
local id, need, want = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now, expires, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local grant = want
for i = 0, 1 do
  local h, z, allowed = KEYS[2 * i + 1], KEYS[2 * i + 2], tonumber(ARGV[7 + i])
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, d in ipairs(dead) do redis.call('HDEL', h, d) end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  if allowed >= 0 then
    local others = 0
    local held = redis.call('HGETALL', h)
    for j = 1, #held, 2 do
      if held[j] ~= id then others = others + tonumber(held[j + 1]) end
    end
    if allowed - others < need then return {i + 1, others} end
    if allowed - others < grant then grant = allowed - others end
  end
end
for i = 0, 1 do
  redis.call('HSET', KEYS[2 * i + 1], id, grant)
  redis.call('ZADD', KEYS[2 * i + 2], expires, id)
  redis.call('PEXPIRE', KEYS[2 * i + 1], ttl)
  redis.call('PEXPIRE', KEYS[2 * i + 2], ttl)
end
return {0, grant}
"""

# KEYS: the user scope's hash and sorted set; ARGV: id, now (ms). Returns the bytes the others hold.
_OTHERS = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
for _, d in ipairs(dead) do redis.call('HDEL', KEYS[1], d) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
local others = 0
local held = redis.call('HGETALL', KEYS[1])
for j = 1, #held, 2 do
  if held[j] ~= ARGV[1] then others = others + tonumber(held[j + 1]) end
end
return others
"""

_client: redis.Redis | None = None

_UNAVAILABLE = (
    "Uploads can not be accounted for right now (Redis does not answer), so nothing was saved and the "
    "folder is unchanged. Try again in a moment, or ask an operator."
)


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    return _client


def storage_limit(user: User) -> int | None:
    """The most bytes ``user``'s folders may hold in all; None: no limit (a setting of 0)."""
    override = getattr(user, "storage_limit", None)
    limit = override if override is not None else settings.USER_STORAGE_LIMIT
    return limit or None


def owner_folders(user: User) -> dict[Any, Path]:
    """The directories of every folder ``user`` owns, by folder id (what their storage limit counts)."""
    return {folder.pk: folder.host_path for folder in Folder.objects.filter(owner=user).only("id")}


def cache_usage(user: User) -> int:
    """Bytes the caches of ``user``'s services hold on the nodes, as the nodes last measured them
    (serving/node/caches.py): their limit counts these too, so filling caches does not escape it."""
    total = (
        ServiceCache.objects.filter(endpoint__owner=user)
        .exclude(endpoint__lifecycle=Endpoint.Lifecycle.DESTROYED)
        .aggregate(total=Sum("bytes"))["total"]
    )
    return int(total or 0)


def usage_of(directories: dict[Any, Path], *, measured: dict[Any, int] | None = None) -> int:
    """Bytes in place in ``directories`` (a walk of each; ``measured``: folders walked already)."""
    total = 0
    for pk, directory in directories.items():
        if measured and pk in measured:
            total += measured[pk]
            continue
        try:
            total += FolderFS(directory).usage()
        except StorageUnavailable:
            continue  # a folder whose directory is missing (deleted meanwhile) holds nothing
    return total


class Hold:
    """One upload request's bytes, held against its folder's quota and its owner's limit (fs.Holder).

    Made where the database may be used (the request's thread): the owner's limit and folders are
    read here; ``start`` then measures the disk, in the thread that streams the upload.
    """

    def __init__(self, folder: Folder) -> None:
        self.id = uuid.uuid4().hex
        self.folder = folder
        self.owner: User = folder.owner
        self.limit = storage_limit(self.owner)
        self.directories = owner_folders(self.owner) if self.limit else {}
        # Read here, where the database may be used; the streaming thread adds it to the disk's.
        self.cached = cache_usage(self.owner) if self.limit else 0
        self.folder_used = 0
        self.user_used = 0
        prefix = f"{settings.REDIS_PREFIX}:upload-holds"
        self.keys = [
            f"{prefix}:folder:{folder.pk}",
            f"{prefix}:folder:{folder.pk}:expiry",
            f"{prefix}:user:{self.owner.pk}",
            f"{prefix}:user:{self.owner.pk}:expiry",
        ]
        self.seconds = float(settings.UPLOAD_HOLD_SECONDS)
        self.held = 0
        self.allowed = 0
        self.renewed = 0.0

    def start(self, folder_used: int) -> Hold:
        """The folder's usage as measured for this request; the owner's other folders are walked now."""
        self.folder_used = folder_used
        if self.limit:
            self.user_used = self.cached + usage_of(
                {**self.directories, self.folder.pk: self.folder.host_path}, measured={self.folder.pk: folder_used}
            )
        return self

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return _redis().eval(script, len(keys), *keys, *args)
        except redis.RedisError:
            raise StorageUnavailable(_UNAVAILABLE) from None

    def hold(self, total: int, allowed: int, want: int) -> int:
        # ``allowed`` is what the folder's quota leaves (files being replaced count as free): the
        # owner's limit leaves as much more as the folder's does beyond its measured usage.
        credit = allowed - (self.folder.effective_quota - self.folder_used)
        user_allowed = -1 if self.limit is None else max(self.limit - self.user_used + credit, 0)
        now = time.time()
        scope, amount = self._run(
            _HOLD,
            self.keys,
            [
                self.id,
                total,
                want,
                int(now * 1000),
                int((now + self.seconds) * 1000),
                int(self.seconds * 2000),
                allowed,
                user_allowed,
            ],
        )
        if scope == 1:
            raise QuotaExceeded(self._folder_message(total, int(amount), allowed))
        if scope == 2:
            raise QuotaExceeded(self._user_message(total, int(amount), user_allowed))
        self.held, self.allowed = int(amount), allowed
        self.renewed = time.monotonic()
        return self.held

    def touch(self) -> None:
        # Renewed a third of the way through its life: a live upload never loses its hold.
        if self.held and time.monotonic() - self.renewed > self.seconds / 3:
            self.hold(self.held, self.allowed, self.held)

    def check_commit(self, added: int) -> None:
        if self.limit is None or added <= 0:
            return
        # Others' holds first, then the disk: an upload that finishes in between is counted twice
        # (its files are in place before its hold goes), never missed.
        others = int(self._run(_OTHERS, self.keys[2:], [self.id, int(time.time() * 1000)]))
        used = self.cached + usage_of({**self.directories, self.folder.pk: self.folder.host_path})
        if used + others + added > self.limit:
            raise QuotaExceeded(
                f"it would pass {self.owner.username}'s storage limit of {format_bytes(self.limit)} across all "
                f"their folders: {format_bytes(used)} is used{self._caches()} and uploads in progress hold "
                f"{format_bytes(others)}. Delete files in any of their folders, or ask an operator for a "
                "larger limit."
            )

    def release(self) -> None:
        if not self.held:
            return
        self.held = 0
        try:
            pipe = _redis().pipeline()
            pipe.hdel(self.keys[0], self.id)
            pipe.zrem(self.keys[1], self.id)
            pipe.hdel(self.keys[2], self.id)
            pipe.zrem(self.keys[3], self.id)
            pipe.execute()
        except redis.RedisError:
            pass  # the hold expires by itself

    def _caches(self) -> str:
        if not self.cached:
            return ""
        return (
            f" ({format_bytes(self.cached)} of it by the caches of their services, /home/work/.cache: "
            "remove what the servers no longer need there, or terminate services they no longer use)"
        )

    def _folder_message(self, size: int, others: int, allowed: int) -> str:
        quota = self.folder.effective_quota
        return (
            f"{format_bytes(size)} would not fit in the quota of folder {self.folder.name!r} "
            f"({format_bytes(quota)}): {format_bytes(max(quota - allowed, 0))} is used and other uploads in "
            f"progress hold {format_bytes(others)}. Wait for them to finish, delete some files, or ask for a "
            "larger quota."
        )

    def _user_message(self, size: int, others: int, allowed: int) -> str:
        limit = self.limit or 0
        return (
            f"{format_bytes(size)} would pass {self.owner.username}'s storage limit of {format_bytes(limit)} "
            f"across all their folders: {format_bytes(max(limit - allowed, 0))} is used{self._caches()} and other "
            "uploads in "
            f"progress hold {format_bytes(others)}. Delete files in any of their folders, or ask an operator "
            "for a larger limit."
        )
