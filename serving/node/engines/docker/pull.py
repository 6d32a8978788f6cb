"""Having an image on a Docker daemon (issue 15), for the Docker and the Swarm engines alike: look it
up, and when it is missing refuse (``SERVING_IMAGE_PULL=never``) or pull it from an allowed
registry (``missing``, ``SERVING_REGISTRIES``; ``serving.core.images`` decides), reporting bytes.

Also ``pinned``: the reference by the digest the daemon pulled, which a Swarm service is created
with so every Swarm node runs the very image the manager looked at (``docker service create``
pins a tag to its digest the same way).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

from serving.core import images
from serving.node.engines.base import ImageNotFound
from serving.node.engines.docker.containers import BUILD_HINT
from serving.node.engines.docker.errors import docker_errors, explain

# Called with a pull's bytes done and total (total grows as the registry announces layers).
PullProgressCallback = Callable[[int, int], None]


def ensure_image(
    client: docker.DockerClient,
    image: str,
    *,
    image_pull: str,
    registries: tuple[str, ...],
    timeout: float,
    progress: PullProgressCallback | None = None,
) -> float | None:
    """Have ``image`` on ``client``'s daemon: None when it already was, else the seconds its pull took.

    With ``image_pull="never"`` a missing image raises ``ImageNotFound`` saying how to load it;
    with "missing" it is pulled if its registry is one of ``registries`` (else ``ImageNotFound``
    saying which to add). The pull uses the credentials of the Docker config docker-py read
    when the client was made (``~/.docker/config.json``, or ``$DOCKER_CONFIG``), and reports
    its bytes to ``progress`` after each message of the daemon (the caller throttles)."""
    with docker_errors(f"look up the image {image}", None, timeout):
        try:
            client.images.get(image)
            return None
        except docker.errors.ImageNotFound:
            pass
    if image_pull == "never":
        raise ImageNotFound(f"The image {image} is not on this node; {BUILD_HINT}.")
    refusal = images.pull_refusal(image, registries)
    if refusal:
        raise ImageNotFound(refusal)
    began = time.monotonic()
    tally = images.PullProgress()
    try:
        # No timeout on the stream (docker-py's pull sets none): a large image takes minutes;
        # the route's progress shows it moving, and the control plane fails a start that stalls.
        for message in client.api.pull(image, stream=True, decode=True):
            tally.feed(message)
            if tally.error:
                break
            if progress is not None:
                progress(tally.done, tally.total)
    except docker.errors.APIError as exc:
        raise ImageNotFound(f"Pulling the image {image} failed: {explain(exc)}.") from exc
    except Exception as exc:  # the connection to the daemon broke mid-stream
        raise ImageNotFound(f"Pulling the image {image} failed: {exc}.") from exc
    if tally.error:
        raise ImageNotFound(f"Pulling the image {image} failed: {tally.error.rstrip('.')}.")
    return time.monotonic() - began


def pinned(image: Any, reference: str) -> str:
    """``reference`` pinned to the digest its registry gave ``image`` (``repo:tag@sha256:...``,
    as ``docker service create`` writes it), or ``reference`` itself when the daemon knows no
    digest of that repository (an image built or loaded here, never pushed or pulled) or it
    names one already."""
    if "@" in reference:
        return reference
    wanted = images.split_reference(reference)
    for repo_digest in (image.attrs or {}).get("RepoDigests") or []:
        name, _, digest = str(repo_digest).partition("@")
        if digest and images.split_reference(name) == wanted:
            return f"{reference}@{digest}"
    return reference
