"""Scenarios migration-*: live moves on a bed of two libvirt hosts (`lvo_testing.libvirt_hosts`, prefix `lvo-hb`),
an agent per host, the bench's API server.

- `migration-move`: the 128 MiB guest (emptyDisk, console log) moved through the operator (patch
  spec.nodeName; from the patch to the watch event with status.nodeName = target and Ready True) against
  `virsh migrate --live --p2p --persistent --undefinesource --copy-storage-inc` of the same domain XML
  (rendered by `domain_xml.render`, the operator's metadata left out, defined outside the operator; its empty
  disk pre-created on the target with qemu-img, inside the timed span), rounds interleaved, directions
  alternating: medians and their ratio (target < 1.3x).
- `migration-downtime`: status.migration.downtimeMilliseconds after each operator move, p50/p95.
- `migration-drain`: N unpinned guests placed on the first host (the second cordoned meanwhile), the second
  uncordoned, then `spec.drain: true` on the first: time until every VM runs Ready on the second, and the
  most moves in flight at once (phase Scheduled/TargetReady/Running), from every VM watch event.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes

from common import GROUP, VERSION, Bench, log, percentile
from e2e import guest_spec
from libvirt_operator import quantity
from libvirt_operator.disk_plan import plan_disks
from libvirt_operator.domain_xml import console_log_path, render
from libvirt_operator.migration import Move
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.spec import parse_spec
from lvo_testing.libvirt_env import GuestImage, build_guest_image
from lvo_testing.libvirt_hosts import BedHost, LibvirtHosts

NAMESPACE = "bench-moves"
BED_PREFIX = "lvo-hb"
EMPTY_DISK = {"name": "data", "emptyDisk": {"size": "64Mi"}}
BOOTED = b"LVO-GUEST-READY"
# The drain's 10 one-vCPU guests all on one host of this machine's 2 CPUs (the default ratio, 4, places 8).
BED_AGENT_ARGS = ("--cpu-allocation-ratio", "8")
PLACEMENT_LEASE = ("libvirt-operator-placement", "kube-system")
VirtualMachine = dict[str, Any]


def ready(vm: VirtualMachine) -> bool:
    conditions = (vm.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def on_node(vm: VirtualMachine, node: str) -> bool:
    return (vm.get("status") or {}).get("nodeName") == node and ready(vm)


class History:
    """Every watch event of the namespace's VMs, with its arrival time; and the most moves in flight at once."""

    def __init__(self, bench: Bench, namespace: str) -> None:
        self.bench, self.namespace = bench, namespace
        self.events: dict[str, list[tuple[float, VirtualMachine]]] = {}
        self.moving: set[str] = set()
        self.most_moving = 0
        self._lock = threading.Lock()

    def __enter__(self) -> History:
        self.bench.watch.listeners.append(self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bench.watch.listeners.remove(self._seen)

    def _seen(self, arrived: float, event_type: str, vm: VirtualMachine) -> None:
        meta = vm["metadata"]
        if meta.get("namespace") != self.namespace or event_type == "DELETED":
            return
        move = Move.of(vm.get("status") or {})
        with self._lock:
            self.events.setdefault(meta["name"], []).append((arrived, vm))
            (self.moving.add if move is not None and move.active else self.moving.discard)(meta["name"])
            self.most_moving = max(self.most_moving, len(self.moving))

    def reset_most_moving(self) -> None:
        with self._lock:
            self.most_moving = len(self.moving)

    def first(self, name: str, since: float, predicate: Callable[[VirtualMachine], bool],
              timeout: float) -> tuple[float, VirtualMachine]:
        """The arrival time and body of the first event of `name` after `since` (wall time) that satisfies
        `predicate`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = next(((at, vm) for at, vm in self.events.get(name, []) if at >= since and predicate(vm)), None)
                last = (self.events.get(name) or [(0.0, {})])[-1][1].get("status") or {}
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: not after {timeout}s; status.nodeName {last.get('nodeName')}, "
                                   f"status.migration {json.dumps(last.get('migration'))}")
            time.sleep(0.05)

    def latest(self, name: str) -> VirtualMachine:
        with self._lock:
            return self.events[name][-1][1]


@contextlib.contextmanager
def bed_with_agents(bench: Bench, image: GuestImage) -> Iterator[LibvirtHosts]:
    """The two-host bed, an agent per host; everything gone afterwards, also after a failure."""
    bed = LibvirtHosts(2, prefix=BED_PREFIX)
    try:
        bed.start()
        bed.copy_in(image.kernel, image.initrd)
        for host in bed.hosts:
            agent = bed.agent(host, bench.workdir / "agents", bench.plane.admin_kubeconfig, *BED_AGENT_ARGS)
            bench.agents.append(agent)
            agent.start(timeout=120)
        wait_published(bench, [host.name for host in bed.hosts])
        wait_fleet_seen(bench)
        yield bed
    except BaseException:
        kept = Path(tempfile.mkdtemp(prefix="lvo-bench-migration-logs-"))
        for agent in bench.agents:
            if agent.node_name.startswith(BED_PREFIX) and agent.log_path.exists():
                shutil.copy(agent.log_path, kept)
        log(f"the bed's agent logs are kept in {kept}")
        raise
    finally:
        with contextlib.suppress(Exception):
            bench.delete_all(NAMESPACE, timeout=180)
        for agent in [a for a in bench.agents if a.node_name.startswith(BED_PREFIX)]:
            agent.stop()
            bench.agents.remove(agent)
        for host in bed.hosts:
            with contextlib.suppress(Exception):
                bench.custom.delete_cluster_custom_object(GROUP, VERSION, "libvirtnodes", host.name)
        bed.stop()


def wait_published(bench: Bench, nodes: list[str], timeout: float = 120) -> None:
    """Until each node's LibvirtNode says how other hosts reach it (a move needs it)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = bench.custom.list_cluster_custom_object(GROUP, VERSION, "libvirtnodes")["items"]
        published = {n["metadata"]["name"] for n in listed if ((n.get("status") or {}).get("migration") or {}).get("uri")}
        if set(nodes) <= published:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"LibvirtNodes {nodes}: only {sorted(published)} publish a migration URI")
        time.sleep(0.5)


def lease_renewed_at(bench: Bench) -> Any:
    lease = kubernetes.client.CoordinationV1Api(bench.api_client).read_namespaced_lease(*PLACEMENT_LEASE)
    return lease.spec.renew_time


def wait_fleet_seen(bench: Bench, timeout: float = 90) -> float:
    """Until the placing agent has re-listed the LibvirtNodes, which is when it sees a LibvirtNode's spec (a cordon,
    a drain) or a new node: it does so in its heartbeat, right after renewing the placement Lease (a LibvirtNode's
    heartbeatTime also changes between heartbeats, when its VM count does); seconds waited."""
    began, before = time.monotonic(), lease_renewed_at(bench)
    while lease_renewed_at(bench) == before:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"the placement Lease was not renewed within {timeout}s")
        time.sleep(0.5)
    time.sleep(1)  # the re-list follows the renewal
    return time.monotonic() - began


def patch_node(bench: Bench, node: str, spec: dict[str, Any]) -> None:
    bench.plane.kubectl("patch", "libvirtnode", node, "--type=merge", "-p", json.dumps({"spec": spec}))


def wait_booted(host: BedHost, log_path: Path, timeout: float = 300) -> None:
    """Until the guest's console log on `host` says it booted (a booting TCG kernel is not what a move of a
    running guest measures)."""
    deadline = time.monotonic() + timeout
    while not (host.path(log_path).exists() and BOOTED in host.path(log_path).read_bytes()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log_path} on {host.name}: no {BOOTED!r} after {timeout}s")
        time.sleep(0.5)


def vm_log(name: str) -> Path:
    return console_log_path(VMRef(uid="", namespace=NAMESPACE, name=name), AgentSettings())


# --- the virsh baseline -------------------------------------------------------------------------------

class VirshGuest:
    """The operator's domain XML for the same spec, without the operator's metadata (so no agent takes it for
    its own), defined and started on a host by virsh; its empty disk created with qemu-img."""

    def __init__(self, image: GuestImage, host: BedHost) -> None:
        vm = VMRef(uid=str(uuid.uuid4()), namespace="lvo-bench-virsh", name="guest")
        spec = parse_spec(guest_spec(image, host.name, marker="virsh-baseline", disks=[EMPTY_DISK]))
        settings = AgentSettings()
        disks = plan_disks(spec, vm, settings)
        size = int(quantity.parse(EMPTY_DISK["emptyDisk"]["size"]))
        self.disks = [(disk.path, size) for disk in disks if disk.owned]
        self.devices = [f"vd{chr(ord('a') + i)}" for i in range(len(disks))]
        self.log = console_log_path(vm, settings)
        definition = ElementTree.fromstring(render(spec, vm, settings, generation=1, spec_hash="", disks=disks))
        definition.remove(definition.find("metadata"))
        self.xml = ElementTree.tostring(definition, encoding="unicode")
        self.name = definition.findtext("name") or ""
        self.host = host

    def start(self) -> None:
        self.host.path(self.log.parent).mkdir(parents=True, exist_ok=True)
        self.create_disks(self.host)
        subprocess.run(["virsh", "-c", self.host.uri, "define", "/dev/stdin"], input=self.xml, text=True, check=True,
                       capture_output=True, timeout=120)
        self.host.virsh("start", self.name)

    def create_disks(self, host: BedHost) -> None:
        for path, size in self.disks:
            host.run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))

    def move(self, destination: BedHost) -> tuple[float, int | None]:
        """Seconds from the target's disks created to `virsh migrate` returning, and the downtime libvirt saw."""
        began = time.monotonic()
        self.create_disks(destination)
        moved = self.host.migrate_live(self.name, destination, "--persistent", "--undefinesource",
                                       "--copy-storage-inc", "--migrate-disks", ",".join(self.devices),
                                       "--disks-uri", f"tcp://{destination.address}")
        seconds = time.monotonic() - began
        if moved.returncode != 0:
            raise RuntimeError(f"virsh migrate {self.host.name} -> {destination.name}: {moved.stderr.strip()}")
        for path, _ in self.disks:
            self.host.path(path).unlink(missing_ok=True)
        self.host = destination
        job = destination.virsh("domjobinfo", "--completed", self.name, check=False)
        downtime = re.search(r"Total downtime:\s+(\d+)\s*ms", job)
        return seconds, int(downtime[1]) if downtime else None

    def remove(self, hosts: list[BedHost]) -> None:
        for host in hosts:
            host.virsh("destroy", self.name, check=False)
            host.virsh("undefine", self.name, check=False)
            for path, _ in self.disks:
                host.path(path).unlink(missing_ok=True)


# --- the scenarios ------------------------------------------------------------------------------------

def operator_move(bench: Bench, history: History, name: str, target: str) -> tuple[float, VirtualMachine]:
    """Patches spec.nodeName; seconds until the watch shows the VM Ready on the target, and that body."""
    began = time.time()
    bench.custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "virtualmachines", name,
                                                {"spec": {"nodeName": target}})
    arrived, vm = history.first(name, began, lambda vm: on_node(vm, target), timeout=300)
    return arrived - began, vm


def downtime_of(history: History, name: str, since: float, move_id: str, timeout: float = 30) -> int | None:
    """status.migration.downtimeMilliseconds of the move `move_id`, once written (None if not within `timeout`)."""
    def noted(vm: VirtualMachine) -> bool:
        move = Move.of(vm.get("status") or {})
        return move is not None and move.id == move_id and move.downtime_ms is not None
    try:
        return Move.of(history.first(name, since, noted, timeout)[1]["status"]).downtime_ms
    except TimeoutError:
        return None


def moves(bench: Bench, bed: LibvirtHosts, image: GuestImage, history: History, rounds: int, count: int) -> None:
    """Operator moves of one VM, `count` in all; the first `rounds` each followed by a virsh move the same way."""
    first, second = bed.hosts
    name = "mover"
    bench.create_vm(NAMESPACE, name, guest_spec(image, first.name, marker=name, disks=[EMPTY_DISK]))
    baseline = VirshGuest(image, first)
    try:
        baseline.start()
        history.first(name, 0, lambda vm: on_node(vm, first.name), timeout=300)
        wait_booted(first, vm_log(name))
        wait_booted(first, baseline.log)
        operator_seconds, virsh_seconds, downtimes, virsh_downtimes, missing = [], [], [], [], []
        for index in range(count):
            source, target = (first, second) if index % 2 == 0 else (second, first)
            seconds, vm = operator_move(bench, history, name, target.name)
            move = Move.of(vm["status"])
            downtime = downtime_of(history, name, 0, move.id) if move is not None else None
            (downtimes.append(downtime) if downtime is not None else missing.append(index))
            log(f"migration: move {index + 1}/{count} {source.name} -> {target.name}: {seconds:.2f}s, "
                f"downtime {downtime} ms")
            if index < rounds:
                operator_seconds.append(seconds)
                seconds, virsh_downtime = baseline.move(target)
                virsh_seconds.append(seconds)
                if virsh_downtime is not None:
                    virsh_downtimes.append(virsh_downtime)
                log(f"migration: virsh {source.name} -> {target.name}: {seconds:.2f}s, downtime {virsh_downtime} ms")
    finally:
        baseline.remove(bed.hosts)
    operator_median, virsh_median = statistics.median(operator_seconds), statistics.median(virsh_seconds)
    scenario = "migration-move"
    bench.add(scenario, "operator_move_median", operator_median, "s",
              f"{rounds} moves by spec.nodeName, patch to Ready on the target; each "
              + " ".join(f"{s:.2f}" for s in operator_seconds))
    bench.add(scenario, "virsh_migrate_median", virsh_median, "s",
              "qemu-img create on the target + virsh migrate --copy-storage-inc of the same domain XML; each "
              + " ".join(f"{s:.2f}" for s in virsh_seconds))
    bench.add(scenario, "operator_over_virsh", operator_median / virsh_median, "x", "target < 1.3")
    scenario = "migration-downtime"
    if downtimes:
        bench.add(scenario, "downtime_p50", percentile(downtimes, 50), "ms",
                  f"status.migration.downtimeMilliseconds, {len(downtimes)} of {count} moves")
        bench.add(scenario, "downtime_p95", percentile(downtimes, 95), "ms")
    bench.add(scenario, "downtime_missing", len(missing), "moves", "moves whose status gave no downtime within 30 s")
    if virsh_downtimes:
        bench.add(scenario, "virsh_downtime_p50", percentile(virsh_downtimes, 50), "ms",
                  f"domjobinfo --completed on the target, {len(virsh_downtimes)} virsh moves")
    bench.delete_all(NAMESPACE, timeout=180)


def drain(bench: Bench, bed: LibvirtHosts, image: GuestImage, history: History, count: int) -> None:
    """`count` unpinned guests on the first host, then a drain of it: total time and most moves at once."""
    first, second = bed.hosts
    names = [f"drained-{i:02d}" for i in range(count)]
    patch_node(bench, second.name, {"unschedulable": True})
    wait_fleet_seen(bench)
    for name in names:
        spec = guest_spec(image, first.name, marker=name)
        del spec["nodeName"]
        bench.create_vm(NAMESPACE, name, spec)
    for name in names:
        history.first(name, 0, ready, timeout=300 + 30 * count)
        placed = (history.latest(name).get("status") or {}).get("nodeName")
        if placed != first.name:
            raise RuntimeError(f"{name} placed on {placed}, not {first.name} (the only uncordoned node)")
    for name in names:
        wait_booted(first, vm_log(name), timeout=300 + 30 * count)
    patch_node(bench, second.name, {"unschedulable": False})
    history.reset_most_moving()
    began = time.time()
    patch_node(bench, first.name, {"drain": True})
    done = [history.first(name, began, lambda vm: on_node(vm, second.name), timeout=120 + 60 * count)[0]
            for name in names]
    scheduled = min(history.first(name, began, lambda vm: Move.of(vm.get("status") or {}) is not None, timeout=0)[0]
                    for name in names)
    scenario = "migration-drain"
    bench.add(scenario, "drain_seconds", max(done) - began, "s",
              f"{count} guests, drain patch to the last seen Ready on {second.name}")
    bench.add(scenario, "drain_first_move_seconds", scheduled - began, "s",
              "drain patch to the first move scheduled (agents watch LibvirtNodes: the admin's edit is acted on "
              "at once)")
    bench.add(scenario, "most_moves_in_flight", history.most_moving, "moves",
              "phase Scheduled/TargetReady/Running at once, over every VM watch event; bound "
              "--parallel-migrations-per-node 2 (default): must be <= 2")
    drained = bench.custom.get_cluster_custom_object(GROUP, VERSION, "libvirtnodes", first.name)
    bench.add(scenario, "node_status_drain", json.dumps((drained.get("status") or {}).get("drain")), "",
              f"LibvirtNode {first.name} status.drain read at once after the drain (its agent rewrites it when its counts change, within seconds)")
    patch_node(bench, first.name, {"drain": False})
    bench.delete_all(NAMESPACE, timeout=300)


def migration(bench: Bench, rounds: int, count: int, drained: int) -> None:
    image = build_guest_image()
    bench.namespace(NAMESPACE)
    with bed_with_agents(bench, image) as bed, History(bench, NAMESPACE) as history:
        moves(bench, bed, image, history, rounds, count)
        drain(bench, bed, image, history, drained)
