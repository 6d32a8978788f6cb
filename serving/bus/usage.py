"""The proxies' gateway usage counters in Redis (proxy/usage.py writes them), taken for the fold
into the database (serving.control.usage).

Taking is atomic and loses nothing: ``MOVE_SCRIPT`` adds a pending hash into its *folding* twin
(``<hash>:folding``) and deletes it in one step, so a proxy's HINCRBY lands either before (folded now)
or after (a new hash, folded next time). The twin is deleted only after the database committed its
counts (``done``); a fold that dies in between finds the twin again through
``<prefix>:gateway:usage:folding`` (a set) and folds it then, so nothing is lost. Only a crash
between the commit and ``done`` would count a twin twice.
"""

from __future__ import annotations

from django.conf import settings

from serving.bus.routing import get_redis

# KEYS: the hash, its folding twin, the pending set, the folding set; ARGV[1]: the member.
MOVE_SCRIPT = """
local data = redis.call('HGETALL', KEYS[1])
for i = 1, #data, 2 do redis.call('HINCRBY', KEYS[2], data[i], data[i + 1]) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('SADD', KEYS[4], ARGV[1]) end
return redis.call('HGETALL', KEYS[2])
"""


def _prefix() -> str:
    return str(settings.REDIS_PREFIX)


def hash_key(member: str) -> str:
    return f"{_prefix()}:gateway:usage:{member}"


def pending_key() -> str:
    return f"{_prefix()}:gateway:usage:pending"


def folding_key() -> str:
    return f"{_prefix()}:gateway:usage:folding"


def members() -> list[str]:
    """``<lookup>:<day>`` of every hash to fold: the pending ones and those a fold left behind."""
    client = get_redis()
    names = client.sunion(pending_key(), folding_key())
    return sorted(n.decode() for n in names)


def take(member: str) -> dict[str, int]:
    """Move one pending hash into its folding twin and return the twin's fields (call ``done`` once
    they are in the database)."""
    client = get_redis()
    source = hash_key(member)
    raw = client.eval(MOVE_SCRIPT, 4, source, f"{source}:folding", pending_key(), folding_key(), member)
    flat = [item.decode() if isinstance(item, bytes) else str(item) for item in raw]
    out: dict[str, int] = {}
    for name, value in zip(flat[::2], flat[1::2], strict=True):
        try:
            out[name] = int(value)
        except ValueError:
            continue
    return out


def done(member: str) -> None:
    pipe = get_redis().pipeline(transaction=True)
    pipe.delete(f"{hash_key(member)}:folding")
    pipe.srem(folding_key(), member)
    pipe.execute()
