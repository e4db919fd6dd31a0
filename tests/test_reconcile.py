"""The pure reconciler over its state table: runStrategy, paused, updates, restarts, deletion."""

from __future__ import annotations

import datetime
import itertools
from dataclasses import replace
from typing import Any

import pytest

from libvirt_operator.model import DomainSnapshot, OwnerMetadata
from libvirt_operator.reconcile import (
    RESTART_ANNOTATION, Decision, Problem, VMView, backoff_seconds, decide, format_time,
)

pytestmark = pytest.mark.unit

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)
NODE = "node-a"
UID = "6f1c0000-0000-4000-8000-000000000001"
STRATEGIES = ("Always", "Halted", "Manual", "RerunOnFailure", "Once")


def owner(spec_hash: str = "h1") -> OwnerMetadata:
    return OwnerMetadata(uid=UID, namespace="default", name="web", generation=1, spec_hash=spec_hash)


def snapshot(state: str = "running", reason: str = "booted", *, spec_hash: str = "h1",
             live_hash: str | None = "h1", revision: int = 7) -> DomainSnapshot:
    active = state not in ("shutoff",)
    return DomainSnapshot(
        uuid=UID, name="default_web", revision=revision, state=state, reason=reason,
        id=3 if active else None, persistent=True, config_owner=owner(spec_hash),
        live_owner=owner(live_hash) if active and live_hash else None,
    )


def vm(strategy: str = "Always", *, status: dict[str, Any] | None = None, spec_hash: str = "h1",
       generation: int = 1, **spec: Any) -> VMView:
    return VMView(name="web", generation=generation, spec={"runStrategy": strategy, "memory": "64Mi", **spec},
                  spec_hash=spec_hash, status=status or {})


def kinds(decision: Decision) -> list[str]:
    return [action.kind for action in decision.actions]


def condition(decision: Decision, kind: str) -> dict[str, Any]:
    return next(c for c in decision.status["conditions"] if c["type"] == kind)


def apply(actions: Any, current: DomainSnapshot | None, spec_hash: str) -> DomainSnapshot | None:
    """What libvirt would do with the actions, as a next snapshot (the agent's role in tests)."""
    for action in actions:
        revision = (current.revision if current else 0) + 1
        if action.kind == "define":
            base = current or snapshot("shutoff", "unknown", spec_hash=spec_hash)
            current = replace(base, config_owner=owner(spec_hash), revision=revision)
        elif action.kind == "start":
            current = replace(current, state="paused" if action.start_paused else "running",
                              reason="user" if action.start_paused else "booted", id=9,
                              live_owner=current.config_owner, revision=revision)
        elif action.kind == "stop":
            current = replace(current, state="shutoff", reason="shutdown", id=None, live_owner=None, revision=revision)
        elif action.kind == "suspend":
            current = replace(current, state="paused", reason="user", revision=revision)
        elif action.kind == "resume":
            current = replace(current, state="running", reason="unpaused", revision=revision)
        elif action.kind == "undefine":
            current = None
    return current


def converge(view: VMView, current: DomainSnapshot | None, now: datetime.datetime = T0,
             steps: int = 4) -> tuple[Decision, DomainSnapshot | None, list[str]]:
    """Runs decide/apply as the agent does until nothing is left to do."""
    done: list[str] = []
    for _ in range(steps):
        decision = decide(view, current, now, NODE)
        if not decision.actions:
            return decision, current, done
        done += kinds(decision)
        current = apply(decision.actions, current, view.spec_hash)
        view = replace(view, status=decision.status)
    raise AssertionError(f"no fixed point after {steps} steps: {done}")


# --- creation ------------------------------------------------------------------------------

def test_a_new_vm_first_gets_the_finalizer_and_nothing_else() -> None:
    decision = decide(replace(vm(), has_finalizer=False), None, T0, NODE)
    assert kinds(decision) == ["add-finalizer"]
    assert decision.status["printableStatus"] == "Pending"
    assert condition(decision, "Reconciling")["status"] == "True"
    assert decision.status["ready"] is False


def test_always_defines_and_starts_without_an_event_then_reports_running_ready() -> None:
    first = decide(vm(), None, T0, NODE)
    assert kinds(first) == ["define", "start"]
    assert [a.event for a in first.actions if a.event] == []  # the status says it: one write less per VM
    assert first.status["printableStatus"] == "Starting"
    final, current, _ = converge(vm(status=first.status), snapshot())
    assert final.status["printableStatus"] == "Running"
    assert final.status["ready"] is True
    assert final.status["observedGeneration"] == 1
    assert condition(final, "Ready")["reason"] == "RunningAsDesired"
    assert condition(final, "Reconciling")["status"] == "False"
    assert condition(final, "Stalled")["status"] == "False"
    assert final.status["domain"] == {"name": "default_web", "uuid": UID, "id": 3, "state": "running",
                                      "reason": "booted", "resourceVersion": "7"}
    assert final.status["restartCount"] == 0 and final.status["nodeName"] == NODE
    assert final.status["vcpus"] == 1


def test_halted_and_manual_define_without_starting_and_are_ready_when_stopped() -> None:
    for strategy in ("Halted", "Manual"):
        decision, current, done = converge(vm(strategy), None)
        assert done == ["define"]
        assert current.state == "shutoff"
        assert decision.status["printableStatus"] == "Stopped"
        assert decision.status["ready"] is True
        assert condition(decision, "Ready")["reason"] == "StoppedAsDesired"


# --- runStrategy -------------------------------------------------------------------------

def test_halted_stops_a_running_domain_gracefully_and_says_stopping_first() -> None:
    decision = decide(vm("Halted", terminationGracePeriodSeconds=12), snapshot(), T0, NODE)
    assert kinds(decision) == ["stop"]
    assert decision.actions[0].grace_seconds == 12 and decision.actions[0].slow
    assert decision.status["printableStatus"] == "Stopping"
    assert decision.status["ready"] is False


def test_always_halted_always_starts_again_without_counting_a_restart() -> None:
    _, current, _ = converge(vm(), None)
    decision, current, done = converge(vm("Halted", status=decide(vm(), current, T0, NODE).status), current)
    assert done == ["stop"] and current.state == "shutoff"
    later = T0 + datetime.timedelta(seconds=5)
    again, current, done = converge(vm("Always", status=decision.status), current, later)
    assert done == ["start"] and current.state == "running"
    assert again.status["restartCount"] == 0


def running_since(strategy: str, started: datetime.datetime, failures: int = 0) -> dict[str, Any]:
    lifecycle: dict[str, Any] = {"runStrategy": strategy, "startTime": format_time(started)}
    if failures:
        lifecycle["consecutiveFailures"] = failures
    return {"lifecycle": lifecycle, "restartCount": 0, "domain": {"state": "running"}}


def test_always_restarts_after_the_guest_shuts_itself_down_and_counts_it() -> None:
    status = running_since("Always", T0 - datetime.timedelta(hours=1))
    decision = decide(vm(status=status), snapshot("shutoff", "shutdown"), T0, NODE)
    assert kinds(decision) == ["start"]
    assert decision.actions[0].event.reason == "Restarted"
    assert "shutoff: shutdown" in decision.actions[0].event.message
    assert decision.status["restartCount"] == 1
    assert decision.status["printableStatus"] == "Starting"


def test_crash_loop_backoff_doubles_from_10s_to_300s() -> None:
    assert [backoff_seconds(n) for n in range(1, 9)] == [0, 10, 20, 40, 80, 160, 300, 300]
    status = running_since("Always", T0 - datetime.timedelta(seconds=5), failures=1)
    decision = decide(vm(status=status), snapshot("shutoff", "crashed"), T0, NODE)
    assert kinds(decision) == []
    assert decision.status["printableStatus"] == "CrashLoopBackOff"
    assert decision.requeue_after == 10
    assert condition(decision, "Stalled")["status"] == "True"
    assert condition(decision, "Ready")["reason"] == "CrashLoopBackOff"
    assert [e.reason for e in decision.events] == ["CrashLoopBackOff"]
    assert decision.status["lifecycle"]["retryAfter"] == format_time(T0 + datetime.timedelta(seconds=10))
    waiting = decide(vm(status=decision.status), snapshot("shutoff", "crashed"), T0 + datetime.timedelta(seconds=4), NODE)
    assert kinds(waiting) == [] and waiting.requeue_after == 6 and waiting.events == ()
    due = decide(vm(status=waiting.status), snapshot("shutoff", "crashed"), T0 + datetime.timedelta(seconds=10), NODE)
    assert kinds(due) == ["start"]
    assert due.status["restartCount"] == 1
    assert "retryAfter" not in due.status["lifecycle"]
    assert due.status["lifecycle"]["consecutiveFailures"] == 2


def test_a_long_run_resets_the_backoff() -> None:
    status = running_since("Always", T0 - datetime.timedelta(minutes=10), failures=6)
    decision = decide(vm(status=status), snapshot("shutoff", "crashed"), T0, NODE)
    assert kinds(decision) == ["start"]
    assert decision.status["lifecycle"]["consecutiveFailures"] == 1


@pytest.mark.parametrize("reason,restarts", [("shutdown", False), ("crashed", True), ("destroyed", True), ("failed", True)])
def test_rerun_on_failure_restarts_only_after_a_failure(reason: str, restarts: bool) -> None:
    status = running_since("RerunOnFailure", T0 - datetime.timedelta(hours=1))
    decision = decide(vm("RerunOnFailure", status=status), snapshot("shutoff", reason), T0, NODE)
    assert kinds(decision) == (["start"] if restarts else [])
    if not restarts:
        assert decision.status["printableStatus"] == "Stopped"
        assert decision.status["ready"] is True


def test_once_starts_once_and_never_again() -> None:
    decision, current, done = converge(vm("Once"), None)
    assert done == ["define", "start"]
    stopped = replace(current, state="shutoff", reason="shutdown", id=None, live_owner=None)
    after, _, done = converge(vm("Once", status=decision.status), stopped, T0 + datetime.timedelta(hours=1))
    assert done == []
    assert after.status["printableStatus"] == "Stopped" and after.status["ready"] is True


def test_manual_never_starts_or_stops_but_reports_the_truth() -> None:
    status = {"lifecycle": {"runStrategy": "Manual"}}
    for state, reason, printable in (("running", "booted", "Running"), ("shutoff", "destroyed", "Stopped"),
                                     ("paused", "user", "Paused")):
        decision = decide(vm("Manual", status=status), snapshot(state, reason), T0, NODE)
        assert kinds(decision) == []
        assert decision.status["printableStatus"] == printable
        assert decision.status["ready"] is True


# --- paused --------------------------------------------------------------------------------

def test_paused_suspends_and_unpausing_resumes() -> None:
    status = running_since("Always", T0)
    decision = decide(vm(status=status, paused=True), snapshot(), T0, NODE)
    assert kinds(decision) == ["suspend"]
    final, current, _ = converge(vm(status=decision.status, paused=True), apply(decision.actions, snapshot(), "h1"))
    assert final.status["printableStatus"] == "Paused" and final.status["ready"] is True
    assert condition(final, "Paused") | {"lastTransitionTime": None} == condition(final, "Paused") | {
        "status": "True", "reason": "PausedBySpec", "lastTransitionTime": None}
    resumed = decide(vm(status=final.status, paused=False), current, T0, NODE)
    assert kinds(resumed) == ["resume"]
    assert resumed.actions[0].event.message == "resumed the domain (spec.paused is false)"


def test_a_pause_outside_the_operator_is_reported_then_undone() -> None:
    decision = decide(vm(status=running_since("Always", T0)), snapshot("paused", "user"), T0, NODE)
    assert kinds(decision) == ["resume"]
    assert "paused outside the operator" in decision.actions[0].event.message
    assert condition(decision, "Paused")["reason"] == "PausedOutsideOperator"


def test_a_transient_pause_is_left_alone() -> None:
    decision = decide(vm(status=running_since("Always", T0)), snapshot("paused", "migration"), T0, NODE)
    assert kinds(decision) == []
    assert decision.status["ready"] is False


def test_starting_with_paused_true_starts_paused() -> None:
    decision = decide(vm(paused=True), None, T0, NODE)
    assert decision.actions[-1].kind == "start" and decision.actions[-1].start_paused


# --- updates and restarts ------------------------------------------------------------------

def test_on_restart_redefines_and_sets_restart_required_until_the_next_boot() -> None:
    status = running_since("Always", T0)
    changed = vm(status=status, spec_hash="h2", generation=2)
    decision = decide(changed, snapshot(), T0, NODE)
    assert kinds(decision) == ["define"]
    assert decision.actions[0].event.reason == "Redefined"
    final, current, _ = converge(replace(changed, status=decision.status), apply(decision.actions, snapshot(), "h2"))
    assert condition(final, "RestartRequired")["status"] == "True"
    assert final.status["ready"] is True and final.status["observedGeneration"] == 2


def test_update_strategy_restart_redefines_and_restarts() -> None:
    changed = vm(status=running_since("Always", T0), spec_hash="h2", generation=2, updateStrategy="Restart")
    final, current, done = converge(changed, snapshot())
    assert done == ["define", "stop", "start"]
    assert current.live_owner.spec_hash == "h2"
    assert condition(final, "RestartRequired")["status"] == "False"
    assert final.status["restartCount"] == 0


def test_the_restart_annotation_restarts_once_per_value() -> None:
    annotated = replace(vm(status=running_since("Always", T0)), annotations={RESTART_ANNOTATION: "1"})
    final, _, done = converge(annotated, snapshot())
    assert done == ["stop", "start"]
    assert final.status["lifecycle"]["restartRequest"] == "1"
    again = replace(annotated, annotations={RESTART_ANNOTATION: "2"}, status=final.status)
    assert kinds(decide(again, snapshot(), T0, NODE)) == ["stop", "start"]


def test_an_undefined_domain_is_defined_again_and_said_so() -> None:
    status = running_since("Always", T0 - datetime.timedelta(hours=1))
    decision = decide(vm(status=status), None, T0, NODE)
    assert kinds(decision) == ["define", "start"]
    assert decision.actions[0].event.reason == "Redefined"


# --- deletion and problems -----------------------------------------------------------------

@pytest.mark.parametrize("current,expected", [
    (snapshot(), ["stop", "undefine", "remove-finalizer"]),
    (snapshot("shutoff", "shutdown"), ["undefine", "remove-finalizer"]),
    (None, ["undefine", "remove-finalizer"]),
])
def test_deletion_stops_undefines_then_releases_the_finalizer(current: DomainSnapshot | None, expected: list[str]) -> None:
    decision = decide(replace(vm(), deleting=True), current, T0, NODE)
    assert kinds(decision) == expected
    assert decision.status["printableStatus"] == "Terminating"


def test_deletion_without_our_finalizer_does_nothing() -> None:
    assert kinds(decide(replace(vm(), deleting=True, has_finalizer=False), snapshot(), T0, NODE)) == []


def test_a_stalled_problem_stops_actions_and_says_why() -> None:
    problem = Problem("ImageNotAllowed", "spec.disks[0].image.path: /etc/passwd is outside the allowed roots", stalled=True)
    decision = decide(vm(generation=3), None, T0, NODE, problem)
    assert kinds(decision) == []
    assert decision.status["printableStatus"] == "Failed"
    assert condition(decision, "Stalled") | {"lastTransitionTime": None} == {
        "type": "Stalled", "status": "True", "reason": "ImageNotAllowed", "message": problem.message,
        "observedGeneration": 3, "lastTransitionTime": None}
    assert condition(decision, "Reconciling")["status"] == "False"
    assert decision.status["observedGeneration"] == 3


def test_a_transient_problem_keeps_reconciling() -> None:
    problem = Problem("LibvirtUnavailable", "libvirt at qemu:///system does not answer", stalled=False)
    decision = decide(vm(), None, T0, NODE, problem)
    assert kinds(decision) == []
    assert decision.status["lifecycle"] == {}
    assert condition(decision, "Reconciling")["status"] == "True"
    assert condition(decision, "Ready")["reason"] == "LibvirtUnavailable"


def test_last_transition_time_only_moves_when_a_condition_flips() -> None:
    first, current, _ = converge(vm(), snapshot())
    later = T0 + datetime.timedelta(minutes=5)
    same = decide(vm(status=first.status), current, later, NODE)
    assert same.status == first.status
    flipped = decide(vm("Halted", status=first.status), current, later, NODE)
    assert condition(flipped, "Ready")["lastTransitionTime"] == format_time(later)
    assert condition(flipped, "Paused")["lastTransitionTime"] == condition(first, "Paused")["lastTransitionTime"]


# --- the whole table -----------------------------------------------------------------------

STATES = [None, ("running", "booted"), ("paused", "user"), ("shutoff", "shutdown"), ("shutoff", "destroyed"),
          ("shutoff", "crashed")]


@pytest.mark.parametrize("strategy,state,paused,stale", list(itertools.product(STRATEGIES, STATES, (False, True), (False, True))))
def test_every_state_converges_to_what_the_spec_asks(strategy: str, state: tuple[str, str] | None,
                                                    paused: bool, stale: bool) -> None:
    current = None if state is None else snapshot(*state, spec_hash="h0" if stale else "h1",
                                                 live_hash="h0" if stale else "h1")
    view = vm(strategy, paused=paused, status={"lifecycle": {"runStrategy": strategy, "startTime": format_time(
        T0 - datetime.timedelta(hours=1))}} if state else {})
    final, end, _ = converge(view, current)
    assert final.status["ready"] is True, final.status
    assert end is not None and end.config_owner.spec_hash == "h1"
    assert final.status["observedGeneration"] == 1
    if strategy == "Halted":
        assert end.state == "shutoff" and final.status["printableStatus"] == "Stopped"
    if strategy == "Always":
        assert end.state == ("paused" if paused else "running")
    if end.state == "running":
        assert not paused


def test_a_running_domain_undefined_outside_is_defined_again() -> None:
    transient = replace(snapshot(), persistent=False)
    decision = decide(vm(status=running_since("Always", T0)), transient, T0, NODE)
    assert kinds(decision) == ["define"]
    assert "undefined outside the operator" in decision.actions[0].event.message


def test_a_definition_edited_outside_is_defined_again_once() -> None:
    ours = replace(snapshot(), config_digest="d1")
    adopted = decide(vm(status=running_since("Always", T0)), ours, T0, NODE)
    assert kinds(adopted) == [] and adopted.status["lifecycle"]["definitionDigest"] == "d1"
    edited = replace(ours, config_digest="d2", revision=8)
    decision = decide(vm(status=adopted.status), edited, T0, NODE)
    assert kinds(decision) == ["define"]
    assert "changed outside the operator" in decision.actions[0].event.message
    redefined = replace(ours, config_digest="d3", revision=9)
    after = decide(vm(status=decision.status), redefined, T0, NODE)
    assert kinds(after) == [] and after.status["lifecycle"]["definitionDigest"] == "d3"


def test_a_domain_stuck_starting_up_is_started_again_after_a_while() -> None:
    stuck = snapshot("paused", "starting up")
    fresh = decide(vm(status=running_since("Always", T0)), stuck, T0 + datetime.timedelta(seconds=5), NODE)
    assert kinds(fresh) == [] and fresh.requeue_after == 30
    late = decide(vm(status=running_since("Always", T0)), stuck, T0 + datetime.timedelta(seconds=31), NODE)
    assert kinds(late) == ["stop", "start"]
    assert late.actions[0].grace_seconds == 0


def test_once_does_not_restart_a_crashed_domain() -> None:
    status = running_since("Once", T0 - datetime.timedelta(seconds=5))
    decision = decide(vm("Once", status=status), snapshot("crashed", "panicked"), T0, NODE)
    assert [a.kind for a in decision.actions] in ([], ["stop"])
    assert "start" not in kinds(decision)
    assert decision.status["printableStatus"] != "CrashLoopBackOff"
