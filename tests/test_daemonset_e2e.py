"""The DaemonSet as users run it: `kubectl apply -k` on a real node (kubelet, containerd, kube-proxy,
the image built from the Dockerfile), its agent driving the host's libvirtd through the mounted socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e import get_vm, guest_spec, vm_manifest, wait_until, wait_vm, virsh
from lvo_testing.agent_process import TRACEBACK
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.node import NODE_NAME, Node

pytestmark = pytest.mark.e2e

OVERLAY = Path(__file__).parent / "data" / "node-overlay"
NAMESPACE = "deployed"


@pytest.fixture(scope="module")
def node(system_uri: str) -> Iterator[Node]:
    with Node() as real_node:
        real_node.kubectl("apply", "-k", str(OVERLAY))
        real_node.kubectl("-n", "kube-system", "rollout", "status", "daemonset/libvirt-operator-agent",
                          "--timeout=120s", timeout=150)
        real_node.kubectl("create", "namespace", NAMESPACE)
        wait_until(lambda: real_node.kubectl("get", "libvirtnode", NODE_NAME, check=False).returncode == 0,
                   timeout=60, what="the DaemonSet's agent registers its LibvirtNode")
        yield real_node
        logs = real_node.kubectl("-n", "kube-system", "logs", "daemonset/libvirt-operator-agent", "--tail=-1").stdout
        assert TRACEBACK not in logs, logs


def agent_pod(node: Node) -> dict[str, Any]:
    pods = json.loads(node.kubectl("-n", "kube-system", "get", "pods", "-l",
                                   "app.kubernetes.io/component=agent", "-o", "json").stdout)["items"]
    [pod] = pods
    return pod


def test_the_agent_pod_runs_the_built_image_and_reaches_libvirtd(node: Node) -> None:
    pod = agent_pod(node)
    [status] = pod["status"]["containerStatuses"]
    assert status["ready"] and status["image"].endswith("libvirt-operator:0.1.0"), status
    metrics = node.kubectl("get", "--raw",
                           f"/api/v1/namespaces/kube-system/pods/{pod['metadata']['name']}:9090/proxy/metrics").stdout
    assert "libvirt_operator_libvirt_connected 1.0" in metrics, "the agent reaches libvirtd through the mounted socket"


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
    assert domain in virsh("list", "--name").split()
    kubectl("delete", "vm", "deployed-vm", "-n", NAMESPACE, "--timeout=90s", timeout=120)
    assert domain not in virsh("list", "--all", "--name").split()
