"""A VirtualMachine's status from the facts: its spec, its domain's snapshot, what the decision chose and
why it could not proceed. Where a libvirt event becomes status: `decide()` calls `build_status` with
the latest snapshot. Pure, no I/O.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from libvirt_operator.migration import Move, migrating_condition, refused
from libvirt_operator.model import DomainSnapshot

RESTART_ANNOTATION = "libvirt-operator.io/restart"
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Paused", "RestartRequired", "Scheduled", "Migrating", "Migratable")
RUNNING_STATES = frozenset({"running", "blocked"})


@dataclass(frozen=True)
class Problem:
    """Why the last attempt could not proceed.

    `stalled`: the spec or the host must change (bad path, missing network): a person acts.
    Otherwise the operator retries by itself (libvirt unreachable, a call failed).
    """

    reason: str
    message: str
    stalled: bool


@dataclass(frozen=True)
class VMView:
    """The parts of a VirtualMachine object `decide()` reads."""

    name: str
    generation: int
    spec: Mapping[str, Any]
    spec_hash: str
    status: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False
    has_finalizer: bool = True
    not_migratable: tuple[str, str] | None = None
    """(reason, message) when the spec keeps the VM from moving live (migration.not_migratable)."""

    @property
    def run_strategy(self) -> str:
        return self.spec.get("runStrategy", "Always")

    @property
    def grace_seconds(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))


@dataclass(frozen=True)
class Planned:
    """What a decision chose, as far as the status tells it."""

    action_kinds: tuple[str, ...]
    crash_loop: str | None
    lifecycle: Mapping[str, Any]
    """The `status.lifecycle` block."""
    restart_count: int


def condition_of(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The status's condition of type `kind`; empty when it has none."""
    return next((c for c in status.get("conditions", []) if c.get("type") == kind), {})


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def definition_current(vm: VMView, snapshot: DomainSnapshot | None) -> bool:
    """A persistent definition of the current spec (an undefined running domain is transient)."""
    return snapshot is not None and snapshot.persistent and snapshot.config_owner is not None and \
        snapshot.config_owner.spec_hash == vm.spec_hash


def _printable(vm: VMView, snapshot: DomainSnapshot | None, planned: Planned, problem: Problem | None) -> str:
    if vm.deleting:
        return "Terminating"
    if problem is not None and problem.stalled and snapshot is None:
        return "Failed"
    if planned.crash_loop:
        return "CrashLoopBackOff"
    if snapshot is None:
        return "Starting" if "start" in planned.action_kinds else "Pending"
    if "stop" in planned.action_kinds or snapshot.state == "shutdown":
        return "Stopping"
    if _moving(vm, snapshot):
        return "Migrating"
    if snapshot.state in RUNNING_STATES:
        return "Running"
    if snapshot.state in ("paused", "pmsuspended"):
        return "Paused"
    if snapshot.state in ("shutoff", "crashed"):
        return "Starting" if "start" in planned.action_kinds else "Stopped"
    return "Unknown"


def _ready(vm: VMView, snapshot: DomainSnapshot | None, planned: Planned, problem: Problem | None) -> tuple[bool, str, str]:
    """(ready, reason, message) for the Ready condition."""
    if vm.deleting:
        return False, "Terminating", "the VM is being deleted"
    if problem is not None:
        return False, problem.reason, problem.message
    if planned.crash_loop:
        return False, "CrashLoopBackOff", planned.crash_loop
    if planned.action_kinds:
        kinds = ", ".join(planned.action_kinds)
        return False, "Reconciling", f"applying the spec: {kinds}"
    if snapshot is None:
        return False, "NotDefined", "the domain is not defined yet"
    if snapshot.state in RUNNING_STATES:
        return True, "RunningAsDesired", f"the domain {snapshot.name} is running"
    if _moving(vm, snapshot):
        return True, "Migrating", f"the domain {snapshot.name} is paused for the last step of its move (migration)"
    if snapshot.state == "paused":
        if vm.spec.get("paused"):
            return True, "PausedAsDesired", "the domain is paused as spec.paused asks"
        if vm.run_strategy == "Manual":
            return True, "ManualAsObserved", f"the domain is paused ({snapshot.reason}); runStrategy Manual leaves it"
        return False, "Paused", f"the domain is paused ({snapshot.reason})"
    if snapshot.state in ("shutoff", "crashed"):
        return True, "StoppedAsDesired", f"the domain is shut off ({snapshot.reason}) as runStrategy {vm.run_strategy} asks"
    return False, "Transitioning", f"the domain is {snapshot.state} ({snapshot.reason})"


def _moving(vm: VMView, snapshot: DomainSnapshot) -> bool:
    """Running on the source while a move is in flight (paused by libvirt for its last step, or not)."""
    move = Move.of(vm.status)
    return move is not None and move.active and (snapshot.state in RUNNING_STATES or
                                                 snapshot.state == "paused" and snapshot.reason == "migration")


def _condition(previous: Mapping[str, Mapping[str, Any]], kind: str, value: bool, reason: str, message: str,
               generation: int, now: datetime.datetime) -> dict[str, Any]:
    status = "True" if value else "False"
    before = previous.get(kind)
    changed = before is None or before.get("status") != status
    return {
        "type": kind, "status": status, "reason": reason, "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": format_time(now) if changed else before.get("lastTransitionTime", format_time(now)),
    }


def _migratable(previous: Mapping[str, Mapping[str, Any]], vm: VMView, now: datetime.datetime) -> dict[str, Any]:
    cannot = vm.not_migratable or refused(Move.of(vm.status))
    return _condition(previous, "Migratable", cannot is None,
                      *(cannot or ("Migratable", "the VM can move live to another node")), vm.generation, now)


def build_status(vm: VMView, snapshot: DomainSnapshot | None, now: datetime.datetime, node_name: str,
                 planned: Planned, problem: Problem | None) -> dict[str, Any]:
    ready, ready_reason, ready_message = _ready(vm, snapshot, planned, problem)
    stalled = (problem is not None and problem.stalled) or planned.crash_loop is not None
    stalled_reason = problem.reason if problem is not None and problem.stalled else \
        ("CrashLoopBackOff" if planned.crash_loop else "AsExpected")
    stalled_message = problem.message if problem is not None and problem.stalled else (planned.crash_loop or "")
    reconciling = not ready and not stalled
    paused = snapshot is not None and snapshot.state in ("paused", "pmsuspended")
    restart_required = (snapshot is not None and snapshot.active and snapshot.live_owner is not None
                        and snapshot.live_owner.spec_hash != vm.spec_hash)
    previous = {c.get("type"): c for c in vm.status.get("conditions", [])}
    conditions = [
        _condition(previous, "Ready", ready, ready_reason, ready_message, vm.generation, now),
        _condition(previous, "Reconciling", reconciling, ready_reason if reconciling else "Idle",
                   ready_message if reconciling else "", vm.generation, now),
        _condition(previous, "Stalled", stalled, stalled_reason, stalled_message, vm.generation, now),
        _condition(previous, "Paused", paused, _paused_reason(vm, snapshot) if paused else "NotPaused",
                   "", vm.generation, now),
        _condition(previous, "RestartRequired", restart_required,
                   "SpecChangedWhileRunning" if restart_required else "UpToDate",
                   "the running domain was booted from an older spec; a restart applies the new one (set the "
                   f"annotation {RESTART_ANNOTATION} to a new value; a reboot inside the guest keeps the old one)"
                   if restart_required else "",
                   vm.generation, now),
        _scheduled_here(previous, vm, node_name, now),
        _condition(previous, "Migrating", *migrating_condition(Move.of(vm.status)), vm.generation, now),
        _migratable(previous, vm, now),
    ]
    applied = definition_current(vm, snapshot) and not planned.action_kinds
    observed = vm.generation if applied or stalled and problem is not None else vm.status.get("observedGeneration")
    status: dict[str, Any] = {
        "printableStatus": _printable(vm, snapshot, planned, problem),
        "ready": ready,
        "nodeName": node_name,
        "conditions": conditions,
        "restartCount": planned.restart_count,
        "lifecycle": dict(planned.lifecycle),
    }
    if observed is not None:
        status["observedGeneration"] = observed
    if "migration" in vm.status:
        status["migration"] = vm.status["migration"]
    if snapshot is not None:
        status["domain"] = _domain_status(snapshot)
        status["vcpus"] = _vcpus(vm.spec, snapshot)
        status["stats"] = stats_status(snapshot.stats)
        status["interfaces"] = [
            {"name": i.name, "macAddress": i.mac_address, "ipAddresses": list(i.ip_addresses)}
            for i in snapshot.interfaces
        ]
    return status


def _scheduled_here(previous: Mapping[str, Mapping[str, Any]], vm: VMView, node_name: str,
                    now: datetime.datetime) -> dict[str, Any]:
    """Scheduled=True on the node whose agent writes this status: the placement's reason kept when it was True."""
    before = previous.get("Scheduled") or {}
    if before.get("status") == "True" and node_name in before.get("message", ""):
        reason, message = before.get("reason", "Placed"), before.get("message", "")
    elif vm.spec.get("nodeName"):
        reason, message = "Pinned", f"spec.nodeName is {node_name}"
    else:
        reason, message = "Placed", f"placed on {node_name}"
    return _condition(previous, "Scheduled", True, reason, message, vm.generation, now)


def _vcpus(spec: Mapping[str, Any], snapshot: DomainSnapshot) -> int:
    """The domain's vCPUs: of the running definition while it runs (a change waiting for the next boot is not
    there yet), else of the persistent one; what the spec asks when libvirt's figure is missing."""
    if "vcpu.maximum" in snapshot.stats:
        return int(snapshot.stats["vcpu.maximum"])
    cpu = spec.get("cpu") or {}
    return int(cpu.get("sockets", 1)) * int(cpu.get("cores", 1)) * int(cpu.get("threads", 1))


def _paused_reason(vm: VMView, snapshot: DomainSnapshot | None) -> str:
    if vm.spec.get("paused"):
        return "PausedBySpec"
    return "PausedOutsideOperator" if snapshot is None or snapshot.reason in ("user", "unknown") else \
        "Paused" + "".join(word.capitalize() for word in snapshot.reason.split())


def _domain_status(snapshot: DomainSnapshot) -> dict[str, Any]:
    domain: dict[str, Any] = {
        "name": snapshot.name, "uuid": snapshot.uuid, "state": snapshot.state, "reason": snapshot.reason,
        "resourceVersion": str(snapshot.revision),
    }
    if snapshot.id is not None and snapshot.active:
        domain["id"] = snapshot.id
    return domain


def stats_status(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The status.stats figures from one domain's bulk statistics (flat libvirt keys)."""
    figures: dict[str, Any] = {}
    if "cpu.time" in stats:
        figures["cpuTimeSeconds"] = round(stats["cpu.time"] / 1e9, 3)
    memory = stats.get("balloon.current", stats.get("balloon.maximum"))
    if memory is not None:
        figures["memoryBytes"] = int(memory) * 1024
    if "vcpu.current" in stats:
        figures["vcpus"] = int(stats["vcpu.current"])
    return figures
