"""Spec changes on a running VM, through the pure reconciler with the real spec hash: a change applied live
never asks for a restart; a change that needs a boot says RestartRequired until a boot really applied it
(a restart, not a guest reboot, which keeps the QEMU process and its definition), and status reports the
running domain, not the spec waiting for it (README "What a spec change does")."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from libvirt_operator.model import DomainSnapshot
from libvirt_operator.reconcile import RESTART_ANNOTATION, Problem, VMView, decide
from libvirt_operator.spec import RUNTIME_FIELDS, spec_hash
from test_reconcile import NODE, T0, apply, condition, converge, kinds, running_since, snapshot

pytestmark = pytest.mark.unit

BOOTED = {
    "runStrategy": "Always", "paused": False, "updateStrategy": "OnRestart", "terminationGracePeriodSeconds": 30,
    "memory": "64Mi", "cpu": {"sockets": 1, "cores": 1, "threads": 1}, "firmware": "bios",
    "disks": [{"name": "root", "bus": "virtio", "readOnly": False, "image": {"path": "/var/lib/libvirt/images/a.qcow2", "clone": True}},
              {"name": "data", "bus": "virtio", "readOnly": False, "emptyDisk": {"size": "1Gi"}}],
    "interfaces": [{"name": "net", "network": "default", "model": "virtio"}],
}
LIVE_CHANGES = {
    "runStrategy": {"runStrategy": "Manual"}, "paused": {"paused": True}, "updateStrategy": {"updateStrategy": "Restart"},
    "terminationGracePeriodSeconds": {"terminationGracePeriodSeconds": 5}, "nodeName": {"nodeName": NODE},
    "nodeSelector": {"nodeSelector": {"rack": "a"}},
}
BOOT_CHANGES = {
    "memory": {"memory": "128Mi"}, "cpu": {"cpu": {"sockets": 1, "cores": 2, "threads": 1}},
    "firmware": {"firmware": "uefi"}, "domainType": {"domainType": "kvm"}, "console": {"console": {"log": True}},
    "kernelBoot": {"kernelBoot": {"kernel": "/var/lib/libvirt/boot/vmlinuz"}},
    "disk-grown": {"disks": [BOOTED["disks"][0], {**BOOTED["disks"][1], "emptyDisk": {"size": "2Gi"}}]},
    "disk-image": {"disks": [{**BOOTED["disks"][0], "image": {"path": "/var/lib/libvirt/images/b.qcow2", "clone": True}},
                             BOOTED["disks"][1]]},
    "disk-removed": {"disks": BOOTED["disks"][:1]},
    "interface": {"interfaces": [{"name": "net", "user": {}, "model": "e1000"}]},
}


def view(spec: dict[str, Any], status: dict[str, Any], generation: int = 2, **options: Any) -> VMView:
    return VMView(name="web", generation=generation, spec=spec, spec_hash=spec_hash(spec), status=status, **options)


def running(spec: dict[str, Any], vcpus: int = 1) -> DomainSnapshot:
    """A domain booted from `spec`, its definitions (live and persistent) both of that spec."""
    return replace(snapshot(spec_hash=spec_hash(spec), live_hash=spec_hash(spec)), stats={"vcpu.maximum": vcpus})


ROOT = Path(__file__).parent.parent


def test_every_spec_field_is_classified_here_and_in_the_readme() -> None:
    """A new spec field must be one of RUNTIME_FIELDS (not in the spec hash) or ask for a restart, and say so."""
    crd = yaml.safe_load((ROOT / "crds" / "virtualmachine.yaml").read_text())
    fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    boot_fields = {key for change in BOOT_CHANGES.values() for key in change}
    assert sorted(LIVE_CHANGES) == sorted(RUNTIME_FIELDS)
    assert sorted(fields) == sorted(set(LIVE_CHANGES) | boot_fields)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What a spec change does"):readme.index("## How to read status")]
    assert set(fields) <= set(re.findall(r"`(\w+)", table))


@pytest.mark.parametrize("field", sorted(LIVE_CHANGES))
def test_a_change_applied_live_asks_for_no_restart(field: str) -> None:
    changed = {**BOOTED, **LIVE_CHANGES[field]}
    final, current, done = converge(view(changed, running_since("Always", T0)), running(BOOTED))
    assert "define" not in done and "start" not in done, done
    assert current.live_owner.spec_hash == spec_hash(BOOTED)
    assert condition(final, "RestartRequired")["status"] == "False"
    assert final.status["observedGeneration"] == 2


@pytest.mark.parametrize("field", sorted(BOOT_CHANGES))
def test_a_change_needing_a_boot_is_required_until_a_restart_applies_it(field: str) -> None:
    changed = {**BOOTED, **BOOT_CHANGES[field]}
    vm = view(changed, running_since("Always", T0))
    pending, current, done = converge(vm, running(BOOTED))
    assert done == ["define"]
    assert current.config_owner.spec_hash == spec_hash(changed) != current.live_owner.spec_hash
    assert condition(pending, "RestartRequired")["status"] == "True"
    assert f"set the annotation {RESTART_ANNOTATION} to a new value" in condition(pending, "RestartRequired")["message"]
    assert pending.status["observedGeneration"] == 2 and pending.status["ready"] is True

    # A guest reboot: the same QEMU process, still on the definition it was started with.
    rebooted = replace(current, revision=current.revision + 1, reason="booted")
    again = decide(replace(vm, status=pending.status), rebooted, T0, NODE)
    assert kinds(again) == [] and condition(again, "RestartRequired")["status"] == "True"

    restarted, booted, done = converge(replace(vm, status=pending.status, annotations={RESTART_ANNOTATION: "1"}),
                                       rebooted)
    assert done == ["stop", "start"]
    assert booted.live_owner.spec_hash == spec_hash(changed)
    assert condition(restarted, "RestartRequired")["status"] == "False"


def test_status_vcpus_are_the_running_domains_until_the_restart() -> None:
    changed = {**BOOTED, **BOOT_CHANGES["cpu"]}
    vm = view(changed, running_since("Always", T0))
    pending = decide(vm, apply(decide(vm, running(BOOTED), T0, NODE).actions, running(BOOTED), spec_hash(changed)), T0, NODE)
    assert condition(pending, "RestartRequired")["status"] == "True"
    assert pending.status["vcpus"] == 1
    rebooted = replace(running(changed, vcpus=2), revision=20)
    assert decide(replace(vm, status=pending.status), rebooted, T0, NODE).status["vcpus"] == 2


def test_update_strategy_restart_applies_a_boot_change_at_once() -> None:
    changed = {**BOOTED, **BOOT_CHANGES["memory"], "updateStrategy": "Restart"}
    final, current, done = converge(view(changed, running_since("Always", T0)), running(BOOTED))
    assert done == ["define", "stop", "start"]
    assert current.live_owner.spec_hash == spec_hash(changed)
    assert condition(final, "RestartRequired")["status"] == "False"


def test_a_boot_change_the_agent_cannot_define_keeps_restart_required_and_does_not_restart() -> None:
    changed = {**BOOTED, **BOOT_CHANGES["disk-image"]}
    vm = view(changed, running_since("Always", T0), annotations={RESTART_ANNOTATION: "1"})
    problem = Problem("InvalidSpec", "spec.disks[0].image.path: /var/lib/libvirt/images/b.qcow2 does not exist", stalled=True)
    decision = decide(vm, running(BOOTED), T0, NODE, problem)
    assert kinds(decision) == []
    assert condition(decision, "RestartRequired")["status"] == "True"
    assert condition(decision, "Stalled")["status"] == "True"


def test_the_restart_annotation_restarts_a_manual_vm_too() -> None:
    changed = {**BOOTED, **BOOT_CHANGES["memory"], "runStrategy": "Manual"}
    vm = view(changed, running_since("Manual", T0))
    pending, current, done = converge(vm, running(BOOTED))
    assert done == ["define"] and condition(pending, "RestartRequired")["status"] == "True"
    restarted, booted, done = converge(replace(vm, status=pending.status, annotations={RESTART_ANNOTATION: "1"}), current)
    assert done == ["stop", "start"]
    assert booted.live_owner.spec_hash == spec_hash(changed)
    assert condition(restarted, "RestartRequired")["status"] == "False"
