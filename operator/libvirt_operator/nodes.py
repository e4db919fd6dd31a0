"""Which agents are alive, and which one owns a VirtualMachine.

Each agent renews a cluster-scoped LibvirtNode named after its node, with a heartbeat time and
the host's capacity. Ownership is decided from that list alone, the same way by every agent,
so two agents never both act on one VM.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

LEASE_SECONDS = 40


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


def live_node_names(nodes: list[dict[str, Any]], now: datetime.datetime) -> frozenset[str]:
    """The names of LibvirtNodes whose heartbeat is younger than their lease."""
    alive = set()
    for node in nodes:
        status = node.get("status") or {}
        beat = status.get("heartbeatTime")
        lease = status.get("leaseDurationSeconds", LEASE_SECONDS)
        if beat and now - _parse_time(beat) < datetime.timedelta(seconds=lease):
            alive.add(node["metadata"]["name"])
    return frozenset(alive)


@dataclass(frozen=True)
class Placement:
    """What this agent should do with one VM: own it, report it Pending, or leave it alone."""

    owned: bool
    pending_message: str | None = None


def place(spec: dict[str, Any], me: str, live: frozenset[str]) -> Placement:
    """Decides ownership from spec.nodeName and the live agents.

    A VM with a nodeName belongs to that node's agent. One without belongs to the only live
    agent, if there is exactly one. VMs no live agent can take are reported Pending by the
    live agent whose name sorts first, and by no other.
    """
    wanted = spec.get("nodeName")
    everyone = live | {me}
    if wanted == me or (not wanted and everyone == {me}):
        return Placement(owned=True)
    if wanted in everyone or min(everyone) != me:
        return Placement(owned=False)
    if wanted:
        message = (f"spec.nodeName is {wanted!r} but no libvirt-operator agent runs there; "
                   f"live agents: {', '.join(sorted(everyone))}")
    else:
        message = (f"spec.nodeName is unset and {len(everyone)} agents are live; "
                   f"set spec.nodeName to one of: {', '.join(sorted(everyone))}")
    return Placement(owned=False, pending_message=message)
