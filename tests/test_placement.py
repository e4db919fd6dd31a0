"""Placement's filter and score, the fleet's liveness on the observer's clock, and who may run a VM. Pure."""

from __future__ import annotations

from typing import Any

import pytest

from libvirt_operator import nodes, placement
from libvirt_operator.nodes import Fleet, Role
from libvirt_operator.spec import parse_spec

pytestmark = pytest.mark.unit

GI = 1 << 30


def node(name: str, *, memory: int = 4 * GI, vcpus: int = 8, beat: str = "t0", labels: dict[str, str] | None = None,
         unschedulable: bool = False, networks: tuple[str, ...] = ("default",), libvirt: str = "Connected") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"unschedulable": unschedulable},
            "status": {"heartbeatTime": beat, "leaseDurationSeconds": 40, "libvirt": {"state": libvirt},
                       "allocatable": {"vcpus": vcpus, "memoryBytes": memory, "vmMemoryOverheadBytes": 64 << 20},
                       "offers": {"domainTypes": ["qemu"], "networks": list(networks), "bridges": [], "pools": ["default"]}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def renewed(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "status": {**body["status"], "heartbeatTime": body["status"]["heartbeatTime"] + "'"}}


def fleet_of(*bodies: dict[str, Any], me: str = "observer", seen_renewing: bool = True) -> tuple[Fleet, Clock]:
    clock = Clock()
    fleet = Fleet(me, 40, clock=clock)
    fleet.observe(bodies)
    if seen_renewing:
        fleet.observe([renewed(body) for body in bodies])
    return fleet, clock


def request(**spec: Any) -> placement.Request:
    return placement.request_of(parse_spec({"memory": "1Gi", **spec}))


def choose(fleet: Fleet, ledger: placement.Ledger, **spec: Any) -> placement.Choice:
    return placement.choose(request(**spec), placement.node_offers(fleet.nodes.values()), ledger)


def test_spread_puts_each_vm_on_the_node_with_most_room_left() -> None:
    fleet, _ = fleet_of(node("a"), node("b"), node("c", memory=8 * GI))
    ledger = placement.Ledger()
    chosen = []
    for i in range(6):
        choice = choose(fleet, ledger)
        ledger.place(f"vm-{i}", choice.node, (1, GI + (64 << 20)))
        chosen.append(choice.node)
    assert chosen[0] == "c" and set(chosen) == {"a", "b", "c"}, chosen
    assert chosen.count("c") >= max(chosen.count("a"), chosen.count("b")), chosen


def test_capacity_is_never_booked_twice() -> None:
    fleet, _ = fleet_of(node("a", memory=2 * GI))
    ledger = placement.Ledger()
    first = choose(fleet, ledger)
    ledger.place("one", first.node, (1, GI + (64 << 20)))
    second = choose(fleet, ledger)
    assert first.node == "a" and second.node is None
    assert second.message == "0/1 nodes are available: 1 insufficient memory (need 1Gi + 64Mi overhead)"
    ledger.place("one", None)
    assert choose(fleet, ledger).node == "a", "room freed by a deleted VM is used again"


def test_an_unplaceable_vm_says_what_every_node_lacks() -> None:
    fleet, _ = fleet_of(node("a", memory=GI), node("b", unschedulable=True), node("c", labels={"rack": "1"}),
                        node("d", libvirt="NotResponding"), node("e", networks=()))
    choice = choose(fleet, placement.Ledger(), nodeSelector={"rack": "2"},
                    interfaces=[{"name": "n", "network": "default"}])
    assert choice.node is None
    assert choice.message == ("0/5 nodes are available: 3 didn't match spec.nodeSelector, 1 cordoned, "
                              "1 not ready"), choice.message
    fits = choose(fleet, placement.Ledger(), nodeSelector={"rack": "1"}, interfaces=[{"name": "n", "network": "default"}])
    assert fits.node == "c"
    without_selector = choose(fleet, placement.Ledger(), interfaces=[{"name": "n", "network": "default"}])
    assert without_selector.message.startswith("placed on c"), without_selector.message
    fleet.observe([renewed(body) for body in (node("a", memory=GI), node("e", networks=()))])
    short = choose(fleet, placement.Ledger(), interfaces=[{"name": "n", "network": "default"}])
    assert short.message == ("0/2 nodes are available: 1 insufficient memory (need 1Gi + 64Mi overhead), "
                             "1 no network default"), short.message


def test_cpu_is_counted_with_the_allocation_ratio_the_node_published() -> None:
    fleet, _ = fleet_of(node("a", vcpus=2))
    choice = choose(fleet, placement.Ledger(), cpu={"sockets": 1, "cores": 4, "threads": 1})
    assert choice.node is None and "1 insufficient cpu (need 4)" in choice.message


def test_liveness_is_judged_on_the_observers_clock_not_the_writers_timestamp() -> None:
    fleet, clock = fleet_of(node("a", beat="2001-01-01T00:00:00Z"), seen_renewing=False)  # a clock far behind
    assert fleet.live("a"), "a node first seen is given a whole lease"
    clock.now += 39
    fleet.observe([node("a", beat="2001-01-01T00:00:00Z")])
    assert fleet.live("a")
    clock.now += 2
    fleet.observe([node("a", beat="2001-01-01T00:00:00Z")])
    assert not fleet.live("a") and fleet.unreachable_since("a") == 1000.0
    fleet.observe([node("a", beat="1999-01-01T00:00:00Z")])  # any change is a renewal, even to an older time
    assert fleet.live("a")


def test_a_node_is_fenced_only_when_its_libvirtnode_is_gone_and_it_stopped_renewing() -> None:
    fleet, clock = fleet_of(node("a"), node("b"))
    fleet.observe([node("a")])  # b's LibvirtNode deleted while its agent was alive: it would recreate it
    assert not fleet.fenced("b")
    clock.now += 41
    fleet.observe([node("a", beat="t1")])
    assert fleet.fenced("b") and not fleet.fenced("a")
    assert fleet.fenced("never-seen"), "a node never seen in a lease's time is gone"


def vm(spec_node: str | None = None, placed: str | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"uid": "u", "name": "vm", "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"memory": "1Gi", **({"nodeName": spec_node} if spec_node else {})},
            "status": {"nodeName": placed} if placed else {}}


@pytest.mark.parametrize(("spec_node", "placed", "deleting", "expected"), [
    (None, "me", False, Role.RUN),
    ("me", None, False, Role.RUN),                  # pinned here and nowhere else
    ("me", "other", False, Role.REMOVE_COPY),       # still on the old node: wait for it to let go
    ("other", "me", False, Role.RELEASE),           # moved away: stop and remove here first
    ("other", "me", True, Role.RUN),                # deleted: the node that has it cleans up
    (None, None, False, Role.NONE),                 # not placed yet
    (None, "other", False, Role.REMOVE_COPY),       # placed elsewhere: a domain here is a stale copy
    ("me", "gone", False, Role.RUN),                # the old node is fenced
    (None, "gone", False, Role.NONE),               # fenced: to be placed again
])
def test_only_the_node_a_vm_is_placed_on_runs_it(spec_node: str | None, placed: str | None, deleting: bool,
                                                 expected: Role) -> None:
    fleet, clock = fleet_of(node("me"), node("other"), node("gone"), me="me")
    clock.now += 41
    fleet.observe([node("me", beat="t1"), node("other", beat="t1")])
    assert nodes.role(vm(spec_node, placed, deleting), fleet) is expected


@pytest.mark.parametrize(("amount", "text"), [(512 << 20, "512Mi"), (3 * GI // 2, "1.5Gi"), (24 * GI, "24Gi"),
                                              (1000, "1000")])
def test_human_units(amount: int, text: str) -> None:
    assert placement.human_bytes(amount) == text


def test_nothing_is_placed_on_a_node_until_it_is_seen_renewing() -> None:
    """A LibvirtNode a gone agent left looks live for a lease (its VMs must not start elsewhere meanwhile),
    but no new VM goes there on that alone."""
    fleet, clock = fleet_of(node("left-over"), node("mine"), me="mine", seen_renewing=False)
    assert fleet.live("left-over")
    assert choose(fleet, placement.Ledger()).node == "mine"
    clock.now += 5
    fleet.observe([renewed(node("left-over", memory=64 * GI)), node("mine")])
    assert choose(fleet, placement.Ledger()).node == "left-over"
