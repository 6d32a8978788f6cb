"""What the Swarm engine asks of an image and of a Swarm node to harden and size its replicas:
whether an image has python3 (the bootstrap runner then sets no_new_privs where the manager's API
can not), and a node's GPUs as Swarm advertises them (generic resources), as a device inventory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import docker
import docker.errors

from serving.node.engines.docker.errors import docker_errors

# Where python3 is in the images people run (Debian's, python's official ones, ours); PATH's
# folders of the image are tried too.
PYTHON3_DIRS = ("/usr/bin", "/usr/local/bin", "/bin", "/opt/conda/bin")


def has_python3(client: docker.DockerClient, image: Any, cache: MutableMapping[str, bool], timeout: float) -> bool:
    """Whether ``image`` has a python3 on its PATH (or in the usual folders): looked at once per
    image id, in a container created from it and never started (its files are read through the
    archive API, on the manager, where ``image`` was found)."""
    if image.id in cache:
        return cache[image.id]
    env = ((image.attrs or {}).get("Config") or {}).get("Env") or []
    path = next((item.partition("=")[2] for item in env if item.startswith("PATH=")), "")
    folders = list(dict.fromkeys([*filter(None, path.split(":")), *PYTHON3_DIRS]))
    found = False
    with docker_errors(f"look for python3 in the image {image.id[:19]}", None, timeout):
        container = client.containers.create(image.id, entrypoint=["/nonexistent"], network_disabled=True)
        try:
            for folder in folders:
                try:
                    stream, _ = client.api.get_archive(container.id, f"{folder.rstrip('/')}/python3")
                except docker.errors.NotFound:
                    continue
                with contextlib.suppress(Exception):
                    stream.close()
                found = True
                break
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)
    cache[image.id] = found
    return found


def gpu_inventory(generic_resources: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, object]]:
    """A Swarm node's ``Description.Resources.GenericResources`` of ``kind`` as a device inventory
    (``Node.devices``: ``cuda:0``, ``cuda:1``...): each named resource is one device (its value,
    e.g. the GPU's UUID, kept as ``uuid``), a discrete one counts that many."""
    named: list[str] = []
    count = 0
    for resource in generic_resources:
        spec = resource.get("NamedResourceSpec")
        if spec and spec.get("Kind") == kind:
            named.append(str(spec.get("Value") or ""))
        spec = resource.get("DiscreteResourceSpec")
        if spec and spec.get("Kind") == kind:
            count += int(spec.get("Value") or 0)
    out: list[dict[str, object]] = []
    for value in sorted(named):
        out.append({"id": f"cuda:{len(out)}", "name": f"{kind} (Swarm generic resource)", "uuid": value})
    for _ in range(count):
        out.append({"id": f"cuda:{len(out)}", "name": f"{kind} (Swarm generic resource)"})
    return out
