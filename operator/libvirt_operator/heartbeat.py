"""This node in the fleet: its LibvirtNode's heartbeat (health, capacity, what it offers, the VMs it
runs), the fleet's liveness as this agent sees it, and, while it holds the placement Lease, the
NotReady mark on the nodes that stopped renewing.

The heartbeat never asks libvirt (it sends the capacity last read), so a hung libvirtd cannot stop it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from libvirt_operator import allowlist, nodes, placement
from libvirt_operator.domains import DomainCache
from libvirt_operator.election import Election
from libvirt_operator.host import Host, HostCapacity, HostUnavailable
from libvirt_operator.kube import KubeClient, now_iso
from libvirt_operator.migration import LIVE_STATES, TARGET_INCOMPATIBLE
from libvirt_operator.model import AgentSettings, Tuning
from libvirt_operator.vm_status import condition_of

log = logging.getLogger(__name__)

COUNTS_SECONDS = 2.0
"""How soon a change of the VMs a node runs reaches its LibvirtNode."""

Counts = tuple[int, tuple[int, int]]


@dataclass
class NodeHeartbeat:
    settings: AgentSettings
    kube: KubeClient
    host: Host
    cache: DomainCache
    tuning: Tuning
    fleet: nodes.Fleet
    ledger: placement.Ledger
    election: Election
    bodies: Mapping[str, Mapping[str, Any]]
    on_fleet_change: Callable[[], Awaitable[None]]
    """Called when the fleet or this agent's leadership changed: the VMs are looked at again."""
    capacity: HostCapacity | None = field(default=None, init=False)
    """The host's capacity as last read; the heartbeat sends it without asking libvirt."""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _published_counts: Counts | None = field(default=None, init=False)

    async def refresh_capacity(self) -> None:
        first = self.capacity is None
        try:
            self.capacity = await self.host.capacity(self.settings.storage_pool)
        except HostUnavailable as error:
            log.info("capacity not read: %s", error)
            return
        if first:  # the node offers nothing to placement until its capacity is published
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Announces this agent, its libvirt's health and the capacity last read; refreshes the list of live
        agents and renews (or tries to take) the placement Lease."""
        async with self._lock:
            await self._announce_node()
            was_leading = self.election.leading
            leading = await self.election.renew()
            if await self.refresh_fleet() or leading != was_leading:
                await self.on_fleet_change()
            if leading:
                await self._mark_silent_nodes()

    async def publish_changed_counts(self) -> None:
        """A heartbeat as soon as the counts changed, so `kubectl get libvirtnodes` follows the VMs (none while
        nothing changes)."""
        if self._published_counts is not None and self._counts() != self._published_counts:
            async with self._lock:
                await self._announce_node()

    async def refresh_fleet(self) -> bool:
        """Re-lists the LibvirtNodes (liveness judged on this agent's clock); True if the fleet changed."""
        return self.fleet.observe(await self.kube.list_nodes())

    async def _announce_node(self) -> None:
        capacity, health = self.capacity, self.host.health.current
        me = self.fleet.nodes.get(self.settings.node_name)
        counts = self._counts()
        status: dict[str, Any] = {
            "heartbeatTime": now_iso(), "leaseDurationSeconds": self.tuning.lease_seconds,
            "state": "NotReady" if not health.answering else "Cordoned" if me is not None and me.cordoned else "Ready",
            "libvirtUri": self.settings.libvirt_uri, "connected": self.host.connected, "libvirt": health.to_status(),
            "vms": counts[0],
            "foreignDomains": self.cache.foreign_domains,
        }
        if migration := migration_status(self.settings):
            status["migration"] = migration
        status["drain"] = drain_status(me, self.bodies.values()) if me is not None and me.spec.get("drain") else None
        if capacity is not None:
            status["hypervisor"] = {
                "type": capacity.hypervisor_type, "version": capacity.hypervisor_version,
                "libvirtVersion": capacity.libvirt_version, "hostname": capacity.hostname,
                "cpuModel": capacity.cpu_model,
            }
            status["capacity"] = {
                "vcpus": capacity.vcpus, "vcpusUsed": capacity.vcpus_used,
                "memory": str(capacity.memory_bytes), "memoryUsed": str(capacity.memory_used_bytes),
                "storagePoolFree": None if capacity.storage_pool_free_bytes is None
                else str(capacity.storage_pool_free_bytes),
            }
            status.update(self._offer(capacity))
        await self.kube.announce_node(status)
        self._published_counts = counts

    def _counts(self) -> Counts:
        """The VMs this agent runs, and what the VMs placed here take: what LibvirtNode readers count."""
        runs = sum(1 for body in self.bodies.values() if nodes.runs_here(body, self.fleet))
        return runs, self.ledger.taken(self.settings.node_name)

    def _offer(self, capacity: HostCapacity) -> dict[str, Any]:
        """What this node offers to placement: room (after the admin's ratios) and the names VMs may use."""
        policy, settings = self.settings.placement, self.settings
        published = placement.published(
            policy.capacity_vcpus or capacity.vcpus, policy.capacity_memory or capacity.memory_bytes,
            policy.cpu_allocation_ratio, policy.memory_allocation_ratio, policy.vm_memory_overhead,
            self.ledger.taken(settings.node_name))
        published["offers"] = {
            "domainTypes": sorted({*capacity.domain_types, settings.domain_type}),
            "networks": sorted(n for n in capacity.networks if allowlist.is_allowed(n, settings.allowed_networks)),
            "bridges": list(settings.allowed_bridges),
            "pools": sorted(p for p in capacity.pools if allowlist.is_allowed(p, settings.allowed_pools)),
            "userNetworking": settings.allow_user_networking,
        }
        return published

    async def _mark_silent_nodes(self) -> None:
        """NotReady on the LibvirtNodes whose agents stopped renewing (they cannot say it themselves)."""
        for name, view in list(self.fleet.nodes.items()):
            if not view.live and view.status.get("state") != "NotReady":
                try:
                    await self.kube.patch_node_status(name, {"state": "NotReady"})
                except ApiException as error:
                    log.info("could not mark LibvirtNode %s NotReady: %s", name, error)


def migration_status(settings: AgentSettings) -> dict[str, str]:
    """`LibvirtNode.status.migration`: how other hosts reach this one for a move; the flags given, else empty."""
    given = {"uri": settings.migration_uri, "address": settings.migration_address}
    return {key: value for key, value in given.items() if value}


def drain_status(node: nodes.NodeView, bodies: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`LibvirtNode.status.drain`: the VMs still placed on the draining node, and those that keep it from emptying."""
    here = [body for body in bodies if (body.get("status") or {}).get("nodeName") == node.name]
    blocked = [{"vm": f"{body['metadata']['namespace']}/{body['metadata']['name']}", "reason": reason}
               for body in here if (reason := _drain_blocker(body, node.name)) is not None]
    state = "Drained" if not here else "Blocked" if len(blocked) == len(here) else "Draining"
    return {"state": state, "remaining": len(here), "blockedBy": blocked}


def _drain_blocker(body: Mapping[str, Any], node: str) -> str | None:
    status = body.get("status") or {}
    if (body.get("spec") or {}).get("nodeName") == node:
        return f"pinned: spec.nodeName is {node}"
    unmovable = condition_of(status, "Migratable")
    if unmovable.get("status") == "False" and unmovable.get("reason") != TARGET_INCOMPATIBLE:
        return unmovable.get("message", "not migratable")
    if (status.get("domain") or {}).get("state") not in LIVE_STATES:
        return "not running: only a running VM moves live"
    return None
