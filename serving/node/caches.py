"""Each service's writable cache on this node: ``/home/work/.cache`` in its replicas (issue 18).

Published model folders download weights on first start (Hugging Face's hub cache, pip, torch):
the model folder is read-only here, so every replica of a service gets one read-write directory of
the node's, ``SERVICE_CACHE_ROOT/<node>/<endpoint id>``, at ``/home/work/.cache``, with ``HF_HOME``
inside it. The same directory serves every replica of the service on this node, so what one
downloaded the next one finds after a restart.

The node's agent measures each directory at most every ``SERVICE_CACHE_MEASURE_INTERVAL`` seconds
and writes the size to ``ServiceCache``, which the owner's storage limit counts (storage/quota.py);
past ``SERVICE_CACHE_LIMIT`` the service's event log warns (the user's files are not deleted). A
directory whose service is destroyed (or gone) is removed by the same sweep.

The walks never follow a symlink: a replica can not point them at a file outside its cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from serving.bus import events
from serving.models import Endpoint, Node, ServiceCache, ServiceEvent
from serving.node.engine import node_name
from serving.node.engines.base import Mount
from storage.fs import format_bytes

log = logging.getLogger(__name__)

TARGET = "/home/work/.cache"
HF_HOME = f"{TARGET}/huggingface"


def node_root() -> Path:
    return Path(settings.SERVICE_CACHE_ROOT) / node_name()


def replica_ids(engine: Any) -> tuple[int, int]:
    """Who the engine's replicas run as: its uid/gid when the worker is root, else the worker itself
    (an unprivileged local engine runs them as its own user and can not give a directory away)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    return int(getattr(engine, "uid", 0)), int(getattr(engine, "gid", 0))


def prepare(endpoint_id: Any, engine: Any) -> Mount:
    """The service's cache directory on this node, made if need be and owned by the replicas' user,
    as the read-write mount of its replicas."""
    root = node_root()
    # 0700: the host's other users see nothing of the caches (the engines bind them as root).
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = root / str(uuid.UUID(str(endpoint_id)))
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a directory")
    uid, gid = replica_ids(engine)
    if os.geteuid() == 0:
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.chown(path, uid, gid, follow_symlinks=False)
    elif uid != os.geteuid():  # pragma: no cover - a non-root worker's replicas are itself
        # Inside the 0700 root only the engine reaches it; the replica's own uid must write it.
        os.chmod(path, 0o777)  # noqa: S103
    return Mount(source=str(path), target=TARGET, read_only=False)


def measure(path: Path) -> int:
    """Bytes of the regular files under ``path`` (hard links once), walked without following links."""
    total = 0
    seen: set[tuple[int, int]] = set()
    pending = [str(path)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            info = entry.stat(follow_symlinks=False)
                            if info.st_nlink > 1:
                                key = (info.st_dev, info.st_ino)
                                if key in seen:
                                    continue
                                seen.add(key)
                            total += info.st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def remove(path: Path) -> None:
    def writable(function: Any, name: str, _exc: Any) -> None:
        # A replica may have left a directory without write permission: open it up and retry once.
        parent = os.path.dirname(name)
        try:
            os.chmod(parent, 0o700)
            function(name)
        except OSError:
            log.warning("could not remove %s from a service cache", name)

    shutil.rmtree(path, onerror=writable)


def sweep(now: datetime | None = None) -> dict[str, int]:
    """Measure this node's service caches (each at most every SERVICE_CACHE_MEASURE_INTERVAL) and
    remove those of destroyed or deleted services; returns counts for logs and tests."""
    now = now or timezone.now()
    counts = {"measured": 0, "removed": 0, "over_limit": 0}
    root = node_root()
    node = Node.objects.filter(name=node_name()).first()
    if node is None:
        return counts
    names: dict[str, Path] = {}
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and _is_uuid(entry.name):
                    names[str(uuid.UUID(entry.name))] = Path(entry.path)
    except FileNotFoundError:
        pass
    rows = {str(row.endpoint_id): row for row in ServiceCache.objects.filter(node=node)}
    # A row whose directory is gone (removed by hand, or a lost disk) holds nothing any more.
    gone = [row.pk for key, row in rows.items() if key not in names]
    if gone:
        ServiceCache.objects.filter(pk__in=gone).delete()
    live = {
        str(pk): status for pk, status in Endpoint.objects.filter(pk__in=list(names)).values_list("pk", "lifecycle")
    }
    limit = int(settings.SERVICE_CACHE_LIMIT)
    interval = float(settings.SERVICE_CACHE_MEASURE_INTERVAL)
    for key, path in names.items():
        status = live.get(key)
        if status is None or status == Endpoint.Lifecycle.DESTROYED:
            remove(path)
            ServiceCache.objects.filter(node=node, endpoint_id=key).delete()
            counts["removed"] += 1
            continue
        row = rows.get(key)
        if row is not None and (now - row.measured_at).total_seconds() < interval:
            continue
        size = measure(path)
        over = bool(limit) and size > limit
        ServiceCache.objects.update_or_create(
            endpoint_id=key, node=node, defaults={"bytes": size, "measured_at": now, "over_limit": over}
        )
        counts["measured"] += 1
        if over and (row is None or not row.over_limit):
            counts["over_limit"] += 1
            events.record_event(
                Endpoint.objects.get(pk=key),
                "cache_over_limit",
                f"The service's cache on node {node.name} (/home/work/.cache) holds {format_bytes(size)}, more than "
                f"the {format_bytes(limit)} a service's cache may hold (SERVICE_CACHE_LIMIT). Nothing was deleted; "
                "remove what the server no longer needs from /home/work/.cache, or ask an operator for a "
                "larger limit. It also counts against your storage limit.",
                level=ServiceEvent.Level.WARNING,
                data={"node": node.name, "bytes": size, "limit": limit},
            )
    return counts


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
