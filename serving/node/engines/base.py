"""The engine protocol: how a node runs replicas, whatever the isolation technology.

An engine is stateless from the caller's point of view: everything it knows about a replica can be
recovered from the engine itself (Docker's containers and labels, the local engine's state directory),
so a node worker that restarts finds its replicas again with ``list()``. Every call is synchronous and
bounded in time; callers run them on the node's own Celery queue.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# Labels every replica carries, so orphans can be found and swept (docs/architecture.md).
LABEL_ENDPOINT = "serving.endpoint"
LABEL_ROUTE = "serving.route"
LABEL_NODE = "serving.node"
LABEL_ROLE = "serving.role"
# Which installation (its Redis prefix) a replica belongs to: two installations, or a test run beside
# `make run`, can share one Docker daemon without sweeping each other's containers as orphans.
LABEL_INSTALLATION = "serving.installation"
# Marks the throwaway replica of a validation run (S4.2).
LABEL_VALIDATION = "serving.validation"  # "main" or "sub-N" in multi-node cluster mode


class EngineError(Exception):
    """An engine call failed for a reason a user can act on; ``str()`` is a sentence for them."""


class ImageNotFound(EngineError):
    """The requested image is not present on the node; we never pull from a registry implicitly."""


class ReplicaNotFound(EngineError):
    """The replica (container / sandbox) does not exist (any more)."""


@dataclass(frozen=True)
class Mount:
    source: str  # absolute host path
    target: str  # absolute path inside the replica
    read_only: bool = True


@dataclass(frozen=True)
class PreStartActionSpec:
    """One pre-start action (S2.3) as plain data, executed inside the replica before start."""

    action: str  # write_file | write_tempfile | run_command | mkdir | log
    args: Mapping[str, object] = field(default_factory=dict)
    ref: str | None = None  # saves the result for later actions' {ref} (the runner resolves it)


@dataclass(frozen=True)
class ClusterPeering:
    """Which cluster (S4.1, ``serving.core.cluster``) a replica is a member of, so the engine can let the
    members reach each other by host name, as on Backend.AI's cluster network, and nothing else."""

    key: str  # the route's id: members carrying the same key form one cluster
    host: str  # this member's host name: main1, sub1, ...
    hosts: tuple[str, ...]  # every member's host name, main first


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything needed to start one replica container/sandbox. Plain data, no ORM."""

    name: str  # unique, e.g. "ms-<endpoint>-<route>"; used as the container name
    image: str
    # None = the image's own entrypoint/command (NIM, "Predefined Image Command").
    command: tuple[str, ...] | None
    port: int  # the port the server listens on inside the replica
    shell: str = "/bin/bash"  # used when command_is_shell: ``shell -c command[0]``
    command_is_shell: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    workdir: str = "/home/work"
    pre_start_actions: tuple[PreStartActionSpec, ...] = ()
    cpu: float = 1.0  # cores
    mem_bytes: int = 1 << 30
    accelerators: Mapping[str, float] = field(default_factory=dict)  # e.g. {"cuda.shares": 0.5}
    # The GPU devices assigned to it on this node and its share of each: {"cuda:1": 0.5}.
    devices: Mapping[str, float] = field(default_factory=dict)
    shm_bytes: int = 64 << 20  # the size of its /dev/shm
    labels: Mapping[str, str] = field(default_factory=dict)
    cluster: ClusterPeering | None = None  # set for the members of a cluster of two or more
    # What the model definition says that is not used (unknown keys): the service's log says so at start.
    definition_warnings: tuple[str, ...] = ()
    # Its environment's cache variables that point under the read-only model folder (HF_HOME=/models/hf).
    environ_warnings: tuple[str, ...] = ()


class ReplicaState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    GONE = "gone"


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str  # the engine's id (Docker container id, local sandbox id)
    name: str
    state: ReplicaState
    host: str  # where the host reaches the server, e.g. "127.0.0.1" or a netns address
    port: int  # host-side port
    labels: Mapping[str, str]
    exit_code: int | None = None
    error: str = ""  # e.g. "OOM killed", "pre-start action 2 (run_command) failed: ..."
    # Set by start(): what the replica's owner should know but that does not stop it, e.g. a
    # read-write mount its user can not write (also a line in the replica's log, which names the
    # node's host path; these do not: they go to the service's events, every project member's).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplicaStats:
    cpu_percent: float  # 100.0 = one full core
    mem_bytes: int
    mem_limit_bytes: int


@runtime_checkable
class Engine(Protocol):
    name: str

    def available(self) -> bool:
        """True when this engine can run replicas on this host right now."""

    def unavailable(self) -> str:
        """Why this node can take no new replica now, as a sentence naming the thing (e.g. "the Swarm
        node worker-2 is drained"); "" when it can. Sent with every heartbeat: the scheduler places
        nothing on a node that reports one, and the mark clears by itself once the engine says "".
        It is the engine's word, beside the operator's own ``Node.schedulable``, which it never writes."""

    def start(self, spec: ReplicaSpec) -> ReplicaInfo:
        """Create and start a replica; returns once the process is running (not yet healthy)."""

    def stop(self, replica_id: str, grace: float = 10.0) -> None:
        """Stop (SIGTERM, then SIGKILL after ``grace`` s) and remove. Idempotent: a gone replica is ok."""

    def inspect(self, replica_id: str) -> ReplicaInfo:
        """Current state; raises ReplicaNotFound when it no longer exists."""

    def logs(
        self, replica_id: str, tail: int = 200, follow: bool = False, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Lines of the replica's combined stdout/stderr (pre-start output included).

        With ``follow``, the last ``tail`` lines and then every new line until the replica ends, or
        until ``stop`` is set: the iterator then ends within about a second even when the replica
        prints nothing, so a follow nobody reads any more can be ended from another thread.
        """

    def stats(self, replica_id: str) -> ReplicaStats:
        """CPU and memory usage right now."""

    def list(self, labels: Mapping[str, str] | None = None) -> list[ReplicaInfo]:
        """All replicas this engine manages (ours carry LABEL_ROUTE), filtered by label equality."""
