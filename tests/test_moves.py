"""Live moves, the pure parts and the elected agent's admission: who acts on a VM during a move, what cannot
move, when a move is scheduled and to where, the parallel bounds, retries, and VirtualMachineMigrations."""

from __future__ import annotations

import asyncio
import datetime
import time
from types import SimpleNamespace
from typing import Any

import pytest

from libvirt_operator import move_admission, nodes, placement
from libvirt_operator.guest_migration import JobProgress
from libvirt_operator.heartbeat import drain_status
from libvirt_operator.migration import Move, migrating_condition, not_migratable
from libvirt_operator.model import MigrationPolicy
from libvirt_operator.move_admission import MoveAdmission
from libvirt_operator.nodes import Role
from libvirt_operator.reconcile import decide
from libvirt_operator.scheduler import Scheduler
from libvirt_operator.spec import parse_spec
from libvirt_operator.vm_move import ProgressWatermark
from libvirt_operator.vm_status import VMView
from test_placement import fleet_of, node, renewed

pytestmark = pytest.mark.unit

NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.timezone.utc)


def host(name: str, **options: Any) -> dict[str, Any]:
    body = node(name, **options)
    body["status"]["migration"] = {"uri": f"qemu+tcp://{name}/system", "address": name}
    return body


def vm(name: str, placed: str | None, *, pinned: str | None = None, state: str = "running",
       migration: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"nodeName": placed, "domain": {"state": state}}
    if migration is not None:
        status["migration"] = migration
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": "7", "generation": 3},
            "spec": {"memory": "512Mi", **({"nodeName": pinned} if pinned else {}), **spec}, "status": status}


def view(status: dict[str, Any]) -> VMView:
    return VMView(name="x", generation=3, spec={"memory": "512Mi"}, spec_hash="h", status=status)


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def active(source: str, target: str, phase: str = "Running", id: str = "m") -> dict[str, Any]:
    return {"id": id, "trigger": "Migration", "source": source, "target": target, "phase": phase}


# --- who acts ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("me", "phase", "role"), [
    ("a", "Running", Role.RUN), ("b", "Scheduled", Role.INCOMING), ("b", "Running", Role.INCOMING),
    ("b", "Failed", Role.CLEAN_INCOMING), ("c", "Running", Role.REMOVE_COPY),
])
def test_during_a_move_the_source_runs_the_vm_and_the_target_only_receives_it(me: str, phase: str, role: Role) -> None:
    fleet, _ = fleet_of(node("a"), node("b"), node("c"), me=me)
    assert nodes.role(vm("x", "a", migration=active("a", "b", phase)), fleet) is role


def test_after_a_move_the_target_runs_the_vm_and_the_source_holds_a_copy_at_most() -> None:
    done = vm("x", "b", migration=active("a", "b", "Succeeded"))
    assert nodes.role(done, fleet_of(node("a"), node("b"), me="b")[0]) is Role.RUN
    assert nodes.role(done, fleet_of(node("a"), node("b"), me="a")[0]) is Role.REMOVE_COPY


# --- what cannot move ----------------------------------------------------------------------------

def test_uefi_and_images_written_in_place_cannot_move_and_say_why() -> None:
    assert not_migratable(parse_spec({"memory": "1Gi", "firmware": "uefi"}))[0] == "UEFIVariables"
    in_place = parse_spec({"memory": "1Gi", "disks": [{"name": "root", "image": {"path": "/var/lib/libvirt/a.qcow2",
                                                                              "clone": False}}]})
    reason, message = not_migratable(in_place)
    assert reason == "LocalWritableImage" and "spec.disks[0].image" in message
    cloned = parse_spec({"memory": "1Gi", "disks": [{"name": "root", "image": {"path": "/var/lib/libvirt/a.qcow2", "clone": True}},
                                                    {"name": "data", "emptyDisk": {"size": "1Gi"}}]})
    assert not_migratable(cloned) is None


def test_the_migrating_condition_tells_the_phase_the_progress_and_the_outcome() -> None:
    running = Move.of({"migration": {**active("a", "b"), "dataTotalBytes": 200, "dataProcessedBytes": 50}})
    assert migrating_condition(running) == (True, "Running", "moving from a to b (Running, 25% of 200 bytes sent)")
    done = Move.of({"migration": {**active("a", "b", "Succeeded"), "downtimeMilliseconds": 120}})
    assert migrating_condition(done) == (False, "Succeeded", "moved from a to b, downtime 120 ms")
    failed = Move.of({"migration": {**active("a", "b", "Failed"), "message": "no progress for 151s"}})
    assert migrating_condition(failed)[2] == "the move from a to b failed: no progress for 151s; the VM stayed on a"
    assert migrating_condition(None) == (False, "NotMigrating", "")


# --- the elected agent's admission ---------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.vm_writes: list[tuple[str, dict[str, Any], str | None]] = []
        self.request_writes: list[tuple[str, dict[str, Any]]] = []

    async def write_status(self, body: dict[str, Any], status: dict[str, Any], resource_version: str | None) -> None:
        await asyncio.sleep(0.01)  # the API server's round trip: other decisions run meanwhile
        self.vm_writes.append((body["metadata"]["name"], status, resource_version))
        body["status"] = status

    async def patch_migration_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.request_writes.append((name, patch))


def admission(*vms: dict[str, Any], hosts: tuple[dict[str, Any], ...] | None = None,
              policy: MigrationPolicy = MigrationPolicy()) -> tuple[MoveAdmission, Recorder]:
    recorder = Recorder()
    fleet, _ = fleet_of(*(hosts or (host("a"), host("b"), host("c", memory=1 << 30))), me="a")
    bodies = {body["metadata"]["uid"]: body for body in vms}
    ledger = placement.Ledger()
    return MoveAdmission(recorder, fleet, ledger, bodies, policy, recorder.write_status, lambda: NOW), recorder


def request(name: str, vm_name: str, target: str | None = None, created: str = "2026-12-06T11:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"req-{name}", "creationTimestamp": created},
            "spec": {"vmName": vm_name, **({"targetNode": target} if target else {})}}


async def test_a_nodename_edit_of_a_running_vm_schedules_a_move_there_conditional_on_the_body() -> None:
    body = vm("x", "a", pinned="b")
    admit, recorder = admission(body)
    assert await admit.duty(body)
    [(name, status, resource_version)] = recorder.vm_writes
    assert resource_version == "7"
    assert {k: status["migration"][k] for k in ("trigger", "source", "target", "phase", "id")} == \
        {"trigger": "NodeName", "source": "a", "target": "b", "phase": "Scheduled", "id": "nodeName-3"}
    assert not await admit.duty(body)  # in flight: nothing more


async def test_a_stopped_vm_is_not_moved_live_and_a_request_for_it_fails_saying_why() -> None:
    body = vm("x", "a", state="shutoff")
    admit, recorder = admission(body)
    admit.observe("ADDED", request("r", "x"))
    assert not await admit.duty(body)
    assert recorder.vm_writes == []
    [(name, patch)] = recorder.request_writes
    assert patch["phase"] == "Failed" and "not running" in patch["message"]


async def test_a_drain_moves_unpinned_vms_to_the_node_with_most_room_and_leaves_pinned_ones() -> None:
    hosts = (host("a", unschedulable=True), host("b"), host("c", memory=1 << 30))
    hosts[0]["spec"]["drain"] = True
    free, pinned = vm("free", "a"), vm("pinned", "a", pinned="a")
    admit, recorder = admission(free, pinned, hosts=hosts)
    assert await admit.duty(free)
    assert not await admit.duty(pinned)
    [(name, status, _)] = recorder.vm_writes
    assert (name, status["migration"]["target"], status["migration"]["trigger"]) == ("free", "b", "Drain")


async def test_moves_in_flight_are_bounded_per_node_and_per_cluster() -> None:
    busy = [vm(f"m{i}", "a", migration=active("a", "b", id=f"m{i}")) for i in range(2)]
    waiting = vm("x", "a", pinned="c")
    admit, recorder = admission(*busy, waiting)
    assert not await admit.duty(waiting)
    assert "uid-x" in admit.waiting and recorder.vm_writes == []
    busy[0]["status"]["migration"]["phase"] = "Succeeded"
    assert await admit.duty(waiting)

    flights = [vm(f"f{i}", f"s{i}", migration=active(f"s{i}", f"t{i}", id=f"f{i}")) for i in range(5)]
    other = vm("y", "a", pinned="b")
    admit, recorder = admission(*flights, other)
    assert not await admit.duty(other)
    assert not await admit.duty(other)  # per cluster: 5 in flight
    assert recorder.vm_writes == []


async def test_a_failed_move_is_retried_after_a_delay_and_a_request_is_never_reused() -> None:
    failed = {"id": "nodeName-3", "trigger": "NodeName", "source": "a", "target": "b", "phase": "Failed",
              "endTime": "2026-12-06T11:59:00Z", "failures": 1, "message": "no progress"}
    body = vm("x", "a", pinned="b", migration=failed)
    admit, recorder = admission(body)
    assert not await admit.duty(body)
    assert "uid-x" in admit.waiting and recorder.vm_writes == []

    request_failed = {**failed, "id": "req-r", "trigger": "Migration"}
    body = vm("y", "a", migration=request_failed)
    admit, recorder = admission(body)
    admit.observe("ADDED", {**request("r", "y"), "status": {"phase": "Failed"}})
    assert not await admit.duty(body)
    assert recorder.vm_writes == []


async def test_a_request_names_its_target_or_lets_the_placement_pick_and_reads_the_outcome() -> None:
    body = vm("x", "a")
    admit, recorder = admission(body)
    admit.observe("ADDED", request("here", "x", target="a"))
    admit.observe("ADDED", request("later", "x", created="2026-12-06T11:30:00Z"))
    assert not await admit.duty(body)
    assert ("here", {"phase": "Failed", "endTime": "2026-12-06T12:00:00Z", "message": "the VM already runs on a"}) \
        in recorder.request_writes
    admit.requests["req-here"]["status"] = {"phase": "Failed"}
    assert await admit.duty(body)
    move = body["status"]["migration"]
    assert (move["id"], move["migrationName"], move["target"]) == ("req-later", "later", "b")
    body["status"]["migration"] = {**move, "phase": "Succeeded", "endTime": "2026-12-06T12:00:05Z"}
    await admit.duty(body)
    name, patch = recorder.request_writes[-1]
    assert name == "later" and patch["phase"] == "Succeeded" and patch["targetNode"] == "b"


async def test_a_host_passthrough_cpu_moves_only_to_a_host_with_the_same_cpu_model() -> None:
    hosts = (host("a"), host("b"), host("c"))
    for body, model in zip(hosts, ("EPYC", "Xeon", "EPYC")):
        body["status"]["hypervisor"] = {"cpuModel": model}
    body = vm("x", "a", cpu={"mode": "host-passthrough"})
    admit, recorder = admission(body, hosts=hosts)
    admit.observe("ADDED", request("to-b", "x", target="b"))
    assert not await admit.duty(body)
    assert "host-passthrough" in recorder.request_writes[-1][1]["message"]
    admit.requests["req-to-b"]["status"] = {"phase": "Failed"}
    admit.observe("ADDED", request("any", "x", created="2026-12-06T11:30:00Z"))
    assert await admit.duty(body)
    assert body["status"]["migration"]["target"] == "c"


def test_progress_is_what_is_left_to_send_shrinking_within_each_phase_of_the_move() -> None:
    watermark = ProgressWatermark()
    disks, memory = 256 << 10, 128 << 20
    assert watermark.stalled(JobProgress(100, disks, disks // 2, disks // 2), now=0.0) == 0
    # the disks copied, memory starts: far more left to send than in the disk phase, and that is progress
    assert watermark.stalled(JobProgress(1100, memory, 0, memory), now=1.0) == 0
    assert watermark.stalled(JobProgress(5100, memory, 16 << 20, memory - (16 << 20)), now=5.0) == 0
    # a stream that stalls (the link cut) does not shrink what is left: the stall counts from the last shrink
    assert watermark.stalled(JobProgress(9100, memory, 16 << 20, memory - (16 << 20)), now=9.0) == 4.0
    assert watermark.stalled(JobProgress(20100, memory, 16 << 20, memory - (16 << 20)), now=20.0) == 15.0


async def test_moves_decided_at_the_same_moment_still_keep_the_bound() -> None:
    first, second = vm("x", "a", pinned="b"), vm("y", "a", pinned="c")
    admit, recorder = admission(first, second, policy=MigrationPolicy(parallel_per_node=1))
    assert sorted(await asyncio.gather(admit.duty(first), admit.duty(second))) == [False, True]
    assert len(recorder.vm_writes) == 1


# --- the placing agent's Pending, while it has not seen every node renew --------------------------

async def test_no_pending_is_written_while_a_node_not_yet_seen_renewing_would_take_the_vm() -> None:
    recorder = Recorder()
    fleet, _ = fleet_of(node("a", memory=1 << 30), node("b"), me="a", seen_renewing=False)
    scheduler = Scheduler(recorder, fleet, placement.Ledger(), recorder.write_status, lambda: NOW)
    small, huge = vm("small", None, memory="2Gi"), vm("huge", None, memory="64Gi")
    small["status"] = huge["status"] = {}
    await scheduler.duty(small)
    assert recorder.vm_writes == [] and "uid-small" in scheduler.waiting  # b, unconfirmed, would take it
    await scheduler.duty(huge)
    [(name, status, _)] = recorder.vm_writes
    assert name == "huge" and status["printableStatus"] == "Pending"  # no node would: said at once


async def test_a_nodename_naming_a_node_that_cannot_take_the_vm_live_says_why_once_and_keeps_it_running() -> None:
    body = vm("x", "a", pinned="b", disks=[{"name": "fast", "volume": {"pool": "nvme", "name": "x-data"}}])
    admit, recorder = admission(body)
    assert not await admit.duty(body)
    [(name, status, resource_version)] = recorder.vm_writes
    move = status["migration"]
    assert (move["phase"], move["target"], resource_version) == ("Failed", "b", "7")
    assert move["message"] == "node b cannot take the VM live: node b lacks the storage pool(s) nvme the VM's volumes are in"
    assert status["nodeName"] == "a" and move["reason"] == "TargetIncompatible"
    assert not await admit.duty(body)
    assert len(recorder.vm_writes) == 1
    migratable = condition(decide(view(status), None, NOW, "a").status, "Migratable")
    assert (migratable["status"], migratable["reason"], migratable["message"]) == \
        ("False", "TargetIncompatible", move["message"])


async def test_a_vm_no_node_can_take_live_reads_migratable_false_and_blocks_the_drain_saying_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = (host("a", unschedulable=True), host("b"), host("c"))
    hosts[0]["spec"]["drain"] = True
    hosts[0]["status"]["offers"]["pools"] = ["default", "nvme"]
    body = vm("x", "a", disks=[{"name": "fast", "volume": {"pool": "nvme", "name": "x-data"}}])
    admit, recorder = admission(body, hosts=hosts)
    assert not await admit.duty(body)
    [(_, status, _)] = recorder.vm_writes
    move = status["migration"]
    assert (move["phase"], move["trigger"], move["reason"]) == ("Failed", "Drain", "NoCompatibleNode")
    assert move["message"] == ("no node can take the VM live: node b lacks the storage pool(s) nvme the VM's volumes "
                               "are in; node c lacks the storage pool(s) nvme the VM's volumes are in")
    body["status"] = {**decide(view(status), None, NOW, "a").status, "domain": {"state": "running"}}
    assert condition(body["status"], "Migratable")["reason"] == "NoCompatibleNode"
    drain = drain_status(admit.fleet.nodes["a"], [body])
    assert drain["state"] == "Blocked" and drain["blockedBy"] == [{"vm": "ns/x", "reason": move["message"]}]
    hosts[2]["status"]["offers"]["pools"] = ["default", "nvme"]  # a node that can take it joins
    admit.fleet.observe([renewed(h) for h in hosts])
    admit.fleet.observe([renewed(renewed(h)) for h in hosts])
    assert not await admit.duty(body) and "uid-x" in admit.waiting  # the retry delay first
    later = time.monotonic() + 31
    monkeypatch.setattr(move_admission, "time", SimpleNamespace(monotonic=lambda: later))
    assert await admit.duty(body)
    assert (body["status"]["migration"]["phase"], body["status"]["migration"]["target"]) == ("Scheduled", "c")
    assert condition(decide(view(body["status"]), None, NOW, "a").status, "Migratable")["status"] == "True"


async def test_a_request_naming_a_node_that_cannot_take_the_vm_fails_and_the_vm_says_why() -> None:
    body = vm("x", "a", disks=[{"name": "fast", "volume": {"pool": "nvme", "name": "x-data"}}])
    admit, recorder = admission(body)
    admit.observe("ADDED", request("to-b", "x", target="b"))
    assert not await admit.duty(body)
    [(_, status, _)] = recorder.vm_writes
    assert (status["migration"]["id"], status["migration"]["reason"]) == ("req-to-b", "TargetIncompatible")
    [(name, patch)] = recorder.request_writes
    assert (name, patch["phase"], patch["targetNode"]) == ("to-b", "Failed", "b")
    assert patch["message"] == status["migration"]["message"]
    assert not await admit.duty(body)  # the request ended: nothing more
    assert len(recorder.vm_writes) == 1 and len(recorder.request_writes) == 1
