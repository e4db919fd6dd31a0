"""Faults in the middle of a live move, on a bed of two libvirt hosts (lvo_testing.libvirt_hosts): the source
agent killed, the destination agent killed, the destination libvirtd killed, the link between the hosts cut,
the VM deleted. Each test ends with the fleet invariant (lvo_testing.fleet_invariant): one running domain per
VM, nothing of a VM on a host that does not run it, status the truth.

The agents move at most 4 MiB/s, so the 128 MiB guest takes ~30 s to move and a fault lands mid-move: each
test waits until the move is Running and the target's libvirtd holds the incoming domain before it strikes.
A counting guest shows, where it survives, that it did not reboot.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from e2e import bed_agents, get_vm, guest_spec, vm_manifest, wait_until, wait_vm
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.fleet_invariant import ENDED_PHASES, assert_fleet_invariant, ready_of
from lvo_testing.guest_counter import counts, read_log, shows_reboot
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.libvirt_hosts import BedHost, LibvirtHosts

pytestmark = pytest.mark.e2e

NAMESPACE = "move-faults"
PROGRESS_TIMEOUT_SECONDS = 15
AGENT_ARGS = ("--migration-bandwidth", "4", "--migration-progress-timeout", str(PROGRESS_TIMEOUT_SECONDS))
INVARIANT_SECONDS = 120
CONSOLE_LOGS = "/var/log/libvirt/libvirt-operator"


@pytest.fixture(scope="module")
def bed(guest_image: GuestImage) -> Iterator[LibvirtHosts]:
    with LibvirtHosts(2, prefix="lvo-hf") as hosts:
        hosts.copy_in(guest_image.kernel, guest_image.initrd)
        yield hosts


@pytest.fixture(scope="module")
def agents(bed: LibvirtHosts, control_plane: ControlPlane,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    with bed_agents(bed, control_plane, tmp_path_factory.mktemp("move-faults"), NAMESPACE, *AGENT_ARGS) as agents:
        yield agents


class Moves:
    """One test's view of the bed: boots a counting guest on the first host, moves it to the second, and
    puts the bed back (agents and libvirtds running, links up) afterwards."""

    def __init__(self, bed: LibvirtHosts, agents: dict[str, AgentProcess], control_plane: ControlPlane) -> None:
        self.bed, self.agents, self.kubectl = bed, agents, control_plane.kubectl
        self.source, self.target = bed.hosts

    def boot(self, name: str, image: GuestImage) -> str:
        """A running counting guest with an owned disk on the source; returns its uid."""
        spec = guest_spec(image, self.source.name, marker=name, disks=[{"name": "data", "emptyDisk": {"size": "64Mi"}}])
        spec["kernelBoot"]["cmdline"] = image.cmdline(marker=name, counter=True)
        self.kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **spec))
        wait_vm(self.kubectl, name, NAMESPACE, "condition=Ready", timeout=240)
        wait_until(lambda: counts(self.console(name, self.source)), timeout=120, what=f"{name} counts")
        return self.vm(name)["metadata"]["uid"]

    def vm(self, name: str) -> dict:
        return get_vm(self.kubectl, name, NAMESPACE)

    def status(self, name: str) -> dict:
        return self.vm(name).get("status") or {}

    def phase(self, name: str) -> str | None:
        return (self.status(name).get("migration") or {}).get("phase")

    def start_move(self, name: str) -> None:
        """Asks the move by spec.nodeName and returns once it is mid-move: Running, the target's libvirtd holding
        the incoming domain. Ready reads True all along."""
        self.kubectl("patch", "vm", name, "-n", NAMESPACE, "--type=merge",
                     "-p", json.dumps({"spec": {"nodeName": self.target.name}}))
        readings: list[tuple[str | None, str | None]] = []

        def running() -> bool:
            status = self.status(name)
            readings.append((ready_of(status), (status.get("migration") or {}).get("phase")))
            return readings[-1][1] == "Running"
        wait_until(running, timeout=120, every=0.3, what=f"{name}'s move Running")
        wait_until(lambda: f"{NAMESPACE}_{name}" in self.target.virsh("list", "--all", "--name").split(),
                   timeout=60, every=0.3, what="the target's libvirtd holds the incoming domain")
        assert all(ready == "True" for ready, _ in readings), readings

    def ended(self, name: str, timeout: float = 240) -> dict:
        """The VM's status once its move ended (Succeeded or Failed)."""
        wait_until(lambda: self.phase(name) in ENDED_PHASES, timeout=timeout, every=0.5, what=f"{name}'s move ended")
        return self.status(name)

    def console(self, name: str, host: BedHost) -> str:
        return read_log(host.path(f"{CONSOLE_LOGS}/{NAMESPACE}_{name}.log"))

    def last_count(self, name: str) -> int:
        return max(count.n for host in self.bed.hosts for count in counts(self.console(name, host)))

    def assert_went_on(self, name: str, before: int) -> None:
        """The guest counts on past `before` (a count seen before the fault), with no second boot."""
        def joined() -> str:
            return self.console(name, self.source) + self.console(name, self.target)
        wait_until(lambda: self.last_count(name) > before + 10, timeout=60, what=f"{name} counts on past {before}")
        assert not shows_reboot(joined()), joined()[-2000:]

    def assert_invariant(self) -> None:
        assert_fleet_invariant(self.kubectl, NAMESPACE, self.bed.hosts, self.agents, timeout=INVARIANT_SECONDS)

    def link(self, host: BedHost, state: str) -> None:
        subprocess.run(["ip", "-n", host.name, "link", "set", host.name, state], check=True, capture_output=True)

    def restore(self) -> None:
        """The bed as before the test: links up, libvirtds and agents running, the test's VMs deleted."""
        for host in self.bed.hosts:
            self.link(host, "up")
            if not host.libvirt.dir("/run/libvirt").joinpath("libvirt-sock").exists() or not _answers(host):
                host.libvirt.start_libvirtd()
            agent = self.agents[host.name]
            if not agent.healthy():
                agent.kill()
                agent.start()
        self.kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=120s", timeout=150, check=False)


def _answers(host: BedHost) -> bool:
    try:
        host.virsh("version")
        return True
    except subprocess.CalledProcessError:
        return False


@pytest.fixture
def moves(bed: LibvirtHosts, agents: dict[str, AgentProcess], control_plane: ControlPlane) -> Iterator[Moves]:
    fleet = Moves(bed, agents, control_plane)
    try:
        yield fleet
    finally:
        fleet.restore()


def _restart_agent(moves: Moves, host: BedHost) -> None:
    moves.agents[host.name].kill()
    moves.agents[host.name].start()


def _crash_libvirtd(moves: Moves, host: BedHost) -> None:
    host.libvirt.stop_libvirtd(signal.SIGKILL)
    host.libvirt.start_libvirtd()


CRASHES: dict[str, tuple[Callable[[Moves], None], str]] = {
    # libvirt drives a peer-to-peer move by itself: without the agents it completes.
    "source-agent-killed": (lambda moves: _restart_agent(moves, moves.source), "Succeeded"),
    "target-agent-killed": (lambda moves: _restart_agent(moves, moves.target), "Succeeded"),
    # The source libvirtd loses its connection to the target's and aborts: the guest stays.
    "target-libvirtd-killed": (lambda moves: _crash_libvirtd(moves, moves.target), "Failed"),
}


@pytest.mark.parametrize("crash", CRASHES)
def test_a_crash_mid_move_leaves_one_guest_that_went_on(moves: Moves, guest_image: GuestImage, crash: str) -> None:
    """SIGKILL, then a restart, mid-move: the move completes or fails as libvirt did, never two copies, and the
    guest never reboots."""
    strike, outcome = CRASHES[crash]
    moves.boot(crash, guest_image)
    moves.start_move(crash)
    before = moves.last_count(crash)
    strike(moves)
    status = moves.ended(crash)
    print(f"{crash}: on {status['nodeName']}, the move {status['migration']}")
    assert status["migration"]["phase"] == outcome, status["migration"]
    assert status["nodeName"] == (moves.target if outcome == "Succeeded" else moves.source).name
    moves.assert_invariant()
    moves.assert_went_on(crash, before)


def test_link_cut_mid_move_aborts_on_the_progress_timeout(moves: Moves, guest_image: GuestImage) -> None:
    name = "link-cut"
    uid = moves.boot(name, guest_image)
    moves.start_move(name)
    before = moves.last_count(name)
    moves.link(moves.target, "down")
    status = moves.ended(name, timeout=PROGRESS_TIMEOUT_SECONDS + 120)
    assert status["migration"]["phase"] == "Failed", status["migration"]
    assert "progress timeout" in status["migration"]["message"], status["migration"]
    assert status["nodeName"] == moves.source.name
    moves.link(moves.target, "up")
    moves.assert_invariant()
    assert not any(path.name.startswith(uid) for path in moves.target.path("/var/lib/libvirt/images").iterdir())
    moves.assert_went_on(name, before)
    print("link cut:", status["migration"])


def test_vm_deleted_mid_move_leaves_nothing(moves: Moves, guest_image: GuestImage) -> None:
    name = "deleted-mid-move"
    uid = moves.boot(name, guest_image)
    moves.start_move(name)
    moves.kubectl("delete", "vm", name, "-n", NAMESPACE, "--wait=false")
    wait_until(lambda: name not in moves.kubectl("get", "vm", "-n", NAMESPACE, "-o", "name").stdout, timeout=180,
               every=0.5, what="the VM is gone (finalizer released)")
    moves.assert_invariant()
    for host in moves.bed.hosts:
        assert uid not in host.virsh("list", "--all", "--uuid")
        assert not any(path.name.startswith(uid) for path in host.path("/var/lib/libvirt/images").iterdir())
