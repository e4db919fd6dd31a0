"""The kustomize base on the real API server, and the agent running with only its ServiceAccount's rights."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e import vm_manifest, wait_vm
from libvirt_operator.testing.agent_process import AgentProcess
from libvirt_operator.testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent
NODE = "node-rbac"
NAMESPACE = "rbac"
GRANTED = {
    ("virtualmachines.libvirt-operator.io", "list patch watch"),
    ("virtualmachines.libvirt-operator.io/status", "patch"),
    ("libvirtnodes.libvirt-operator.io", "create list"),
    ("libvirtnodes.libvirt-operator.io/status", "patch"),
    ("secrets", "get"),
    ("events", "create"),
    ("customresourcedefinitions.apiextensions.k8s.io", "list watch"),
}
EVERY_AUTHENTICATED_USER = {"selfsubjectreviews.authentication.k8s.io", "selfsubjectaccessreviews.authorization.k8s.io",
                            "selfsubjectrulesreviews.authorization.k8s.io"}


def test_server_side_dry_run_of_the_base(control_plane: ControlPlane) -> None:
    # A dry run persists nothing, so the namespace the base creates must exist for its namespaced objects.
    control_plane.kubectl("create", "namespace", "libvirt-operator", check=False)
    result = control_plane.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "manifests"))
    assert "daemonset.apps/libvirt-operator-agent created (server dry run)" in result.stdout
    assert "clusterrole.rbac.authorization.k8s.io/libvirt-operator created (server dry run)" in result.stdout


def test_the_agent_works_with_its_service_account_and_may_do_nothing_else(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    kubectl = control_plane.kubectl
    kubectl("apply", "-k", str(ROOT / "manifests"))
    kubectl("wait", "--for=condition=Established", "crd/virtualmachines.libvirt-operator.io", "--timeout=30s")
    kubectl("create", "namespace", NAMESPACE, check=False)
    config = control_plane.service_account_kubeconfig("libvirt-operator", "libvirt-operator")
    listed = kubectl("auth", "can-i", "--list", kubeconfig=config).stdout.splitlines()[1:]
    rules = {(line.split()[0], " ".join(sorted(line[line.rindex("["):].strip("[] \n").split()))) for line in listed
             if line.split() and not line.split()[0].startswith("[")}
    resource_rules = {rule for rule in rules if rule[0] not in EVERY_AUTHENTICATED_USER}
    assert resource_rules == GRANTED, resource_rules
    with AgentProcess(tmp_path, config, libvirt_uri="test:///default", node_name=NODE,
                      extra_args=("--storage-pool", "default-pool")) as agent:
        kubectl("apply", "-f", "-", input=vm_manifest("least", NAMESPACE, nodeName=NODE, memory="64Mi",
                                                       disks=[{"name": "data", "emptyDisk": {"size": "1Gi"}}]))
        wait_vm(kubectl, "least", NAMESPACE, "condition=Ready", timeout=60)
        kubectl("patch", "vm", "least", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
        wait_vm(kubectl, "least", NAMESPACE, "jsonpath={.status.printableStatus}=Stopped", timeout=60)
        kubectl("delete", "vm", "least", "-n", NAMESPACE, "--timeout=60s")
        log = agent.log_path.read_text()
    assert "Forbidden" not in log and " 403" not in log
