"""Live moves through the operator, on the test bed of two libvirt hosts (lvo_testing.libvirt_hosts): a
real API server, an agent per host, real QEMU guests migrated peer to peer between two libvirtds.

A move by `spec.nodeName`, by a VirtualMachineMigration and by a drain: the guest keeps running (no second
boot), its disk keeps what it held, the old host keeps nothing, and `kubectl get vm` reads Ready throughout.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import pytest

from e2e import Kubectl, event_reasons, get_vm, guest_spec, install_crds, vm_manifest, wait_until, wait_vm
from lvo_testing.controlplane import ControlPlane
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.libvirt_hosts import BedHost, LibvirtHosts

pytestmark = pytest.mark.e2e

NAMESPACE = "moves"


@pytest.fixture(scope="module")
def bed(guest_image: GuestImage) -> Iterator[LibvirtHosts]:
    with LibvirtHosts(2, prefix="lvo-hm") as hosts:
        hosts.copy_in(guest_image.kernel, guest_image.initrd)
        yield hosts


@pytest.fixture(scope="module")
def agents(bed: LibvirtHosts, control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    install_crds(control_plane.kubectl, NAMESPACE)
    workdir = tmp_path_factory.mktemp("moves")
    with contextlib.ExitStack() as stack:
        for host in bed.hosts:
            stack.enter_context(bed.agent(host, workdir, control_plane.admin_kubeconfig))
        yield
        control_plane.kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=120s", timeout=150, check=False)


def domains(host: BedHost) -> dict[str, str]:
    """Every domain of the host and its state."""
    names = host.virsh("list", "--all", "--name").split()
    return {name: host.virsh("domstate", name, check=False).strip() for name in names}


def volumes(host: BedHost) -> list[str]:
    return sorted(path.name for path in host.libvirt.dir("/var/lib/libvirt").joinpath("images").iterdir())


class ReadyWatch:
    """Reads the VM's Ready condition every 0.2 s in the background, from kubectl, and keeps every reading."""

    def __init__(self, kubectl: Kubectl, name: str) -> None:
        self.kubectl, self.name = kubectl, name
        self.readings: list[tuple[str | None, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            status = get_vm(self.kubectl, self.name, NAMESPACE).get("status") or {}
            ready = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)
            self.readings.append((ready, status.get("nodeName")))

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_running_vm_moves_live_when_its_nodename_changes(
        bed: LibvirtHosts, agents: None, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    source, target = bed.hosts
    name = "by-nodename"
    spec = guest_spec(guest_image, source.name, marker=name, disks=[{"name": "data", "emptyDisk": {"size": "64Mi"}}])
    kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **spec))
    wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=240)
    domain = f"{NAMESPACE}_{name}"
    assert domains(source) == {domain: "running"}
    with ReadyWatch(kubectl, name) as watch:
        kubectl("patch", "vm", name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps({"spec": {"nodeName": target.name}}))
        wait_until(lambda: (get_vm(kubectl, name, NAMESPACE).get("status") or {}).get("nodeName") == target.name,
                   timeout=240, every=0.5, what="status.nodeName is the target")
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=60)
    status = get_vm(kubectl, name, NAMESPACE)["status"]
    assert status["migration"]["phase"] == "Succeeded", status["migration"]
    assert {(reading, node) for reading, node in watch.readings} <= {("True", source.name), ("True", target.name)}, \
        watch.readings
    assert domains(target) == {domain: "running"}
    assert domains(source) == {}
    assert volumes(source) == []
    assert len(volumes(target)) == 1
    assert {"Migrating", "Migrated"} <= set(event_reasons(kubectl, name, NAMESPACE))
    kubectl("delete", "vm", name, "-n", NAMESPACE, "--timeout=120s", timeout=150)
    assert domains(target) == {} and volumes(target) == []
