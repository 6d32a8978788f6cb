"""From a route to a ReplicaSpec: the definition file, the runtime variant, mounts, env, limits.

Everything a replica needs is resolved here, on the node, at start time, so a fixed definition file
is picked up by the next start ("Clear errors and retry", S4.4).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings

from serving import folders
from serving.bus import events
from serving.core import cluster, definitions, devices, runtimes, slots
from serving.core.definitions import writes
from serving.core.health import TCP_DEFAULT, HealthConfig
from serving.models import Revision, Route, RouteMember
from serving.node import caches, prestart, snapshots
from serving.node.engine import get_engine
from serving.node.engines.base import (
    LABEL_ENDPOINT,
    LABEL_NODE,
    LABEL_ROLE,
    LABEL_ROUTE,
    ClusterPeering,
    Mount,
    ReplicaSpec,
)
from storage.fs import FolderFS, StorageUnavailable
from storage.models import Folder


class SpecError(Exception):
    """The replica can not be started as configured; ``kind`` says which part is wrong."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


def model_root(route: Route, member: RouteMember | None = None) -> Path:
    """Where this node has the route's model folder: the web app's storage itself when this node
    shares it (NODE_SHARED_STORAGE), else a snapshot copied into its cache (serving.node.snapshots)."""
    folder = route.endpoint.model_folder
    if folder is None:
        raise SpecError("folder", "The service's model folder was deleted; modify the service to mount another one.")
    if settings.NODE_SHARED_STORAGE:
        return folder.host_path
    # A saved route's progress shows on it (a cluster's sub, copied on its own node, keeps quiet).
    saved = not route._state.adding and member is None
    endpoint_id = str(route.endpoint_id)
    try:
        result = snapshots.fetch_snapshot(
            str(folder.pk),
            route_id=str(route.pk) if saved else None,
            notify=(lambda: events.notify_endpoint_changed(endpoint_id)) if saved else None,
            # A dry run's unsaved endpoint carries the validation's id (serving.node.dryrun).
            validation=route.endpoint.pk.hex if route.endpoint._state.adding else None,
        )
    except snapshots.SnapshotError as exc:
        raise SpecError(
            "snapshot", f"The model folder {folder.name!r} could not be copied to node {settings.NODE_NAME}: {exc}"
        ) from None
    if not route._state.adding:
        who = f"Replica {str(route.pk)[:8]}" + (f" ({member.host_name})" if member is not None else "")
        events.record_event(
            route.endpoint,
            "route_snapshot",
            f"{who} on node {settings.NODE_NAME}: {result.describe(folder.name)}",
            route_id=route.pk,
            data={
                "digest": result.digest,
                "bytes": result.total_bytes,
                "fetched_bytes": result.fetched_bytes,
                "manifest_seconds": round(result.manifest_seconds, 3),
                "fetch_seconds": round(result.fetch_seconds, 3),
            },
        )
    return result.path


def load_definition(route: Route, root: Path | None = None) -> definitions.ModelDefinition:
    endpoint = route.endpoint
    folder = endpoint.model_folder
    if folder is None:
        raise SpecError("folder", "The service's model folder was deleted; modify the service to mount another one.")
    fs = FolderFS(root if root is not None else folder.host_path)
    wanted = endpoint.model_definition_path or definitions.DEFAULT_MODEL_DEFINITION_PATH
    # The default name falls back to .yml, as the original does; an explicit path does not.
    names = definitions.MODEL_DEFINITION_NAMES if wanted == definitions.DEFAULT_MODEL_DEFINITION_PATH else (wanted,)
    for name in names:
        try:
            # The one reader of definition files (launcher, validation, replica start): through
            # storage.fs, size-capped; a symlink, a directory or an oversized file is a problem.
            data = folders.read_folder_file(fs, name)
        except definitions.DefinitionError as exc:
            if isinstance(exc.__cause__, StorageUnavailable):
                raise SpecError("folder", f"The model folder {folder.name!r} has no data on this node.") from None
            raise SpecError(
                "definition",
                f"The model definition file path {name!r} can not be used: {exc} "
                f"Use a regular file inside the model folder, such as {definitions.DEFAULT_MODEL_DEFINITION_PATH}.",
                problems=[p.to_dict() for p in exc.problems],
            ) from None
        if data is None:
            continue
        try:
            return definitions.parse_model_definition(data, name, model_mount=endpoint.model_mount)
        except definitions.DefinitionError as exc:
            problems = [p.to_dict() if hasattr(p, "to_dict") else str(p) for p in exc.problems]
            raise SpecError("definition", str(exc), problems=problems) from None
    raise SpecError(
        "definition",
        f"The model folder {folder.name!r} has no {wanted}. Upload a model definition file "
        "(see examples/simple-http-server) or set the model definition file path.",
    )


def _covers(target: str, path: str) -> bool:
    """Whether a mount at ``target`` holds ``path`` (or is it)."""
    target = os.path.normpath(target)
    return path == target or path.startswith(target.rstrip("/") + "/")


def use_revision(route: Route) -> None:
    """A route of another revision than the one its service stands on (a canary's stable side, a
    rollback's) runs that revision's configuration: set it on ``route.endpoint``, in memory only."""
    endpoint = route.endpoint
    if route.spec_version == endpoint.spec_version:
        return
    revision = Revision.objects.filter(endpoint_id=endpoint.pk, number=route.spec_version).first()
    if revision is not None:
        revision.apply(endpoint)
        endpoint.spec_version = route.spec_version


def build_spec(
    route: Route, member: RouteMember | None = None, addresses: Mapping[str, str] | None = None
) -> tuple[ReplicaSpec, HealthConfig]:
    """The container to start for ``route`` (its main, or the sub ``member`` in cluster mode), and the
    health check that applies to it. ``addresses``: the running members' ``host:port`` by host name."""
    use_revision(route)
    endpoint = route.endpoint
    # Checked again here, for a service that was configured before the rule (or whose folders changed):
    # no replica starts with private mounts and a model definition others can edit.
    problem = endpoint.shared_definition_problem(name_folders=False)
    if problem:
        raise SpecError("folder", problem)
    runtime = runtimes.get_runtime(endpoint.runtime)
    if endpoint.extra_mounts and not settings.NODE_SHARED_STORAGE:
        raise SpecError(
            "mount",
            f"Node {settings.NODE_NAME} copies model folders (its storage is not the web app's), so it can not "
            "mount additional (writable) folders; run this service on a node with NODE_SHARED_STORAGE=true.",
        )
    root = model_root(route, member) if endpoint.model_folder is not None else None
    definition = load_definition(route, root) if runtime.needs_definition_file else None
    try:
        effective = runtimes.effective_service(
            endpoint.runtime, definition, endpoint.model_mount, dict(endpoint.environ)
        )
    except (ValueError, definitions.DefinitionError) as exc:
        raise SpecError("definition", str(exc)) from None

    folder = endpoint.model_folder
    assert folder is not None or not runtime.needs_definition_file
    mounts: list[Mount] = []
    if folder is not None:
        mounts.append(Mount(source=str(root or folder.host_path), target=endpoint.model_mount, read_only=True))
    for extra in endpoint.extra_mounts or []:
        extra_folder = Folder.objects.filter(pk=extra.get("folder")).first()
        if extra_folder is None:
            raise SpecError("mount", f"Additional mount {extra.get('target')} refers to a folder that was deleted.")
        if extra_folder.usage_mode == Folder.UsageMode.MODEL:
            raise SpecError(
                "mount", f"Folder {extra_folder.name!r} is a model folder; it can not be an additional mount."
            )
        mounts.append(Mount(source=str(extra_folder.host_path), target=str(extra["target"]), read_only=False))
    # The service's writable cache on this node (/home/work/.cache), unless a mount covers it already.
    # A validation's unsaved service has none: its replica writes into its own /home/work, thrown away.
    if not endpoint._state.adding and not any(_covers(m.target, caches.TARGET) for m in mounts):
        try:
            mounts.append(caches.prepare(endpoint.pk, get_engine()))
        except OSError as exc:
            raise SpecError(
                "mount",
                f"The service's cache directory could not be made on this node: {exc}. Check SERVICE_CACHE_ROOT.",
            ) from None

    env = {
        "BACKEND_MODEL_NAME": effective.model_name,
        "BACKEND_MODEL_PATH": endpoint.model_mount,
        "BACKEND_SERVICE_PORT": str(effective.port),
        "MODEL_NAME": effective.model_name,
        # What the runtime adds for its server (e.g. vLLM's flags as variables); the user's own win.
        **{str(k): str(v) for k, v in effective.environ.items()},
        **{str(k): str(v) for k, v in (endpoint.environ or {}).items()},
    }
    # A cache variable pointing into the read-only model folder fails at the first download: say so.
    environ_warnings = tuple(writes.environ_warnings(env, endpoint.model_mount)) if folder is not None else ()
    # Downloads land in the writable cache, not the read-only model folder; the user's own wins.
    env.setdefault("HF_HOME", caches.HF_HOME)
    me = cluster.MemberName(cluster.SUB, member.idx) if member is not None else cluster.MemberName(cluster.MAIN, 1)
    # The route's own members, not the service's cluster size: a modified service replaces its
    # routes, and until then the old ones keep the shape they were placed with. Every replica gets
    # the variables (a plain one is a cluster of one, main1), as Backend.AI's sessions do; set last so
    # a user's variable can not fake a member's role or peers.
    # (A validation's transient route is unsaved: it runs the main alone.)
    size = 1 if route._state.adding else route.members.count() + 1
    env.update(cluster.cluster_env(size, me, addresses))
    node = member.node if member is not None else route.node
    resources = dict((member.resources if member is not None else route.resources) or {})
    accelerators = {k: v for k, v in resources.items() if k not in ("cpu", "mem", *slots.UNSCHEDULED_KEYS)}
    assigned = {str(k): float(v) for k, v in ((member.devices if member is not None else route.devices) or {}).items()}
    # Which devices, and its share of each, for the server to size its memory to; set after the
    # user's variables, which can not point the replica at another replica's device.
    env.update(devices.replica_env(assigned))
    mem_bytes = int(resources.get("mem", 1024**3))
    command = effective.start_command
    command_is_shell = isinstance(command, str)
    spec = ReplicaSpec(
        name=f"ms-{route.pk.hex[:12]}" + (f"-{me.host}" if member is not None else ""),
        image=endpoint.image,
        command=(command,) if isinstance(command, str) else (tuple(command) if command else None),
        command_is_shell=command_is_shell,
        shell=effective.shell,
        port=effective.port,
        env=env,
        mounts=tuple(mounts),
        pre_start_actions=tuple(prestart.to_specs(effective.pre_start_actions)),
        cpu=float(resources.get("cpu", 1.0)),
        mem_bytes=mem_bytes,
        accelerators=accelerators,
        devices=assigned,
        shm_bytes=int(resources.get("shm") or devices.default_shm(mem_bytes)),
        labels={
            LABEL_ENDPOINT: str(endpoint.pk),
            LABEL_ROUTE: str(route.pk),
            LABEL_NODE: node.name if node is not None else "",
            LABEL_ROLE: me.host if member is not None else "main",
        },
        # The engine joins the members on one network where each reaches the others by host name.
        cluster=(
            ClusterPeering(key=str(route.pk), host=me.host, hosts=tuple(n.host for n in cluster.member_names(size)))
            if size > 1
            else None
        ),
        definition_warnings=tuple(str(w) for w in definition.warnings) if definition is not None else (),
        environ_warnings=environ_warnings,
    )
    health = effective.health_check
    config = (
        TCP_DEFAULT
        if health is None
        else HealthConfig(
            path=health.path,
            interval=health.interval,
            max_retries=health.max_retries,
            max_wait_time=health.max_wait_time,
            expected_status_code=health.expected_status_code,
            initial_delay=health.initial_delay,
            headers=tuple(sorted((getattr(health, "headers", None) or {}).items())),
        )
    )
    return spec, config
