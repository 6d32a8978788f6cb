"""The local engine: replicas in bubblewrap sandboxes, each in its own network namespace.

What a laptop without Docker gets, and what most tests use (a sandbox is up in ~10 ms):

* the sandbox's root is built from parts (read-only /usr and /etc, the python installation if it
  lives outside /usr), the model folder is bound read-only at its mount path, /home/work and /tmp
  are private tmpfs, own PID/IPC/UTS/cgroup namespaces, every capability dropped, the environment
  cleared; nothing else of the host (the platform's files, other folders) is there;
* the replica runs as an unprivileged user, as Backend.AI runs kernels as ``work``: uid/gid 65534
  (nobody/nogroup) unless the engine is given another (settings ``LOCAL_ENGINE_UID``/``_GID``). As
  root, bwrap keeps just CHOWN/SETUID/SETGID/SETPCAP for a one-line prelude inside the sandbox that
  hands /home/work (and a workdir bwrap made in it) to that user and execs ``setpriv`` (util-linux),
  which takes the uid/gid, clears the groups and drops every capability, bounding set included,
  before the pre-start runner or the start command starts: both run as that user, with /home/work
  theirs, /tmp and /var/tmp sticky and world-writable, the model folder read-only (and readable
  where its modes let others read: storage writes 0644/0755 files). No user namespace: the uid
  is the host's, so the host sees (and kills, and accounts) the replica's processes as before.
  An engine not running as root runs replicas as its own user;
* as root: one network namespace per replica with a veth pair (one /30 per replica out of the
  ``subnet`` setting), so two replicas of a service both listen on the definition's port and the
  host reaches each at its own address. The server must listen on 0.0.0.0 (or the namespace's
  address), not 127.0.0.1, which is the namespace's own loopback. Without root, ``pasta`` (Debian
  ``passt``) gives the sandbox a network namespace and forwards a free port of 127.0.0.1 to it;
* memory, CPU and process-count limits from cgroup v1 controllers (setrlimit(RLIMIT_AS) when no
  cgroup can be made), applied before the sandbox starts;
* a tiny detached ``/bin/sh`` supervisor per replica (its own session, so replicas outlive a
  node-worker restart as Docker containers do) waits for the sandbox, so it never lingers as a
  zombie, and records its exit status.

Everything about a replica lives in ``state_dir/<replica id>/``: ``spec.json`` (what was asked),
``pid`` (the sandbox's PID-namespace init: "PID STARTTIME", the start time guards against a reused
pid), ``status.json`` (bwrap's own status), ``exit`` (exit status), ``log``. A new engine instance
finds the replicas again with ``list()``. The image is not used: sandboxes run the host's userland.

The package, by concern: ``sandbox.py`` (the bwrap arguments: what a replica sees of the host),
``cgroups.py`` (limits and usage), ``network.py`` (namespaces, veths, address registry, egress and
cluster peering rules), ``supervisor.py`` (the replica's processes, exit records and log),
``proc.py`` (/proc readings and atomic record writes), ``engine.py`` (``LocalEngine``, composing
them).
"""
