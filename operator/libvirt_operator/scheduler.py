"""What the elected agent (election.py) does for the VMs no agent runs: place them, say why they wait,
mark those of unreachable nodes Unknown, and let go of deleted ones whose node is fenced.

Every placement is a status patch with a resourceVersion precondition, so a decision made on a stale
body (or by a leader about to lose its Lease) loses to whatever changed the VM meanwhile. The
capacity is booked in the ledger before the write's await, so two VMs placed at the same moment never
count the same room.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from kubernetes.client.exceptions import ApiException

from libvirt_operator import nodes, placement, reconcile
from libvirt_operator.kube import FINALIZER, KubeClient
from libvirt_operator.nodes import Fleet
from libvirt_operator.spec import EmptyDiskSource, HttpSource, ImageSource, SpecError, VMSpec, parse_spec
from libvirt_operator.vm_status import condition_of

log = logging.getLogger(__name__)

DISK_LOSS_ANNOTATION = "libvirt-operator.io/allow-disk-loss"
"""Set to "true" by an admin on a VM whose fenced node held its only disks: place it again with new ones."""

WriteStatus = Callable[[dict[str, Any], dict[str, Any], str | None], Awaitable[None]]


def with_condition(status: dict[str, Any], kind: str, value: str, reason: str, message: str,
                    now: datetime.datetime, generation: int) -> dict[str, Any]:
    previous = condition_of(status, kind)
    condition = {"type": kind, "status": value, "reason": reason, "message": message, "observedGeneration": generation,
                 "lastTransitionTime": previous["lastTransitionTime"] if previous.get("status") == value
                 and "lastTransitionTime" in previous else reconcile.format_time(now)}
    others = [c for c in status.get("conditions", []) if c.get("type") != kind]
    return {**status, "conditions": [*others, condition]}


STALLED_REASONS = ("NodeNotReady", "NodeLost", "InvalidSpec")
"""Pending reasons only a person can end (Stalled, Argo CD's Degraded); Unschedulable and Moving end by themselves."""


def pending_status(body: Mapping[str, Any], reason: str, message: str, now: datetime.datetime) -> dict[str, Any]:
    """Pending on no node: Ready and Scheduled False saying why, the rest of the status as it was. A VM whose
    fenced node held its disks keeps that node in status.nodeName, the record of where its data was."""
    view = reconcile.VMView(name=body["metadata"]["name"], generation=body["metadata"].get("generation", 1),
                            spec=body.get("spec") or {}, spec_hash="", status=body.get("status") or {})
    status = reconcile.decide(replace(view, has_finalizer=True), None, now, "",
                              reconcile.Problem(reason, message, stalled=reason in STALLED_REASONS)).status
    status["printableStatus"] = "Pending"
    if reason == "NodeLost":
        status["nodeName"] = (body.get("status") or {}).get("nodeName")
    else:
        status.pop("nodeName", None)
    status.pop("observedGeneration", None)
    return with_condition(status, "Scheduled", "False", reason, message, now, view.generation)


def unreachable_status(body: Mapping[str, Any], node: str, message: str, now: datetime.datetime) -> dict[str, Any]:
    """What a reader can know of a VM whose node's agent stopped renewing: the last facts, Unknown."""
    status = dict(body.get("status") or {})
    status["printableStatus"] = "Unknown"
    status["ready"] = False
    return with_condition(status, "Ready", "Unknown", "NodeUnreachable", message, now,
                           body["metadata"].get("generation", 1))


def owned_data_disks(spec: VMSpec) -> list[str]:
    """The disks whose data lives only on the node the VM runs on: empty disks and clones' overlays."""
    return [f"spec.disks[{i}] ({disk.name})" for i, disk in enumerate(spec.disks) if not disk.cdrom and (
            isinstance(disk.source, EmptyDiskSource)
            or isinstance(disk.source, (ImageSource, HttpSource)) and getattr(disk.source, "clone", True))]


class Scheduler:
    def __init__(self, kube: KubeClient, fleet: Fleet, ledger: placement.Ledger, write_status: WriteStatus,
                 clock: Callable[[], datetime.datetime]) -> None:
        self.kube = kube
        self.fleet = fleet
        self.ledger = ledger
        self.write_status = write_status
        self.clock = clock
        self.decisions = 0
        self.decision_seconds = 0.0
        self.waiting: set[str] = set()
        """VMs no node could take at their last decision: looked at again when room is freed."""

    def cost(self, body: Mapping[str, Any], node: str) -> tuple[int, int]:
        try:
            request = placement.request_of(parse_spec(body.get("spec") or {}))
        except SpecError:
            return 0, 0
        view = self.fleet.nodes.get(node)
        overhead = placement.Offer.of(view).vm_memory_overhead if view is not None else 0
        return request.vcpus, request.memory + overhead

    def book(self, body: Mapping[str, Any]) -> None:
        """Keeps the ledger in step with a VM body just seen (its placement, or its absence)."""
        uid = body["metadata"]["uid"]
        node = (body.get("status") or {}).get("nodeName") or (body.get("spec") or {}).get("nodeName")
        self.ledger.place(uid, node, self.cost(body, node) if node else (0, 0))

    async def duty(self, body: dict[str, Any]) -> None:
        """For a VM that no agent runs here, what the elected agent owes it."""
        meta, status, spec = body["metadata"], body.get("status") or {}, body.get("spec") or {}
        placed_raw = status.get("nodeName") or None
        placed = nodes.placed_node(body, self.fleet)
        pinned = spec.get("nodeName") or None
        if meta.get("deletionTimestamp"):
            if placed is None and (pinned is None or self.fleet.fenced(pinned)) and FINALIZER in meta.get("finalizers", []):
                await self._release_finalizer(body)
            return
        if placed is not None:
            since = self.fleet.unreachable_since(placed)
            if since is not None:
                await self._mark_unreachable(body, placed, since)
            return
        if pinned is not None:
            if not self.fleet.live(pinned):
                await self._pending(body, "NodeNotReady", f"spec.nodeName is {pinned!r} but no live libvirt-operator "
                                    f"agent runs there; live agents: {', '.join(self._live()) or 'none'}")
            return
        try:
            parsed = parse_spec(spec)
        except SpecError as error:
            await self._pending(body, "InvalidSpec", str(error))
            return
        if placed_raw is not None and owned_data_disks(parsed) and \
                meta.get("annotations", {}).get(DISK_LOSS_ANNOTATION) != "true":
            await self._pending(body, "NodeLost", (
                f"node {placed_raw} was fenced (its LibvirtNode deleted) and {', '.join(owned_data_disks(parsed))} "
                f"lived only there; to start it elsewhere with new, empty disks annotate the VM "
                f"{DISK_LOSS_ANNOTATION}=true"))
            return
        await self._place(body, placement.request_of(parsed))

    def _fits_an_unconfirmed_node(self, request: placement.Request) -> bool:
        """Whether a live node not yet seen renewing (this agent has just started deciding) would take the VM: it
        likely will within a heartbeat, when the fleet's change looks at every waiting VM again; no Pending is
        written meanwhile."""
        unconfirmed = [replace(view, renewal_seen=True) for view in self.fleet.nodes.values()
                       if view.live and not view.renewal_seen]
        return bool(unconfirmed) and placement.choose(request, placement.node_offers(unconfirmed), self.ledger).node \
            is not None

    def _live(self) -> list[str]:
        return sorted(name for name in self.fleet.nodes if self.fleet.live(name))

    async def _place(self, body: dict[str, Any], request: placement.Request) -> None:
        began = time.monotonic()
        uid = body["metadata"]["uid"]
        choice = placement.choose(request, placement.node_offers(self.fleet.nodes.values()), self.ledger)
        self.decisions += 1
        self.decision_seconds += time.monotonic() - began
        if choice.node is None:
            self.waiting.add(uid)
            if not self._fits_an_unconfirmed_node(request):
                await self._pending(body, "Unschedulable", choice.message)
            return
        self.waiting.discard(uid)
        self.ledger.place(uid, choice.node, placement.Offer.of(self.fleet.nodes[choice.node]).cost(request))
        now = self.clock()
        status = with_condition(dict(body.get("status") or {}), "Scheduled", "True", "Placed", choice.message, now,
                                 body["metadata"].get("generation", 1))
        status["nodeName"] = choice.node
        try:
            await self.write_status(body, status, body["metadata"]["resourceVersion"])
        except BaseException:
            self.ledger.place(uid, None)
            raise
        log.info("placed VM %s/%s: %s", body["metadata"]["namespace"], body["metadata"]["name"], choice.message)

    async def _pending(self, body: dict[str, Any], reason: str, message: str) -> None:
        await self.write_status(body, pending_status(body, reason, message, self.clock()), body["metadata"]["resourceVersion"])

    async def _mark_unreachable(self, body: dict[str, Any], node: str, since: float) -> None:
        ready = condition_of(body.get("status") or {}, "Ready")
        if ready.get("reason") == "NodeUnreachable":
            return
        now = self.clock()
        silent = self.fleet.clock() - since
        beat = (self.fleet.nodes[node].status.get("heartbeatTime")) or "never"
        message = (f"node {node}'s agent has not renewed its LibvirtNode for {silent:.0f}s (its last heartbeat says "
                   f"{beat}); the VM may still run there and is not started elsewhere until the node is fenced "
                   f"(kubectl delete libvirtnode {node})")
        await self.write_status(body, unreachable_status(body, node, message, now), body["metadata"]["resourceVersion"])

    async def _release_finalizer(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        log.warning("VM %s/%s is deleted and its node is fenced: releasing its finalizer", meta["namespace"], meta["name"])
        finalizers = [f for f in meta.get("finalizers", []) if f != FINALIZER]
        try:
            await self.kube.set_finalizers(meta["namespace"], meta["name"], finalizers, meta["resourceVersion"])
        except ApiException as error:
            if error.status not in (404, 409):
                raise

