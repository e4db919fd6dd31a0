"""The Argo CD health Lua, run with a real Lua (lupa) over statuses the reconciler really writes."""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from libvirt_operator.agent import _pending_status
from libvirt_operator.model import DomainSnapshot, OwnerMetadata
from libvirt_operator.reconcile import Problem, VMView, decide, format_time

pytestmark = pytest.mark.unit

ARGOCD = Path(__file__).parent.parent / "manifests" / "argocd"
LUA = (ARGOCD / "health-virtualmachine.lua").read_text()
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
UID = "00000000-0000-4000-8000-000000000001"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(LUA)
    return result["status"], result["message"]


def snapshot(state: str, reason: str) -> DomainSnapshot:
    owner = OwnerMetadata(UID, "default", "vm", 1, "h")
    active = state != "shutoff"
    return DomainSnapshot(uuid=UID, name="default_vm", revision=3, state=state, reason=reason,
                          id=1 if active else None, persistent=True, config_owner=owner,
                          live_owner=owner if active else None)


def vm_object(strategy: str, current: DomainSnapshot | None, *, paused: bool = False, deleting: bool = False,
              problem: Problem | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"runStrategy": strategy, "paused": paused, "memory": "64Mi"}
    lifecycle = {"runStrategy": strategy, "startTime": format_time(NOW - datetime.timedelta(seconds=5)),
                 "consecutiveFailures": 1} if current is not None else {}
    view = VMView(name="vm", generation=1, spec=spec, spec_hash="h",
                  status=status if status is not None else {"lifecycle": lifecycle}, deleting=deleting)
    return {"metadata": {"name": "vm", "generation": 1}, "spec": spec,
            "status": decide(view, current, NOW, "node-a", problem).status}


CASES = {
    "Running/Always": (vm_object("Always", snapshot("running", "booted")), "Running", "Healthy"),
    "Running/RerunOnFailure": (vm_object("RerunOnFailure", snapshot("running", "booted")), "Running", "Healthy"),
    "Running/Manual": (vm_object("Manual", snapshot("running", "booted")), "Running", "Healthy"),
    "Running/Once": (vm_object("Once", snapshot("running", "booted")), "Running", "Healthy"),
    "Stopped/Halted": (vm_object("Halted", snapshot("shutoff", "shutdown")), "Stopped", "Healthy"),
    "Stopped/Manual": (vm_object("Manual", snapshot("shutoff", "destroyed")), "Stopped", "Healthy"),
    "Stopped/Once": (vm_object("Once", snapshot("shutoff", "shutdown")), "Stopped", "Healthy"),
    "Stopped/RerunOnFailure": (vm_object("RerunOnFailure", snapshot("shutoff", "shutdown")), "Stopped", "Healthy"),
    "Starting/Always": (vm_object("Always", None), "Starting", "Progressing"),
    "Stopping/Halted": (vm_object("Halted", snapshot("running", "booted")), "Stopping", "Progressing"),
    "Paused/spec": (vm_object("Always", snapshot("paused", "user"), paused=True), "Paused", "Suspended"),
    "Paused/outside": (vm_object("Always", snapshot("paused", "user")), "Paused", "Progressing"),
    "CrashLoopBackOff/Always": (vm_object("Always", snapshot("shutoff", "crashed")), "CrashLoopBackOff", "Degraded"),
    "Failed/stalled": (vm_object("Always", None, problem=Problem("InvalidSpec", "spec.disks[0].image.path: outside", True)),
                       "Failed", "Degraded"),
    "Pending/no agent": ({"metadata": {"name": "vm", "generation": 1}, "spec": {"nodeName": "node-x"},
                          "status": _pending_status({"metadata": {"name": "vm", "generation": 1}, "spec": {}},
                                                    "no agent on node-x", NOW)}, "Pending", "Degraded"),
    "Terminating": (vm_object("Always", snapshot("running", "booted"), deleting=True), "Terminating", "Progressing"),
    "Unknown": (vm_object("Always", snapshot("nostate", "unknown")), "Unknown", "Progressing"),
    "Reconciling/transient": (vm_object("Always", None, problem=Problem("LibvirtUnavailable", "down", False)),
                              "Pending", "Progressing"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_health_follows_the_conditions(case: str) -> None:
    obj, printable, expected = CASES[case]
    assert obj["status"]["printableStatus"] == printable
    status, message = health(obj)
    assert status == expected, (case, message)
    if expected == "Degraded":
        assert message


def test_no_status_yet_and_an_unapplied_generation_are_progressing() -> None:
    assert health({"metadata": {"generation": 1}, "spec": {}})[0] == "Progressing"
    obj, _, _ = CASES["Running/Always"]
    newer = {**obj, "metadata": {"name": "vm", "generation": 2}}
    assert health(newer) == ("Progressing", "The agent has not applied generation 2 yet")


def test_the_argocd_cm_snippet_embeds_the_lua_verbatim() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.libvirt-operator.io_VirtualMachine"] == LUA
