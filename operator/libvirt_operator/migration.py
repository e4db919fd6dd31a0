"""A live move between nodes, as the VirtualMachine's `status.migration` records it. Pure.

The move is handed from agent to agent through that block, each step a status patch with a
resourceVersion precondition, so exactly one agent acts on the VM at any time:

- `Scheduled`: the elected agent (placement's decider, which knows every move in flight and so keeps
  the parallel bounds) chose the target; the source keeps running the VM.
- `TargetReady`: the target's agent prepared (checked the bases, fetched http bases, created each owned
  overlay and empty disk fresh); it holds no domain yet.
- `Running`: the source's agent migrates (libvirt peer to peer, copying the owned disks).
- `Succeeded`: the source wrote it together with `status.nodeName` = target, once libvirt said the target
  runs the guest and the source's own disks were deleted. From then the target's agent runs the VM.
- `Failed`: the guest stayed on the source; the target's agent deletes what it prepared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from libvirt_operator.spec import ImageSource, VMSpec, VolumeSource

SCHEDULED, TARGET_READY, RUNNING, SUCCEEDED, FAILED = "Scheduled", "TargetReady", "Running", "Succeeded", "Failed"
ACTIVE_PHASES = (SCHEDULED, TARGET_READY, RUNNING)

LIVE_STATES = ("running", "blocked", "paused")
"""Domain states (status.domain.state) of a guest that can move live."""

NODE_NAME, MIGRATION, DRAIN = "NodeName", "Migration", "Drain"
"""What asked for the move: a `spec.nodeName` edit, a VirtualMachineMigration, a drain of the source."""

TARGET_INCOMPATIBLE, NO_COMPATIBLE_NODE = "TargetIncompatible", "NoCompatibleNode"
"""`status.migration.reason` of a move refused before it began: the node asked for, or every node, cannot give
what the VM needs as it is (its volumes' pools, its host-passthrough CPU). The VM reads Migratable=False."""


@dataclass(frozen=True)
class Move:
    """The VM's `status.migration` block, read."""

    id: str
    trigger: str
    source: str
    target: str
    phase: str
    migration_name: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    message: str = ""
    reason: str | None = None
    failures: int = 0
    downtime_ms: int | None = None
    data_total: int | None = None
    data_processed: int | None = None

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> Move | None:
        block = status.get("migration")
        if not block or not block.get("phase"):
            return None
        return cls(id=block.get("id", ""), trigger=block.get("trigger", ""), source=block.get("source", ""),
                   target=block.get("target", ""), phase=block["phase"], migration_name=block.get("migrationName"),
                   start_time=block.get("startTime"), end_time=block.get("endTime"), message=block.get("message", ""),
                   reason=block.get("reason"), failures=int(block.get("failures", 0)),
                   downtime_ms=block.get("downtimeMilliseconds"),
                   data_total=block.get("dataTotalBytes"), data_processed=block.get("dataProcessedBytes"))

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def to_status(self) -> dict[str, Any]:
        block = {
            "id": self.id, "trigger": self.trigger, "migrationName": self.migration_name, "source": self.source,
            "target": self.target, "phase": self.phase, "startTime": self.start_time, "endTime": self.end_time,
            "message": self.message or None, "reason": self.reason, "failures": self.failures or None,
            "downtimeMilliseconds": self.downtime_ms, "dataTotalBytes": self.data_total,
            "dataProcessedBytes": self.data_processed,
        }
        return {key: value for key, value in block.items() if value is not None}


def active_move(status: Mapping[str, Any]) -> Move | None:
    move = Move.of(status)
    return move if move is not None and move.active else None


def with_move(status: Mapping[str, Any], move: Move) -> dict[str, Any]:
    return {**status, "migration": move.to_status()}


def not_migratable(spec: VMSpec) -> tuple[str, str] | None:
    """(reason, message) when the VM cannot move live whatever the target, else None."""
    if spec.firmware == "uefi":
        return "UEFIVariables", ("spec.firmware is uefi: libvirt 9.0 does not carry the NVRAM (UEFI variables) "
                                 "across a move; stop the VM and move it cold, or use firmware bios")
    for i, disk in enumerate(spec.disks):
        source = disk.source
        if isinstance(source, ImageSource) and not source.clone and not disk.read_only and not disk.cdrom:
            return "LocalWritableImage", (f"spec.disks[{i}].image is written in place (clone: false, not readOnly): "
                                          "its data lives in a file on this node only; use clone: true or readOnly")
    return None


def refused(move: Move | None) -> tuple[str, str] | None:
    """(reason, message) when the VM's last move was refused for what the VM needs of a target, else None."""
    if move is None or move.phase != FAILED or move.reason not in (TARGET_INCOMPATIBLE, NO_COMPATIBLE_NODE):
        return None
    return move.reason, move.message


def volume_pools(spec: VMSpec) -> frozenset[str]:
    """The pools the target must have: the VM's volume disks are used where they are (shared storage)."""
    return frozenset(disk.source.pool for disk in spec.disks if isinstance(disk.source, VolumeSource))


def completion_timeout(per_gib_seconds: float, memory: int, disk_bytes: int) -> float:
    """KubeVirt's rule: so many seconds per GiB of what moves (at least one GiB's worth)."""
    gib = max(1.0, (memory + disk_bytes) / (1 << 30))
    return per_gib_seconds * gib


def migrating_condition(move: Move | None) -> tuple[bool, str, str]:
    """(status, reason, message) of the Migrating condition."""
    if move is None:
        return False, "NotMigrating", ""
    where = f"from {move.source} to {move.target}"
    if move.active:
        progress = ""
        if move.data_total:
            progress = f", {100 * (move.data_processed or 0) // move.data_total}% of {move.data_total} bytes sent"
        return True, move.phase, f"moving {where} ({move.phase}{progress})"
    if move.phase == SUCCEEDED:
        downtime = f", downtime {move.downtime_ms} ms" if move.downtime_ms is not None else ""
        return False, SUCCEEDED, f"moved {where}{downtime}"
    return False, FAILED, f"the move {where} failed: {move.message}; the VM stayed on {move.source}"
