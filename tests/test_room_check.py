"""A node's own check of the VMs placed on it: what runs or is pinned there stays, the rest keep their room in
the order they were placed, and a VM past the room is handed back before it starts."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from libvirt_operator import placement
from libvirt_operator.room_check import RoomCheck, beyond_room
from test_placement import GI, fleet_of, node

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.timezone.utc)
OVERHEAD = 64 << 20


def vm(name: str, placed_at: str, *, memory: str = "512Mi", pinned: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": "5", "generation": 1},
            "spec": {"memory": memory, **({"nodeName": pinned} if pinned else {})},
            "status": {"nodeName": "a", "conditions": [{"type": "Scheduled", "status": "True", "reason": "Placed",
                                                        "lastTransitionTime": placed_at}]}}


class Writes:
    def __init__(self) -> None:
        self.status: list[tuple[str, dict[str, Any], str | None]] = []
        self.events: list[tuple[str, str]] = []

    async def write_status(self, body: dict[str, Any], status: dict[str, Any], resource_version: str | None) -> None:
        self.status.append((body["metadata"]["name"], status, resource_version))

    async def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((body["metadata"]["name"], reason))


def check(*bodies: dict[str, Any], running: tuple[str, ...] = ()) -> tuple[RoomCheck, Writes]:
    fleet, _ = fleet_of(node("a", memory=1 * GI), node("b"), me="a")
    ledger = placement.Ledger()
    for body in bodies:
        ledger.place(body["metadata"]["uid"], "a", (1, (512 << 20) + OVERHEAD))
    writes = Writes()
    by_uid = {body["metadata"]["uid"]: body for body in bodies}
    room = RoomCheck("a", fleet, ledger, by_uid, lambda uid: uid in {f"uid-{n}" for n in running},
                     writes.write_status, writes, lambda: NOW)  # type: ignore[arg-type]
    return room, writes


def test_the_vms_past_the_room_are_those_placed_last() -> None:
    offer = placement.Offer.of(fleet_of(node("a", memory=1 * GI), me="a")[0].nodes["a"])
    need = (1, 576 << 20)
    assert beyond_room(offer, [("x", need), ("y", need), ("z", (1, 100 << 20))]) == ["y"]


def test_two_vms_placed_on_the_same_last_room_the_later_is_handed_back_before_it_starts() -> None:
    first, second = vm("first", "2026-12-06T11:00:00Z"), vm("second", "2026-12-06T11:00:01Z")
    room, writes = check(first, second)
    assert room.over(first) is None
    why = room.over(second)
    assert why is not None and "(2 vCPUs and 1.1Gi placed there, 8 and 1Gi allocatable;" in why
    asyncio.run(room.refuse(second, why))
    [(name, status, resource_version)] = writes.status
    assert (name, resource_version, "nodeName" in status, status["printableStatus"]) == ("second", "5", False, "Pending")
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "NodeFull")
    assert writes.events == [("second", "NodeFull")]


def test_a_vm_that_runs_or_is_pinned_here_keeps_its_room_whenever_it_was_placed() -> None:
    early, late = vm("early", "2026-12-06T11:00:00Z"), vm("late", "2026-12-06T11:00:01Z")
    room, _ = check(early, late, running=("late",))
    assert room.over(late) is None and room.over(early) is not None
    pinned = vm("pinned", "2026-12-06T11:00:05Z", pinned="a")
    room, _ = check(early, pinned)
    assert room.over(pinned) is None and room.over(early) is not None


def test_a_node_with_room_sorts_nothing() -> None:
    only = vm("only", "2026-12-06T11:00:00Z")
    room, _ = check(only)
    room.bodies = Unread()  # not even looked at: the ledger's total is within the room
    assert room.over(only) is None


class Unread(dict):  # type: ignore[type-arg]
    def values(self) -> Any:
        raise AssertionError("the VMs were looked through though the node has room")

