"""What a replica sees of the host: the bubblewrap arguments of its sandbox (a read-only skeleton
of the host's userland, private tmpfs, the model folder and other mounts, namespaces, capabilities,
a cleared environment), the checks of a spec against them, and the command bwrap runs: the start
command, through the pre-start runner if need be, behind the root prelude that hands /home/work to
the replica's user and drops to it with setpriv.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.core import definitions, devices
from serving.core.definitions import ENV_NAME
from serving.node.engines.base import EngineError, ReplicaSpec
from serving.node.engines.local.supervisor import JOIN_FAILED

BOOTSTRAP = Path(__file__).parents[1] / "bootstrap.py"
BOOTSTRAP_DIR = "/opt/modelserve"  # where the pre-start runner and its plan appear in the sandbox
# The user's environment variables, handed to the replica's own process only (see Sandbox.command).
ENV_FILE_NAME = "environ"
ENV_FILE = f"{BOOTSTRAP_DIR}/{ENV_FILE_NAME}"
# Kept by bwrap for the prelude only: setpriv drops them all before the replica's own code runs.
PRELUDE_CAPS = ("CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
PRIVATE_TMPFS = ("/home/work", "/tmp", "/var/tmp")  # noqa: S108  (the sandbox's own tmpfs)
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Sandbox paths a mount may not cover: the sandbox's own skeleton and the pre-start runner.
RESERVED_TARGETS = ("/usr", "/etc", "/proc", "/dev", "/bin", "/sbin", "/lib", "/lib64", BOOTSTRAP_DIR)
# Readable by uid 0 even without capabilities (it owns them); not the replica's business.
# The host's read-only skeleton in the sandbox: directories there exist already.
SKELETON = ("/usr", "/etc", "/proc", "/dev", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")
ETC_SECRET_DIRS = ("/etc/ssl/private",)
# The NVIDIA driver's shared nodes every GPU process opens besides its own /dev/nvidiaN, bound when
# the host has them (nvidia-caps is a directory of capability nodes, MIG's).
NVIDIA_SHARED = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia-caps")


def device_args(assigned: Mapping[str, float], dev_root: str = "/dev") -> list[str]:
    """bwrap arguments that show a replica its assigned GPUs' device nodes (and the driver's shared
    ones), nothing of the host's other /dev/nvidia*: the sandbox's /dev is bwrap's own minimal one.
    ``dev_root``: where the host's nodes are (a fake directory in tests)."""
    if not assigned:
        return []
    args: list[str] = []
    for device in sorted(assigned, key=lambda d: int(devices.index(d))):
        node = f"nvidia{devices.index(device)}"
        source = os.path.join(dev_root, node)
        if not os.path.exists(source):
            raise EngineError(
                f"The replica was assigned {device}, but this node has no {source}: list only the node's "
                "real devices in NODE_ACCELERATORS (or leave it empty to use what nvidia-smi lists)."
            )
        args += ["--dev-bind", source, f"/dev/{node}"]
    for node in NVIDIA_SHARED:
        source = os.path.join(dev_root, node)
        if os.path.exists(source):
            args += ["--dev-bind", source, f"/dev/{node}"]
    return args


def host_python_prefix() -> str | None:
    """The interpreter behind sys.executable (a venv's base), unless under /usr (bound anyway)."""
    base = os.path.realpath(sys.base_prefix)
    return None if base == "/usr" or base.startswith("/usr/") or base == "/" else base


def parent_dirs(target: str) -> list[str]:
    """``--dir`` for the ancestors of a bind target: bwrap makes missing ones mode 0700, which the
    replica's unprivileged user could not pass (an existing directory is left as it is)."""
    chain: list[str] = []
    parent = os.path.dirname(os.path.normpath(target))
    while parent not in ("/", ""):
        chain.append(parent)
        parent = os.path.dirname(parent)
    args: list[str] = []
    for path in reversed(chain):
        if not any(path == s or path.startswith(s + "/") for s in SKELETON):
            args += ["--dir", path]
    return args


def home_dirs(spec: ReplicaSpec) -> list[str]:
    """The sandbox's own directories the replica's user must own: /home/work and whatever bwrap
    makes for the workdir inside a private tmpfs. Never a mount: a host folder keeps its owner."""
    targets = [os.path.normpath(m.target) for m in spec.mounts]

    def mounted(path: str) -> bool:
        return any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets)

    dirs = ["/home/work"]
    workdir = os.path.normpath(spec.workdir or "/home/work")
    for root in PRIVATE_TMPFS:
        if workdir.startswith(root + "/"):
            parts = workdir.removeprefix(root + "/").split("/")
            dirs += [f"{root}/{'/'.join(parts[: i + 1])}" for i in range(len(parts))]
    return [d for d in dict.fromkeys(dirs) if not mounted(d)]


def replica_command(spec: ReplicaSpec, notes: list[str]) -> tuple[list[str], bool]:
    assert spec.command is not None
    if spec.pre_start_actions:
        # The runner handles the shell form and its fallback itself.
        return ["python3", "-I", f"{BOOTSTRAP_DIR}/bootstrap.py", f"{BOOTSTRAP_DIR}/plan.json"], True
    if spec.command_is_shell:
        shell = spec.shell or "/bin/bash"
        if not os.path.exists(shell):  # the sandbox's /usr is the host's
            notes.append(f"the shell {shell} is not installed; running the start command with /bin/sh")
            shell = "/bin/sh"
        return [shell, "-c", spec.command[0]], False
    return list(spec.command), False


def write_environ(path: Path, env: Mapping[str, str]) -> None:
    """The user's variables as shell assignments for the last step of the prelude, readable by
    root only: they may hold secrets, and only the prelude (root) opens the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the worker's umask or a leftover file said
        handle.writelines(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


@dataclass(frozen=True)
class Sandbox:
    """How this engine builds sandboxes: ``python_prefix`` (an interpreter outside /usr to show,
    or None), whether it runs as root, the user replicas switch to (``drops_to_user``) and the
    host tools the root prelude calls by absolute path (None when missing)."""

    python_prefix: str | None
    rootful: bool
    drops_to_user: bool
    uid: int
    gid: int
    setpriv: str | None
    chown: str | None
    cat: str | None
    dev_root: str = "/dev"  # where the host's device nodes are (GPUs are bound from there)

    def check_spec(self, spec: ReplicaSpec) -> None:
        if spec.command is None or not spec.command or not spec.command[0]:
            raise EngineError(
                "The local engine runs the host's userland, not the image, so it needs a start command; "
                "give the service one (or use the Docker engine for the image's own command)."
            )
        if not 0 < spec.port < 65536:
            raise EngineError(f"The port {spec.port} is not a TCP port (1-65535).")
        for key in spec.env:
            # A shell hands the variables to the replica (see command): names must be its names.
            if not ENV_NAME.match(key) or "\0" in spec.env[key]:
                raise EngineError(
                    f"The environment variable {key!r} can not be handed to the replica: a name must be "
                    f"{definitions.ENV_NAME_RULE}, and a value must not hold NUL bytes; change it in the "
                    "service's environment."
                )
        for mount in spec.mounts:
            target = os.path.normpath(mount.target)
            if not mount.target.startswith("/") or target == "/":
                raise EngineError(f"The mount target {mount.target!r} must be an absolute path below /.")
            reserved = [*RESERVED_TARGETS, *self.python_dirs()]
            if any(target == r or target.startswith(r.rstrip("/") + "/") for r in reserved):
                raise EngineError(f"The mount target {mount.target} is reserved for the sandbox itself.")
            if not Path(mount.source).is_dir() and not Path(mount.source).is_file():
                raise EngineError(
                    f"The folder to mount at {mount.target} does not exist on this node ({mount.source})."
                )

    def python_dirs(self) -> list[str]:
        if not self.python_prefix:
            return []
        return [str(Path(self.python_prefix) / sub) for sub in ("bin", "lib", "lib64")]

    def root_args(self) -> list[str]:
        """The sandbox's skeleton: the host's /usr and /etc read-only, the rest private."""
        args = ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / name
            if host.is_symlink():  # merged /usr (Debian 12): the same symlinks as the host
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        args += ["--ro-bind", "/etc", "/etc"]
        for secret in ETC_SECRETS:
            if os.path.isfile(secret):
                args += ["--ro-bind", "/dev/null", secret]
        for secret_dir in ETC_SECRET_DIRS:
            if os.path.isdir(secret_dir):
                args += ["--tmpfs", secret_dir]
        # Only bin/ and lib/ of a python installation outside /usr: if it (or a venv) lies inside
        # the platform's own tree, nothing else of that tree becomes visible.
        for path in self.python_dirs():
            if os.path.islink(path):
                args += [*parent_dirs(path), "--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += [*parent_dirs(path), "--ro-bind", path, path]
        args += [
            "--perms", "0755", "--tmpfs", "/home/work",  # handed to the replica's user by the prelude
            "--perms", "1777", "--tmpfs", "/tmp",  # noqa: S108  (the sandbox's own tmpfs)
            "--perms", "1777", "--tmpfs", "/var/tmp",  # noqa: S108
            "--dev", "/dev",
            "--proc", "/proc",
        ]  # fmt: skip
        return args

    def bwrap_args(self, spec: ReplicaSpec, replica_dir: Path, with_plan: bool, hosts_file: bool = False) -> list[str]:
        """Everything but the command, for ``bwrap --args`` (no quoting, no ARG_MAX worries)."""
        args = self.root_args()
        args += device_args(spec.devices, self.dev_root)
        if spec.shm_bytes > 0:
            # Its own /dev/shm, of the size it asked (or a quarter of its memory): NCCL and vLLM's
            # tensor parallelism pass tensors through it.
            args += ["--perms", "1777", "--size", str(spec.shm_bytes), "--tmpfs", "/dev/shm"]  # noqa: S108  (its own tmpfs)
        if hosts_file:
            # Over the host's /etc/hosts: the cluster's host names (main1, sub1, ...) resolve.
            args += ["--ro-bind", str(replica_dir / "hosts"), "/etc/hosts"]
        if with_plan or self.drops_to_user:
            args += [*parent_dirs(f"{BOOTSTRAP_DIR}/bootstrap.py")]
        if with_plan:
            args += ["--ro-bind", str(BOOTSTRAP), f"{BOOTSTRAP_DIR}/bootstrap.py"]
            args += ["--ro-bind", str(replica_dir / "plan.json"), f"{BOOTSTRAP_DIR}/plan.json"]
        if self.drops_to_user:
            args += ["--ro-bind", str(replica_dir / ENV_FILE_NAME), ENV_FILE]
        # Parents before children, so a mount inside another one lands on top of it.
        for mount in sorted(spec.mounts, key=lambda m: os.path.normpath(m.target).count("/")):
            target = os.path.normpath(mount.target)
            args += [*parent_dirs(target), "--ro-bind" if mount.read_only else "--bind", mount.source, target]
        workdir = spec.workdir or "/home/work"
        hostname = re.sub(r"[^A-Za-z0-9-]", "-", spec.name)[:63].strip("-") or "replica"
        path = SANDBOX_PATH + (f":{self.python_prefix}/bin" if self.python_prefix else "")
        args += [
            "--dir", workdir,
            "--chdir", workdir,
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", hostname,
            "--new-session",
            "--json-status-fd", "4",
            "--clearenv",
            "--setenv", "PATH", path,
            "--setenv", "HOME", "/home/work",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONUNBUFFERED", "1",  # logs appear as they are written
        ]  # fmt: skip
        if self.rootful:
            args += ["--cap-drop", "ALL"]
            if self.drops_to_user:
                for cap in PRELUDE_CAPS:
                    args += ["--cap-add", cap]
        if not self.drops_to_user:
            # Nothing privileged runs before the replica's own process: it may have them at once.
            for key, value in spec.env.items():
                args += ["--setenv", key, value]
        return args

    def command(self, spec: ReplicaSpec, notes: list[str]) -> tuple[list[str], bool]:
        """The argv bwrap runs, and whether it goes through the pre-start runner."""
        argv, with_plan = replica_command(spec, notes)
        if not self.drops_to_user:
            return argv, with_plan
        assert self.setpriv is not None and self.chown is not None and self.cat is not None
        notes.append(f"runs as uid {self.uid}, gid {self.gid}")
        # As root with PRELUDE_CAPS: hand the home to the user, then become it for good. setpriv
        # execs in place, so the server keeps the pid the engine watches and signals.
        #
        # The prelude and every program it runs are root with CHOWN/SETUID/SETGID: not one byte of
        # the user's environment may reach them, or LD_PRELOAD=/models/evil.so (or PATH, GCONV_PATH,
        # BASH_ENV, ...) runs the user's code as root. So bwrap starts it with the engine's fixed
        # environment only, it calls its helpers by absolute path, and it opens the user's variables
        # (a root-only file, never on a command line the host's users could read) as fd 5 for the
        # last step: a shell that already is the replica's user exports them and execs the server.
        owned = " ".join(shlex.quote(d) for d in home_dirs(spec))
        prelude = (
            f"exec 5< {ENV_FILE} || "
            f"{{ echo '[engine] could not read the environment of the replica'; exit {JOIN_FAILED}; }}\n"
            'exec "$@"'
        )
        if owned:
            prelude = (
                f"{self.chown} {self.uid}:{self.gid} {owned} || "
                f"{{ echo '[engine] could not hand /home/work to uid {self.uid}'; exit {JOIN_FAILED}; }}\n{prelude}"
            )
        setpriv = [
            self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip
        handoff = (
            f'eval "$({self.cat} <&5)" || '
            f"{{ echo '[engine] could not set the environment variables of the replica'; exit {JOIN_FAILED}; }}\n"
            'exec 5<&-\nexec "$@"'
        )
        return ["/bin/sh", "-c", prelude, "prelude", *setpriv, "/bin/sh", "-c", handoff, "sh", *argv], with_plan
