"""Start the node agent inside a node worker (a worker that consumes a ``node.<name>`` queue)."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger(__name__)
_agent: Any = None


def _consumes_node_queue(sender: Any) -> bool:
    try:
        queues = {q.name for q in sender.app.amqp.queues.consume_from.values()}
    except Exception:
        return False
    return any(name.startswith("node.") for name in queues)


@worker_ready.connect
def start_node_agent(sender: Any = None, **_: Any) -> None:
    global _agent
    if sender is None or not _consumes_node_queue(sender):
        return
    from serving.node import NodeAgent, heartbeat

    heartbeat()  # register before the first task arrives
    _agent = NodeAgent()
    _agent.start()
    log.info("node agent started")


@worker_shutdown.connect
def stop_node_agent(**_: Any) -> None:
    if _agent is not None:
        _agent.stop()
