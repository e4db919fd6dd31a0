"""The test bed of several libvirt hosts (lvo_testing.libvirt_hosts): two hosts, an agent on each, one API server.

Each VM runs on the libvirtd of its node only; each LibvirtNode publishes how other hosts reach it; a plain
guest moves live between the hosts over the bed's network, and a counting guest with its qcow2 overlay goes on
counting after the move, its disk copied (what moves through the operator rest on: libvirt 9.0 needs the
overlay pre-created on the destination); and the bed leaves nothing behind, also when the process that made
it is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e import Kubectl, bed_agents, get_vm, guest_spec, vm_manifest, wait_until, wait_vm
from lvo_testing import node_cleanup
from lvo_testing.controlplane import REPO, ControlPlane, pid_alive
from lvo_testing.guest_counter import Count, boots, counts, counts_on_disk, read_log, shows_reboot
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.libvirt_hosts import POOL_PATH, BedHost, LibvirtHosts

pytestmark = pytest.mark.e2e

NAMESPACE = "libvirt-hosts"


@pytest.fixture(scope="module")
def bed(guest_image: GuestImage) -> Iterator[LibvirtHosts]:
    with LibvirtHosts(2) as hosts:
        hosts.copy_in(guest_image.kernel, guest_image.initrd)
        yield hosts


@pytest.fixture(scope="module")
def agents(bed: LibvirtHosts, control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with bed_agents(bed, control_plane, tmp_path_factory.mktemp("libvirt-hosts"), NAMESPACE):
        yield


def _domains(host: BedHost) -> set[str]:
    return set(host.virsh("list", "--all", "--name").split())


def _volumes(host: BedHost) -> list[str]:
    """The files in the host's storage pool (read directly: a pool refresh could meet the agent's own)."""
    return sorted(path.name for path in host.libvirt.dir("/var/lib/libvirt").joinpath("images").iterdir())


def test_a_vm_pinned_to_a_node_runs_on_that_host_only_and_leaves_nothing(
        bed: LibvirtHosts, agents: None, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl: Kubectl = control_plane.kubectl
    pinned = {f"on-{host.name}": host for host in bed.hosts}
    for name, host in pinned.items():
        spec = guest_spec(guest_image, host.name, marker=name, disks=[{"name": "data", "emptyDisk": {"size": "64Mi"}}])
        kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **spec))
    for name, host in pinned.items():
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=240)
        assert get_vm(kubectl, name, NAMESPACE)["status"]["nodeName"] == host.name
    for name, host in pinned.items():
        domain = f"{NAMESPACE}_{name}"
        assert host.virsh("domstate", domain).strip() == "running"
        assert len(_volumes(host)) == 1, _volumes(host)
        for other in bed.hosts:
            if other is not host:
                assert domain not in _domains(other)
    kubectl("delete", "vm", *pinned, "-n", NAMESPACE, "--timeout=180s", timeout=210)
    for host in bed.hosts:
        assert not {d for d in _domains(host) if d.startswith(f"{NAMESPACE}_")}
        assert _volumes(host) == []


def test_each_libvirtnode_publishes_how_other_hosts_reach_it(
        bed: LibvirtHosts, agents: None, control_plane: ControlPlane) -> None:
    def published() -> dict[str, object]:
        listed = json.loads(control_plane.kubectl("get", "libvirtnodes", "-o", "json").stdout)["items"]
        return {node["metadata"]["name"]: node.get("status", {}).get("migration") for node in listed}
    expected = {host.name: {"uri": host.tcp_uri, "address": host.address} for host in bed.hosts}
    wait_until(lambda: expected.items() <= published().items(), timeout=120, every=1,
               what=f"LibvirtNodes publish {expected}")


def _guest_xml(guest_image: GuestImage, domain: str, cmdline: str, devices: str = "") -> str:
    return f"""<domain type='qemu'><name>{domain}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type><kernel>{guest_image.kernel}</kernel><initrd>{guest_image.initrd}</initrd>
        <cmdline>{cmdline}</cmdline></os>
      <devices>{devices}<console type='pty'/></devices></domain>"""


def test_a_plain_guest_moves_live_between_the_hosts(bed: LibvirtHosts, guest_image: GuestImage) -> None:
    source, destination = bed.hosts
    domain = "lvo-bed-plain-guest"
    xml = _guest_xml(guest_image, domain, guest_image.cmdline(marker=domain), "<serial type='pty'/>")
    subprocess.run(["virsh", "-c", source.uri, "create", "/dev/stdin"], input=xml, text=True, check=True,
                   capture_output=True, timeout=120)
    try:
        moved = source.migrate_live(domain, destination)
        assert moved.returncode == 0, moved.stderr
        assert destination.virsh("domstate", domain).strip() == "running"
        assert domain not in _domains(source)
    finally:
        for host in bed.hosts:
            host.virsh("destroy", domain, check=False)


@dataclass(frozen=True)
class CounterGuest:
    domain: str
    overlay: str       # its disk, a qcow2 overlay of the guest image's base disk, as the hosts see it
    console_log: str   # where each host's virtlogd writes its serial console, as the hosts see it

    def counts_on(self, host: BedHost) -> list[Count]:
        return counts(read_log(host.path(self.console_log)))


def _create_overlay(host: BedHost, guest_image: GuestImage, overlay: str) -> None:
    """A fresh overlay of the base disk, of the base's virtual size (what the destination of a move needs)."""
    host.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(guest_image.disk), "-F", "qcow2", overlay)


@pytest.fixture
def counter_guest(bed: LibvirtHosts, guest_image: GuestImage) -> Iterator[CounterGuest]:
    """A counting guest running on the first host, its disk an overlay in the pool; counting already."""
    source = bed.hosts[0]
    domain = "lvo-bed-counter-guest"
    guest = CounterGuest(domain, f"{POOL_PATH}/{domain}.qcow2", f"/var/log/libvirt/qemu/{domain}-console.log")
    bed.copy_in(guest_image.disk)
    _create_overlay(source, guest_image, guest.overlay)
    devices = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{guest.overlay}'/>"
               f"<target dev='vda' bus='virtio'/></disk>"
               f"<serial type='pty'><log file='{guest.console_log}' append='on'/></serial>")
    xml = _guest_xml(guest_image, domain, guest_image.cmdline(marker=domain, counter=True), devices)
    subprocess.run(["virsh", "-c", source.uri, "define", "/dev/stdin"], input=xml, text=True, check=True,
                   capture_output=True, timeout=120)
    try:
        source.virsh("start", domain)
        wait_until(lambda: len(guest.counts_on(source)) >= 5, timeout=180, every=0.5, what=f"{domain} counts")
        yield guest
    finally:
        for host in bed.hosts:
            host.virsh("destroy", domain, check=False)
            host.virsh("undefine", domain, check=False)
            host.path(guest.overlay).unlink(missing_ok=True)
            host.path(guest.console_log).unlink(missing_ok=True)


def test_a_counting_guest_moves_live_with_its_disk_and_goes_on_counting(
        bed: LibvirtHosts, guest_image: GuestImage, counter_guest: CounterGuest) -> None:
    source, destination = bed.hosts
    domain = counter_guest.domain
    _create_overlay(destination, guest_image, counter_guest.overlay)
    moved = source.migrate_live(domain, destination, "--persistent", "--undefinesource", "--copy-storage-inc",
                                "--migrate-disks", "vda", "--disks-uri", f"tcp://{destination.address}")
    assert moved.returncode == 0, moved.stderr
    wait_until(lambda: len(counter_guest.counts_on(destination)) >= 3, timeout=60, what="counts on the destination")
    before_log = read_log(source.path(counter_guest.console_log))
    after_log = read_log(destination.path(counter_guest.console_log))
    before, after = counts(before_log), counts(after_log)
    assert boots(before_log) == 1 and boots(after_log) == 0, after_log
    assert not shows_reboot(before_log + after_log)
    assert after[0].n > before[-1].n
    assert after[0].disk == after[0].n - 1, after[0]
    # The destination's overlay started empty; each count before the source's last was on the source's disk
    # before the guest printed the next.
    written = [count.n for count in before[:-1]]
    assert counts_on_disk(destination, counter_guest.overlay, written) == {n: n for n in written}
    assert domain not in _domains(source)
    assert "Persistent:     yes" in destination.virsh("dominfo", domain)
    job = destination.virsh("domjobinfo", "--completed", domain)
    assert "Total downtime" in job and "Time elapsed" in job, job


def test_a_move_without_the_overlay_on_the_destination_fails_and_the_guest_goes_on_at_the_source(
        bed: LibvirtHosts, counter_guest: CounterGuest) -> None:
    source, destination = bed.hosts
    moved = source.migrate_live(counter_guest.domain, destination, "--persistent", "--undefinesource",
                                "--copy-storage-inc", "--migrate-disks", "vda")
    assert moved.returncode != 0
    assert "pre-creation of storage targets for incremental storage migration is not supported" in moved.stderr
    counted = len(counter_guest.counts_on(source))
    wait_until(lambda: len(counter_guest.counts_on(source)) > counted, timeout=30, what="counting on at the source")
    assert counter_guest.domain not in _domains(destination)
    assert not destination.path(counter_guest.overlay).exists()
    assert not shows_reboot(read_log(source.path(counter_guest.console_log)))


KILLED_BED = """
import json, subprocess, sys, time
from pathlib import Path
from lvo_testing.libvirt_hosts import LibvirtHosts
bed = LibvirtHosts(2, prefix="lvo-hkill")
bed.start()
host = bed.hosts[0]
bed.copy_in(Path(sys.argv[2]), Path(sys.argv[3]))
subprocess.run(["virsh", "-c", host.uri, "create", "/dev/stdin"], input=sys.argv[4], text=True, check=True,
               capture_output=True)
agent = bed.agent(host, host.libvirt.logs, Path(sys.argv[1]))
agent.start()
print(json.dumps({"agent": agent.process.pid, "qemu": host.libvirt.qemu_pid("killed-bed-guest")}), flush=True)
time.sleep(3600)
"""


def test_a_killed_bed_is_cleaned_without_a_trace(control_plane: ControlPlane, guest_image: GuestImage) -> None:
    names = r"lvo-hkill(\d+|sw)"
    guest = (f"<domain type='qemu'><name>killed-bed-guest</name><memory unit='MiB'>64</memory>"
             f"<os><type arch='x86_64'>hvm</type><kernel>{guest_image.kernel}</kernel>"
             f"<initrd>{guest_image.initrd}</initrd><cmdline>{guest_image.cmdline()}</cmdline></os></domain>")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "testing")])}
    maker = subprocess.Popen([sys.executable, "-c", KILLED_BED, str(control_plane.admin_kubeconfig),
                              str(guest_image.kernel), str(guest_image.initrd), guest],
                             stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = maker.stdout.readline() if maker.stdout else ""
        assert line, f"the bed did not come up (exit {maker.poll()})"
        started = json.loads(line)
        assert node_cleanup.host_pids(names) >= set(started.values())
    finally:
        os.killpg(maker.pid, signal.SIGKILL)
        maker.wait(30)
    node_cleanup.clean_hosts(names)
    assert not any(pid_alive(pid) for pid in started.values()), started
    assert node_cleanup.host_pids(names) == set()
    assert node_cleanup.host_namespaces(names) == []
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "lvo-hkill" not in links
    assert str(node_cleanup.HOSTS_STATE / "lvo-hkill") not in Path("/proc/self/mountinfo").read_text()
    assert not list(node_cleanup.HOSTS_STATE.glob("lvo-hkill*"))
