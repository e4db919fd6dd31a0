"""The kustomize base and the examples on a real API server, and the agent running with nothing but
the ServiceAccount token the base gives it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from e2e import CRD_NAMES, event_reasons, install_crds, vm_manifest, wait_until, wait_vm
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
AGENT_NAMESPACE = "kube-system"   # manifests/kustomization.yaml
NODE = "node-rbac"
NAMESPACE = "rbac"
# (resource, resource names, verbs) beyond what every authenticated user may do: manifests/rbac.yaml.
GRANTED = {
    ("virtualmachines.libvirt-operator.io", "", "list patch watch"),
    ("virtualmachines.libvirt-operator.io/status", "", "patch"),
    ("virtualmachinemigrations.libvirt-operator.io", "", "list watch"),
    ("virtualmachinemigrations.libvirt-operator.io/status", "", "patch"),
    ("libvirtnodes.libvirt-operator.io", "", "create list watch"),
    ("libvirtnodes.libvirt-operator.io/status", "", "patch"),
    ("secrets", "", "get"),
    ("events", "", "create"),
    ("namespaces", "kube-system", "get"),
    ("customresourcedefinitions.apiextensions.k8s.io", "", "list watch"),
    ("leases.coordination.k8s.io", "", "create"),
    ("leases.coordination.k8s.io", "libvirt-operator-placement", "get update"),
}


def test_server_side_dry_run_of_the_base_on_a_fresh_api_server(tmp_path: Path) -> None:
    """What a new cluster sees: nothing of ours exists yet, and a dry run persists nothing."""
    with ControlPlane(tmp_path / "fresh") as fresh:
        result = fresh.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "manifests"))
    created = set(re.findall(r"^(\S+) created \(server dry run\)$", result.stdout, re.MULTILINE))
    assert created == {
        "customresourcedefinition.apiextensions.k8s.io/virtualmachines.libvirt-operator.io",
        "customresourcedefinition.apiextensions.k8s.io/libvirtnodes.libvirt-operator.io",
        "customresourcedefinition.apiextensions.k8s.io/virtualmachinemigrations.libvirt-operator.io",
        "validatingadmissionpolicy.admissionregistration.k8s.io/virtualmachine-updates.libvirt-operator.io",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/virtualmachine-updates.libvirt-operator.io",
        "serviceaccount/libvirt-operator", "clusterrole.rbac.authorization.k8s.io/libvirt-operator",
        "clusterrolebinding.rbac.authorization.k8s.io/libvirt-operator", "daemonset.apps/libvirt-operator-agent",
        "role.rbac.authorization.k8s.io/libvirt-operator-placement",
        "rolebinding.rbac.authorization.k8s.io/libvirt-operator-placement",
    }, result.stdout + result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_passes_server_side_validation(control_plane: ControlPlane, example: Path) -> None:
    install_crds(control_plane.kubectl, "default")
    result = control_plane.kubectl("apply", "--dry-run=server", "-f", str(example))
    assert f"virtualmachine.libvirt-operator.io/{example.stem} " in result.stdout


def allowed_rules(control_plane: ControlPlane, kubeconfig: Path) -> set[tuple[str, str, str]]:
    """`kubectl auth can-i --list` in the agent's namespace (its placement Lease is there) as (resource,
    resource names, verbs); non-resource URLs left out."""
    lines = control_plane.kubectl("auth", "can-i", "--list", "-n", AGENT_NAMESPACE,
                                  kubeconfig=kubeconfig).stdout.splitlines()[1:]
    rules = set()
    for line in lines:
        if not line.strip() or line.startswith(" "):
            continue
        _non_resource_urls, names, verbs = re.findall(r"\[([^\]]*)\]", line)
        rules.add((line.split()[0], " ".join(sorted(names.split())), " ".join(sorted(verbs.split()))))
    return rules


def test_the_agent_works_with_its_service_account_and_may_do_nothing_else(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    kubectl = control_plane.kubectl
    kubectl("apply", "-k", str(ROOT / "manifests"))
    kubectl("wait", "--for=condition=Established", *CRD_NAMES, "--timeout=30s")
    kubectl("create", "namespace", NAMESPACE, check=False)

    # Exactly the rules the agent uses, beyond what any authenticated identity may do anyway.
    config = control_plane.service_account_kubeconfig(AGENT_NAMESPACE, "libvirt-operator")
    nobody = control_plane.service_account_kubeconfig(NAMESPACE, "no-bindings")
    granted = allowed_rules(control_plane, config) - allowed_rules(control_plane, nobody)
    assert granted == GRANTED, granted

    # The lifecycle with that token only: define+start (finalizer, status, events, a Secret read for
    # the seed, the node heartbeat), stop, delete (undefine, disks, finalizer released).
    kubectl("-n", NAMESPACE, "create", "secret", "generic", "least-userdata", "--from-literal=userdata=#cloud-config\n",
            check=False)
    with AgentProcess(tmp_path, config, libvirt_uri="test:///default", node_name=NODE,
                      extra_args=("--storage-pool", "default-pool")) as agent:
        kubectl("apply", "-f", "-", input=vm_manifest(
            "least", NAMESPACE, nodeName=NODE, memory="64Mi",
            disks=[{"name": "data", "emptyDisk": {"size": "1Gi"}},
                   {"name": "seed", "cloudInit": {"userDataSecretRef": {"name": "least-userdata"}}}]))
        wait_vm(kubectl, "least", NAMESPACE, "condition=Ready", timeout=60)
        node = json.loads(kubectl("get", "libvirtnode", NODE, "-o", "json").stdout)
        assert node["status"]["heartbeatTime"]
        kubectl("patch", "vm", "least", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
        wait_vm(kubectl, "least", NAMESPACE, "jsonpath={.status.printableStatus}=Stopped", timeout=60)
        wait_until(lambda: event_reasons(kubectl, "least", NAMESPACE)["Stopped"] >= 1, 30,
                   what="an Event posted with the least privileges")
        kubectl("delete", "vm", "least", "-n", NAMESPACE, "--timeout=60s")
        assert "NotFound" in kubectl("get", "vm", "least", "-n", NAMESPACE, check=False).stderr
        log = agent.log_path.read_text()
    for denied in ("Forbidden", " 403", "Not enough permissions"):
        assert denied not in log, log
