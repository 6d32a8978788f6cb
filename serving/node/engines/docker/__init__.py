"""The Docker engine: one container per replica, driven through docker-py.

Every replica is a container named after ``ReplicaSpec.name`` and carrying its labels, so a node
worker that restarts finds its replicas again with ``list()`` (docs/architecture.md). Choices that matter:

* an image is pulled only when asked (issue 15): we look it up first; a missing one raises
  ``ImageNotFound`` with how to build or load it (``SERVING_IMAGE_PULL=never``, the default), or
  is pulled (``missing``) from the registries of ``SERVING_REGISTRIES`` only
  (``serving.core.images``), with the node's Docker config's credentials, the bytes reported to
  the caller (``ensure_image``); we never let ``containers.create`` pull on its own;
* ``init=True``: a tiny init is PID 1 and forwards SIGTERM, otherwise a Python server ignores it
  and every stop waits the whole grace period;
* locked down: every capability dropped, ``no-new-privileges``, a pids limit, never privileged,
  never the host network, and the Docker socket (or a folder holding it) can not be mounted;
* not root (issue 13): replicas run as ``uid``:``gid`` (65534, nobody/nogroup, by default; settings
  ``DOCKER_REPLICA_UID``/``_GID``), whatever user the image names, so what they write on a
  read-write mount is not root's on the host and a read-write mount is writable only where the
  folder's modes let that user write (as on the local engine). ``/home/work`` is a private tmpfs
  owned by that user (the image's one belongs to root), ``HOME`` points there. When a replica
  stops, setuid/setgid bits of files on its read-write mounts are cleared (``mounts.py``);
* the server's port is published on 127.0.0.1 (a setting) at a host port the engine picks, so
  replicas of one service never collide and ports are never exhausted (S4.3, S10);
* tenants apart (issue 13): replicas are never on Docker's default bridge, where every container
  reaches every other. A plain replica joins the installation's replica network
  (``ms-replicas[-<installation>]``), a bridge with inter-container communication off, so it
  reaches no other replica (of another service or its own) by its address there, while the proxy
  reaches it through its published port. Docker keeps different bridges apart, so other containers
  on the daemon do not reach it either. With ``egress="deny"`` (``SERVING_REPLICA_EGRESS``) the
  replica and cluster networks' bridges get iptables rules dropping every connection a replica
  opens to anything outside its own network: the host's addresses (INPUT) and everything the host
  routes to (DOCKER-USER); answers on the published ports still flow. Docker's ``internal``
  networks would do that too, but Docker publishes no port of a container on one. Either way a
  replica can not open a TCP connection to the ports Docker publishes replicas on (the host's
  ephemeral range) at any node's address (``set_node_addresses``, from the Node table at each
  heartbeat and before each start): a replica calling another service's replica that way, on this
  node or another, would skip the proxy's tokens. Other ports there (the proxy's, say) stay open;
* cluster mode (S4.1): the members of one cluster share a user-defined bridge network of their own
  (``ms-cluster-<route>``, made with the first member, removed with the last, created or running) where each has its
  host name (main1, sub1, ...) as alias, as on Backend.AI; a sub's ``BACKENDAI_CLUSTER_MAIN_ADDR``
  and ``BACKENDAI_CLUSTER_ADDRS`` are main's address on that network (the published 127.0.0.1
  port means nothing inside a container). Containers of other networks can not reach it (Docker's
  isolation between bridges). One daemon owns the network, so the members must share one Docker
  host: several node workers on one machine do, real hosts would need an overlay (Swarm) network;
* pre-start actions (S2.3) run inside the container by ``bootstrap.py``, bind-mounted read-only
  at /opt/modelserve with a JSON plan written to a per-replica folder under ``state_dir``;
* every Docker call is bounded in time (30 s, 2 s for the liveness ping) and every Docker error
  becomes an ``EngineError`` whose text is a sentence.

The daemon must share the host's filesystem (bind mounts use host paths): a local dockerd.

The package, by concern: ``containers.py`` (a spec's create arguments, a container's state, logs
and stats), ``networks.py`` (the replica and cluster networks and the host's network lock),
``rules.py`` (the firewall rules of their bridges), ``errors.py`` (Docker's failures as
sentences), ``engine.py`` (``DockerEngine``, composing them).
"""
