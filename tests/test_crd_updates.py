"""Spec changes on a real API server: what cannot be applied is refused at admission, naming the field
and the fix (CEL transition rules with `oldSelf`); everything else is admitted (README "What a spec change
does")."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from e2e import wait_until
from test_crd_admission import NAMESPACE, Kubectl, manifest, vm_crd

pytestmark = pytest.mark.e2e
POLICY = Path(__file__).parent.parent / "crds" / "virtualmachine-updates.yaml"


@pytest.fixture(scope="module", autouse=True)
def no_vm_left_behind(vm_crd: Kubectl) -> Iterator[None]:
    """Agents of later modules would take the VMs made here (those without nodeName) as theirs."""
    yield
    vm_crd("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=60s", timeout=90, check=False)


@pytest.fixture(scope="module")
def policy(vm_crd: Kubectl) -> Kubectl:
    """The CRD and the update policy, once the API server enforces the policy (it loads policies in the background)."""
    vm_crd("apply", "-f", str(POLICY))
    create(vm_crd, "policy-probe", disks=disks(("data", "2Gi")))

    def shrink_refused() -> bool:
        if patch(vm_crd, "policy-probe", {"disks": disks(("data", "1Gi"))}).returncode != 0:
            return True
        patch(vm_crd, "policy-probe", {"disks": disks(("data", "2Gi"))})
        return False

    wait_until(shrink_refused, timeout=60, every=1, what="the update policy is enforced")
    return vm_crd


def create(kubectl: Kubectl, name: str, **spec: object) -> None:
    kubectl("delete", "vm", name, "-n", NAMESPACE, "--ignore-not-found")
    # JSON, not YAML: kubectl reads YAML 1.1, where a size like 1e10 would be a number.
    kubectl("apply", "-f", "-", input=json.dumps(yaml.safe_load(manifest(name, **spec))))


def patch(kubectl: Kubectl, name: str, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kubectl("patch", "vm", name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps({"spec": spec}), check=False)


def owned_by(kubectl: Kubectl, name: str, node: str) -> None:
    """What an agent writes once it owns the VM."""
    kubectl("patch", "vm", name, "-n", NAMESPACE, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"nodeName": node}}))


def stored_spec(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return yaml.safe_load(kubectl("get", "vm", name, "-n", NAMESPACE, "-o", "yaml").stdout)["spec"]


def refused(result: subprocess.CompletedProcess[str], name: str, *expected: str) -> None:
    assert result.returncode != 0, result.stdout
    assert f'"{name}" is invalid' in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def disks(*sized: tuple[str, object]) -> list[dict[str, Any]]:
    return [{"name": name, "emptyDisk": {"size": size}} for name, size in sized]


@pytest.mark.parametrize(("before", "after"), [("2Gi", "1Gi"), (2 * 1024**3, "1Gi"), ("1Gi", "1G"), ("1Gi", 1048576), ("1e10", "9Gi")])
def test_an_empty_disk_cannot_shrink(policy: Kubectl, before: object, after: object) -> None:
    vm_crd = policy
    create(vm_crd, "shrink", disks=disks(("root", "1Gi"), ("data", before)))
    result = patch(vm_crd, "shrink", {"disks": disks(("root", "1Gi"), ("data", after))})
    refused(result, "shrink", f"spec.disks[].emptyDisk.size cannot shrink (disk data from {before} to {after})",
            "or a new disk name for a new empty disk")
    assert stored_spec(vm_crd, "shrink")["disks"][1]["emptyDisk"]["size"] == before


def test_an_empty_disk_may_grow_keep_its_size_or_give_way_to_another(policy: Kubectl) -> None:
    vm_crd = policy
    create(vm_crd, "grow", disks=disks(("data", "1Gi"), ("scratch", "4Gi")))
    for changed in (disks(("data", "2Gi"), ("scratch", "4Gi")),       # grows
                    disks(("data", 2 * 1024**3), ("scratch", "4Gi")),  # the same size, written otherwise
                    disks(("data", "2Gi"), ("scratch-2", "1Gi")),      # a new name: a new, smaller disk
                    [{"name": "data", "image": {"path": "/var/lib/libvirt/images/a.qcow2"}}]):  # another source
        result = patch(vm_crd, "grow", {"disks": changed})
        assert result.returncode == 0, (changed, result.stderr)
    assert stored_spec(vm_crd, "grow")["disks"] == [
        {"name": "data", "readOnly": False, "image": {"path": "/var/lib/libvirt/images/a.qcow2", "clone": False}}]


NODE_MOVES = {
    "another-node": ({"nodeName": "node-a"}, {"nodeName": "node-b"}),
    "removed": ({"nodeName": "node-a"}, {"nodeName": None}),
    "unset-to-another-node": ({}, {"nodeName": "node-b"}),
}


@pytest.mark.parametrize("case", sorted(NODE_MOVES))
def test_node_name_may_change_while_an_agent_owns_the_vm(vm_crd: Kubectl, case: str) -> None:
    """A nodeName edit is a move, which the agents carry out (old node first); admission no longer refuses it."""
    before, after = NODE_MOVES[case]
    name = f"pinned-{case}"
    create(vm_crd, name, **before)
    owned_by(vm_crd, name, "node-a")
    result = patch(vm_crd, name, after)
    assert result.returncode == 0, result.stderr
    assert stored_spec(vm_crd, name).get("nodeName") == after.get("nodeName")


def test_node_name_may_pin_the_vm_where_it_runs_or_move_a_pending_vm(vm_crd: Kubectl) -> None:
    create(vm_crd, "unpinned")
    owned_by(vm_crd, "unpinned", "node-a")
    assert patch(vm_crd, "unpinned", {"nodeName": "node-a"}).returncode == 0
    create(vm_crd, "pending", nodeName="node-nowhere")  # no agent there: no domain anywhere
    assert patch(vm_crd, "pending", {"nodeName": "node-a"}).returncode == 0
    owned_by(vm_crd, "pending", "node-a")
    vm_crd("patch", "vm", "pending", "-n", NAMESPACE, "--subresource=status", "--type=merge",
           "-p", json.dumps({"status": {"printableStatus": "Running"}}))
    assert stored_spec(vm_crd, "pending")["nodeName"] == "node-a"


def test_changes_applied_live_or_at_the_next_boot_are_admitted(policy: Kubectl) -> None:
    vm_crd = policy
    create(vm_crd, "changes", nodeName="node-a", disks=disks(("data", "1Gi")),
           interfaces=[{"name": "net", "network": "default"}])
    owned_by(vm_crd, "changes", "node-a")
    for change in ({"runStrategy": "Halted"}, {"paused": True}, {"updateStrategy": "Restart"},
                   {"terminationGracePeriodSeconds": 5}, {"memory": "1Gi"}, {"cpu": {"cores": 2}},
                   {"domainType": "kvm"}, {"firmware": "uefi"}, {"firmware": "bios"}, {"console": {"log": True}},
                   {"kernelBoot": {"kernel": "/var/lib/libvirt/boot/vmlinuz"}},
                   {"interfaces": [{"name": "net", "user": {}, "model": "e1000"}]},
                   {"disks": [{"name": "data", "bus": "scsi", "bootOrder": 1, "emptyDisk": {"size": "1Gi"}},
                              {"name": "seed", "cloudInit": {"userData": "#cloud-config\n"}}]}):
        result = patch(vm_crd, "changes", change)
        assert result.returncode == 0, (change, result.stderr)
    spec = stored_spec(vm_crd, "changes")
    assert (spec["memory"], spec["cpu"]["cores"], spec["firmware"], spec["runStrategy"]) == ("1Gi", 2, "bios", "Halted")
