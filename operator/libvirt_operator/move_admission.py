"""What the elected agent does for moves: it sees which running VMs should move (a `spec.nodeName` edit, a
VirtualMachineMigration, a drain of their node), picks the target when none is named, keeps the parallel
bounds (it is the one decider, so its count of moves in flight is exact), and starts a move by writing
`status.migration` phase Scheduled with a resourceVersion precondition. It also keeps each
VirtualMachineMigration's status in step with the move it asked for.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from libvirt_operator import placement
from libvirt_operator.kube import KubeClient
from libvirt_operator.migration import (
    DRAIN, FAILED, LIVE_STATES, MIGRATION, NO_COMPATIBLE_NODE, NODE_NAME, SCHEDULED, SUCCEEDED, TARGET_INCOMPATIBLE,
    Move, not_migratable, volume_pools, with_move,
)
from libvirt_operator.model import MigrationPolicy
from libvirt_operator.nodes import Fleet
from libvirt_operator.reconcile import format_time
from libvirt_operator.scheduler import WriteStatus
from libvirt_operator.spec import SpecError, VMSpec, parse_spec

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 30.0
RETRY_MAX_SECONDS = 300.0
TERMINAL = (SUCCEEDED, FAILED)


@dataclass(frozen=True)
class Wanted:
    trigger: str
    target: str | None
    id: str
    request: Mapping[str, Any] | None = None
    """The VirtualMachineMigration asking, when one does."""


def request_status(move: Move) -> dict[str, Any]:
    """A VirtualMachineMigration's status, from the move it asked for."""
    status = {"phase": move.phase, "sourceNode": move.source, "targetNode": move.target,
              "startTime": move.start_time, "endTime": move.end_time, "message": move.message or None,
              "downtimeMilliseconds": move.downtime_ms, "dataTotalBytes": move.data_total,
              "dataProcessedBytes": move.data_processed}
    return {key: value for key, value in status.items() if value is not None}


def retry_delay(failures: int) -> float:
    return min(RETRY_FIRST_SECONDS * 2 ** max(failures - 1, 0), RETRY_MAX_SECONDS)


class MoveAdmission:
    def __init__(self, kube: KubeClient, fleet: Fleet, ledger: placement.Ledger, bodies: Mapping[str, dict[str, Any]],
                 policy: MigrationPolicy, write_status: WriteStatus, clock: Callable[[], datetime.datetime]) -> None:
        self.kube = kube
        self.fleet = fleet
        self.ledger = ledger
        self.bodies = bodies
        self.policy = policy
        self.write_status = write_status
        self.clock = clock
        self.requests: dict[str, dict[str, Any]] = {}
        """Every VirtualMachineMigration, by uid, as last seen."""
        self.waiting: set[str] = set()
        """VMs whose move waits for room under the parallel bounds (or for a retry)."""
        self._failure_seen: dict[tuple[str, str], float] = {}
        self._deciding = asyncio.Lock()

    # --- VirtualMachineMigrations ------------------------------------------------------------

    def observe(self, event_type: str, body: Mapping[str, Any]) -> str | None:
        """Keeps the request; returns the uid of the VM it names, when known."""
        uid = body["metadata"]["uid"]
        if event_type == "DELETED":
            self.requests.pop(uid, None)
        else:
            self.requests[uid] = dict(body)
        vm = self._vm_named(body["metadata"]["namespace"], (body.get("spec") or {}).get("vmName"))
        return vm["metadata"]["uid"] if vm is not None else None

    def _vm_named(self, namespace: str, name: str | None) -> dict[str, Any] | None:
        return next((b for b in self.bodies.values()
                     if b["metadata"]["namespace"] == namespace and b["metadata"]["name"] == name), None)

    def _open_requests(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        meta = body["metadata"]
        found = [r for r in self.requests.values() if r["metadata"]["namespace"] == meta["namespace"]
                 and (r.get("spec") or {}).get("vmName") == meta["name"]
                 and (r.get("status") or {}).get("phase") not in TERMINAL]
        return sorted(found, key=lambda r: (r["metadata"].get("creationTimestamp", ""), r["metadata"]["name"]))

    async def fail_orphan_requests(self) -> None:
        """Requests naming no VirtualMachine fail at once: a request is never reused."""
        for request in list(self.requests.values()):
            meta, spec = request["metadata"], request.get("spec") or {}
            if (request.get("status") or {}).get("phase") in TERMINAL:
                continue
            if self._vm_named(meta["namespace"], spec.get("vmName")) is None:
                await self._set_request(request, {"phase": FAILED, "endTime": self._now(),
                                                  "message": f"VirtualMachine {spec.get('vmName')} not found"})

    async def _set_request(self, request: dict[str, Any], status: dict[str, Any]) -> None:
        old = request.get("status") or {}
        if all(old.get(key) == value for key, value in status.items()):
            return
        meta = request["metadata"]
        await self.kube.patch_migration_status(meta["namespace"], meta["name"], status)
        request["status"] = {**old, **status}

    async def _mirror(self, body: Mapping[str, Any]) -> None:
        """Each open request of the VM reads what became of its move, or why it waits."""
        move = Move.of(body.get("status") or {})
        own = self.requests.get(move.id) if move is not None else None
        if own is not None and own not in self._open_requests(body):  # ended: the target's downtime comes later
            await self._set_request(own, {"downtimeMilliseconds": move.downtime_ms} if move.downtime_ms else {})
        for position, request in enumerate(self._open_requests(body)):
            if move is not None and move.id == request["metadata"]["uid"]:
                await self._set_request(request, request_status(move))
            elif position > 0 or (move is not None and move.active):
                await self._set_request(request, {"phase": "Pending", "message": "waiting for the VM's move in flight"})

    # --- the duty ------------------------------------------------------------------------------

    async def duty(self, body: dict[str, Any]) -> bool:
        """True when it wrote the VM (the watch brings the new body)."""
        await self._mirror(body)
        if body["metadata"].get("deletionTimestamp"):
            return False
        status = body.get("status") or {}
        last = Move.of(status)
        if last is not None and last.active:
            return False
        wanted = await self._wanted(body)
        uid = body["metadata"]["uid"]
        if wanted is None:
            if self._open_requests(body):  # a request waits for a node with room
                self.waiting.add(uid)
            else:
                self.waiting.discard(uid)
            return False
        if last is not None and last.phase == FAILED and last.id == wanted.id and wanted.request is None:
            seen = self._failure_seen.setdefault((uid, last.end_time or ""), time.monotonic())
            if time.monotonic() - seen < retry_delay(last.failures):
                self.waiting.add(uid)
                return False
        source = status["nodeName"]
        failures = last.failures if last is not None and last.phase == FAILED and last.id == wanted.id else 0
        move = Move(id=wanted.id, trigger=wanted.trigger, source=source, target=wanted.target or "", phase=SCHEDULED,
                    migration_name=wanted.request["metadata"]["name"] if wanted.request else None,
                    start_time=self._now(), failures=failures)
        # Several workers decide at once: the room is counted and taken in one step (the write puts the move
        # into `bodies`, which the next count reads).
        async with self._deciding:
            if not self._room(source, wanted.target):
                self.waiting.add(uid)
                return False
            self.waiting.discard(uid)
            await self.write_status(body, with_move(status, move), body["metadata"]["resourceVersion"])
        log.info("move of %s/%s scheduled: %s -> %s (%s)", body["metadata"]["namespace"], body["metadata"]["name"],
                 source, move.target, move.trigger)
        return True

    def in_flight(self) -> Iterator[Move]:
        for body in self.bodies.values():
            move = Move.of(body.get("status") or {})
            if move is not None and move.active:
                yield move

    def _room(self, source: str, target: str | None) -> bool:
        moves = list(self.in_flight())
        per_node = self.policy.parallel_per_node
        return (len(moves) < self.policy.parallel_per_cluster
                and sum(source in (m.source, m.target) for m in moves) < per_node
                and sum(target in (m.source, m.target) for m in moves) < per_node)

    async def _wanted(self, body: Mapping[str, Any]) -> Wanted | None:
        placed = (body.get("status") or {}).get("nodeName")
        requests = self._open_requests(body)
        request = requests[0] if requests else None
        why_not, parsed = self._movable(body, placed)
        if parsed is None:
            if request is not None:
                await self._set_request(request, {"phase": FAILED, "endTime": self._now(), "message": why_not})
            return None
        wanted = self._asked(body, placed, request)
        if wanted is None:
            return None
        refusal = self._refusal(wanted, parsed, placed)
        if refusal is not None:
            await self._record_refusal(body, wanted, *refusal)
            return None
        checked = self._checked(wanted, parsed, placed)
        if checked is None and request is not None and wanted.trigger == MIGRATION:
            await self._refuse(request, parsed, placed)
        return checked

    def _asked(self, body: Mapping[str, Any], placed: str, request: Mapping[str, Any] | None) -> Wanted | None:
        """The move someone asked for, first the spec's, then a request's, then the drain's; None when none is."""
        pinned, meta = (body.get("spec") or {}).get("nodeName"), body["metadata"]
        if pinned and pinned != placed:
            return Wanted(NODE_NAME, pinned, f"nodeName-{meta.get('generation', 1)}")
        if request is not None:
            return Wanted(MIGRATION, (request.get("spec") or {}).get("targetNode"), request["metadata"]["uid"], request)
        node = self.fleet.nodes.get(placed)
        if node is not None and node.spec.get("drain") and not pinned:
            return Wanted(DRAIN, None, f"drain-{placed}")
        return None

    def _refusal(self, wanted: Wanted, spec: VMSpec, source: str) -> tuple[str, str] | None:
        """(reason, message) when the VM as it is can never go where it is asked to: the node named, or any node."""
        if wanted.target is not None:
            why = self._incompatible(spec, source, wanted.target)
            return None if why is None else (TARGET_INCOMPATIBLE,
                                             f"node {wanted.target} cannot take the VM live: {why}")
        others = [name for name in self.fleet.nodes
                  if name != source and self.fleet.live(name) and self._published(name)]
        problems = [why for name in others if (why := self._incompatible(spec, source, name)) is not None]
        if not others or len(problems) < len(others):
            return None
        return NO_COMPATIBLE_NODE, f"no node can take the VM live: {'; '.join(problems)}"

    def _movable(self, body: Mapping[str, Any], placed: str | None) -> tuple[str, VMSpec | None]:
        """The VM's parsed spec when it can move live, else (why not, None)."""
        status = body.get("status") or {}
        if not placed or not self.fleet.live(placed):
            return f"the VM runs on no live node (status.nodeName {placed!r})", None
        state = (status.get("domain") or {}).get("state")
        if state not in LIVE_STATES:
            return f"the VM is not running (its domain is {state or 'not defined'}): only a running VM moves live", None
        try:
            parsed = parse_spec(body.get("spec") or {})
        except SpecError as error:
            return f"the spec is invalid: {error}", None
        reason = not_migratable(parsed)
        return (reason[1], None) if reason is not None else ("", parsed)

    def _checked(self, wanted: Wanted, spec: VMSpec, source: str) -> Wanted | None:
        """The wanted move with its target: the one named if it can take the VM, else the placement's pick."""
        if wanted.target is not None:
            return wanted if self._target_problem_for(wanted.target, spec, source) is None else None
        offers = [offer for offer in placement.node_offers(self.fleet.nodes.values()) if offer.name != source
                  and self._published(offer.name) and self._cpu_problem(spec, source, offer.name) is None]
        choice = placement.choose(placement.request_of(spec), offers, self.ledger)
        if choice.node is None:
            return None
        return Wanted(wanted.trigger, choice.node, wanted.id, wanted.request)

    def _published(self, node: str) -> bool:
        view = self.fleet.nodes.get(node)
        return view is not None and bool((view.status.get("migration") or {}).get("uri"))

    def _cpu_problem(self, spec: VMSpec, source: str, target: str) -> str | None:
        """A host-passthrough CPU is the source host's own: only a host with the same CPU model can give it."""
        if spec.cpu.mode != "host-passthrough":
            return None
        models = [((self.fleet.nodes[n].status.get("hypervisor") or {}).get("cpuModel") if n in self.fleet.nodes
                   else None) for n in (source, target)]
        if models[0] is None or models[0] != models[1]:
            return (f"the VM's CPU is host-passthrough (spec.cpu.mode) and node {target}'s CPU ({models[1]}) is not "
                    f"node {source}'s ({models[0]})")
        return None

    def _target_problem_for(self, target: str, spec: VMSpec, source: str) -> str | None:
        if target == source:
            return f"the VM already runs on {target}"
        if not self.fleet.live(target):
            return f"node {target} has no live libvirt-operator agent"
        if not self._published(target):
            return f"node {target} publishes no migration URI (its agent's --migration-uri)"
        return self._incompatible(spec, source, target)

    def _incompatible(self, spec: VMSpec, source: str, target: str) -> str | None:
        """Why the target can never take this VM live as it is (its CPU, its volumes' pools), None when it can."""
        cpu = self._cpu_problem(spec, source, target)
        if cpu is not None:
            return cpu
        view = self.fleet.nodes.get(target)
        offered = frozenset(((view.status.get("offers") or {}).get("pools") or ()) if view is not None else ())
        missing = volume_pools(spec) - offered
        if missing:
            return f"node {target} lacks the storage pool(s) {', '.join(sorted(missing))} the VM's volumes are in"
        return None

    async def _record_refusal(self, body: dict[str, Any], wanted: Wanted, reason: str, message: str) -> None:
        """The VM stays where it runs and its move reads Failed saying why, so the VM reads Migratable=False (written
        once; looked at again on the next look, in case the nodes changed). A request asking for it fails alike."""
        status = body.get("status") or {}
        last = Move.of(status)
        if last is not None and last.id == wanted.id and last.phase == FAILED and last.message == message:
            return
        now = self._now()
        move = Move(id=wanted.id, trigger=wanted.trigger, source=status["nodeName"], target=wanted.target or "",
                    migration_name=wanted.request["metadata"]["name"] if wanted.request else None,
                    phase=FAILED, start_time=now, end_time=now, message=message, reason=reason,
                    failures=(last.failures if last is not None and last.id == wanted.id else 0) + 1)
        await self.write_status(body, with_move(status, move), body["metadata"]["resourceVersion"])
        request = self.requests.get(wanted.id)
        if request is not None:
            await self._set_request(request, request_status(move))

    async def _refuse(self, request: dict[str, Any], spec: VMSpec, source: str) -> None:
        """A named target that cannot take the VM fails the request; with no target named, it waits for room."""
        target = (request.get("spec") or {}).get("targetNode")
        if target is not None:
            problem = self._target_problem_for(target, spec, source) or f"node {target} cannot take the VM"
            await self._set_request(request, {"phase": FAILED, "endTime": self._now(), "message": problem})
            return
        offers = [offer for offer in placement.node_offers(self.fleet.nodes.values()) if offer.name != source]
        why = placement.choose(placement.request_of(spec), offers, self.ledger).message
        await self._set_request(request, {"phase": "Pending", "message": f"no node can take the VM yet: {why}"})

    def _now(self) -> str:
        return format_time(self.clock())
