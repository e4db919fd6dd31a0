"""The Argo CD health Lua, run with a real Lua (lupa) over the statuses the reconciler really writes.

Every VM object here gets its status from `reconcile.decide()` (and the agent's Pending status),
so the table below is what Argo CD shows for each runStrategy in each situation a VM can be in:
every printableStatus appears, and the expectations are the API's: Healthy when Ready (a Halted VM
that is shut off is Healthy), Progressing while Reconciling or before the agent has applied the
generation, Degraded when Stalled (with Stalled's message), Suspended only for `spec.paused: true`.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from libvirt_operator.model import DomainSnapshot, OwnerMetadata
from libvirt_operator.reconcile import Problem, VMView, decide, format_time
from libvirt_operator.scheduler import pending_status

pytestmark = pytest.mark.unit

ARGOCD = Path(__file__).parent.parent / "manifests" / "argocd"
LUA = (ARGOCD / "health-virtualmachine.lua").read_text()
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
UID = "00000000-0000-4000-8000-000000000001"
STRATEGIES = ("Always", "Halted", "Manual", "RerunOnFailure", "Once")
PRINTABLE_STATUSES = {"Pending", "Stopped", "Starting", "Running", "Paused", "Stopping", "Terminating",
                      "CrashLoopBackOff", "Failed", "Unknown"}


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """What Argo CD computes: the script runs with the object as the global `obj`."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(LUA)
    assert set(result.keys()) == {"status", "message"}
    return result["status"], result["message"]


def snapshot(state: str, reason: str) -> DomainSnapshot:
    owner = OwnerMetadata(UID, "default", "vm", 1, "h")
    active = state not in ("shutoff", "crashed")
    return DomainSnapshot(uuid=UID, name="default_vm", revision=3, state=state, reason=reason,
                          id=1 if active else None, persistent=True, config_owner=owner,
                          live_owner=owner if active else None)


def lifecycle(strategy: str, *, started_seconds_ago: int, failures: int) -> dict[str, Any]:
    return {"runStrategy": strategy, "consecutiveFailures": failures,
            "startTime": format_time(NOW - datetime.timedelta(seconds=started_seconds_ago))}


def vm(strategy: str, domain: tuple[str, str] | None, *, paused: bool = False, deleting: bool = False,
       problem: Problem | None = None, crash_looping: bool = False) -> dict[str, Any]:
    """A VirtualMachine object whose status is what the reconciler writes for this situation."""
    spec = {"runStrategy": strategy, "paused": paused, "memory": "64Mi"}
    status: dict[str, Any] = {}
    if domain is not None:  # it has been started before: long ago, or just now and failing
        status["lifecycle"] = lifecycle(strategy, started_seconds_ago=5 if crash_looping else 3600,
                                        failures=1 if crash_looping else 0)
    view = VMView(name="vm", generation=1, spec=spec, spec_hash="h", status=status, deleting=deleting)
    current = snapshot(*domain) if domain is not None else None
    return {"metadata": {"name": "vm", "namespace": "default", "generation": 1}, "spec": spec,
            "status": decide(view, current, NOW, "node-a", problem).status}


def no_agent(strategy: str) -> dict[str, Any]:
    body = {"metadata": {"name": "vm", "namespace": "default", "generation": 1},
            "spec": {"runStrategy": strategy, "memory": "64Mi", "nodeName": "node-x"}}
    return {**body, "status": pending_status(body, "NodeNotReady", "no live agent on node node-x; see kubectl get libvirtnodes", NOW)}


BAD_PATH = Problem("InvalidSpec", "spec.disks[0].image.path: /etc/passwd is outside the allowed roots", True)
LIBVIRT_DOWN = Problem("LibvirtUnavailable", "libvirt is not reachable; retrying", False)

SITUATIONS = {
    "new": lambda s: vm(s, None),
    "running": lambda s: vm(s, ("running", "booted")),
    "paused by spec.paused": lambda s: vm(s, ("paused", "user"), paused=True),
    "paused with virsh": lambda s: vm(s, ("paused", "user")),
    "guest shut itself down": lambda s: vm(s, ("shutoff", "shutdown")),
    "crashing right after each start": lambda s: vm(s, ("shutoff", "crashed"), crash_looping=True),
    "shutting down": lambda s: vm(s, ("shutdown", "user")),
    "domain state unknown": lambda s: vm(s, ("nostate", "unknown")),
    "being deleted": lambda s: vm(s, ("running", "booted"), deleting=True),
    "stalled on a bad path": lambda s: vm(s, None, problem=BAD_PATH),
    "no agent on its node": no_agent,
    "libvirt unreachable": lambda s: vm(s, None, problem=LIBVIRT_DOWN),
}

# (printableStatus, Argo CD health) for each situation, in the order of STRATEGIES:
#            Always                          Halted                  Manual                  RerunOnFailure                  Once
EXPECTED = {
    "new": [("Starting", "Progressing"), ("Pending", "Progressing"), ("Pending", "Progressing"),
            ("Starting", "Progressing"), ("Starting", "Progressing")],
    "running": [("Running", "Healthy"), ("Stopping", "Progressing"), ("Running", "Healthy"),
                ("Running", "Healthy"), ("Running", "Healthy")],
    "paused by spec.paused": [("Paused", "Suspended"), ("Stopping", "Progressing"), ("Paused", "Suspended"),
                              ("Paused", "Suspended"), ("Paused", "Suspended")],
    # Manual leaves a domain paused behind its back alone, and says so: as the spec asks, not Suspended.
    "paused with virsh": [("Paused", "Progressing"), ("Stopping", "Progressing"), ("Paused", "Healthy"),
                          ("Paused", "Progressing"), ("Paused", "Progressing")],
    "guest shut itself down": [("Starting", "Progressing"), ("Stopped", "Healthy"), ("Stopped", "Healthy"),
                               ("Stopped", "Healthy"), ("Stopped", "Healthy")],
    "crashing right after each start": [("CrashLoopBackOff", "Degraded"), ("Stopped", "Healthy"),
                                        ("Stopped", "Healthy"), ("CrashLoopBackOff", "Degraded"),
                                        ("Stopped", "Healthy")],
    "shutting down": [("Stopping", "Progressing")] * 5,
    "domain state unknown": [("Unknown", "Progressing"), ("Stopping", "Progressing"), ("Unknown", "Progressing"),
                             ("Unknown", "Progressing"), ("Unknown", "Progressing")],
    "being deleted": [("Terminating", "Progressing")] * 5,
    "stalled on a bad path": [("Failed", "Degraded")] * 5,
    "no agent on its node": [("Pending", "Degraded")] * 5,
    "libvirt unreachable": [("Pending", "Progressing")] * 5,
}

CASES = [(situation, strategy) for situation in SITUATIONS for strategy in STRATEGIES]


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


@pytest.mark.parametrize(("situation", "strategy"), CASES, ids=[f"{s}/{r}" for s, r in CASES])
def test_health_of_every_runstrategy_in_every_situation(situation: str, strategy: str) -> None:
    obj = SITUATIONS[situation](strategy)
    printable, expected = EXPECTED[situation][STRATEGIES.index(strategy)]
    assert obj["status"]["printableStatus"] == printable
    status, message = health(obj)
    assert status == expected, message
    by_type = conditions(obj)
    if expected == "Degraded":
        assert by_type["Stalled"]["status"] == "True"
        assert message == by_type["Stalled"]["message"] and message
    elif expected == "Suspended":
        assert obj["spec"]["paused"] is True and by_type["Paused"]["status"] == "True"
        assert message == "Paused as spec.paused asks"
    elif expected == "Healthy":
        assert by_type["Ready"]["status"] == "True"
        assert message == by_type["Ready"]["message"] and message
    else:
        assert by_type["Reconciling"]["status"] == "True"
        assert message == by_type["Ready"]["message"] and message


def test_the_table_covers_every_printable_status() -> None:
    assert {printable for row in EXPECTED.values() for printable, _ in row} == PRINTABLE_STATUSES
    assert all(len(row) == len(STRATEGIES) for row in EXPECTED.values())


def test_suspended_only_when_spec_paused() -> None:
    for situation, row in EXPECTED.items():
        for strategy, (_, expected) in zip(STRATEGIES, row):
            if expected == "Suspended":
                assert situation == "paused by spec.paused", (situation, strategy)


def test_no_status_yet_is_progressing() -> None:
    assert health({"metadata": {"name": "vm", "generation": 1}, "spec": {"memory": "64Mi"}}) == \
        ("Progressing", "Waiting for the libvirt-operator agent")
    assert health({"metadata": {"name": "vm", "generation": 1}, "spec": {}, "status": {}})[0] == "Progressing"


@pytest.mark.parametrize("situation", ["running", "paused by spec.paused", "stalled on a bad path"])
def test_a_generation_the_agent_has_not_applied_is_progressing(situation: str) -> None:
    """kstatus: a status written for generation 1 says nothing about generation 2's spec."""
    obj = SITUATIONS[situation]("Always")
    obj["metadata"]["generation"] = 2
    assert health(obj) == ("Progressing", "The agent has not applied generation 2 yet")


def test_the_argocd_cm_snippet_embeds_the_lua_verbatim() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"] == {"name": "argocd-cm", "namespace": "argocd"}
    assert patch["data"] == {"resource.customizations.health.libvirt-operator.io_VirtualMachine": LUA}


@pytest.mark.parametrize("printable", ["CrashLoopBackOff", "Failed"])
def test_a_crash_looping_or_failed_vm_is_degraded_whatever_its_conditions_say(printable: str) -> None:
    """printableStatus alone decides here: conditions written by an older agent may still say Ready."""
    obj = SITUATIONS["running"]("Always")
    obj["status"]["printableStatus"] = printable
    assert conditions(obj)["Ready"]["status"] == "True" and conditions(obj)["Stalled"]["status"] == "False"
    assert health(obj) == ("Degraded", f"The VM is {printable}")
    del obj["status"]["conditions"]
    assert health(obj) == ("Degraded", f"The VM is {printable}")
