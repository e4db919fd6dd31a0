"""A move, the two agents' side (migration.py has the phases): the target prepares, the source migrates,
watches the job against its timeouts, and hands the VM over by writing `status.nodeName`.

Each hand-over is a status patch with a resourceVersion precondition (the target's TargetReady, the
source's Running), so a step decided on a stale body loses; from Running to the end only the source writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from libvirt_operator import guest, guest_migration
from libvirt_operator.guest_migration import Destination, JobProgress, PeerLost, TargetNotEmpty
from libvirt_operator.libvirt_errors import LibvirtError
from libvirt_operator.migration import (
    FAILED, RUNNING, SCHEDULED, SUCCEEDED, TARGET_READY, Move, completion_timeout, migrating_condition, with_move,
)
from libvirt_operator.nodes import Role
from libvirt_operator.reconcile import Event, format_time
from libvirt_operator.scheduler import with_condition
from libvirt_operator.spec import SpecError
from libvirt_operator.vm_run import VMRun

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
PROGRESS_WRITE_SECONDS = 10.0


def _now(run: VMRun) -> str:
    return format_time(run.agent.clock())


async def _write_move(run: VMRun, move: Move, *, precondition: bool) -> None:
    """The VM's status with `move` as its migration block, nothing else changed."""
    body = run.body
    status = with_move(body.get("status") or {}, move)
    await run.agent.status.write(body, status, body["metadata"]["resourceVersion"] if precondition else None)
    run.view = replace(run.view, status=body.get("status") or status)


# --- the target ------------------------------------------------------------------------------------

async def prepare(run: VMRun, move: Move) -> None:
    """Scheduled here: the VM's files checked and its own disks created fresh, then TargetReady; or Failed
    saying what this node lacks."""
    if move.phase != SCHEDULED:
        return
    agent = run.agent
    try:
        if run.spec is None:
            raise SpecError("spec", run.problem.message if run.problem else "the spec is being deleted")
        secrets = await run.user_data()
        created = await agent.host.call(guest_migration.prepare_incoming, run.spec, run.ref, agent.settings, secrets.get)
    except (SpecError, TargetNotEmpty, LibvirtError) as error:
        await _write_move(run, replace(move, phase=FAILED, end_time=_now(run), failures=move.failures + 1,
                                       message=f"node {move.target} cannot take the VM: {error}"), precondition=True)
        return
    log.info("prepared %s/%s for its move from %s: %s", run.ref.namespace, run.ref.name, move.source,
             ", ".join(created) or "nothing to create")
    await _write_move(run, replace(move, phase=TARGET_READY), precondition=True)


async def clean_incoming(run: VMRun, move: Move, cleaned: set[tuple[str, str]]) -> None:
    """The move here failed: whatever it left (prepared disks, a domain libvirt did not remove) goes, once."""
    if (run.ref.uid, move.id) in cleaned:
        return
    removed = await run.agent.host.call(guest.undefine_and_delete, run.ref.uid, run.agent.settings)
    cleaned.add((run.ref.uid, move.id))
    if removed:
        log.info("the move of %s/%s here failed; removed %s", run.ref.namespace, run.ref.name, ", ".join(removed))


async def note_downtime(run: VMRun, move: Move) -> None:
    """The first reconcile after a move here: the downtime this libvirtd measured goes into the move's record
    (written with the status the reconcile writes anyway)."""
    downtime = await run.agent.host.call(guest_migration.incoming_downtime_ms, run.ref.uid)
    if downtime is not None:
        run.view = replace(run.view, status=with_move(run.view.status, replace(move, downtime_ms=downtime)))


# --- the source ------------------------------------------------------------------------------------

@dataclass
class ProgressWatermark:
    """The least a move had left to send, and since when: no progress is that not shrinking. The owned disks are
    copied first, then memory, each phase with its own total and what is left starting again from it, so the
    least counts within one phase only."""

    least: int | None = None
    total: int | None = None
    since: float = 0.0

    def stalled(self, progress: JobProgress, now: float) -> float:
        """Seconds without progress, `progress` read at `now`."""
        if self.least is None or progress.total != self.total or progress.remaining < self.least:
            self.least, self.total, self.since = progress.remaining, progress.total, now
        return now - self.since


class Outbound:
    """The source's part of one move: returns True when it dealt with the VM this round (no converge)."""

    def __init__(self, run: VMRun, move: Move, first_seen: float) -> None:
        self.run = run
        self.move = move
        self.first_seen = first_seen
        self.policy = run.agent.settings.migration

    @property
    def agent(self) -> Any:
        return self.run.agent

    async def step(self) -> bool:
        if self.move.phase == SCHEDULED:
            return await self._await_target()
        fresh = self.move.phase == TARGET_READY
        log.info("move of %s/%s from %s to %s: %s", self.run.ref.namespace, self.run.ref.name, self.move.source,
                 self.move.target, "starting" if fresh else "watching the migration libvirt runs")
        if fresh:
            self.move = replace(self.move, phase=RUNNING)
            await _write_move(self.run, self.move, precondition=True)
            await self.agent.status.post_events(self.run.body, [Event(
                "Normal", "Migrating", f"moving live from {self.move.source} to {self.move.target}")])
        await self._migrate(fresh)
        return True

    async def _await_target(self) -> bool:
        waited = time.monotonic() - self.first_seen
        left = self.policy.prepare_timeout_seconds - waited
        if left > 0:
            self.agent.queue.add_after(self.run.ref.uid, left)
            return False
        await self._failed(f"node {self.move.target}'s agent did not prepare within "
                           f"{self.policy.prepare_timeout_seconds:g}s")
        return True

    def _destination(self) -> Destination:
        node = self.agent.fleet.nodes.get(self.move.target)
        published = (node.status.get("migration") if node is not None else None) or {}
        if not published.get("uri"):
            raise SpecError("status.migration.target", f"node {self.move.target} publishes no migration URI "
                            "(its agent's --migration-uri)")
        return Destination(published["uri"], published.get("address"), self.policy.tls, self.policy.bandwidth_mib)

    async def _migrate(self, fresh: bool) -> None:
        """Runs the migration (or, after a restart of this agent, waits for the one libvirt still runs), then
        settles the outcome by what this host holds: the guest gone means the target runs it. Either way the
        libvirt job has ended by then (migrateToURI3 returns after it, aborted or not)."""
        host, uid = self.agent.host, self.run.ref.uid
        began = time.monotonic()
        why: str | None = None
        if fresh and await host.call(guest_migration.job_progress, uid) is None:
            try:
                destination = self._destination()
            except SpecError as error:
                why = str(error)
            else:
                limit = self._completion_limit() + self.policy.progress_timeout_seconds
                job = asyncio.create_task(host.call(guest_migration.migrate, uid, destination, timeout=limit))
                try:
                    why = await self._watch(job)
                    await job
                except (LibvirtError, PeerLost) as error:
                    why = why or str(error)
                finally:
                    if not job.done():
                        job.cancel()
        else:
            why = await self._watch(None)
        if await host.call(guest_migration.holds, uid):
            await self._failed(why or "the move ended without the target running the guest")
        else:
            await self._succeeded(time.monotonic() - began)

    def _completion_limit(self) -> float:
        spec = self.run.spec
        memory = spec.memory if spec is not None else 0
        return completion_timeout(self.policy.completion_timeout_per_gib_seconds, memory, 0)

    async def _watch(self, job: asyncio.Task[None] | None) -> str | None:
        """Polls the job until it ends; aborts it past a timeout or when the VM is deleted, saying why."""
        host, uid = self.agent.host, self.run.ref.uid
        began, written_at, watermark = time.monotonic(), time.monotonic(), ProgressWatermark()
        while True:
            if job is not None:
                await asyncio.wait({job}, timeout=POLL_SECONDS)
                if job.done():
                    return None
            else:
                await asyncio.sleep(POLL_SECONDS)
            progress: JobProgress | None = await host.call(guest_migration.job_progress, uid)
            if progress is None:
                if job is None:
                    return None
                continue
            now = time.monotonic()
            why = self._abort_reason(watermark.stalled(progress, now), now - began)
            if why is not None:
                await host.call(guest_migration.abort_job, uid)
                return why
            if now - written_at >= PROGRESS_WRITE_SECONDS:
                written_at = now
                self.move = replace(self.move, data_total=progress.total, data_processed=progress.processed)
                await self._report_progress()

    def _abort_reason(self, stalled: float, elapsed: float) -> str | None:
        body = self.agent.bodies.get(self.run.ref.uid)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return "the VM is being deleted"
        if stalled > self.policy.progress_timeout_seconds:
            return f"no progress for {stalled:.0f}s (progress timeout {self.policy.progress_timeout_seconds:g}s)"
        limit = self._completion_limit()
        if elapsed > limit:
            return f"not complete after {elapsed:.0f}s (completion timeout {limit:g}s)"
        return None

    async def _report_progress(self) -> None:
        try:
            await _write_move(self.run, self.move, precondition=False)
        except Exception as error:  # the move goes on whether the API server hears of its progress or not
            log.info("progress of the move of %s not written: %s", self.run.ref.name, error)

    async def _succeeded(self, seconds: float) -> None:
        """The target runs the guest and this host holds no domain of it: its own disks go, then the hand-over."""
        run, move = self.run, replace(self.move, phase=SUCCEEDED, end_time=_now(self.run), failures=0, message="")
        await self.agent.host.call(guest.undefine_and_delete, run.ref.uid, self.agent.settings)
        self.move = move
        status = dict(run.body.get("status") or {})
        status["nodeName"] = move.target
        status["lifecycle"] = {k: v for k, v in (status.get("lifecycle") or {}).items() if k != "definitionDigest"}
        generation = run.view.generation
        status = with_condition(with_move(status, move), "Migrating", "False", *migrating_condition(move)[1:],
                                run.agent.clock(), generation)
        await self.agent.status.write(run.body, status)
        self.agent.moves.outcomes[SUCCEEDED] += 1
        await self.agent.status.post_events(run.body, [Event(
            "Normal", "Migrated", f"moved live from {move.source} to {move.target} in {seconds:.1f}s")])

    async def _failed(self, why: str) -> None:
        log.warning("move of %s/%s from %s to %s failed: %s", self.run.ref.namespace, self.run.ref.name,
                    self.move.source, self.move.target, why)
        move = replace(self.move, phase=FAILED, end_time=_now(self.run), failures=self.move.failures + 1, message=why)
        self.move = move
        run = self.run
        run.view = replace(run.view, status=with_move(run.view.status, move))
        await self.agent.status.write(run.body, run.decide_now().status)
        self.agent.moves.outcomes[FAILED] += 1
        await self.agent.status.post_events(run.body, [Event(
            "Warning", "MigrationFailed", f"the move from {move.source} to {move.target} failed: {why}; "
            f"the guest runs on {move.source}")])


# --- which step an agent owes a VM's move ----------------------------------------------------------

class MoveSteps:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.first_seen: dict[tuple[str, str], float] = {}
        """When this agent first saw each move Scheduled (its own clock: the prepare timeout runs from here)."""
        self.cleaned: set[tuple[str, str]] = set()
        self.noted: set[tuple[str, str]] = set()
        self.outcomes: Counter[str] = Counter()
        """Moves run from here, by outcome (for /metrics)."""

    async def reconcile(self, run: VMRun, role: Role) -> bool:
        """Takes this agent's step of the VM's move, if it owes one; True when nothing else is to be done now."""
        me, uid = self.agent.settings.node_name, run.ref.uid
        move = Move.of(run.view.status)
        if role is Role.INCOMING:
            await prepare(run, move)
            return True
        if role is Role.CLEAN_INCOMING:
            await clean_incoming(run, move, self.cleaned)
            return True
        if move is not None and move.active and move.source == me:
            first = self.first_seen.setdefault((uid, f"{move.id}@{move.start_time}"), time.monotonic())
            if not await Outbound(run, move, first).step():
                await run.converge()  # still here while the target prepares: never released meanwhile
            return True
        if move is not None and move.phase == SUCCEEDED and move.target == me and move.downtime_ms is None \
                and (uid, move.id) not in self.noted:
            self.noted.add((uid, move.id))
            await note_downtime(run, move)
        if role is Role.RELEASE:  # spec.nodeName names another node
            why = self._why_not_live(run)
            if why is None:
                await run.converge()  # it moves live: the elected agent schedules the move
            else:
                await run.release(why)
            return True
        return False

    def _why_not_live(self, run: VMRun) -> str | None:
        """Why the VM cannot move live to the node spec.nodeName names, None when it can."""
        snapshot = self.agent.cache.get(run.ref.uid)
        if snapshot is None or not snapshot.active:
            return "it is not running (only a running VM moves live)"
        if run.view.not_migratable is not None:
            return run.view.not_migratable[1]
        target = run.spec_dict.get("nodeName")
        view = self.agent.fleet.nodes.get(target)
        if view is not None and view.status.get("heartbeatTime") and not (view.status.get("migration") or {}).get("uri"):
            return f"node {target} takes no live moves (its agent publishes no --migration-uri)"
        return None  # a node not seen yet (or not announced yet) may take it: nothing goes until it is known
