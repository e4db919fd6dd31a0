"""libvirtd hung (SIGSTOP) or killed: the node's VMs read Unknown, the LibvirtNode says why and keeps its
heartbeat, and once libvirt answers again status is the truth and no guest was restarted.

Real kube-apiserver, real libvirtd with a QEMU guest, the agent as a process with a short call bound.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest

from e2e import Kubectl, get_vm, guest_spec, namespace_agent, virsh, vm_manifest, wait_until, wait_vm
from lvo_testing import libvirt_env
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.libvirt_env import GuestImage

pytestmark = pytest.mark.e2e

NAMESPACE = "unanswered"
NODE = "node-unanswered"


@pytest.fixture(scope="module")
def agent(control_plane: ControlPlane, system_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from namespace_agent(control_plane, system_uri, tmp_path_factory.mktemp("unanswered"), NAMESPACE, NODE,
                               "--libvirt-call-timeout-seconds", "3")


def ready_condition(kubectl: Kubectl, name: str) -> dict:
    return next(c for c in get_vm(kubectl, name, NAMESPACE)["status"]["conditions"] if c["type"] == "Ready")


def node_status(kubectl: Kubectl) -> dict:
    return json.loads(kubectl("get", "libvirtnode", NODE, "-o", "json").stdout)["status"]


def unknown(kubectl: Kubectl, name: str) -> dict | None:
    vm = get_vm(kubectl, name, NAMESPACE)
    condition = ready_condition(kubectl, name)
    return condition if vm["status"]["printableStatus"] == "Unknown" and condition["status"] == "Unknown" else None


@pytest.mark.parametrize("fault", ["hung", "killed"])
def test_libvirt_that_does_not_answer_makes_status_unknown_then_true_again(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage, fault: str) -> None:
    kubectl = control_plane.kubectl
    name = f"steady-{fault}"
    kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **guest_spec(guest_image, NODE)))
    wait_vm(kubectl, name, NAMESPACE, "condition=Ready")
    domain_id = virsh("domid", f"{NAMESPACE}_{name}").strip()
    if fault == "hung":
        with libvirt_env.libvirtd_stopped():
            condition = wait_until(lambda: unknown(kubectl, name), timeout=90, what="the VM reads Unknown")
            # A call past the bound, or libvirt's keepalive closing the connection first: either says why.
            assert condition["reason"] in ("LibvirtNotResponding", "LibvirtUnavailable"), condition
            assert "qemu:///system" in condition["message"]
            assert "since" in condition["message"]
            first = node_status(kubectl)
            assert first["libvirt"]["state"] in ("NotResponding", "Disconnected"), first
            wait_until(lambda: node_status(kubectl)["heartbeatTime"] != first["heartbeatTime"], timeout=60,
                       what="the heartbeat goes on while libvirtd hangs")
    else:
        libvirt_env.kill_libvirtd(signal.SIGKILL)
        try:
            condition = wait_until(lambda: unknown(kubectl, name), timeout=90, what="the VM reads Unknown")
            assert condition["reason"] in ("LibvirtUnavailable", "LibvirtNotResponding")
            assert "qemu:///system" in condition["message"]
            wait_until(lambda: node_status(kubectl)["libvirt"]["state"] == "Disconnected", timeout=60,
                       what="the LibvirtNode says libvirt is disconnected")
        finally:
            libvirt_env.start_daemons()
    wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=120)
    vm = get_vm(kubectl, name, NAMESPACE)
    assert vm["status"]["printableStatus"] == "Running" and vm["status"]["restartCount"] == 0
    assert virsh("domid", f"{NAMESPACE}_{name}").strip() == domain_id, "the guest was restarted"
    wait_until(lambda: node_status(kubectl)["libvirt"]["state"] == "Connected", timeout=60,
               what="the LibvirtNode says libvirt answers again")
