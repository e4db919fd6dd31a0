"""One reconcile of one VM: decide, act, re-read the domain, until no action is left; then one status write
and the actions' Events. The decisions are `reconcile.decide`'s; this runs them against libvirt (through
the Host) and the API server.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from libvirt_operator import guest, reconcile
from libvirt_operator.domains import DomainCache
from libvirt_operator.held_bodies import kept
from libvirt_operator.host import Host, HostUnavailable
from libvirt_operator.libvirt_errors import LibvirtError
from libvirt_operator.kube import FINALIZER, KubeClient
from libvirt_operator.migration import not_migratable
from libvirt_operator.libvirt_health import NOT_RESPONDING, LibvirtHealth
from libvirt_operator.nodes import Fleet
from libvirt_operator.model import AgentSettings, DomainSnapshot, OwnerMetadata, Tuning, VMRef
from libvirt_operator.scheduler import owned_data_disks, pending_status
from libvirt_operator.spec import SpecError, VMSpec, parse_spec, spec_hash
from libvirt_operator.status_writer import StatusWriter
from libvirt_operator.vm_status import condition_of
from libvirt_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

MAX_STEPS = 4


class RunContext(Protocol):
    """What a run needs of the agent."""

    settings: AgentSettings
    kube: KubeClient
    host: Host
    cache: DomainCache
    tuning: Tuning
    queue: WorkQueue
    status: StatusWriter
    bodies: dict[str, dict[str, Any]]
    clock: Callable[[], datetime.datetime]
    fleet: Fleet

    def retry_delay(self, uid: str) -> float: ...


class VMRun:
    """One reconcile of one VM: decide, act, re-read, until done; then one status write."""

    def __init__(self, agent: RunContext, body: dict[str, Any]) -> None:
        self.agent = agent
        self.body = body
        meta = body["metadata"]
        self.ref = VMRef(uid=meta["uid"], namespace=meta["namespace"], name=meta["name"])
        self.spec_dict = body.get("spec") or {}
        self.view = reconcile.VMView(
            name=meta["name"], generation=meta.get("generation", 1), spec=self.spec_dict,
            spec_hash=spec_hash(self.spec_dict), status=agent.status.last_decided(body),
            annotations=meta.get("annotations") or {}, deleting=bool(meta.get("deletionTimestamp")),
            has_finalizer=FINALIZER in (meta.get("finalizers") or []),
        )
        self.problem: reconcile.Problem | None = None
        self.spec: VMSpec | None = None
        self.action_events: list[reconcile.Event] = []
        if not self.view.deleting:
            try:
                self.spec = parse_spec(self.spec_dict)
            except SpecError as error:
                self.problem = stalled(error)
            else:
                self.view = replace(self.view, not_migratable=not_migratable(self.spec))

    async def report_unknown(self, health: LibvirtHealth) -> None:
        """What a reader can know while libvirt does not answer; nothing is done to the domain meanwhile."""
        reason = "LibvirtNotResponding" if health.state == NOT_RESPONDING else "LibvirtUnavailable"
        message = f"{health.message} (since {health.to_status()['since']}); the domain's state is not known"
        status = reconcile.unknown_status(self.view, self.agent.cache.get(self.ref.uid), self.agent.clock(),
                                          self.agent.settings.node_name, reason, message)
        await self.agent.status.write(self.body, status)

    async def release(self, why_not_live: str) -> None:
        """spec.nodeName names another node and the VM cannot move live (`why_not_live`): it is removed here before
        that node's agent may start it (status.nodeName cleared last), unless its disks hold data only this node has."""
        target, me = self.spec_dict.get("nodeName"), self.agent.settings.node_name
        data = owned_data_disks(self.spec) if self.spec is not None else []
        if self.problem is None and data:
            self.problem = stalled(SpecError("spec.nodeName", (
                f"moving this VM from {me} to {target} would lose {', '.join(data)}, whose data lives only on {me}, "
                f"and it cannot move live: {why_not_live}; set spec.nodeName back to {me}, or delete the VM and "
                f"create it on {target}")))
        if self.problem is not None:
            await self.agent.status.write(self.body, self.decide_now().status)
            return
        async with self.agent.cache.reads_held(self.ref.uid):
            await self._stop(self.spec.termination_grace_period_seconds)
            await self.agent.host.call(guest.undefine_and_delete, self.ref.uid, self.agent.settings)
        await self.agent.status.write(self.body, pending_status(
            self.body, "Moving", f"stopped and removed on {me}; the agent of {target} starts it", self.agent.clock()))

    async def converge(self) -> None:
        """Acts until the domain is as the spec asks, writes the status, then posts the actions' Events
        (after the status: Ready is what a user waits for; an Event's POST would only delay it)."""
        decision: reconcile.Decision | None = None
        try:
            decision = await self._act_until_done()
            if decision is not None:
                await self.agent.status.write(self.body, decision.status)
        finally:
            await self.post_action_events()
        if decision is not None:
            await self.agent.status.post_events(self.body, decision.events)
            self._schedule(decision)

    async def _act_until_done(self) -> reconcile.Decision | None:
        """The decision with nothing left to do (or a problem); None when the VM is gone."""
        agent = self.agent
        snapshot = agent.cache.get(self.ref.uid)
        decision = self._decide(snapshot)
        for _ in range(MAX_STEPS):
            if not decision.actions or self.problem is not None:
                break
            if any(action.slow for action in decision.actions):
                await self._announce(decision.status)
            if any(action.touches_domain for action in decision.actions):
                async with agent.cache.reads_held(self.ref.uid):
                    finished = await self._act(decision.actions, snapshot)
                    snapshot = await agent.cache.refresh(self.ref.uid) if finished else None
            else:
                finished = await self._act(decision.actions, snapshot)
                snapshot = agent.cache.get(self.ref.uid)
            if not finished:
                return None
            if self.problem is None:
                self.view = replace(self.view, status=decision.status)
                agent.status.decided(self.ref.uid, decision.status)
            decision = self._decide(snapshot)
        if self.problem is not None:
            decision = self._decide(snapshot)
        return decision

    async def post_action_events(self) -> None:
        events, self.action_events = self.action_events, []
        await self.agent.status.post_events(self.body, events)

    async def _announce(self, status: dict[str, Any]) -> None:
        """Says what a slow action is about to do; an API server that cannot hear it must not hold the action up."""
        try:
            await self.agent.status.write(self.body, status)
        except Exception as error:
            if isinstance(error, ApiException) and error.status == 404:
                raise
            log.info("status of %s/%s before a slow action not written: %s", self.ref.namespace, self.ref.name, error)

    def decide_now(self) -> reconcile.Decision:
        return self._decide(self.agent.cache.get(self.ref.uid))

    def _decide(self, snapshot: DomainSnapshot | None) -> reconcile.Decision:
        return reconcile.decide(self.view, snapshot, self.agent.clock(), self.agent.settings.node_name, self.problem)

    def _schedule(self, decision: reconcile.Decision) -> None:
        queue, uid = self.agent.queue, self.ref.uid
        if decision.requeue_after is not None:
            queue.add_after(uid, decision.requeue_after)
        elif self.problem is not None and self.problem.stalled:
            queue.add_after(uid, self.agent.tuning.stalled_retry_seconds)
        elif self.problem is not None:
            queue.add_after(uid, self.agent.retry_delay(uid))

    async def _act(self, actions: tuple[reconcile.Action, ...], snapshot: DomainSnapshot | None) -> bool:
        """Runs the actions in order; False when the VM is gone (finalizer released)."""
        for step in _steps(actions):
            first = step[0]
            if first.kind == "remove-finalizer":
                await self.post_action_events()  # while the VM still exists
            try:
                await self._execute(step, snapshot)
            except SpecError as error:
                self.problem = stalled(error)
            except HostUnavailable as error:
                self.problem = reconcile.Problem("LibvirtUnavailable", f"libvirt does not answer: {error}", stalled=False)
            except LibvirtError as error:
                what = " and ".join(action.kind for action in step)
                self.problem = reconcile.Problem("LibvirtError", f"{what} failed: {error}", stalled=False)
            if self.problem is not None:
                self.report_failure()
                return True
            self.action_events.extend(action.event for action in step if action.event is not None)
            if first.kind == "remove-finalizer":
                return False
        return True

    def report_failure(self) -> None:
        previous = condition_of(self.view.status, "Ready")
        if previous.get("message") != self.problem.message:
            self.action_events.append(reconcile.Event("Warning", "Failed", self.problem.message))

    async def _execute(self, step: tuple[reconcile.Action, ...], snapshot: DomainSnapshot | None) -> None:
        host, uid = self.agent.host, self.ref.uid
        action = step[0]
        kind = action.kind
        if kind in ("add-finalizer", "remove-finalizer"):
            await self._set_finalizer(present=kind == "add-finalizer")
        elif kind == "define":
            await self._define(then_start=step[1] if len(step) > 1 else None)
        elif kind == "start" and self.spec is not None:
            await self._define(then_start=action)  # a boot applies what waited for it: new overlays, grown disks
        elif kind == "start":
            await host.call(guest.start, uid, action.start_paused)
        elif kind == "stop":
            await self._stop(action.grace_seconds)
        elif kind == "suspend":
            await host.call(guest.suspend, uid)
        elif kind == "resume":
            await host.call(guest.resume, uid)
        elif kind == "undefine":
            await host.call(guest.undefine_and_delete, uid, self.agent.settings)
        else:
            raise ValueError(f"unknown action {kind}")

    async def _set_finalizer(self, *, present: bool) -> None:
        meta = self.body["metadata"]
        finalizers = [f for f in meta.get("finalizers") or [] if f != FINALIZER] + ([FINALIZER] if present else [])
        updated = kept(await self.agent.kube.set_finalizers(meta["namespace"], meta["name"], finalizers,
                                                            meta["resourceVersion"]))
        self.body = updated
        self.agent.bodies[self.ref.uid] = updated
        self.view = replace(self.view, has_finalizer=present)

    async def _define(self, then_start: reconcile.Action | None = None) -> None:
        assert self.spec is not None
        secrets = await self.user_data()
        owner = OwnerMetadata(uid=self.ref.uid, namespace=self.ref.namespace, name=self.ref.name,
                              generation=self.view.generation, spec_hash=self.view.spec_hash,
                              cluster=self.agent.settings.cluster_id)
        host, args = self.agent.host, (self.spec, self.ref, self.agent.settings, owner, secrets.get)
        start_error = None
        if then_start is None:
            await host.call(guest.apply_definition, *args)
        else:
            start_error = await host.call(guest.apply_definition_and_start, *args, then_start.start_paused)
        self.agent.cache.remember_owner(self.ref.uid, owner)  # defined, even when the start after it failed
        if start_error is not None:
            raise start_error

    async def user_data(self) -> dict[str, str | bytes]:
        """The Secrets the spec's cloudInit disks name, read with `get` only (bytes when not UTF-8 text:
        cloud-init takes gzip-compressed user data)."""
        found: dict[str, str | bytes] = {}
        for i, disk in enumerate(self.spec.disks if self.spec else ()):
            reference = getattr(disk.source, "user_data_secret", None)
            if reference and reference not in found:
                try:
                    value = await self.agent.kube.read_secret_key(self.ref.namespace, reference, "userdata")
                except ApiException as error:
                    if error.status not in (401, 403):
                        raise
                    raise SpecError(f"spec.disks[{i}].cloudInit.userDataSecretRef.name",
                                    f"the agent may not read Secret {reference} in namespace {self.ref.namespace} "
                                    f"({error.status} {error.reason}): its role needs `get` on Secrets") from error
                if value is not None:
                    found[reference] = value
        return found

    async def _stop(self, grace_seconds: int) -> None:
        """ACPI shutdown, waiting up to the grace period for the guest, then destroy."""
        host, cache, uid = self.agent.host, self.agent.cache, self.ref.uid
        current = cache.get(uid)
        if current is None or not current.active:
            return
        if grace_seconds > 0:
            if current.state == "paused":
                await host.call(guest.resume, uid)
            await host.call(guest.shutdown, uid)
            deadline = time.monotonic() + grace_seconds
            while current is not None and current.active and time.monotonic() < deadline:
                current = await cache.wait_for_change(uid, current.revision, deadline - time.monotonic())
                current = cache.get(uid)
            if current is None or not current.active:
                return
        await host.call(guest.destroy, uid)


def _steps(actions: tuple[reconcile.Action, ...]) -> list[tuple[reconcile.Action, ...]]:
    """One step per action, except that a define and the start after it are one libvirt job:
    the domain just defined is started without being looked up again."""
    steps: list[tuple[reconcile.Action, ...]] = []
    for action in actions:
        if action.kind == "start" and steps and len(steps[-1]) == 1 and steps[-1][0].kind == "define":
            steps[-1] = (steps[-1][0], action)
        else:
            steps.append((action,))
    return steps


def stalled(error: SpecError) -> reconcile.Problem:
    return reconcile.Problem("InvalidSpec", str(error), stalled=True)
