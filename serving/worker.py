"""Start the node agent inside a node worker (a worker that consumes a ``node.<name>`` queue), and the
wake listener (scale to zero, serving/control/sleep.py) inside a control worker (queue ``control``)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger(__name__)
_agent: Any = None
_wake_listener: Any = None
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
    if _agent is not None:
        _agent.stop()
    if _wake_listener is not None:
        _wake_listener.stop()
