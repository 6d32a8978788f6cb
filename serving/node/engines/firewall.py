"""What both engines share about running replicas apart from the host: who replicas run as, the
egress choice, where host tools are looked up, and the iptables runner (issue 13).

No Django here: the settings module reads ``EGRESS_CHOICES`` too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from serving.node.engines.base import EngineError

# Host tools are looked up and run with this PATH, never the worker's own (which a user can not
# set, but a tool an operator put first in PATH should not quietly replace iptables or bwrap).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Who replicas run as by default: nobody/nogroup, which owns no file of the host.
DEFAULT_UID = DEFAULT_GID = 65534
MAX_ID = 4_294_967_294  # (uid_t)-1 means "unchanged" to the kernel
# SERVING_REPLICA_EGRESS: "allow" (replicas reach what the host reaches, other replicas and the
# nodes' published ports excepted) or "deny" (nothing outside their own network, not the host).
EGRESS_CHOICES = ("allow", "deny")
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)


def check_replica_ids(uid: int, gid: int, *, who: str, uid_setting: str, gid_setting: str) -> None:
    """Refuse a uid/gid the kernel would not take, naming the setting to change."""
    for what, value, setting in (("uid", uid, uid_setting), ("gid", gid, gid_setting)):
        if not 0 <= value <= MAX_ID:
            raise EngineError(
                f"{who} {what} {value} is not a valid {what}; set {setting} to a number from 0 to {MAX_ID} "
                "(65534 is nobody/nogroup)."
            )


def check_egress(egress: str) -> str:
    if egress not in EGRESS_CHOICES:
        raise EngineError(f"SERVING_REPLICA_EGRESS={egress!r} is not one of {', '.join(EGRESS_CHOICES)}.")
    return egress


def find_iptables() -> str | None:
    return shutil.which("iptables", path=HOST_PATH)


def run_iptables(binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``iptables -w 5 ARGS`` (waits for the xtables lock other workers hold); a failure with
    ``check`` is an EngineError naming the rule and iptables' own words."""
    done = subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip()
        raise EngineError(f"The firewall rule `iptables {' '.join(args)}` failed: {detail}.")
    return done


def usable_iptables(binary: str | None) -> str | None:
    """``binary`` when this process can change the firewall with it (iptables installed and we are
    root), else None: the one test both "add the rules" and "warn that we can not" ask."""
    return binary if binary is not None and os.geteuid() == 0 else None


def ephemeral_port_range() -> tuple[int, int]:
    """The host's ephemeral port range, where Docker picks the random host ports it publishes
    containers on (it reads the same file); Linux's default when the file can not be read."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split()[:2])
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    if not 0 < low <= high <= 65535:
        return DEFAULT_EPHEMERAL_RANGE
    return low, high
