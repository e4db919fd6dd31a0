"""The decision, pure: from a VirtualMachine and its domain snapshot to actions (and the status that
`vm_status.build_status` makes of them).

No I/O here. `decide()` is called with the latest spec, the previous status (the operator's
only memory, so restarts of the agent lose nothing) and the latest domain snapshot; it returns
the actions to take, in order, and the status to write. The caller runs the actions, re-reads
the domain and calls `decide()` again with the status it got, until no action is left.

The `status.lifecycle` block is the operator's bookkeeping:
- `runStrategy`: the strategy the current run episode follows. A change of
  `spec.runStrategy` starts a new episode, which begins with one start for Always,
  RerunOnFailure and Once.
- `startTime`: when the operator last started the domain (a run shorter than
  `SHORT_RUN` counts as a failure for the crash-loop backoff).
- `consecutiveFailures`, `retryAfter`: the crash-loop backoff.
- `restartRequest`: the last value of the restart annotation acted upon.
- `definitionDigest`: the digest of the definition the operator last applied, so a
  definition edited behind its back (`virsh edit`) is noticed and defined again.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from libvirt_operator.model import DomainSnapshot
from libvirt_operator.vm_status import (  # the status's names, which decide() reads and returns, are reconcile's too
    RESTART_ANNOTATION, RUNNING_STATES, Planned, Problem, VMView, build_status, condition_of, definition_current,
    format_time,
)

SHORT_RUN = datetime.timedelta(seconds=60)
BACKOFF_FIRST_SECONDS = 10
BACKOFF_MAX_SECONDS = 300
STUCK_START = datetime.timedelta(seconds=30)
FAILED_SHUTOFF_REASONS = frozenset({"crashed", "destroyed", "failed", "unknown", "daemon"})
TRANSIENT_PAUSE_REASONS = frozenset({"migration", "save", "dump", "snapshot", "starting up", "shutting down"})


# --- what decide() returns -----------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Action:
    """One step for the agent. `kind` is one of ACTION_KINDS; `event` is posted after success."""

    kind: str
    grace_seconds: int = 0
    start_paused: bool = False
    event: Event | None = None

    @property
    def touches_domain(self) -> bool:
        """Changes the domain (the finalizer actions change only the VirtualMachine)."""
        return self.kind not in ("add-finalizer", "remove-finalizer")

    @property
    def slow(self) -> bool:
        """Takes long enough that the status should say so before it runs."""
        graceful_stop = self.kind == "stop" and self.grace_seconds > 0
        restart = self.kind == "start" and self.event is not None and self.event.reason == "Restarted"
        return graceful_stop or restart


ACTION_KINDS = (
    "add-finalizer", "define", "start", "stop", "suspend", "resume", "undefine", "remove-finalizer",
)


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    status: dict[str, Any]
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None


# --- time ----------------------------------------------------------------------------------

def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text)


def backoff_seconds(failures: int) -> int:
    """0 for the first failure, then 10 s doubling up to 300 s."""
    if failures <= 1:
        return 0
    return min(BACKOFF_FIRST_SECONDS * 2 ** (failures - 2), BACKOFF_MAX_SECONDS)


# --- the lifecycle memory ------------------------------------------------------------------

@dataclass(frozen=True)
class Lifecycle:
    run_strategy: str | None = None
    start_time: str | None = None
    consecutive_failures: int = 0
    retry_after: str | None = None
    restart_request: str | None = None
    restart_count: int = 0
    definition_digest: str | None = None

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> Lifecycle:
        block = status.get("lifecycle") or {}
        return cls(
            run_strategy=block.get("runStrategy"),
            start_time=block.get("startTime"),
            consecutive_failures=int(block.get("consecutiveFailures", 0)),
            retry_after=block.get("retryAfter"),
            restart_request=block.get("restartRequest"),
            definition_digest=block.get("definitionDigest"),
            restart_count=int(status.get("restartCount", 0)),
        )

    def to_status(self) -> dict[str, Any]:
        block = {
            "runStrategy": self.run_strategy,
            "startTime": self.start_time,
            "consecutiveFailures": self.consecutive_failures or None,
            "retryAfter": self.retry_after,
            "restartRequest": self.restart_request,
            "definitionDigest": self.definition_digest,
        }
        return {key: value for key, value in block.items() if value is not None}

    def started(self, now: datetime.datetime, *, restart: bool) -> Lifecycle:
        return replace(self, start_time=format_time(now), retry_after=None,
                       restart_count=self.restart_count + (1 if restart else 0))


# --- decide --------------------------------------------------------------------------------

@dataclass
class _Plan:
    """Accumulates what one decide() call chooses."""

    lifecycle: Lifecycle
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    crash_loop: str | None = None

    def add(self, kind: str, reason: str | None = None, message: str = "", **options: Any) -> None:
        event = Event("Normal", reason, message) if reason else None
        self.actions.append(Action(kind, event=event, **options))

    def requeue(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def decide(vm: VMView, snapshot: DomainSnapshot | None, now: datetime.datetime, node_name: str,
           problem: Problem | None = None) -> Decision:
    """The actions that move the domain toward the spec, and the status that tells the truth."""
    plan = _Plan(Lifecycle.from_status(vm.status))
    if vm.deleting:
        _plan_deletion(vm, snapshot, plan)
    elif not vm.has_finalizer:
        plan.add("add-finalizer")
    elif problem is None:
        _plan_definition(vm, snapshot, plan)
        _plan_power(vm, snapshot, now, plan)
    planned = Planned(tuple(a.kind for a in plan.actions), plan.crash_loop, plan.lifecycle.to_status(),
                      plan.lifecycle.restart_count)
    status = build_status(vm, snapshot, now, node_name, planned, problem)
    return Decision(tuple(plan.actions), status, tuple(plan.events), plan.requeue_after)


def _plan_deletion(vm: VMView, snapshot: DomainSnapshot | None, plan: _Plan) -> None:
    if not vm.has_finalizer:
        return
    if snapshot is not None and snapshot.active:
        plan.add("stop", grace_seconds=vm.grace_seconds)
    plan.add("undefine")
    plan.add("remove-finalizer")


def _plan_definition(vm: VMView, snapshot: DomainSnapshot | None, plan: _Plan) -> None:
    recorded = plan.lifecycle.definition_digest
    plan.lifecycle = replace(plan.lifecycle, definition_digest=None)
    if definition_current(vm, snapshot):
        digest = snapshot.config_digest
        if recorded is None or digest is None or recorded == digest:
            plan.lifecycle = replace(plan.lifecycle, definition_digest=digest)
        else:
            plan.add("define", "Redefined", "the domain definition was changed outside the operator "
                     "(virsh edit?); defined it again from the spec")
        return
    if snapshot is None:
        if vm.status.get("domain"):
            plan.add("define", "Redefined", "the domain was undefined outside the operator; defined it again")
        elif vm.run_strategy in ("Halted", "Manual"):
            plan.add("define", "Defined", "defined the domain")
        else:
            plan.add("define")
    elif not snapshot.persistent:
        plan.add("define", "Redefined", "the domain was undefined outside the operator; defined it again")
    else:
        plan.add("define", "Redefined", f"applied generation {vm.generation} to the domain definition")


def _wants_running(vm: VMView, snapshot: DomainSnapshot | None, plan: _Plan) -> bool | None:
    """True: should run; False: should be off; None: leave the power state alone (Manual)."""
    strategy = vm.run_strategy
    if strategy == "Halted":
        return False
    if strategy == "Manual":
        return None
    new_episode = plan.lifecycle.run_strategy != strategy
    if new_episode or strategy == "Always":
        return True
    if strategy == "Once":
        return snapshot is not None and snapshot.active and snapshot.state != "crashed"
    # RerunOnFailure: run again only when the last run failed
    if snapshot is None or snapshot.active:
        return True
    return snapshot.reason in FAILED_SHUTOFF_REASONS or snapshot.state == "crashed"


def _plan_power(vm: VMView, snapshot: DomainSnapshot | None, now: datetime.datetime, plan: _Plan) -> None:
    wants = _wants_running(vm, snapshot, plan)
    active = snapshot is not None and snapshot.active and snapshot.state != "crashed"
    restart_requested = _restart_requested(vm, plan)
    if wants is None:
        plan.lifecycle = replace(plan.lifecycle, run_strategy=vm.run_strategy)
        if restart_requested and active:
            _plan_restart(vm, now, plan, "the restart annotation changed")
            return
        _plan_manual(vm, snapshot, plan)
        return
    if not wants:
        plan.lifecycle = replace(plan.lifecycle, run_strategy=vm.run_strategy, retry_after=None)
        if active:
            plan.add("stop", "Stopped", f"stopped the domain (runStrategy {vm.run_strategy})",
                     grace_seconds=vm.grace_seconds)
        return
    if active:
        _plan_running(vm, snapshot, now, plan, restart_requested)
        plan.lifecycle = replace(plan.lifecycle, run_strategy=vm.run_strategy)
        return
    _plan_start(vm, snapshot, now, plan)


def _restart_requested(vm: VMView, plan: _Plan) -> bool:
    request = vm.annotations.get(RESTART_ANNOTATION)
    if not request or request == plan.lifecycle.restart_request:
        return False
    plan.lifecycle = replace(plan.lifecycle, restart_request=request)
    return True


def _plan_manual(vm: VMView, snapshot: DomainSnapshot | None, plan: _Plan) -> None:
    if snapshot is None or not snapshot.active:
        return
    if vm.spec.get("paused") and snapshot.state in RUNNING_STATES:
        plan.add("suspend", "Paused", "suspended the domain (spec.paused)")
    elif not vm.spec.get("paused") and snapshot.state == "paused" and _paused_by_spec(vm):
        plan.add("resume", "Resumed", "resumed the domain (spec.paused is false)")


def _paused_by_spec(vm: VMView) -> bool:
    return any(c.get("type") == "Paused" and c.get("reason") == "PausedBySpec"
               for c in vm.status.get("conditions", []))


def _plan_running(vm: VMView, snapshot: DomainSnapshot, now: datetime.datetime, plan: _Plan,
                  restart_requested: bool) -> None:
    stale_boot = snapshot.live_owner is not None and snapshot.live_owner.spec_hash != vm.spec_hash
    if restart_requested or (stale_boot and vm.spec.get("updateStrategy") == "Restart"):
        _plan_restart(vm, now, plan, "the restart annotation changed" if restart_requested
                      else "the spec changed (updateStrategy Restart)")
        return
    if _stuck_starting(snapshot, plan.lifecycle, now):
        plan.add("stop")
        plan.add("start", "Restarted", "the domain was stuck starting up (was libvirtd restarted while starting it?); "
                 "started it again", start_paused=bool(vm.spec.get("paused")))
        plan.lifecycle = plan.lifecycle.started(now, restart=False)
        return
    if snapshot.state == "paused" and snapshot.reason == "starting up":
        plan.requeue(STUCK_START.total_seconds())
    if vm.spec.get("paused") and snapshot.state in RUNNING_STATES:
        plan.add("suspend", "Paused", "suspended the domain (spec.paused)")
    elif not vm.spec.get("paused") and snapshot.state == "paused" and snapshot.reason not in TRANSIENT_PAUSE_REASONS:
        message = "resumed the domain (spec.paused is false)" if _paused_by_spec(vm) else \
            f"the domain was paused outside the operator ({snapshot.reason}); resumed it"
        plan.add("resume", "Resumed", message)


def _plan_restart(vm: VMView, now: datetime.datetime, plan: _Plan, why: str) -> None:
    """A stop and a fresh boot, which applies the persistent definition (a guest reboot would not)."""
    plan.add("stop", grace_seconds=vm.grace_seconds)
    plan.add("start", "Restarted", f"restarted the domain: {why}", start_paused=bool(vm.spec.get("paused")))
    plan.lifecycle = plan.lifecycle.started(now, restart=False)


def _stuck_starting(snapshot: DomainSnapshot, lifecycle: Lifecycle, now: datetime.datetime) -> bool:
    started = parse_time(lifecycle.start_time)
    return (snapshot.state == "paused" and snapshot.reason == "starting up"
            and (started is None or now - started > STUCK_START))


def _plan_start(vm: VMView, snapshot: DomainSnapshot | None, now: datetime.datetime, plan: _Plan) -> None:
    lifecycle = plan.lifecycle
    paused = bool(vm.spec.get("paused"))
    if lifecycle.run_strategy != vm.run_strategy or lifecycle.start_time is None:
        plan.lifecycle = replace(lifecycle, run_strategy=vm.run_strategy, consecutive_failures=0).started(now, restart=False)
        if lifecycle.start_time is None:  # the first start after apply: Ready and lifecycle.startTime tell it
            plan.add("start", start_paused=paused)
            return
        message = "defined and started the domain" if snapshot is None else "started the domain"
        plan.add("start", "Started", f"{message} (runStrategy {vm.run_strategy})", start_paused=paused)
        return
    retry_after = parse_time(lifecycle.retry_after)
    if retry_after is None:
        started = parse_time(lifecycle.start_time)
        short = started is not None and now - started < SHORT_RUN
        failures = lifecycle.consecutive_failures + 1 if short else 1
        lifecycle = replace(lifecycle, consecutive_failures=failures)
        delay = backoff_seconds(failures)
        if delay:
            retry_after = now + datetime.timedelta(seconds=delay)
            lifecycle = replace(lifecycle, retry_after=format_time(retry_after))
            why = _stop_description(snapshot)
            plan.events.append(Event("Warning", "CrashLoopBackOff",
                                     f"{why}; {failures} short runs in a row, next start in {delay}s"))
    if retry_after is not None and now < retry_after:
        plan.lifecycle = lifecycle
        plan.crash_loop = (f"the domain stopped {lifecycle.consecutive_failures} times within "
                           f"{int(SHORT_RUN.total_seconds())}s of starting; next start at {format_time(retry_after)}")
        plan.requeue((retry_after - now).total_seconds())
        return
    plan.lifecycle = lifecycle.started(now, restart=True)
    plan.add("start", "Restarted", f"{_stop_description(snapshot)}; started it again "
             f"(runStrategy {vm.run_strategy}, restart {plan.lifecycle.restart_count})", start_paused=paused)


def _stop_description(snapshot: DomainSnapshot | None) -> str:
    if snapshot is None:
        return "the domain disappeared"
    return f"the domain stopped ({snapshot.state}: {snapshot.reason})"


def unknown_status(vm: VMView, snapshot: DomainSnapshot | None, now: datetime.datetime, node_name: str,
                   reason: str, message: str) -> dict[str, Any]:
    """The status while libvirt cannot be asked: the last snapshot's facts, `printableStatus: Unknown` and
    Ready `Unknown` (kstatus), the bookkeeping (restarts, lifecycle, observed generation) left as it was."""
    status = decide(vm, snapshot, now, node_name, Problem(reason, message, stalled=False)).status
    status["printableStatus"] = "Unknown"
    status["ready"] = False
    for key in ("lifecycle", "restartCount", "observedGeneration"):
        if key in vm.status:
            status[key] = vm.status[key]
    before = condition_of(vm.status, "Ready")
    for condition in status["conditions"]:
        if condition["type"] == "Ready":
            condition["status"] = "Unknown"
            unchanged = before.get("status") == "Unknown"
            condition["lastTransitionTime"] = before["lastTransitionTime"] if unchanged else format_time(now)
    return status
