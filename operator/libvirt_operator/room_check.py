"""A node's own last word on the VMs placed on it: one the node has no room for is handed back, not started.

The elected agent books room before it places, so one decider never double-books a node. Two deciders can, for
the moment one of them has not yet seen that it lost the Lease (a process paused between its check and its
write): each places another VM on the same last room. The node's agent then counts, from the same ledger every
agent keeps, what is placed on it against what it offers. VMs that run here or are pinned here stay, the others
keep their room in the order they were placed, and a VM past the room is handed back (`status.nodeName` cleared,
`Scheduled=False` reason `NodeFull`, with a resourceVersion precondition) before it ever starts, so the elected
agent places it again where there is room.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from libvirt_operator import placement
from libvirt_operator.kube import KubeClient
from libvirt_operator.migration import active_move
from libvirt_operator.nodes import Fleet
from libvirt_operator.placement import human_bytes
from libvirt_operator.scheduler import WriteStatus, pending_status
from libvirt_operator.vm_status import condition_of

NODE_FULL = "NodeFull"


def beyond_room(offer: placement.Offer, costs: Iterable[tuple[str, tuple[int, int]]]) -> list[str]:
    """The VMs, taken in the order given, whose room the node no longer has once the ones before took theirs."""
    vcpus = memory = 0
    beyond = []
    for uid, (need_vcpus, need_memory) in costs:
        if vcpus + need_vcpus > offer.vcpus or memory + need_memory > offer.memory:
            beyond.append(uid)
            continue
        vcpus, memory = vcpus + need_vcpus, memory + need_memory
    return beyond


def placed_at(body: Mapping[str, Any]) -> str:
    scheduled = condition_of(body.get("status") or {}, "Scheduled")
    return scheduled.get("lastTransitionTime") or body["metadata"].get("creationTimestamp") or ""


@dataclass
class RoomCheck:
    node: str
    fleet: Fleet
    ledger: placement.Ledger
    bodies: Mapping[str, Mapping[str, Any]]
    runs_here: Callable[[str], bool]
    """Whether this node holds a domain of the VM (by uid)."""
    write_status: WriteStatus
    kube: KubeClient
    clock: Callable[[], datetime.datetime]

    def _stays(self, body: Mapping[str, Any]) -> bool:
        """A VM whose room is not in question: it runs here, is pinned here, or is moving."""
        return (self.runs_here(body["metadata"]["uid"]) or bool((body.get("spec") or {}).get("nodeName"))
                or active_move(body.get("status") or {}) is not None)

    def over(self, body: Mapping[str, Any]) -> str | None:
        """Why this node has no room for the VM, when it has not and the VM is one it may hand back; else None."""
        view = self.fleet.nodes.get(self.node)
        if view is None or self._stays(body) or body["metadata"].get("deletionTimestamp"):
            return None
        offer = placement.Offer.of(view)
        vcpus, memory = self.ledger.taken(self.node)
        if vcpus <= offer.vcpus and memory <= offer.memory:  # the common case: nothing to sort
            return None
        here = [b for b in self.bodies.values() if (b.get("status") or {}).get("nodeName") == self.node
                and b["metadata"]["uid"] in self.ledger.by_vm]
        here.sort(key=lambda b: (not self._stays(b), placed_at(b), b["metadata"]["uid"]))
        costs = [(b["metadata"]["uid"], self.ledger.by_vm[b["metadata"]["uid"]][1:]) for b in here]
        if body["metadata"]["uid"] not in beyond_room(offer, costs):
            return None
        return (f"placed on {self.node}, which has no room left for it ({vcpus} vCPUs and {human_bytes(memory)} "
                f"placed there, {offer.vcpus} and {human_bytes(offer.memory)} allocatable; a decider that had not seen "
                f"the other placements, or the node's own size, put it there): it is placed again")

    async def refuse(self, body: dict[str, Any], why: str) -> None:
        status = pending_status(body, NODE_FULL, why, self.clock())
        await self.write_status(body, status, body["metadata"]["resourceVersion"])
        await self.kube.post_event(body, "Warning", NODE_FULL, why)
