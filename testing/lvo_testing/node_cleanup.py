"""Removes everything a real test node (`testing/node.py`) leaves on the machine, also after a run
that was killed: its processes (its own libvirtd and guests among them) and containers, their mounts
and cgroups, its network and mount namespaces (with its veth pair, iptables rules and per-namespace
sysctls), the global sysctls kubelet changed, and its state directory. Likewise the hosts of the
test bed of several libvirt hosts (`libvirt_hosts.py`): `clean_hosts()`.

Standard library only: `hack/clean-stale.sh` runs it with the system python3 before a fresh
clone has a virtualenv (`python3 testing/lvo_testing/node_cleanup.py`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

STATE = Path("/var/lib/libvirt-operator-test-node")
NETNS = "lvo-node"
HOST_VETH = "lvo-node-host"
# kubelet's cgroupRoot: every pod and container of the node lives below it, in every hierarchy.
CGROUP_ROOT = "libvirt-operator-test-node"
CGROUPS = Path("/sys/fs/cgroup")
# What kubelet sets on start (kernel defaults it expects); the node records the values it found.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
SAVED_SYSCTLS = STATE / "sysctls.json"
# The node's own copies of these, bind-mounted in its mount namespace (`testing/node_host.py`).
LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
# The test bed's hosts: each a network namespace and a state directory of this name, below HOSTS_STATE.
HOSTS_STATE = Path("/var/lib/libvirt-operator-test-hosts")
HOSTS_NAMES = r"lvo-h[\w-]*"


def save_sysctls() -> None:
    """Records the global sysctls kubelet will change, once: a restarted node keeps the originals."""
    if not SAVED_SYSCTLS.exists():
        STATE.mkdir(parents=True, exist_ok=True)
        values = {name: (Path("/proc/sys") / name).read_text().strip() for name in KUBELET_SYSCTLS}
        SAVED_SYSCTLS.write_text(json.dumps(values))


def _restore_sysctls() -> None:
    if SAVED_SYSCTLS.exists():
        for name, value in json.loads(SAVED_SYSCTLS.read_text()).items():
            (Path("/proc/sys") / name).write_text(value)


def _node_cgroups() -> list[Path]:
    """The node's cgroups in every hierarchy, deepest first."""
    found = [path for hierarchy in CGROUPS.iterdir() if (path := hierarchy / CGROUP_ROOT).is_dir()]
    # os.walk, not rglob: a container's cgroup may vanish while the walk runs.
    below = [Path(parent) / name for top in found for parent, names, _ in os.walk(top) for name in names]
    return sorted([*found, *below], key=lambda path: len(path.parts), reverse=True)


def node_pids() -> set[int]:
    """Processes in the node's network namespace (control plane, containerd, shims, kubelet, libvirtd,
    its guests, the mount namespace's holder) and in its cgroups (the containers, which have network
    namespaces of their own)."""
    pids: set[int] = set()
    listed = subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True, text=True)
    pids.update(int(pid) for pid in listed.stdout.split())
    for cgroup in _node_cgroups():
        try:
            pids.update(int(pid) for pid in (cgroup / "cgroup.procs").read_text().split())
        except OSError:  # gone, or going (ENODEV) while its last process exits
            continue
    pids.discard(os.getpid())
    return pids


def _kill_all(pids_of: Callable[[], set[int]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_of():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids_of() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids_of():
            return


def _unmount_under(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    inside = [m for m in mounts if m == str(root) or m.startswith(f"{root}/")]
    for mount in sorted(set(inside), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True)


def clean() -> None:
    _kill_all(node_pids)
    _unmount_under(STATE)
    for cgroup in _node_cgroups():
        try:
            cgroup.rmdir()
        except OSError:
            pass
    subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "delete", HOST_VETH], capture_output=True)
    _restore_sysctls()
    subprocess.run(["rm", "-rf", "--one-file-system", str(STATE)], check=False)


def host_namespaces(names: str = HOSTS_NAMES) -> list[str]:
    """The network namespaces whose names match the regular expression `names` in full."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip() and re.fullmatch(names, line.split()[0])]


def _mount_namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def host_pids(names: str = HOSTS_NAMES, mount_namespaces: set[str] | None = None) -> set[int]:
    """Processes in the hosts' network namespaces (libvirtd, virtlogd, guests, the mount namespaces' holders)
    and in their mount namespaces (the agents, which use the machine's network). `mount_namespaces` gathers
    those mount namespaces across calls: the agents are found after the holders died."""
    pids: set[int] = set()
    for netns in host_namespaces(names):
        listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        pids.update(int(pid) for pid in listed.stdout.split())
    seen = mount_namespaces if mount_namespaces is not None else set()
    seen.update({_mount_namespace(pid) for pid in pids} - {_mount_namespace("self"), None})
    pids.update(int(entry.name) for entry in Path("/proc").iterdir()
                if entry.name.isdigit() and _mount_namespace(entry.name) in seen)
    pids.discard(os.getpid())
    return pids


def clean_hosts(names: str = HOSTS_NAMES) -> None:
    """Removes the test bed's hosts whose names match `names`: processes, namespaces (their veths with them),
    mounts and state directories."""
    mount_namespaces: set[str] = set()
    _kill_all(lambda: host_pids(names, mount_namespaces))
    for netns in host_namespaces(names):
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
    states = [path for path in HOSTS_STATE.glob("*") if re.fullmatch(names, path.name)] if HOSTS_STATE.is_dir() else []
    for state in states:
        _unmount_under(state)
        subprocess.run(["rm", "-rf", "--one-file-system", str(state)], check=False)
    if HOSTS_STATE.is_dir() and not any(HOSTS_STATE.iterdir()):
        HOSTS_STATE.rmdir()


if __name__ == "__main__":
    clean()
    clean_hosts()
