"""The DaemonSet as users run it: `kubectl apply -k` on a real node (kubelet, containerd, kube-proxy,
the image built from the Dockerfile), its agent driving the node's own libvirtd through the mounted
socket: the lifecycle, libvirtd stopped and back, and a rollout of the agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import event_reasons, get_vm, guest_spec, vm_manifest, wait_until, wait_vm, virsh
from lvo_testing.agent_process import TRACEBACK
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.node import NODE_NAME, Node

pytestmark = pytest.mark.e2e

OVERLAY = Path(__file__).parent / "data" / "node-overlay"
NAMESPACE = "deployed"
DAEMONSET = "daemonset/libvirt-operator-agent"


@pytest.fixture(scope="module")
def node(guest_image: GuestImage) -> Iterator[Node]:
    with Node() as real_node:
        real_node.host.copy_in(guest_image.kernel, guest_image.initrd)
        real_node.kubectl("apply", "-k", str(OVERLAY))
        wait_rolled_out(real_node)
        real_node.kubectl("create", "namespace", NAMESPACE)
        wait_until(lambda: real_node.kubectl("get", "libvirtnode", NODE_NAME, check=False).returncode == 0,
                   timeout=60, what="the DaemonSet's agent registers its LibvirtNode")
        yield real_node
        logs = real_node.kubectl("-n", "kube-system", "logs", DAEMONSET, "--tail=-1").stdout
        print(real_node.kubectl("get", "vm", "-A", "-o", "yaml").stdout, logs[-6000:])   # shown when a test failed
        assert TRACEBACK not in logs, logs


@pytest.fixture(scope="module")
def steady_vm(node: Node, guest_image: GuestImage) -> str:
    """A guest that runs through the module's disturbances; its domain name."""
    node.kubectl("apply", "-f", "-", input=vm_manifest("steady", NAMESPACE, **guest_spec(guest_image, NODE_NAME)))
    wait_vm(node.kubectl, "steady", NAMESPACE, "condition=Ready", timeout=120)
    return f"{NAMESPACE}_steady"


def wait_rolled_out(node: Node) -> None:
    """`rollout status` may judge a DaemonSet whose status does not count its pod yet: the pod's readiness too."""
    node.kubectl("-n", "kube-system", "rollout", "status", DAEMONSET, "--timeout=120s", timeout=150)
    wait_until(lambda: pod_ready(node), timeout=120, what="the agent's pod is ready")


def agent_pods(node: Node) -> list[dict[str, Any]]:
    return json.loads(node.kubectl("-n", "kube-system", "get", "pods", "-l",
                                   "app.kubernetes.io/component=agent", "-o", "json").stdout)["items"]


def agent_pod(node: Node) -> dict[str, Any]:
    [pod] = agent_pods(node)
    return pod


def pod_ready(node: Node) -> bool:
    pods = agent_pods(node)
    statuses = [status for pod in pods for status in pod["status"].get("containerStatuses", [])]
    return len(pods) == 1 and len(statuses) == 1 and statuses[0]["ready"]


def agent_metrics(node: Node) -> str:
    pod = agent_pod(node)["metadata"]["name"]
    return node.kubectl("get", "--raw", f"/api/v1/namespaces/kube-system/pods/{pod}:9090/proxy/metrics").stdout


def domain_id(node: Node, domain: str) -> str:
    return virsh("domid", domain, uri=node.host.uri).strip()


def test_the_agent_pod_runs_the_built_image_and_reaches_libvirtd(node: Node) -> None:
    [status] = agent_pod(node)["status"]["containerStatuses"]
    assert status["ready"] and status["image"].endswith("libvirt-operator:0.1.0"), status
    assert "libvirt_operator_libvirt_connected 1.0" in agent_metrics(node), \
        "the agent reaches libvirtd through the mounted socket"


def test_a_vm_lives_and_dies_through_the_daemonset(node: Node, guest_image: GuestImage) -> None:
    kubectl = node.kubectl
    kubectl("apply", "-f", "-", input=vm_manifest("deployed-vm", NAMESPACE, **guest_spec(guest_image, NODE_NAME)))
    wait_vm(kubectl, "deployed-vm", NAMESPACE, "condition=Ready", timeout=120)
    assert get_vm(kubectl, "deployed-vm", NAMESPACE)["status"]["printableStatus"] == "Running"
    kubectl("patch", "vm", "deployed-vm", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
    wait_vm(kubectl, "deployed-vm", NAMESPACE, "jsonpath={.status.printableStatus}=Stopped")
    kubectl("patch", "vm", "deployed-vm", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"runStrategy":"Always"}}')
    wait_vm(kubectl, "deployed-vm", NAMESPACE, "jsonpath={.status.printableStatus}=Running")
    domain = f"{NAMESPACE}_deployed-vm"
    assert domain in virsh("list", "--name", uri=node.host.uri).split()

    before = (node.host.qemu_pid(domain), domain_id(node, domain))
    kubectl("annotate", "vm", "deployed-vm", "-n", NAMESPACE, "libvirt-operator.io/restart=1")
    wait_until(lambda: event_reasons(kubectl, "deployed-vm", NAMESPACE)["Restarted"] >= 1,
               what="the restart annotation restarts the guest")
    wait_vm(kubectl, "deployed-vm", NAMESPACE, "condition=Ready")
    after = (node.host.qemu_pid(domain), domain_id(node, domain))
    assert after[0] != before[0] and after[1] != before[1], "a new QEMU, a new domain id"
    assert event_reasons(kubectl, "deployed-vm", NAMESPACE)["Restarted"] == 1
    assert (node.host.qemu_pid(domain), domain_id(node, domain)) == after, "restarted once"

    kubectl("delete", "vm", "deployed-vm", "-n", NAMESPACE, "--timeout=90s", timeout=120)
    assert domain not in virsh("list", "--all", "--name", uri=node.host.uri).split()


def test_the_pod_is_unready_while_libvirtd_is_stopped_and_recovers(node: Node, steady_vm: str) -> None:
    """The readiness probe follows the agent's libvirt connection; nothing restarts, no guest either."""
    qemu_pid, restarts = node.host.qemu_pid(steady_vm), agent_restarts(node)
    node.host.stop_libvirtd()
    try:
        wait_until(lambda: not pod_ready(node), timeout=60, what="the pod reports unready without libvirtd")
        wait_vm(node.kubectl, "steady", NAMESPACE, "condition=Ready=Unknown")
    finally:
        node.host.start_libvirtd()
    wait_until(lambda: pod_ready(node), timeout=60, what="the pod is ready again with libvirtd back")
    wait_vm(node.kubectl, "steady", NAMESPACE, "condition=Ready")
    assert node.host.qemu_pid(steady_vm) == qemu_pid, "the guest ran on"
    assert agent_restarts(node) == restarts, "unready, not restarted"


def agent_restarts(node: Node) -> int:
    [status] = agent_pod(node)["status"]["containerStatuses"]
    return int(status["restartCount"])


def test_a_rollout_of_the_agent_restarts_no_guest_and_writes_no_unchanged_status(
        node: Node, steady_vm: str) -> None:
    kubectl = node.kubectl
    wait_vm(kubectl, "steady", NAMESPACE, "condition=Ready")
    old_pod = agent_pod(node)["metadata"]["name"]
    qemu_pid, version = node.host.qemu_pid(steady_vm), get_vm(kubectl, "steady", NAMESPACE)["metadata"]["resourceVersion"]
    kubectl("-n", "kube-system", "rollout", "restart", DAEMONSET)
    wait_until(lambda: old_pod not in [pod["metadata"]["name"] for pod in agent_pods(node)], timeout=120,
               what="the old agent pod gone")
    wait_rolled_out(node)

    def settled() -> bool:
        metrics = agent_metrics(node)
        return "libvirt_operator_queue_depth 0.0" in metrics and "libvirt_operator_reconciles_total 0.0" not in metrics
    wait_until(settled, timeout=60, what="the new agent has reconciled the VM")
    assert node.host.qemu_pid(steady_vm) == qemu_pid, "the rollout restarted the guest"
    assert get_vm(kubectl, "steady", NAMESPACE)["metadata"]["resourceVersion"] == version, \
        "the rollout wrote a VM whose state did not change"
