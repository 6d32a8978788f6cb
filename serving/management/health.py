"""The health check of a Celery worker or the beat, for a container orchestrator (compose.yaml's
``healthcheck``, Docker's ``--health-cmd``, a Kubernetes exec probe): exit 0 when the process's
heartbeat in Redis is fresh, 1 with a sentence when it is stale or missing.

The heartbeat is what serving/worker.py writes every few seconds (the admin's Processes page reads
it; shapes in serving/core/processes.py). Two ways to run the same check:

* ``python -m serving.management.health --role node`` loads Django's settings but not its apps:
  about 0.3 s of CPU, which matters for a check every few seconds in every worker's container;
* ``python manage.py worker_health --role node``, the same check for a person at a shell.

Why not ``celery inspect ping``: it sends a broadcast through the broker that every worker
receives, waits a fixed timeout (one second) for the answer of a worker busy enough to miss it,
and the beat answers no ping at all. The heartbeat says that the process runs and reaches Redis.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

import redis
from django.conf import settings  # read lazily: `python -m` sets DJANGO_SETTINGS_MODULE before

from serving.core import processes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", required=True, choices=processes.ROLES, help="which process to check")
    parser.add_argument(
        "--name", default=None, help="a node worker's node (its NODE_NAME; default: this environment's NODE_NAME)"
    )
    parser.add_argument(
        "--host",
        default=None,
        help="the host the process runs on, as its heartbeat names it (default: this one, as for a "
        "container's own health check)",
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=processes.FRESH,
        help=f"seconds after which a heartbeat is stale (default {processes.FRESH:g}; a beat every "
        f"{processes.INTERVAL:g} s)",
    )


def check(
    role: str, name: str | None = None, host: str | None = None, max_age: float = processes.FRESH
) -> tuple[bool, str]:
    """Whether the ``role`` process on ``host`` beats: (True, when it last did) or (False, why not).

    Reads REDIS_URL, REDIS_PREFIX and NODE_NAME from the settings (not the apps: nothing here needs
    them). Bad arguments raise ValueError with a sentence."""
    if name is not None and role != "node":
        raise ValueError(f"--name names a node worker's node; a {role} has none: leave --name out.")
    if not max_age > 0:
        raise ValueError(f"--max-age {max_age:g} is not a duration: give the seconds, more than 0.")
    host = host or socket.gethostname()
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        # The key names the kind and the host: only this host's keys of that kind are read.
        keys = list(client.scan_iter(match=processes.host_pattern(settings.REDIS_PREFIX, role, host), count=1000))
        values = client.mget(keys) if keys else []
    except redis.RedisError as exc:
        # The orchestrator's retries (compose.yaml: 3) ride out a short outage before a restart.
        return (
            False,
            f"Redis at REDIS_URL did not answer ({exc.__class__.__name__}: {exc}): the heartbeat can not be read.",
        )
    finally:
        client.close()
    beats = [beat for raw in values if (beat := processes.parse(raw)) is not None]
    return processes.health(beats, role, host, time.time(), node=name or settings.NODE_NAME, max_age=max_age)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.management.health", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    options: Any = parser.parse_args(argv)
    try:
        healthy, sentence = check(options.role, options.name, options.host, options.max_age)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(sentence, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.exit(main())
