"""Start the node agent inside a node worker (a worker that consumes a ``node.<name>`` queue), and the
wake listener (scale to zero, serving/control/sleep.py) inside a control worker (queue ``control``).

Also, for every worker and beat: JSON log lines when ``LOG_FORMAT=json`` (serving/core/logs.py), the
running task's name and ids in each line's context, and a heartbeat in Redis every few seconds
(serving/core/processes.py) that the admin's Processes page lists.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
)
from django.conf import settings

from serving.bus.nodebus import redis_client
from serving.core import logs, processes

log = logging.getLogger(__name__)
_agent: Any = None
_wake_listener: Any = None
NODE_TASKS = {"start_route", "stop_route", "start_member", "stop_member"}
_beating = threading.Event()  # set: the heartbeat thread stops
_heartbeats: list[threading.Thread] = []
# Imported as the worker process loads the apps, before it consumes any task: a start claimed before
# this was claimed by an earlier worker (serving.node.recover_interrupted_starts).
_LOADED_AT = time.time()


def _queues(sender: Any) -> set[str]:
    try:
        return {q.name for q in sender.app.amqp.queues.consume_from.values()}
    except Exception:
        return set()


def _consumes_node_queue(sender: Any) -> bool:
    return any(name.startswith("node.") for name in _queues(sender))


@worker_ready.connect
def start_wake_listener(sender: Any = None, **_: Any) -> None:
    global _wake_listener
    if sender is None or "control" not in _queues(sender):
        return
    # Imported here, not at the top: this module is loaded by every process (the app's ready()),
    # and only a control worker listens for wake requests.
    from serving.control.sleep import start_listener

    _wake_listener = start_listener()
    log.info("wake listener started")


@worker_ready.connect
def start_worker_heartbeat(sender: Any = None, **_: Any) -> None:
    if sender is None:
        return
    node = _consumes_node_queue(sender)
    kind = "node" if node else "control"
    logs.set_process(kind, settings.NODE_NAME if node else "")
    _start_heartbeat(kind, settings.NODE_NAME if node else "")


@beat_init.connect
def start_beat_heartbeat(**_: Any) -> None:
    logs.set_process("beat")
    _start_heartbeat("beat", "")


def _start_heartbeat(kind: str, node: str) -> None:
    host, pid = socket.gethostname(), os.getpid()
    key = processes.key(settings.REDIS_PREFIX, kind, host, pid)
    started = _LOADED_AT

    def run() -> None:
        client = redis_client(read_timeout=2)
        try:
            while True:
                try:
                    client.set(key, processes.beat(kind, host, pid, started, node), ex=processes.TTL)
                except Exception as exc:  # Redis away: the key expires, the page shows the gap
                    log.debug("heartbeat not written: %s", exc)
                if _beating.wait(processes.INTERVAL):
                    break
            client.delete(key)  # a clean stop leaves the page at once
        except Exception:
            log.debug("heartbeat key not removed at shutdown", exc_info=True)
        finally:
            client.close()

    thread = threading.Thread(target=run, name=f"heartbeat-{kind}", daemon=True)
    _heartbeats.append(thread)
    thread.start()


@after_setup_logger.connect
@after_setup_task_logger.connect
def json_log_lines(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery installs its own handlers after Django's LOGGING: give them the JSON formatter too."""
    if logger is None or not logs.json_enabled():
        return
    for handler in logger.handlers:
        handler.setFormatter(logs.JsonFormatter())


@task_prerun.connect
def bind_task_context(task: Any = None, task_id: str | None = None, args: Any = None, **_: Any) -> None:
    logs.clear()
    if task is None:
        return
    logs.bind(task=task.name)
    short = task.name.rpartition(".")[2]
    first = str(args[0]) if args else ""
    if short in NODE_TASKS:  # these run on a node's queue, in a pool process of its worker
        logs.bind(node=settings.NODE_NAME)
    if short == "reconcile_endpoint":
        logs.bind(service=first)  # the service's id
    elif short in ("start_route", "stop_route", "stop_member"):
        logs.bind(route=first)


@task_postrun.connect
def clear_task_context(**_: Any) -> None:
    logs.clear()


@worker_ready.connect
def start_node_agent(sender: Any = None, **_: Any) -> None:
    global _agent
    if sender is None or not _consumes_node_queue(sender):
        return
    # Imported here, not at the top: this module is loaded by every process (the app's ready()),
    # and only a node worker needs the node side and its engines.
    from serving.node.agent import NodeAgent, heartbeat

    heartbeat()  # register before the first task arrives
    _agent = NodeAgent(worker_started=datetime.fromtimestamp(_LOADED_AT, UTC))
    _agent.start()
    log.info("node agent started")


@worker_shutdown.connect
def stop_node_agent(**_: Any) -> None:
    _beating.set()
    for thread in _heartbeats:
        # A daemon thread dies with the process: wait for it to delete its key, so a clean stop
        # leaves the Processes page at once and a health check says "no heartbeat", not "stale".
        thread.join(timeout=3)
    if _agent is not None:
        _agent.stop()
    if _wake_listener is not None:
        _wake_listener.stop()
