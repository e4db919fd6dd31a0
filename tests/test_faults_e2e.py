"""Faults survived: agent kill -9, libvirtd crash, API server outage, deletion while libvirtd is
down, conflicting status writers. Each test ends with the invariant check.

Real kube-apiserver and real libvirtd with small QEMU guests (the test driver lives inside the
agent process, so it would die with the agent and could not show what survives).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from e2e import Kubectl, get_vm, guest_spec, namespace_agent, virsh, vm_manifest, wait_until, wait_vm
from lvo_testing import libvirt_env
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.libvirt_env import GuestImage

pytestmark = pytest.mark.e2e

NAMESPACE = "faults"
NODE = "node-faults"


@pytest.fixture(scope="module")
def agent(control_plane: ControlPlane, system_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from namespace_agent(control_plane, system_uri, tmp_path_factory.mktemp("faults"), NAMESPACE, NODE)


def vms(kubectl: Kubectl) -> list[dict]:
    return json.loads(kubectl("get", "vm", "-n", NAMESPACE, "-o", "json").stdout)["items"]


def domains() -> dict[str, str]:
    """This namespace's domains on the host: name -> uuid."""
    names = [n for n in virsh("list", "--all", "--name").split() if n.startswith(f"{NAMESPACE}_")]
    return {name: virsh("domuuid", name).strip() for name in names}


def assert_invariant(kubectl: Kubectl, timeout: float = 120) -> None:
    """Status matches libvirt, each VM has exactly its one domain, nothing orphaned or stuck."""
    def settled() -> bool:
        return all(vm.get("status", {}).get("ready") for vm in vms(kubectl))
    try:
        wait_until(settled, timeout=timeout, what="every VM Ready")
    except TimeoutError:
        for vm in vms(kubectl):
            print(vm["metadata"]["name"], json.dumps(vm.get("status"), indent=1))
        raise
    present = domains()
    items = vms(kubectl)
    assert sorted(present) == sorted(f"{NAMESPACE}_{vm['metadata']['name']}" for vm in items), present
    for vm in items:
        name = f"{NAMESPACE}_{vm['metadata']['name']}"
        status = vm["status"]
        assert present[name] == vm["metadata"]["uid"] == status["domain"]["uuid"]
        assert status["nodeName"] == NODE
        state = virsh("domstate", name).strip()
        expected = {"running": "running", "shutoff": "shut off", "paused": "paused"}[status["domain"]["state"]]
        assert state == expected, (name, state, status["domain"])
        assert not vm["metadata"].get("deletionTimestamp")


def apply_many(kubectl: Kubectl, image: GuestImage, names: list[str]) -> None:
    text = "---\n".join(vm_manifest(name, NAMESPACE, **guest_spec(image, NODE)) for name in names)
    kubectl("apply", "-f", "-", input=text)


def delete_all(kubectl: Kubectl) -> None:
    """Deletes every VM; afterwards no domain, volume or VM object of theirs is left."""
    uids = {vm["metadata"]["uid"] for vm in vms(kubectl)}
    kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=120s", timeout=150)
    assert domains() == {} and vms(kubectl) == []
    assert not [v for v in virsh("vol-list", "default").split() if v[:36] in uids]


def test_agent_killed_while_creating_vms(agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    names = [f"rollout-{i}" for i in range(50)]
    apply_many(kubectl, guest_image, names)
    wait_until(lambda: len(domains()) >= 10, timeout=60, every=0.05, what="some domains defined")
    agent.kill()
    began = time.monotonic()
    # 50 TCG guests booting saturate both cores for about a minute: the new process's imports and
    # start-up then get a small share of the CPU and can take longer than AgentProcess's default 60 s.
    agent.start(timeout=240)
    print(f"kill -9 mid-rollout: healthy {time.monotonic() - began:.1f}s after the kill")
    assert_invariant(kubectl, timeout=300)
    print(f"kill -9 mid-rollout: converged {time.monotonic() - began:.1f}s after restart")
    for vm in vms(kubectl):
        assert vm["status"]["restartCount"] == 0
    delete_all(kubectl)


def test_libvirtd_restarted_during_a_rollout_and_a_deletion(agent: AgentProcess, control_plane: ControlPlane,
                                                           guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_many(kubectl, guest_image, ["keep", "drop"])
    wait_vm(kubectl, "drop", NAMESPACE, "condition=Ready")
    apply_many(kubectl, guest_image, [f"late-{i}" for i in range(6)])
    # A service restart mid-rollout. (kill -9 of libvirtd 9.0 while it starts a QEMU domain can
    # leave that domain "paused (starting up)" with its job lock held for good, even across
    # libvirtd restarts; no API call can clear it, so the crash is tested while nothing starts.)
    libvirt_env.restart_libvirtd(signal.SIGTERM)
    assert_invariant(kubectl)
    kubectl("delete", "vm", "drop", "-n", NAMESPACE, "--wait=false")
    libvirt_env.restart_libvirtd(signal.SIGKILL)
    kubectl("wait", "--for=delete", "vm/drop", "-n", NAMESPACE, "--timeout=120s", timeout=150)
    assert_invariant(kubectl)
    delete_all(kubectl)


def test_vm_deleted_while_libvirtd_is_down_keeps_its_finalizer_until_it_is_back(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_many(kubectl, guest_image, ["orphan-proof"])
    wait_vm(kubectl, "orphan-proof", NAMESPACE, "condition=Ready")
    libvirt_env.stop_daemons()
    try:
        kubectl("delete", "vm", "orphan-proof", "-n", NAMESPACE, "--wait=false")
        time.sleep(3)
        held = get_vm(kubectl, "orphan-proof", NAMESPACE)
        assert held["metadata"]["finalizers"] == ["libvirt-operator.io/domain"]
    finally:
        libvirt_env.start_daemons()
    kubectl("wait", "--for=delete", "vm/orphan-proof", "-n", NAMESPACE, "--timeout=120s", timeout=150)
    assert "faults_orphan-proof" not in domains()


def test_api_server_outage_while_vms_change_state(agent: AgentProcess, control_plane: ControlPlane,
                                                  guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_many(kubectl, guest_image, ["outage-a", "outage-b"])
    for name in ("outage-a", "outage-b"):
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready")
    control_plane.stop_apiserver()
    try:
        virsh("destroy", f"{NAMESPACE}_outage-a")
        virsh("suspend", f"{NAMESPACE}_outage-b")
        time.sleep(20)
    finally:
        control_plane.start_apiserver()
    began = time.monotonic()
    try:
        wait_until(lambda: get_vm(kubectl, "outage-a", NAMESPACE)["status"]["restartCount"] == 1, timeout=60,
                   what="the restart during the outage is reported")
    except TimeoutError:
        print(json.dumps(get_vm(kubectl, "outage-a", NAMESPACE)["status"], indent=1), agent.log_tail(400))
        raise
    assert_invariant(kubectl)
    print(f"API server outage: status caught up {time.monotonic() - began:.1f}s after it returned")
    delete_all(kubectl)


def test_a_conflicting_status_writer_is_overruled(agent: AgentProcess, control_plane: ControlPlane,
                                                  guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_many(kubectl, guest_image, ["contested"])
    wait_vm(kubectl, "contested", NAMESPACE, "condition=Ready")
    for _ in range(5):
        kubectl("patch", "vm", "contested", "-n", NAMESPACE, "--subresource=status", "--type=merge",
                "-p", '{"status":{"printableStatus":"Bogus","ready":false}}')
    wait_vm(kubectl, "contested", NAMESPACE, "jsonpath={.status.printableStatus}=Running")
    assert_invariant(kubectl)
    delete_all(kubectl)
