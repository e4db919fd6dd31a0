"""A libvirt host of its own on this machine: a mount namespace inside a network namespace, in which
/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are the
host's own directories (under its state directory), and a libvirtd of its own running there. The
test node (`node.py`) is one; the test bed of several hosts (`libvirt_hosts.py`) makes N.

containerd, kubelet and kube-proxy run in that mount namespace too, so the DaemonSet's hostPath
mounts resolve to the node's directories, as on a separate machine: the test may stop this libvirtd
without touching the host's (see ../shared/notes/two-hosts.md). Everything here dies with the
processes of the node's network namespace, which `node_cleanup.clean()` ends; the mounts vanish
with the namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from lvo_testing.controlplane import pid_alive, spawn
from lvo_testing.node_cleanup import LIBVIRT_DIRS

HOST_LIBVIRT_CONFIG = Path("/etc/libvirt")
HOST_LIBVIRT_CACHE = Path("/var/cache/libvirt")
# Test hosts share the machine's cgroups: no controllers, so two daemons' guests never share a cgroup name.
NODE_QEMU_SETTINGS = {"cgroup_controllers": "[ ]"}


class NodeHost:
    """`start()` makes the mount namespace (inside network namespace `netns`) and starts libvirtd in it;
    `enter()` prefixes a command to run there. With `tcp_address`, libvirtd also listens for plain TCP
    without authentication at that address (`qemu+tcp://ADDRESS/system`): for tests only."""

    def __init__(self, root: Path, logs: Path, netns: str, *, tcp_address: str | None = None) -> None:
        self.root = root
        self.logs = logs
        self.netns = netns
        self.tcp_address = tcp_address
        self.holder = 0

    @property
    def uri(self) -> str:
        """The node's libvirtd, as seen from outside its namespaces."""
        return f"qemu+unix:///system?socket={self.dir('/run/libvirt')}/libvirt-sock"

    def dir(self, mounted_at: str) -> Path:
        """Where the node's directory mounted at `mounted_at` lives on the machine."""
        return self.root / mounted_at.strip("/").replace("/", "-")

    def enter(self, network: bool = True) -> list[str]:
        """`network=False`: the mount namespace only, for a process that reaches the machine's loopback."""
        return ["nsenter", "-t", str(self.holder), "-m", *(["-n"] if network else []), "--"]

    def start(self) -> None:
        self._make_directories()
        mounts = " && ".join(f"mount --bind {self.dir(target)} {target}" for target in LIBVIRT_DIRS)
        # Slave propagation: the machine's later mounts show up inside, the node's never leak out.
        self.holder = spawn(["unshare", "--mount", "--propagation", "slave", "--",
                             "sh", "-c", f"{mounts} && exec sleep infinity"], self.logs / "mount-namespace.log",
                            netns=self.netns)
        deadline = time.monotonic() + 10
        while f" {LIBVIRT_DIRS[-1]} " not in Path(f"/proc/{self.holder}/mountinfo").read_text():
            if time.monotonic() > deadline or not pid_alive(self.holder):
                raise RuntimeError(f"the node's mount namespace: see {self.logs / 'mount-namespace.log'}")
            time.sleep(0.05)
        self._start_daemon("virtlogd")
        self.start_libvirtd()

    def start_libvirtd(self) -> None:
        self._start_daemon("libvirtd")
        self._wait_socket(self.dir("/run/libvirt") / "libvirt-sock")

    def _start_daemon(self, daemon: str) -> None:
        listen = ["--listen"] if daemon == "libvirtd" and self.tcp_address else []
        subprocess.run([*self.enter(), daemon, "-d", *listen, "-p", str(self._pid_file(daemon))], check=True,
                       capture_output=True)

    def stop_libvirtd(self, signum: int = signal.SIGTERM) -> None:
        """Stops libvirtd only (SIGTERM, as `systemctl stop` does; SIGKILL, as a crash); its guests and virtlogd
        go on."""
        pid = int(self._pid_file("libvirtd").read_text())
        os.kill(pid, signum)
        deadline = time.monotonic() + 30
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd {pid} did not stop")
            time.sleep(0.1)

    def qemu_pid(self, domain: str) -> int:
        return int(self.dir("/run/libvirt").joinpath("qemu", f"{domain}.pid").read_text())

    def copy_in(self, *paths: Path) -> None:
        """Copies files of the machine's /var/lib/libvirt to the same path on the node."""
        for path in paths:
            target = self.dir("/var/lib/libvirt") / path.relative_to("/var/lib/libvirt")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Contents and mode only: the xattrs hold the machine libvirtd's DAC labels (remember_owner), with
            # which the node's libvirtd refuses the file as in use by another owner.
            shutil.copyfile(path, target)
            shutil.copymode(path, target)

    def _pid_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def _make_directories(self) -> None:
        for target in LIBVIRT_DIRS:
            self.dir(target).mkdir(parents=True, exist_ok=True)
        etc = self.dir("/etc/libvirt")
        for conf in HOST_LIBVIRT_CONFIG.glob("*.conf"):   # not the host's domains, networks or pools
            shutil.copy2(conf, etc)
        _set(etc / "qemu.conf", NODE_QEMU_SETTINGS)
        tcp = {"listen_tls": "0", "listen_tcp": "1", "auth_tcp": '"none"', "listen_addr": f'"{self.tcp_address}"'}
        _set(etc / "libvirtd.conf", {"host_uuid": f'"{uuid.uuid4()}"', **(tcp if self.tcp_address else {})})
        (self.dir("/var/log/libvirt") / "qemu").mkdir(exist_ok=True)
        (self.dir("/var/lib/libvirt") / "images").mkdir(exist_ok=True)
        if HOST_LIBVIRT_CACHE.is_dir():   # QEMU's probed capabilities: a fresh daemon's first calls take seconds
            shutil.copytree(HOST_LIBVIRT_CACHE, self.dir("/var/cache/libvirt"), dirs_exist_ok=True, symlinks=True)

    def _wait_socket(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_UNIX) as client:
                try:
                    client.connect(str(path))
                    return
                except OSError:
                    time.sleep(0.1)
        raise RuntimeError(f"the libvirtd of {self.root}: {path} not answering after {timeout} s")


def _set(path: Path, settings: dict[str, str]) -> None:
    kept = [line for line in path.read_text().splitlines() if line.split("=")[0].strip() not in settings]
    path.write_text("\n".join([*kept, *(f"{key} = {value}" for key, value in settings.items()), ""]))
