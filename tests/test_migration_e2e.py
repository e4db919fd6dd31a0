"""Live moves through the operator, on the test bed of two libvirt hosts (lvo_testing.libvirt_hosts): a
real API server, an agent per host, real QEMU guests migrated peer to peer between two libvirtds.

A move by `spec.nodeName`, by a VirtualMachineMigration and by a drain: the guest keeps running (no second
boot), its disk keeps what it held, the old host keeps nothing, and `kubectl get vm` reads Ready throughout.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from e2e import Kubectl, bed_agents, event_reasons, get_vm, guest_spec, vm_manifest, wait_until, wait_vm
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.guest_counter import boots, counts, counts_on_disk, read_log, shows_reboot
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.libvirt_hosts import BedHost, LibvirtHosts

pytestmark = pytest.mark.e2e

NAMESPACE = "moves"
LOCAL_POOL = "fast"
"""A pool the test defines on one host only: a VM with a volume in it cannot move live to the other."""


@pytest.fixture(scope="module")
def bed(guest_image: GuestImage) -> Iterator[LibvirtHosts]:
    with LibvirtHosts(2, prefix="lvo-hm") as hosts:
        hosts.copy_in(guest_image.kernel, guest_image.initrd)
        yield hosts


@pytest.fixture(scope="module")
def agents(bed: LibvirtHosts, control_plane: ControlPlane,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    with bed_agents(bed, control_plane, tmp_path_factory.mktemp("moves"), NAMESPACE,
                    "--allowed-pool", "default", "--allowed-pool", LOCAL_POOL) as agents:
        yield agents


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


CONSOLE_LOGS = "/var/log/libvirt/libvirt-operator"
IMAGES = "/var/lib/libvirt/images"


def console_log(host: BedHost, name: str) -> str:
    return read_log(host.path(f"{CONSOLE_LOGS}/{NAMESPACE}_{name}.log"))


def counting_vm(kubectl: Kubectl, guest_image: GuestImage, name: str, node: str | None, **extra: Any) -> str:
    """A counting guest with an empty disk (where it writes its counts), Ready; returns its uid."""
    spec = guest_spec(guest_image, node, marker=name, counter=True,
                      disks=[{"name": "data", "emptyDisk": {"size": "64Mi"}}], **extra)
    kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **spec))
    wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=240)
    return get_vm(kubectl, name, NAMESPACE)["metadata"]["uid"]


def placed(kubectl: Kubectl, name: str) -> str | None:
    return (get_vm(kubectl, name, NAMESPACE).get("status") or {}).get("nodeName")


def assert_moved_alive(kubectl: Kubectl, name: str, uid: str, source: BedHost, target: BedHost,
                       watch: ReadyWatch) -> None:
    """The guest runs on the target only, did not reboot, its disk holds what it wrote before the move, the source
    holds nothing of it, and every reading of the VM during the move was Ready."""
    domain = f"{NAMESPACE}_{name}"
    assert ("True", source.name) in watch.readings or ("True", target.name) in watch.readings
    assert {ready for ready, _ in watch.readings} == {"True"}, watch.readings
    assert domains(target).get(domain) == "running"
    assert domain not in domains(source)
    assert not [v for v in volumes(source) if v.startswith(uid)]
    wait_until(lambda: len(counts(console_log(target, name))) >= 3, timeout=30, what="the guest counts on the target")
    before, after = console_log(source, name), console_log(target, name)
    assert boots(before) == 1 and boots(after) == 0, (before[-500:], after[:500])
    assert not shows_reboot(before + after)
    last_before = counts(before)[-1].n
    assert counts(after)[0].n > last_before
    written = [count.n for count in counts(before)[-5:-1]]
    on_disk = counts_on_disk(target, f"{IMAGES}/{uid}-data.qcow2", written)
    assert on_disk == {n: n for n in written}, on_disk


def test_a_running_vm_moves_live_when_its_nodename_changes(
        bed: LibvirtHosts, agents: dict[str, AgentProcess], control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    source, target = bed.hosts
    name = "by-nodename"
    uid = counting_vm(kubectl, guest_image, name, source.name)
    wait_until(lambda: len(counts(console_log(source, name))) >= 5, timeout=60, what="the guest counts")
    with ReadyWatch(kubectl, name) as watch:
        kubectl("patch", "vm", name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps({"spec": {"nodeName": target.name}}))
        wait_until(lambda: placed(kubectl, name) == target.name, timeout=240, every=0.5,
                   what="status.nodeName is the target")
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=60)
    status = get_vm(kubectl, name, NAMESPACE)["status"]
    assert status["migration"]["phase"] == "Succeeded", status["migration"]
    assert status["migration"]["trigger"] == "NodeName"
    assert_moved_alive(kubectl, name, uid, source, target, watch)
    assert {"Migrating", "Migrated"} <= set(event_reasons(kubectl, name, NAMESPACE))
    assert 'libvirt_operator_moves_total{outcome="Succeeded"} 1.0' in agents[source.name].metrics()
    kubectl("delete", "vm", name, "-n", NAMESPACE, "--timeout=120s", timeout=150)
    assert not [v for v in volumes(target) if v.startswith(uid)]
    assert f"{NAMESPACE}_{name}" not in domains(target)


def migration_status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "vmim", name, "-n", NAMESPACE, "-o", "json").stdout).get("status") or {}


def test_a_virtualmachinemigration_moves_the_vm_and_records_the_outcome(
        bed: LibvirtHosts, agents: dict[str, AgentProcess], control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    name = "by-request"
    uid = counting_vm(kubectl, guest_image, name, None)
    source = next(host for host in bed.hosts if host.name == placed(kubectl, name))
    target = next(host for host in bed.hosts if host is not source)
    wait_until(lambda: len(counts(console_log(source, name))) >= 5, timeout=60, what="the guest counts")
    request = {"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachineMigration",
               "metadata": {"name": "move-1", "namespace": NAMESPACE}, "spec": {"vmName": name}}
    with ReadyWatch(kubectl, name) as watch:
        kubectl("apply", "-f", "-", input=json.dumps(request))
        wait_until(lambda: migration_status(kubectl, "move-1").get("phase") in ("Succeeded", "Failed"), timeout=240,
                   every=0.5, what="the migration ends")
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=60)
    outcome = migration_status(kubectl, "move-1")
    assert outcome["phase"] == "Succeeded", outcome
    assert (outcome["sourceNode"], outcome["targetNode"]) == (source.name, target.name)
    assert placed(kubectl, name) == target.name
    assert_moved_alive(kubectl, name, uid, source, target, watch)
    wait_until(lambda: "downtimeMilliseconds" in migration_status(kubectl, "move-1"), timeout=30,
               what="the downtime recorded")

    request["metadata"]["name"] = "move-2"
    request["spec"]["targetNode"] = target.name
    kubectl("apply", "-f", "-", input=json.dumps(request))
    wait_until(lambda: migration_status(kubectl, "move-2").get("phase") == "Failed", timeout=60,
               what="a move to where the VM runs fails")
    assert "already runs" in migration_status(kubectl, "move-2")["message"]
    assert placed(kubectl, name) == target.name
    kubectl("delete", "vm", name, "-n", NAMESPACE, "--timeout=120s", timeout=150)


def node_status(kubectl: Kubectl, node: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "libvirtnode", node, "-o", "json").stdout).get("status") or {}


def test_a_drain_moves_every_vm_it_may_and_names_those_that_block_it(
        bed: LibvirtHosts, agents: dict[str, AgentProcess], control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    source, target = bed.hosts

    def set_node(node: BedHost, spec: dict[str, Any]) -> None:
        kubectl("patch", "libvirtnode", node.name, "--type=merge", "-p", json.dumps({"spec": spec}))

    try:
        movable = {name: counting_vm(kubectl, guest_image, name, source.name) for name in ("drained-a", "drained-b")}
        counting_vm(kubectl, guest_image, "pinned", source.name)
        for name in movable:  # unpinned, and placed where they run
            kubectl("patch", "vm", name, "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"nodeName": null}}')
        assert {placed(kubectl, name) for name in movable} == {source.name}
        wait_until(lambda: len(counts(console_log(source, "drained-a"))) >= 5, timeout=60, what="the guest counts")
        with ReadyWatch(kubectl, "drained-a") as watch:
            set_node(source, {"drain": True})
            for name in movable:
                wait_until(lambda: placed(kubectl, name) == target.name, timeout=240, every=0.5, what=f"{name} moved")
                wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=60)
        assert_moved_alive(kubectl, "drained-a", movable["drained-a"], source, target, watch)
        drain = wait_until(lambda: (node_status(kubectl, source.name).get("drain") or {}).get("state") == "Blocked"
                           and node_status(kubectl, source.name)["drain"], timeout=60, what="the drain is Blocked")
        assert drain["remaining"] == 1
        assert drain["blockedBy"] == [{"vm": f"{NAMESPACE}/pinned", "reason": f"pinned: spec.nodeName is {source.name}"}]
        assert placed(kubectl, "pinned") == source.name
        assert domains(source).get(f"{NAMESPACE}_pinned") == "running"
    finally:
        set_node(source, {"drain": None})
        kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=180s", timeout=210)


def test_a_move_to_a_node_without_the_pool_of_the_vms_volume_is_refused_and_the_vm_says_why(
        bed: LibvirtHosts, agents: dict[str, AgentProcess], control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    source, target = bed.hosts
    name, volume = "local-volume", "local-volume-data"
    source.run("mkdir", "-p", f"/var/lib/libvirt/{LOCAL_POOL}")
    source.virsh("pool-define-as", LOCAL_POOL, "dir", "--target", f"/var/lib/libvirt/{LOCAL_POOL}")
    source.virsh("pool-start", LOCAL_POOL)
    source.virsh("vol-create-as", LOCAL_POOL, volume, "16M", "--format", "qcow2")
    try:
        spec = guest_spec(guest_image, source.name, marker=name,
                          disks=[{"name": "data", "volume": {"pool": LOCAL_POOL, "name": volume}}])
        kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **spec))
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=240)
        request = {"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachineMigration",
                   "metadata": {"name": "to-no-pool", "namespace": NAMESPACE},
                   "spec": {"vmName": name, "targetNode": target.name}}
        kubectl("apply", "-f", "-", input=json.dumps(request))
        wait_until(lambda: migration_status(kubectl, "to-no-pool").get("phase") == "Failed", timeout=60,
                   what="the request fails")
        why = f"node {target.name} cannot take the VM live: node {target.name} lacks the storage pool(s) {LOCAL_POOL}"
        assert migration_status(kubectl, "to-no-pool")["message"].startswith(why)

        def migratable() -> dict[str, Any]:
            conditions = get_vm(kubectl, name, NAMESPACE)["status"]["conditions"]
            return next(c for c in conditions if c["type"] == "Migratable")

        condition = wait_until(lambda: migratable()["status"] == "False" and migratable(), timeout=60,
                               what="the VM reads Migratable=False")
        assert condition["reason"] == "TargetIncompatible" and condition["message"].startswith(why)
        assert placed(kubectl, name) == source.name
        assert domains(source).get(f"{NAMESPACE}_{name}") == "running"
        assert f"{NAMESPACE}_{name}" not in domains(target)
        ready = next(c for c in get_vm(kubectl, name, NAMESPACE)["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"
    finally:
        kubectl("delete", "vm", name, "-n", NAMESPACE, "--timeout=120s", timeout=150, check=False)
        source.virsh("vol-delete", volume, "--pool", LOCAL_POOL, check=False)
        source.virsh("pool-destroy", LOCAL_POOL, check=False)
        source.virsh("pool-undefine", LOCAL_POOL, check=False)
