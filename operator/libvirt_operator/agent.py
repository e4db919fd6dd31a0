"""The agent: one per node, between the VirtualMachine API, the reconciler and libvirt.

It keeps the latest body of every VirtualMachine (fed by the watch), wakes a per-VM work
queue on a body change, a domain change (the cache's events) or the resync timer, and for each
wake-up runs one `vm_run.VMRun` (decide, act, until no action is left; one status write through
`status_writer`). The node's own LibvirtNode is `heartbeat`'s. Nothing here imports libvirt or kopf.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from libvirt_operator import guest, nodes, placement, process_memory, reconcile
from libvirt_operator.domains import DomainCache
from libvirt_operator.election import Election
from libvirt_operator.heartbeat import COUNTS_SECONDS, NodeHeartbeat
from libvirt_operator.host import Host, HostUnavailable
from libvirt_operator.kube import KubeClient
from libvirt_operator.libvirt_errors import LibvirtError
from libvirt_operator.libvirt_health import LibvirtHealth
from libvirt_operator.metrics import Readings
from libvirt_operator.migration import Move
from libvirt_operator.move_admission import MoveAdmission
from libvirt_operator.model import AgentSettings, DomainSnapshot, Tuning
from libvirt_operator.nodes import Role
from libvirt_operator.room_check import RoomCheck
from libvirt_operator.scheduler import Scheduler
from libvirt_operator.held_bodies import kept
from libvirt_operator.status_writer import StatusWriter, newer_or_same
from libvirt_operator.vm_move import MoveSteps
from libvirt_operator.vm_run import VMRun
from libvirt_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

UNAVAILABLE = (ApiException, urllib3.exceptions.HTTPError, HostUnavailable)
"""What an unreachable API server or libvirtd raises: expected, retried, logged without a traceback."""
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
ADMISSION_RECHECK_SECONDS = 10.0
"""How soon a move held back (parallel bounds, retry delay) is looked at again, besides when a move ends."""


class Agent:
    def __init__(self, settings: AgentSettings, kube: KubeClient, host: Host, cache: DomainCache,
                 tuning: Tuning = Tuning(), clock: Callable[[], datetime.datetime] | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.host = host
        self.cache = cache
        self.tuning = tuning
        self.clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.bodies: dict[str, dict[str, Any]] = {}
        self.queue = WorkQueue()
        self.fleet = nodes.Fleet(settings.node_name, tuning.lease_seconds)
        self.ledger = placement.Ledger()
        self.election = Election(kube, settings.placement.lease_namespace, settings.node_name, tuning.lease_seconds)
        self.status = StatusWriter(kube, self.bodies, tuning)
        self.scheduler = Scheduler(kube, self.fleet, self.ledger, self.status.write, self.clock)
        self.admission = MoveAdmission(kube, self.fleet, self.ledger, self.bodies, settings.migration,
                                       self.status.write, self.clock)
        self.moves = MoveSteps(self)
        self.room = RoomCheck(settings.node_name, self.fleet, self.ledger, self.bodies,
                              lambda uid: self.cache.get(uid) is not None, self.status.write, kube, self.clock)
        self.node = NodeHeartbeat(settings, kube, host, cache, tuning, self.fleet, self.ledger, self.election,
                                  self.bodies, self.resync)
        self.retries: dict[str, float] = {}
        self.reconciles = 0
        self.reconcile_seconds = 0.0
        self.listed = False
        """Whether the first listing of the domains is done (and VMs are being reconciled)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._jobs: set[asyncio.Task[None]] = set()
        """One-off jobs (an orphan's removal, a heartbeat on a change of libvirt's health), kept referenced until done."""
        host.health.listeners.append(self._libvirt_health_changed)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connects to libvirt and returns; the first listing of the domains, then the reconciles, follow
        in the background. That listing waits for every domain libvirtd is still starting (a killed
        agent's rollout: a minute or more on a busy host), and the liveness probe must answer meanwhile.

        First the cluster's identity, which every mark carries: without it another cluster's domains on a
        shared host would look like this one's orphans."""
        if not self.settings.cluster_id:
            self.settings = replace(self.settings, cluster_id=await self.kube.cluster_identity())
        self.host.cluster_id = self.settings.cluster_id
        self.node.settings = self.settings
        await self.host.start()
        # The first heartbeat runs beside the rest: reading capacity asks every guest's QEMU,
        # which takes seconds when the guests keep the CPUs busy, and VMs need none of it.
        beat = self.tuning.heartbeat_seconds
        self._tasks = [asyncio.create_task(self._every(beat, self.node.heartbeat, at_once=True)),
                       asyncio.create_task(self._every(beat, self.node.refresh_capacity, at_once=True)),
                       asyncio.create_task(self._every(COUNTS_SECONDS, self.node.publish_changed_counts)),
                       asyncio.create_task(self._reconcile_once_listed())]

    async def _reconcile_once_listed(self) -> None:
        await self.cache.start()
        await self.remove_orphans()
        self.listed = True
        self.cache.subscribe(self._domain_changed)
        self._tasks += [asyncio.create_task(self.queue.serve(self.reconcile_safely)) for _ in range(self.tuning.workers)]
        self._tasks.append(asyncio.create_task(self._every(self.tuning.resync_seconds, self.resync)))

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._jobs]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.election.release()
        except UNAVAILABLE as error:
            log.info("the placement Lease was not given up: %s", error)
        self.queue.close()
        await self.cache.stop()
        await self.host.stop()

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Any], *, at_once: bool = False) -> None:
        delay = 0.0 if at_once else seconds
        while True:
            await asyncio.sleep(delay)
            delay = seconds
            try:
                await job()
            except UNAVAILABLE as error:  # the API server or libvirt is down: the next period tries again
                log.warning("periodic %s failed: %s", getattr(job, "__name__", job), error)
            except Exception:
                log.exception("periodic %s failed", getattr(job, "__name__", job))

    def readings(self) -> Readings:
        """The counters /metrics reports (called from the metrics server's thread)."""
        host, scheduler = self.host, self.scheduler
        return Readings(
            reconciles=self.reconciles, reconcile_seconds=self.reconcile_seconds, libvirt_calls=Counter(host.calls),
            libvirt_call_seconds=Counter(host.call_seconds), libvirt_connections_opened=host.connections_opened,
            kubernetes_writes=Counter(self.kube.writes),
            domain_states=Counter(snapshot.state for snapshot in self.cache.snapshots().values()),
            foreign_domains=self.cache.foreign_domains, queue_depth=len(self.queue), libvirt_connected=host.connected,
            placement_leader=self.election.leading, placement_decisions=scheduler.decisions,
            placement_decision_seconds=scheduler.decision_seconds, moves=Counter(self.moves.outcomes))

    # --- wake-ups ----------------------------------------------------------------------

    def observe(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A watch event for a VirtualMachine (kopf's on.event); runs on the event loop, as everything here."""
        uid = body["metadata"]["uid"]
        held = self.bodies.get(uid)
        if held is not None and self._move_ended(held, body):
            for waiting in self.admission.waiting:
                self.queue.add(waiting)
        if event_type == "DELETED":
            self.bodies.pop(uid, None)
            self.ledger.place(uid, None)
            self.scheduler.waiting.discard(uid)
            if self.election.leading:  # room freed: the VMs waiting for some try again
                for waiting in self.scheduler.waiting:
                    self.queue.add(waiting)
            self.status.forget(uid)
            self.retries.pop(uid, None)
            move = Move.of((held or body).get("status") or {})
            if self.cache.get(uid) is not None or move is not None and move.target == self.settings.node_name:
                self._background(self.remove_orphan(uid))
            return
        if held is not None and newer_or_same(held, body):
            return
        self.bodies[uid] = kept(body)
        self.scheduler.book(body)
        self.queue.add(uid)

    @staticmethod
    def _move_ended(held: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
        before, after = Move.of(held.get("status") or {}), Move.of(body.get("status") or {})
        return before is not None and before.active and (after is None or not after.active)

    def observe_migration(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A watch event for a VirtualMachineMigration: the VM it names is looked at again."""
        vm = self.admission.observe(event_type, body)
        if vm is not None:
            self.queue.add(vm)
        elif self.election.leading and event_type != "DELETED":
            self._background(self.admission.fail_orphan_requests())

    def observe_node(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A watch event for a LibvirtNode: an admin's word (cordon, drain, labels, a deletion) or a node not known
        yet is acted on at once, with a heartbeat (which re-lists the fleet); its own renewals wait for the next."""
        view = self.fleet.nodes.get(body["metadata"]["name"])
        labels = body["metadata"].get("labels") or {}
        if event_type == "DELETED" or view is None or view.spec != (body.get("spec") or {}) or view.labels != labels:
            self._background(self.node.heartbeat())

    def _background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, UNAVAILABLE):
            log.warning("a background job failed: %s", error)
        elif error is not None:
            log.error("a background job failed unexpectedly", exc_info=error)

    async def remove_orphans(self) -> None:
        """Removes the listed domains whose VM is gone: deleted past its finalizer while no agent
        watched, or while the domains were being listed (its DELETED event then found none).
        The VMs are listed after the domains, so a domain's VM, if it exists, is among them. Only domains
        whose mark names this cluster: one from before cluster identities may be another cluster's."""
        listed = {uuid for uuid, snapshot in self.cache.snapshots().items()
                  if _marked_by(snapshot, self.settings.cluster_id)}
        try:
            existing = await self.kube.vm_uids()
        except Exception as error:
            log.warning("could not list the VirtualMachines to find orphaned domains: %s", error)
            return
        for uid in listed - existing:
            await self.remove_orphan(uid)

    async def remove_orphan(self, uid: str) -> None:
        """A VM deleted without its finalizer having run (removed by hand): its domain and disks go too."""
        try:
            removed = await self.host.call(guest.undefine_and_delete, uid, self.settings)
            if removed:  # nothing when the finalizer had removed it all and the cache had not heard yet
                log.warning("VM %s was deleted without the operator's finalizer; removed %s", uid, ", ".join(removed))
        except (HostUnavailable, LibvirtError) as error:
            log.warning("could not remove the orphaned domain %s: %s", uid, error)

    def _domain_changed(self, uuid: str) -> None:
        if uuid in self.bodies:
            self.status.domain_changed(uuid)
            self.queue.add(uuid)

    async def resync(self) -> None:
        """Looks again at every VM this agent runs or holds a domain of, and at every VM while it places them."""
        leading = self.election.leading
        for uid, body in list(self.bodies.items()):
            if leading or nodes.runs_here(body, self.fleet) or self.cache.get(uid) is not None:
                self.queue.add(uid)
        await asyncio.to_thread(process_memory.release_free_memory)

    def _libvirt_health_changed(self, health: LibvirtHealth) -> None:
        """Every VM of the node is looked at again: Unknown while libvirt cannot be asked, the truth after."""
        log.warning("libvirt %s: %s", health.state, health.message or "answering again")
        for uid in self.bodies:
            self.queue.add(uid)
        self._background(self.node.heartbeat())

    # --- one reconcile -----------------------------------------------------------------

    async def reconcile_safely(self, uid: str) -> None:
        began = time.monotonic()
        try:
            await self.reconcile(uid)
            self.retries.pop(uid, None)
        except ApiException as error:
            if error.status == 404:
                self.bodies.pop(uid, None)
                return
            self._retry_later(uid, f"API server answered {error.status} {error.reason}",
                              quiet=error.status == 409)
        except HostUnavailable as error:  # the health listener makes the node's VMs read Unknown
            self._retry_later(uid, str(error))
        except LibvirtError as error:  # a step outside a VM's run (a move's, a copy's removal): tried again
            self._retry_later(uid, f"libvirt: {error}")
        except urllib3.exceptions.HTTPError as error:  # the API server is unreachable: nothing to report to
            self._retry_later(uid, f"the API server is unreachable: {error}")
        except Exception as error:
            log.exception("reconcile of %s failed unexpectedly", uid)
            self._retry_later(uid, f"{type(error).__name__}: {error}")
            await self._report_unexpected(uid, error)
        finally:
            self.reconciles += 1
            self.reconcile_seconds += time.monotonic() - began

    async def _report_unexpected(self, uid: str, error: Exception) -> None:
        """An error the agent does not expect still reaches the VM's status (Reconciling, while it retries)
        and an Event, once per distinct message."""
        body = self.bodies.get(uid)
        if body is None or body["metadata"].get("deletionTimestamp") or not nodes.runs_here(body, self.fleet):
            return  # the status is the running node's: another agent's error must not write its node name there
        run = VMRun(self, body)
        run.problem = reconcile.Problem("ReconcileError", f"unexpected {type(error).__name__}: {error}; retrying",
                                        stalled=False)
        try:
            run.report_failure()
            await self.status.write(body, run.decide_now().status)
            await run.post_action_events()
        except Exception as failure:  # the API server may be what fails: the retry comes back here
            log.warning("could not report the error of %s: %s", uid, failure)

    def retry_delay(self, uid: str) -> float:
        """The next delay of this VM's exponential retry backoff."""
        delay = min(self.retries.get(uid, RETRY_FIRST_SECONDS / 2) * 2, RETRY_MAX_SECONDS)
        self.retries[uid] = delay
        return delay

    def _retry_later(self, uid: str, why: str, *, quiet: bool = False) -> None:
        delay = self.retry_delay(uid)
        log.log(logging.DEBUG if quiet else logging.WARNING, "reconcile of %s: %s; retrying in %.1fs", uid, why, delay)
        self.queue.add_after(uid, delay)

    async def reconcile(self, uid: str) -> None:
        body = self.bodies.get(uid)
        if body is None:
            return
        if self.election.leading:
            if await self.admission.duty(body):
                return  # a move was scheduled: the watch brings the body written
            if uid in self.admission.waiting:
                self.queue.add_after(uid, ADMISSION_RECHECK_SECONDS)
        role = nodes.role(body, self.fleet)
        if role is Role.REMOVE_COPY and self.cache.get(uid) is not None:
            await self.remove_copy(body)
        if role not in (Role.RUN, Role.RELEASE, Role.INCOMING, Role.CLEAN_INCOMING):
            if self.election.leading:
                await self.scheduler.duty(body)
                if uid in self.bodies and nodes.runs_here(self.bodies[uid], self.fleet):
                    self.queue.add(uid)  # placed here: the watch event of this write is one this agent has seen
            return
        if role is Role.RUN and (why := self.room.over(body)) is not None:
            await self.room.refuse(body, why)
            return
        run = VMRun(self, body)
        health = self.host.health.current
        if not health.answering:
            if role in (Role.RUN, Role.RELEASE):
                await run.report_unknown(health)
            return
        if await self.moves.reconcile(run, role):
            return
        await run.converge()

    async def remove_copy(self, body: Mapping[str, Any]) -> None:
        """A domain here of a VM placed on another node since (this node was fenced): stopped and removed, and
        nothing else touched; the VM's status belongs to the node it is placed on."""
        uid, meta = body["metadata"]["uid"], body["metadata"]
        removed = await self.host.call(guest.undefine_and_delete, uid, self.settings)
        log.warning("VM %s/%s is placed on %s now: removed this node's copy (%s)", meta["namespace"], meta["name"],
                    (body.get("status") or {}).get("nodeName"), ", ".join(removed))


def _marked_by(snapshot: DomainSnapshot, cluster: str) -> bool:
    return snapshot.owner is not None and snapshot.owner.cluster == cluster
