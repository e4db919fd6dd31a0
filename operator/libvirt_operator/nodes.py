"""The fleet as one agent sees it: which LibvirtNodes are alive, cordoned or fenced, and which agent
owns a VirtualMachine.

Liveness is judged on the observer's own monotonic clock, like kubelet's node Leases: a node is
alive while this agent saw its heartbeat change within the node's lease. The writer's timestamp is
never compared with the reader's clock.

A VirtualMachine runs only on the node named by `status.nodeName` (the placement's record), and
only while `spec.nodeName` is unset or names that same node. Every other agent keeps its hands off.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from libvirt_operator.migration import FAILED, Move
from libvirt_operator.model import Tuning

LEASE_SECONDS = Tuning().lease_seconds


@dataclass
class _Seen:
    heartbeat: str | None
    changed_at: float
    renewed: bool = False
    """Whether this observer saw the heartbeat change (not only a value found when it first looked)."""


@dataclass(frozen=True)
class NodeView:
    """One LibvirtNode as listed, with what this observer judged of it."""

    name: str
    live: bool
    body: Mapping[str, Any]
    renewal_seen: bool = True
    """False until this observer saw the node renew: a LibvirtNode left by a gone agent looks live for a lease
    (it may still run VMs), but nothing new is placed there on that alone."""

    @property
    def status(self) -> Mapping[str, Any]:
        return self.body.get("status") or {}

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.body.get("spec") or {}

    @property
    def cordoned(self) -> bool:
        return bool(self.spec.get("unschedulable") or self.spec.get("drain"))

    @property
    def labels(self) -> Mapping[str, str]:
        return self.body.get("metadata", {}).get("labels") or {}

    @property
    def placement_facts(self) -> tuple[Any, ...]:
        """What placement reads of the node: a change of any of it may let a waiting VM in."""
        status = self.status
        return (self.live, self.renewal_seen, self.spec, self.labels, status.get("allocatable"), status.get("offers"),
                (status.get("libvirt") or {}).get("state"))


@dataclass
class Fleet:
    """Every LibvirtNode this agent has listed, and since when each was last seen renewing."""

    me: str
    lease_seconds: int = LEASE_SECONDS
    clock: Callable[[], float] = time.monotonic
    nodes: dict[str, NodeView] = field(default_factory=dict)
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _started: float = field(init=False)

    def __post_init__(self) -> None:
        self._started = self.clock()

    def observe(self, listed: Iterable[Mapping[str, Any]]) -> bool:
        """Takes a fresh listing; True when a node's liveness, presence or spec changed."""
        now = self.clock()
        before = {name: view.placement_facts for name, view in self.nodes.items()}
        present: dict[str, NodeView] = {}
        for body in listed:
            name = body["metadata"]["name"]
            beat = (body.get("status") or {}).get("heartbeatTime")
            seen = self._seen.get(name)
            if seen is None or seen.heartbeat != beat:
                self._seen[name] = _Seen(beat, now, renewed=seen is not None)
            renewed = self._seen[name].renewed or name == self.me
            present[name] = NodeView(name, self._renewed_within_lease(name, body, now) or name == self.me, body, renewed)
        self.nodes = present
        return before != {name: view.placement_facts for name, view in present.items()}

    def _renewed_within_lease(self, name: str, body: Mapping[str, Any], now: float) -> bool:
        lease = (body.get("status") or {}).get("leaseDurationSeconds", self.lease_seconds)
        return now - self._seen[name].changed_at < lease

    def live(self, name: str) -> bool:
        view = self.nodes.get(name)
        return view is not None and view.live

    def unreachable_since(self, name: str) -> float | None:
        """The monotonic time this observer last saw the node renew, when it is present but not live."""
        if name in self.nodes and not self.nodes[name].live:
            return self._seen[name].changed_at
        return None

    def fenced(self, name: str) -> bool:
        """The admin's word that the host is gone: no LibvirtNode, and no renewal of it seen for a lease (one
        deleted while its agent lives is recreated by the agent's next heartbeat, well within the lease)."""
        if name in self.nodes or name == self.me:
            return False
        seen = self._seen.get(name)
        last = seen.changed_at if seen is not None else self._started
        return self.clock() - last >= self.lease_seconds


class Role(enum.Enum):
    RUN = "run"
    """This agent runs the VM: placed here, or pinned here and not placed anywhere else."""
    RELEASE = "release"
    """Placed here, but spec.nodeName now names another node: stop and remove it here first."""
    REMOVE_COPY = "remove-copy"
    """Placed on another node (after this one was fenced): a domain here is a stale copy."""
    INCOMING = "incoming"
    """The target of a move in flight: prepare when asked, and leave the incoming domain to libvirt."""
    CLEAN_INCOMING = "clean-incoming"
    """The target of a move that failed: what was prepared here goes."""
    NONE = "none"


def placed_node(body: Mapping[str, Any], fleet: Fleet) -> str | None:
    """Where the VM is placed, None when nowhere or on a fenced node."""
    placed = (body.get("status") or {}).get("nodeName") or None
    return None if placed is None or fleet.fenced(placed) else placed


def role(body: Mapping[str, Any], fleet: Fleet) -> Role:
    me = fleet.me
    pinned = (body.get("spec") or {}).get("nodeName") or None
    placed = placed_node(body, fleet)
    if placed == me:
        deleting = bool(body.get("metadata", {}).get("deletionTimestamp"))
        return Role.RUN if pinned in (None, me) or deleting else Role.RELEASE
    move = Move.of(body.get("status") or {})
    if placed is not None and move is not None and move.target == me and move.source == placed:
        if move.active:
            return Role.INCOMING
        if move.phase == FAILED:
            return Role.CLEAN_INCOMING
    if placed is None:
        return Role.RUN if pinned == me else Role.NONE
    return Role.REMOVE_COPY


def runs_here(body: Mapping[str, Any], fleet: Fleet) -> bool:
    """Whether this agent runs the VM (or stops it here before it moves)."""
    return role(body, fleet) in (Role.RUN, Role.RELEASE)
