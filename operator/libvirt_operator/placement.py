"""Where an unpinned VirtualMachine goes: filter the LibvirtNodes, then score them (spread). Pure.

Each agent publishes what its node offers (`status.offers`, `status.allocatable`); what is allocated
on a node is summed from the VirtualMachines placed there, never taken from the node's word, so a
decider that just placed a VM counts it at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from libvirt_operator.nodes import NodeView
from libvirt_operator.spec import VMSpec, VolumeSource


def human_bytes(amount: int) -> str:
    """A quantity a reader takes in at a glance: 512Mi, 1.5Gi, 24Gi."""
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if amount >= unit:
            value = round(amount / unit, 1)
            return f"{value:g}{suffix}"
    return str(amount)


@dataclass(frozen=True)
class Request:
    """What one VM needs of a node."""

    vcpus: int
    memory: int
    domain_type: str | None = None
    networks: frozenset[str] = frozenset()
    bridges: frozenset[str] = frozenset()
    pools: frozenset[str] = frozenset()
    user_networking: bool = False
    selector: tuple[tuple[str, str], ...] = ()


def request_of(spec: VMSpec) -> Request:
    kinds: dict[str, set[str]] = {"network": set(), "bridge": set()}
    for interface in spec.interfaces:
        if interface.kind in kinds and interface.source:
            kinds[interface.kind].add(interface.source)
    return Request(
        vcpus=spec.cpu.vcpus, memory=spec.memory, domain_type=spec.domain_type,
        networks=frozenset(kinds["network"]), bridges=frozenset(kinds["bridge"]),
        pools=frozenset(d.source.pool for d in spec.disks if isinstance(d.source, VolumeSource)),
        user_networking=any(i.kind == "user" for i in spec.interfaces), selector=spec.node_selector,
    )


@dataclass(frozen=True)
class Offer:
    """What one node offers, as its agent published it (status.allocatable, status.offers)."""

    name: str
    vcpus: int
    memory: int
    vm_memory_overhead: int
    domain_types: frozenset[str]
    networks: frozenset[str]
    bridges: frozenset[str]
    pools: frozenset[str]
    user_networking: bool
    labels: Mapping[str, str]
    schedulable: str | None
    """None when new VMs may go there, else why not (`cordoned`, `not ready`)."""

    @classmethod
    def of(cls, view: NodeView) -> Offer:
        status = view.status
        allocatable = status.get("allocatable") or {}
        offers = status.get("offers") or {}
        answering = (status.get("libvirt") or {}).get("state", "Connected") == "Connected"
        why_not = ("not ready" if not view.live or not view.renewal_seen or not answering or not allocatable
                   else "cordoned" if view.cordoned else None)
        return cls(
            name=view.name, vcpus=int(allocatable.get("vcpus", 0)), memory=int(allocatable.get("memoryBytes", 0)),
            vm_memory_overhead=int(allocatable.get("vmMemoryOverheadBytes", 0)),
            domain_types=frozenset(offers.get("domainTypes") or ()), networks=frozenset(offers.get("networks") or ()),
            bridges=frozenset(offers.get("bridges") or ()), pools=frozenset(offers.get("pools") or ()),
            user_networking=bool(offers.get("userNetworking")), labels=view.labels, schedulable=why_not,
        )

    def cost(self, request: Request) -> tuple[int, int]:
        return request.vcpus, request.memory + self.vm_memory_overhead


@dataclass
class Ledger:
    """What the placed VMs take of each node: [vCPUs, memory with the node's per-VM overhead, VMs]."""

    by_node: dict[str, list[int]] = field(default_factory=dict)
    by_vm: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def place(self, uid: str, node: str | None, cost: tuple[int, int] = (0, 0)) -> None:
        """Records the VM on `node` (None: on no node), replacing what it took before."""
        old = self.by_vm.pop(uid, None)
        if old is not None:
            self._add(old[0], -old[1], -old[2], -1)
        if node is not None:
            self.by_vm[uid] = (node, *cost)
            self._add(node, cost[0], cost[1], 1)

    def _add(self, node: str, vcpus: int, memory: int, vms: int) -> None:
        taken = self.by_node.setdefault(node, [0, 0, 0])
        taken[0] += vcpus
        taken[1] += memory
        taken[2] += vms

    def taken(self, node: str) -> tuple[int, int]:
        vcpus, memory, _ = self.by_node.get(node, (0, 0, 0))
        return vcpus, memory

    def count(self, node: str) -> int:
        return self.by_node.get(node, (0, 0, 0))[2]


def _unfit(request: Request, offer: Offer, ledger: Ledger) -> str | None:
    """Why the VM cannot go to this node (a kube-scheduler-style reason), None when it fits."""
    if offer.schedulable is not None:
        return offer.schedulable
    if any(offer.labels.get(key) != value for key, value in request.selector):
        return "didn't match spec.nodeSelector"
    if request.domain_type is not None and request.domain_type not in offer.domain_types:
        return f"no domain type {request.domain_type}"
    for kind, wanted, offered in (("network", request.networks, offer.networks),
                                  ("bridge", request.bridges, offer.bridges), ("pool", request.pools, offer.pools)):
        missing = sorted(wanted - offered) if "*" not in offered else []
        if missing:
            return f"no {kind} {', '.join(missing)}"
    if request.user_networking and not offer.user_networking:
        return "user networking off"
    vcpus, memory = offer.cost(request)
    taken_vcpus, taken_memory = ledger.taken(offer.name)
    if taken_memory + memory > offer.memory:
        return (f"insufficient memory (need {human_bytes(request.memory)} + {human_bytes(offer.vm_memory_overhead)} "
                "overhead)")
    if taken_vcpus + vcpus > offer.vcpus:
        return f"insufficient cpu (need {request.vcpus})"
    return None


def _free_after(request: Request, offer: Offer, ledger: Ledger) -> float:
    vcpus, memory = offer.cost(request)
    taken_vcpus, taken_memory = ledger.taken(offer.name)
    return min((offer.vcpus - taken_vcpus - vcpus) / offer.vcpus, (offer.memory - taken_memory - memory) / offer.memory)


@dataclass(frozen=True)
class Choice:
    node: str | None
    message: str


def choose(request: Request, offers: Iterable[Offer], ledger: Ledger) -> Choice:
    """The node with the most room left after the VM (spread), or None with why no node fits."""
    offers = list(offers)
    fitting: list[Offer] = []
    reasons: Counter[str] = Counter()
    for offer in offers:
        why = _unfit(request, offer, ledger)
        if why is None:
            fitting.append(offer)
        else:
            reasons[why] += 1
    if not fitting:
        summary = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
        return Choice(None, f"0/{len(offers)} nodes are available" + (f": {summary}" if summary else ""))
    best = max(fitting, key=lambda offer: (_free_after(request, offer, ledger), -ledger.count(offer.name),
                                           [-ord(c) for c in offer.name]))
    return Choice(best.name, f"placed on {best.name} ({len(fitting)}/{len(offers)} nodes fit)")


def node_offers(nodes: Iterable[NodeView]) -> list[Offer]:
    return [Offer.of(view) for view in nodes]


def published(capacity_vcpus: int, capacity_memory: int, cpu_ratio: float, memory_ratio: float,
              overhead: int, allocated: tuple[int, int]) -> dict[str, Any]:
    """The allocatable and allocated figures a node publishes (bytes for deciders, human units for people)."""
    vcpus, memory = int(capacity_vcpus * cpu_ratio), int(capacity_memory * memory_ratio)
    return {
        "allocatable": {"vcpus": vcpus, "memoryBytes": memory, "memory": human_bytes(memory),
                        "vmMemoryOverheadBytes": overhead},
        "allocated": {"vcpus": allocated[0], "memoryBytes": allocated[1], "memory": human_bytes(allocated[1])},
    }
