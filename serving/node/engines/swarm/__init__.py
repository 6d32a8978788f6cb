"""The Docker Swarm engine: replicas as Swarm services, driven through a manager's Docker API (docker-py).

For teams that already run a Swarm: the node worker talks to a manager (``DOCKER_HOST``) and Swarm
runs the containers on its hosts. Choices, and why:

* **one service per replica member**, not one service per replica with ``replicas: N``: the
  platform's scheduler already tracks slots and devices per node and decides where each replica
  runs (S4.3); a service of its own per member keeps that decision ours and makes a replica's id,
  state, logs and stop exactly one service's. Each service is pinned by a placement constraint
  ``node.hostname==<SWARM_NODE>`` (default: the manager's own host), so one node worker stands
  for one Swarm node, as a node worker stands for one Docker host today;
* labelled like the Docker engine's containers (service and container labels: ``serving.route``,
  ``serving.installation``...), so ``list()`` finds them for the orphan sweep after a restart;
* the resource slots are both **reservations** (Swarm places nothing where they do not fit) and
  **limits** (a replica can not take more);
* **GPUs are Swarm generic resources** (``SWARM_GPU_RESOURCE``, default ``NVIDIA-GPU``, what
  nodes advertise with ``node-generic-resources``): a replica asking for N devices reserves N of
  it (a ``DiscreteResourceSpec``) and Swarm picks which (``DOCKER_RESOURCE_NVIDIA-GPU`` names
  them; nvidia-container-runtime's ``swarm-resource`` shows the container those). Whole devices
  only: a fraction is refused with a sentence, not rounded up, because the platform's scheduler
  would book the rest of that device for another replica that Swarm then could not place. A task
  pending for "insufficient resources" of a generic resource is an error naming it at once. The
  node's devices are what its Swarm node advertises (``advertised_devices``, read by the node
  agent instead of nvidia-smi on the worker's host);
* ``restart_policy`` **none**: the platform replaces a replica that ends, so a Swarm restart
  would only hide the exit from the prober and count twice;
* the server's port is **published in mode host** (``SWARM_PUBLISH_MODE``, default ``host``) at a
  port the node picks, reached at the address of the Swarm node the task runs on; the proxy
  needs no overlay network. ``ingress`` (the VIP routing mesh) is the other choice for swarms
  where it works: the port is then reached on every node, at ``NODE_ADDRESS``. Services use the
  ``dnsrr`` endpoint mode (no virtual IP): the VIP mode needs IPVS, which some hosts lack;
* the model folder is bind-mounted read-only at the same host path, as on the Docker engine: it
  must exist on the Swarm node, so on several hosts a node worker runs on each Swarm node's host,
  pinned to it, with ``NODE_CACHE_ROOT``: the folder is then its snapshot there
  (serving/node/snapshots.py); the pre-start plan too;
* images as on the Docker engine (``SERVING_IMAGE_PULL``, ``SERVING_REGISTRIES``): a missing one
  is pulled onto the manager, where the engine reads it (``ensure_image``, progress on the
  route), and the service is pinned to that digest and carries the Docker config's credentials
  for its registry (docker-py sends them, as ``--with-registry-auth``), so the task's node pulls
  the same image itself; a task rejected for "No such image" fails the start with a sentence
  naming the image and its registry (``services.no_image``);
* the container is locked down as on the Docker engine: every capability dropped, a tiny init
  as PID 1 (``init``), the replica's user (``DOCKER_REPLICA_UID``/``_GID``), ``/dev/shm`` a tmpfs,
  bounded json-file logs, a **pids limit** (``Resources.Limits.Pids``, API 1.41) and
  **no_new_privs**: ``ContainerSpec.Privileges.NoNewPrivileges`` where the manager's API has it
  (1.44, Docker 25); on an older manager the bootstrap runner sets the bit (prctl) before it
  execs the start command, for images with python3 (looked up once per image; one without runs
  without it, logged). The server's own process has it either way (PID 1, the init, does not on
  an older manager: it execs nothing);
* **tenants apart** (``networks.py``): a plain replica joins ``ms-swarm-replicas[-<installation>]``,
  a swarm-scoped bridge network made from a config-only network (ICC off, a bridge name we
  chose), so it reaches no other replica by its address, and the Docker engine's firewall rules
  (``SERVING_REPLICA_EGRESS``) apply to that bridge where they can act: when the replicas run on
  this worker's host (local ``DOCKER_HOST``, pinned to the manager's node);
* ``/home/work`` is an anonymous ``local`` volume that is a tmpfs owned by the replica's user
  (``o=uid=..,gid=..``, ``NoCopy``): a service's own tmpfs mount takes the image's folder's owner
  and mode whatever ``tmpfs_mode`` says (root, 0755), so the user could not write its
  home; Swarm removes the volume with the task's container;
* a task Swarm ended or is ending (its node drained or down, or removed from the swarm; the task
  shut down, rejected or orphaned) reads as exited with that sentence, so the node's sync replaces
  the replica (restart policy none: Swarm makes no other task). Tested with a real kill through
  the product, with a client that reports the node drained or down, and by draining the test
  swarm's only node for a few seconds (tests/reliability/test_swarm_drain.py);
* a Swarm node that can take no task (drained, paused, down, or no node of the swarm has that host
  name) makes ``unavailable()`` say so as a sentence (``nodes.py``); the node worker sends it with
  its heartbeat (``Node.unavailable``), the scheduler places nothing on that node worker, so the
  replacement of a drained node's replica goes to another node of the resource group (or waits,
  its event log naming the node), and the mark clears by itself once the node is active again.
  The operator's cordon (``Node.schedulable``) is never written by the engine;
* cluster mode: each cluster replica gets an **attachable overlay network** of its own
  (``ms-swarm-cluster-<route>``, dnsrr), made with its first member and removed with its last;
  each member has its host name (``main1``, ``sub1``...) as alias there, so members on different
  hosts reach each other by name, and nothing else is on that network;
* state from the service's task (``new``...``running``, then ``complete``/``failed``/...), logs
  from ``service logs``, stats from the container of the task through this engine's client (so
  only for tasks on the manager's own host); stop removes the service (Swarm stops its task with
  the service's stop grace period) and waits for the container to be gone.

Not (yet) as on the Docker engine: firewall rules for replicas on another host than the node
worker's (config-only networks and iptables are per host: the operator makes the config-only
network there, ``networks.operator_command``, and ``egress=deny`` refuses to start with a
sentence), and egress rules for cluster members (their overlay network is theirs alone, but what
they open outside it is not filtered); no_new_privs for an image without python3 on a manager
older than API 1.44; GPU fractions. A start the scheduler placed between a drain and the next
heartbeat (the node worker also asks ``unavailable()`` before each start, so only a drain during
the start itself) waits for its task until the engine's timeout, then fails (a failed start) and
is placed again.

``services.py`` turns a spec into ``services.create`` arguments and a task into a state;
``nodes.py`` says whether the pinned Swarm node takes replicas; ``networks.py`` makes the plain
replicas' network and keeps its rules; ``hardening.py`` looks for python3 in an image and reads a
Swarm node's GPUs; ``engine.py`` holds ``SwarmEngine``.
"""
