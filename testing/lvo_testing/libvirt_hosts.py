"""A test bed of several libvirt hosts on this machine, for moves between hosts.

Each host (`lvo-h0`, `lvo-h1`, ... by default) is a `NodeHost`: a libvirtd and virtlogd of its own in a
network and mount namespace of its own, with its own socket, images, logs and `host_uuid`. The hosts'
namespaces hang on one bridge in a namespace of its own (`lvo-hsw`), each at 10.215.0.(1+index), and
every libvirtd listens there for plain TCP without authentication (`qemu+tcp://ADDRESS/system`; tests
only): traffic between hosts stays inside namespaces the run created. An agent per host runs in that
host's mount namespace (the paths it inspects are its libvirtd's) with the machine's network (the test
API server is on loopback). `stop()`, and `node_cleanup.clean_hosts()` after a killed run (called by
hack/clean-stale.sh), remove everything: processes, guests, mounts, namespaces, veths, state directories.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lvo_testing import node_cleanup
from lvo_testing.agent_process import AgentProcess
from lvo_testing.node_cleanup import HOSTS_STATE, LIBVIRT_DIRS
from lvo_testing.node_host import NodeHost

SUBNET = "10.215.0"
SWITCH = "sw"
BRIDGE = "br0"
POOL = "default"
POOL_PATH = Path("/var/lib/libvirt/images")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class BedHost:
    name: str
    address: str
    libvirt: NodeHost

    @property
    def uri(self) -> str:
        """Its libvirtd's unix socket, from the machine or from the host's mount namespace alike."""
        return self.libvirt.uri

    @property
    def tcp_uri(self) -> str:
        """Its libvirtd as other hosts' libvirtd reach it."""
        return f"qemu+tcp://{self.address}/system"

    def virsh(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True, check=check,
                              timeout=120).stdout

    def migrate_live(self, domain: str, destination: BedHost, *flags: str) -> subprocess.CompletedProcess[str]:
        """`virsh migrate --live --p2p` of `domain` to `destination`, the stream to its address on the bed's
        network; for a guest with its own disks, `flags` adds what tests/test_libvirt_hosts_e2e.py shows."""
        return subprocess.run(["virsh", "-c", self.uri, "migrate", "--live", "--p2p", *flags, domain,
                               destination.tcp_uri, "--migrateuri", f"tcp://{destination.address}",
                               "--listen-address", destination.address], capture_output=True, text=True, timeout=600)

    def run(self, *command: str) -> str:
        """A command inside the host's namespaces (paths as its libvirtd sees them)."""
        return subprocess.run([*self.libvirt.enter(), *command], capture_output=True, text=True, check=True,
                              timeout=120).stdout

    def path(self, inside: str | Path) -> Path:
        """Where the file the host sees at `inside`, below one of its libvirt directories, lives on the machine."""
        for mounted_at in LIBVIRT_DIRS:
            if Path(inside).is_relative_to(mounted_at):
                return self.libvirt.dir(mounted_at) / Path(inside).relative_to(mounted_at)
        raise ValueError(f"{inside}: not in the host's own directories {LIBVIRT_DIRS}")


class LibvirtHosts:
    """`count` hosts named `prefix` + index; a context manager. A bed cleans what an earlier bed of the
    same prefix left before it starts."""

    def __init__(self, count: int = 2, prefix: str = "lvo-h") -> None:
        assert re.fullmatch(node_cleanup.HOSTS_NAMES, prefix), f"{prefix}: not a name the cleanup finds"
        self.names = rf"{re.escape(prefix)}(\d+|{SWITCH})"
        self.switch = f"{prefix}{SWITCH}"
        self.hosts = [self._host(f"{prefix}{index}", f"{SUBNET}.{index + 1}") for index in range(count)]

    @staticmethod
    def _host(name: str, address: str) -> BedHost:
        root = HOSTS_STATE / name
        return BedHost(name, address, NodeHost(root / "libvirt", root / "logs", name, tcp_address=address))

    def __enter__(self) -> LibvirtHosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.stop()
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.switch, "link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._connect(host)
            host.libvirt.logs.mkdir(parents=True, exist_ok=True)
            host.libvirt.start()
            host.virsh("pool-define-as", POOL, "dir", "--target", str(POOL_PATH))
            host.virsh("pool-start", POOL)

    def _connect(self, host: BedHost) -> None:
        """The host's namespace, and a veth from it to the bridge (the host's end named after it)."""
        _ip("netns", "add", host.name)
        _ip("-n", host.name, "link", "set", "lo", "up")
        port = f"{host.name}-{SWITCH}"
        _ip("link", "add", host.name, "netns", host.name, "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", BRIDGE, "up")
        _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.name)
        _ip("-n", host.name, "link", "set", host.name, "up")

    def stop(self) -> None:
        node_cleanup.clean_hosts(self.names)

    def copy_in(self, *paths: Path) -> None:
        """Files of the machine's /var/lib/libvirt, at the same path on every host."""
        for host in self.hosts:
            host.libvirt.copy_in(*paths)

    def agent(self, host: BedHost, workdir: Path, kubeconfig: Path, *extra_args: str) -> AgentProcess:
        """An agent for `host` (its node name is the host's), publishing how other hosts reach it."""
        return AgentProcess(workdir, kubeconfig, libvirt_uri=host.uri, node_name=host.name,
                            command_prefix=tuple(host.libvirt.enter(network=False)),
                            extra_args=("--migration-uri", host.tcp_uri, "--migration-address", host.address,
                                        *extra_args))
