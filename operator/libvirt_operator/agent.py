"""The agent: one per node, between the VirtualMachine API, the reconciler and libvirt.

It keeps the latest body of every VirtualMachine (fed by the watch), wakes a per-VM work
queue on a body change, a domain change (the cache's events) or the resync timer, and for each
wake-up runs `reconcile.decide` until no action is left, then writes status once, only if it
changed. Nothing here imports libvirt or kopf.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from libvirt_operator import allowlist, guest, nodes, placement, reconcile
from libvirt_operator.election import Election
from libvirt_operator.metrics import EVENT_TO_STATUS
from libvirt_operator.domains import DomainCache
from libvirt_operator.host import Host, HostCapacity, HostUnavailable
from libvirt_operator.libvirt_health import NOT_RESPONDING, LibvirtHealth
from libvirt_operator.kube import FINALIZER, KubeClient, now_iso, status_merge_patch
from libvirt_operator.model import AgentSettings, DomainSnapshot, OwnerMetadata, Tuning, VMRef
from libvirt_operator.nodes import Role
from libvirt_operator.scheduler import Scheduler, owned_data_disks, pending_status
from libvirt_operator.spec import SpecError, VMSpec, parse_spec, spec_hash
from libvirt_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

UNAVAILABLE = (ApiException, urllib3.exceptions.HTTPError, HostUnavailable)
"""What an unreachable API server or libvirtd raises: expected, retried, logged without a traceback."""
MAX_STEPS = 4
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
VOLATILE_STATUS = ("stats",)
VOLATILE_DOMAIN = ("resourceVersion",)
COUNTS_SECONDS = 2.0
"""How soon a change of the VMs a node runs reaches its LibvirtNode."""


def _significant(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without what changes on its own (stats, snapshot revision)."""
    kept = {key: value for key, value in status.items() if key not in VOLATILE_STATUS}
    if isinstance(kept.get("domain"), dict):
        kept["domain"] = {k: v for k, v in kept["domain"].items() if k not in VOLATILE_DOMAIN}
    return kept


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
        self.scheduler = Scheduler(kube, self.fleet, self.ledger, self.write_status, self.clock)
        self.retries: dict[str, float] = {}
        self.stats_written: dict[str, float] = {}
        self.woken_at: dict[str, float] = {}
        self.unwritten: dict[str, dict[str, Any]] = {}
        """Statuses whose write failed: they carry the lifecycle memory (restarts made) until written."""
        self.reconciles = 0
        self.reconcile_seconds = 0.0
        self.started = time.monotonic()
        self.listed = False
        """Whether the first listing of the domains is done (and VMs are being reconciled)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._jobs: set[asyncio.Task[None]] = set()
        """One-off jobs (an orphan's removal, a heartbeat on a change of libvirt's health), kept referenced until done."""
        self._heartbeat_lock = asyncio.Lock()
        self._published_counts: tuple[int, tuple[int, int]] | None = None
        self.capacity: HostCapacity | None = None
        """The host's capacity as last read; the heartbeat sends it without asking libvirt."""
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
        await self.host.start()
        # The first heartbeat runs beside the rest: reading capacity asks every guest's QEMU,
        # which takes seconds when the guests keep the CPUs busy, and VMs need none of it.
        self._tasks = [asyncio.create_task(self._every(self.tuning.heartbeat_seconds, self.heartbeat, at_once=True)),
                       asyncio.create_task(self._every(self.tuning.heartbeat_seconds, self.refresh_capacity,
                                                       at_once=True)),
                       asyncio.create_task(self._every(COUNTS_SECONDS, self._publish_changed_counts)),
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

    # --- wake-ups ----------------------------------------------------------------------

    def observe(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A watch event for a VirtualMachine (kopf's on.event); runs on the event loop, as everything here."""
        uid = body["metadata"]["uid"]
        if event_type == "DELETED":
            self.bodies.pop(uid, None)
            self.ledger.place(uid, None)
            self.scheduler.waiting.discard(uid)
            if self.election.leading:  # room freed: the VMs waiting for some try again
                for waiting in self.scheduler.waiting:
                    self.queue.add(waiting)
            self.unwritten.pop(uid, None)
            self.retries.pop(uid, None)
            self.stats_written.pop(uid, None)
            if self.cache.get(uid) is not None:
                self._background(self.remove_orphan(uid))
            return
        held = self.bodies.get(uid)
        if held is not None and _newer_or_same(held, body):
            return
        self.bodies[uid] = dict(body)
        self.scheduler.book(body)
        self.queue.add(uid)

    def _background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

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
        except (HostUnavailable, guest.LIBVIRT_ERROR) as error:
            log.warning("could not remove the orphaned domain %s: %s", uid, error)

    def _domain_changed(self, uuid: str) -> None:
        if uuid in self.bodies:
            self.woken_at.setdefault(uuid, time.monotonic())
            self.queue.add(uuid)

    async def resync(self) -> None:
        """Looks again at every VM this agent runs or holds a domain of, and at every VM while it places them."""
        leading = self.election.leading
        for uid, body in list(self.bodies.items()):
            if leading or self._owned(body) or self.cache.get(uid) is not None:
                self.queue.add(uid)

    def _libvirt_health_changed(self, health: LibvirtHealth) -> None:
        """Every VM of the node is looked at again: Unknown while libvirt cannot be asked, the truth after."""
        log.warning("libvirt %s: %s", health.state, health.message or "answering again")
        for uid in self.bodies:
            self.queue.add(uid)
        self._background(self.heartbeat())

    async def refresh_capacity(self) -> None:
        first = self.capacity is None
        try:
            self.capacity = await self.host.capacity(self.settings.storage_pool)
        except HostUnavailable as error:
            log.info("capacity not read: %s", error)
            return
        if first:  # the node offers nothing to placement until its capacity is published
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Announces this agent, its libvirt's health and the capacity last read (never asking libvirt, so a
        hung libvirtd cannot stop it); refreshes the list of live agents."""
        async with self._heartbeat_lock:
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        await self._announce_node()
        was_leading = self.election.leading
        leading = await self.election.renew()
        if await self.refresh_fleet() or leading != was_leading:
            await self.resync()
        if leading:
            await self._mark_silent_nodes()

    async def _announce_node(self) -> None:
        capacity, health = self.capacity, self.host.health.current
        me = self.fleet.nodes.get(self.settings.node_name)
        counts = self._counts()
        status: dict[str, Any] = {
            "heartbeatTime": now_iso(), "leaseDurationSeconds": self.tuning.lease_seconds,
            "state": "NotReady" if not health.answering else "Cordoned" if me is not None and me.cordoned else "Ready",
            "libvirtUri": self.settings.libvirt_uri, "connected": self.host.connected, "libvirt": health.to_status(),
            "vms": counts[0],
            "foreignDomains": self.cache.foreign_domains,
        }
        if capacity is not None:
            status["hypervisor"] = {
                "type": capacity.hypervisor_type, "version": capacity.hypervisor_version,
                "libvirtVersion": capacity.libvirt_version, "hostname": capacity.hostname,
                "cpuModel": capacity.cpu_model,
            }
            status["capacity"] = {
                "vcpus": capacity.vcpus, "vcpusUsed": capacity.vcpus_used,
                "memory": str(capacity.memory_bytes), "memoryUsed": str(capacity.memory_used_bytes),
                "storagePoolFree": None if capacity.storage_pool_free_bytes is None
                else str(capacity.storage_pool_free_bytes),
            }
            status.update(self._offer(capacity))
        await self.kube.announce_node(status)
        self._published_counts = counts

    def _counts(self) -> tuple[int, tuple[int, int]]:
        """The VMs this agent runs, and what the VMs placed here take: what LibvirtNode readers count."""
        return sum(1 for body in self.bodies.values() if self._owned(body)), self.ledger.taken(self.settings.node_name)

    async def _publish_changed_counts(self) -> None:
        """A heartbeat as soon as the counts changed, so `kubectl get libvirtnodes` follows the VMs (none while
        nothing changes)."""
        if self._published_counts is not None and self._counts() != self._published_counts:
            async with self._heartbeat_lock:
                await self._announce_node()

    def _offer(self, capacity: HostCapacity) -> dict[str, Any]:
        """What this node offers to placement: room (after the admin's ratios) and the names VMs may use."""
        policy, settings = self.settings.placement, self.settings
        published = placement.published(
            policy.capacity_vcpus or capacity.vcpus, policy.capacity_memory or capacity.memory_bytes,
            policy.cpu_allocation_ratio, policy.memory_allocation_ratio, policy.vm_memory_overhead,
            self.ledger.taken(settings.node_name))
        published["offers"] = {
            "domainTypes": sorted({*capacity.domain_types, settings.domain_type}),
            "networks": sorted(n for n in capacity.networks if allowlist.is_allowed(n, settings.allowed_networks)),
            "bridges": list(settings.allowed_bridges),
            "pools": sorted(p for p in capacity.pools if allowlist.is_allowed(p, settings.allowed_pools)),
            "userNetworking": settings.allow_user_networking,
        }
        return published

    async def refresh_fleet(self) -> bool:
        """Re-lists the LibvirtNodes (liveness judged on this agent's clock); True if the fleet changed."""
        return self.fleet.observe(await self.kube.list_nodes())

    async def _mark_silent_nodes(self) -> None:
        """NotReady on the LibvirtNodes whose agents stopped renewing (they cannot say it themselves)."""
        for name, view in list(self.fleet.nodes.items()):
            if not view.live and view.status.get("state") != "NotReady":
                try:
                    await self.kube.patch_node_status(name, {"state": "NotReady"})
                except ApiException as error:
                    log.info("could not mark LibvirtNode %s NotReady: %s", name, error)

    def _owned(self, body: Mapping[str, Any]) -> bool:
        return nodes.role(body, self.fleet) in (Role.RUN, Role.RELEASE)

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
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        run = _Run(self, body)
        run.problem = reconcile.Problem("ReconcileError", f"unexpected {type(error).__name__}: {error}; retrying",
                                        stalled=False)
        try:
            run.report_failure()
            await self.write_status(body, run.decide_now().status)
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
        role = nodes.role(body, self.fleet)
        if role is Role.REMOVE_COPY and self.cache.get(uid) is not None:
            await self.remove_copy(body)
        if role not in (Role.RUN, Role.RELEASE):
            if self.election.leading:
                await self.scheduler.duty(body)
                if uid in self.bodies and self._owned(self.bodies[uid]):
                    self.queue.add(uid)  # placed here: the watch event of this write is one this agent has seen
            return
        run = _Run(self, body)
        health = self.host.health.current
        if not health.answering:
            await run.report_unknown(health)
            return
        if role is Role.RELEASE:
            await run.release()
            return
        await run.converge()

    async def remove_copy(self, body: Mapping[str, Any]) -> None:
        """A domain here of a VM placed on another node since (this node was fenced): stopped and removed, and
        nothing else touched; the VM's status belongs to the node it is placed on."""
        uid, meta = body["metadata"]["uid"], body["metadata"]
        removed = await self.host.call(guest.undefine_and_delete, uid, self.settings)
        log.warning("VM %s/%s is placed on %s now: removed this node's copy (%s)", meta["namespace"], meta["name"],
                    (body.get("status") or {}).get("nodeName"), ", ".join(removed))


    async def write_status(self, body: dict[str, Any], status: dict[str, Any], resource_version: str | None = None) -> None:
        """Patches status when something a reader cares about changed (stats alone wait); with
        `resource_version`, only if the VM is still as it was then (409 otherwise)."""
        old = body.get("status") or {}
        uid = body["metadata"]["uid"]
        now = time.monotonic()
        woken = self.woken_at.pop(uid, None)
        self.unwritten.pop(uid, None)
        if _significant(old) == _significant(status):
            last = self.stats_written.get(uid, self.started)
            if old.get("stats") == status.get("stats") or now - last < self.tuning.stats_seconds:
                return
        patch = status_merge_patch(old, status)
        if not patch:
            return
        meta = body["metadata"]
        try:
            updated = await self.kube.patch_vm_status(meta["namespace"], meta["name"], patch, resource_version)
        except Exception:
            self.unwritten[uid] = status
            raise
        if woken is not None:
            EVENT_TO_STATUS.observe(time.monotonic() - woken)
        self.stats_written[uid] = now
        if uid in self.bodies and not _newer_or_same(self.bodies[uid], updated):
            self.bodies[uid] = updated
        body["status"] = updated.get("status") or status
        body["metadata"] = updated["metadata"]  # a finalizer patch after this one must not answer 409


def _marked_by(snapshot: DomainSnapshot, cluster: str) -> bool:
    owner = snapshot.live_owner or snapshot.config_owner
    return owner is not None and owner.cluster == cluster


def _newer_or_same(held: Mapping[str, Any], incoming: Mapping[str, Any]) -> bool:
    try:
        return int(held["metadata"]["resourceVersion"]) >= int(incoming["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return False


class _Run:
    """One reconcile of one VM: decide, act, re-read, until done; then one status write."""

    def __init__(self, agent: Agent, body: dict[str, Any]) -> None:
        self.agent = agent
        self.body = body
        meta = body["metadata"]
        self.ref = VMRef(uid=meta["uid"], namespace=meta["namespace"], name=meta["name"])
        self.spec_dict = body.get("spec") or {}
        self.view = reconcile.VMView(
            name=meta["name"], generation=meta.get("generation", 1), spec=self.spec_dict,
            spec_hash=spec_hash(self.spec_dict), status=agent.unwritten.get(meta["uid"]) or body.get("status") or {},
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
                self.problem = _stalled(error)

    async def report_unknown(self, health: LibvirtHealth) -> None:
        """What a reader can know while libvirt does not answer; nothing is done to the domain meanwhile."""
        reason = "LibvirtNotResponding" if health.state == NOT_RESPONDING else "LibvirtUnavailable"
        message = f"{health.message} (since {health.to_status()['since']}); the domain's state is not known"
        status = reconcile.unknown_status(self.view, self.agent.cache.get(self.ref.uid), self.agent.clock(),
                                          self.agent.settings.node_name, reason, message)
        await self.agent.write_status(self.body, status)

    async def release(self) -> None:
        """spec.nodeName names another node: the domain is stopped and removed here before that node's agent may
        start it (status.nodeName cleared last), unless its disks hold data only this node has."""
        target, me = self.spec_dict.get("nodeName"), self.agent.settings.node_name
        data = owned_data_disks(self.spec) if self.spec is not None else []
        if self.problem is None and data:
            self.problem = _stalled(SpecError("spec.nodeName", (
                f"moving this VM from {me} to {target} would lose {', '.join(data)}, whose data lives only on {me}, "
                f"and live migration is not there yet; set spec.nodeName back to {me}, or delete the VM and create "
                f"it on {target}")))
        if self.problem is not None:
            await self.agent.write_status(self.body, self.decide_now().status)
            return
        async with self.agent.cache.reads_held(self.ref.uid):
            await self._stop(self.spec.termination_grace_period_seconds)
            await self.agent.host.call(guest.undefine_and_delete, self.ref.uid, self.agent.settings)
        await self.agent.write_status(self.body, pending_status(
            self.body, "Moving", f"stopped and removed on {me}; the agent of {target} starts it", self.agent.clock()))

    async def converge(self) -> None:
        """Acts until the domain is as the spec asks, writes the status, then posts the actions' Events
        (after the status: Ready is what a user waits for; an Event's POST would only delay it)."""
        decision: reconcile.Decision | None = None
        try:
            decision = await self._act_until_done()
            if decision is not None:
                await self.agent.write_status(self.body, decision.status)
        finally:
            await self.post_action_events()
        if decision is not None:
            for event in decision.events:
                await self.agent.kube.post_event(self.body, event.type, event.reason, event.message)
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
                agent.unwritten[self.ref.uid] = decision.status
            decision = self._decide(snapshot)
        if self.problem is not None:
            decision = self._decide(snapshot)
        return decision

    async def post_action_events(self) -> None:
        events, self.action_events = self.action_events, []
        for event in events:
            await self.agent.kube.post_event(self.body, event.type, event.reason, event.message)

    async def _announce(self, status: dict[str, Any]) -> None:
        """Says what a slow action is about to do; an API server that cannot hear it must not hold the action up."""
        try:
            await self.agent.write_status(self.body, status)
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
                self.problem = _stalled(error)
            except HostUnavailable as error:
                self.problem = reconcile.Problem("LibvirtUnavailable", f"libvirt does not answer: {error}", stalled=False)
            except guest.LIBVIRT_ERROR as error:
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
        previous = next((c for c in self.view.status.get("conditions", []) if c.get("type") == "Ready"), {})
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
        updated = await self.agent.kube.set_finalizers(meta["namespace"], meta["name"], finalizers, meta["resourceVersion"])
        self.body = updated
        self.agent.bodies[self.ref.uid] = updated
        self.view = replace(self.view, has_finalizer=present)

    async def _define(self, then_start: reconcile.Action | None = None) -> None:
        assert self.spec is not None
        secrets = await self._user_data()
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

    async def _user_data(self) -> dict[str, str | bytes]:
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


def _stalled(error: SpecError) -> reconcile.Problem:
    return reconcile.Problem("InvalidSpec", str(error), stalled=True)
