"""Docker's failures as sentences: every docker-py or requests error of an engine call becomes an
``EngineError`` (``ReplicaNotFound`` for a replica's 404) saying what could not be done and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import docker
import docker.errors
import requests

from serving.node.engines.base import EngineError, ReplicaNotFound

API_TIMEOUT = 30.0


def explain(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip().rstrip(".")


@contextlib.contextmanager
def docker_errors(what: str, replica: str | None = None, timeout: float = API_TIMEOUT) -> Iterator[None]:
    """Turn docker-py / requests failures into EngineError sentences (ReplicaNotFound for a 404)."""
    try:
        yield
    except EngineError:
        raise
    except docker.errors.NotFound as exc:
        if replica is not None:
            raise ReplicaNotFound(f"The replica {replica} does not exist (any more).") from exc
        raise EngineError(f"Docker could not {what}: {explain(exc)}.") from exc
    except docker.errors.APIError as exc:
        raise EngineError(f"Docker could not {what}: {explain(exc)}.") from exc
    except requests.exceptions.Timeout as exc:
        raise EngineError(
            f"The Docker engine did not answer within {timeout:g} s while trying to {what}; is dockerd overloaded?"
        ) from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise EngineError(
            f"Docker could not {what}: the engine is unreachable: {explain(exc)}; "
            "start it with scripts/docker-up.sh or use SERVING_ENGINE=local."
        ) from exc


def network_missing(text: str) -> bool:
    return "network" in text and "not found" in text
