"""Which file or pool volume each spec disk becomes, and the names of the volumes a VM owns.

Pure: `plan_disks` works it out without libvirt (for `render` dry runs); storage.py provisions the same
disks for real and hands back the same `ResolvedDisk`s.
"""

from __future__ import annotations

from dataclasses import dataclass

from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.spec import CloudInitSource, Disk, HttpSource, ImageSource, VMSpec, VolumeSource


@dataclass(frozen=True)
class ResolvedDisk:
    """One spec disk as it will be attached: a file (`path`) or a pool volume (`pool`, `volume`)."""

    name: str
    kind: str
    device: str
    bus: str
    format: str | None = None
    path: str | None = None
    pool: str | None = None
    volume: str | None = None
    boot_order: int | None = None
    read_only: bool = False
    owned: bool = False
    backing: tuple[str, str] | None = None
    """(path, format) of the checked base under an overlay the agent made: pinned in the XML, never probed."""


def owned_volume_name(uid: str, disk_name: str) -> str:
    return f"{uid}-{disk_name}.qcow2"


def seed_volume_name(uid: str, disk_name: str) -> str:
    return f"{uid}-{disk_name}-cidata.iso"


def http_cache_name(sha256: str) -> str:
    return f"http-{sha256}"


def resolved(disk: Disk, **source: object) -> ResolvedDisk:
    """`disk` attached from `source` (the `ResolvedDisk` fields that say where its bytes are)."""
    is_seed_cdrom = isinstance(disk.source, CloudInitSource) and disk.bus != "virtio"
    return ResolvedDisk(
        name=disk.name, device="cdrom" if is_seed_cdrom or disk.cdrom else "disk", bus=disk.bus,
        boot_order=disk.boot_order, read_only=disk.read_only, **source,
    )


def _planned_disk(disk: Disk, vm: VMRef, settings: AgentSettings) -> ResolvedDisk:
    source = disk.source
    in_pool = settings.storage_pool_path
    if isinstance(source, VolumeSource):
        return resolved(disk, kind="volume", pool=source.pool, volume=source.name)
    if isinstance(source, ImageSource) and not source.clone:
        return resolved(disk, kind="file", path=source.path, format=_named_format(source))
    if isinstance(source, CloudInitSource):
        return resolved(disk, kind="file", path=str(in_pool / seed_volume_name(vm.uid, disk.name)), format="raw", owned=True)
    backing = None
    if isinstance(source, ImageSource):
        backing = (source.path, _named_format(source))
    elif isinstance(source, HttpSource):
        backing = (str(in_pool / http_cache_name(source.sha256)), "qcow2")
    return resolved(disk, kind="file", path=str(in_pool / owned_volume_name(vm.uid, disk.name)), format="qcow2",
                    owned=True, backing=backing)


def _named_format(source: ImageSource) -> str:
    """The spec's format, else a guess from the name: for dry runs only, which read no file."""
    return source.format or ("qcow2" if source.path.endswith((".qcow2", ".qcow")) else "raw")


def plan_disks(spec: VMSpec, vm: VMRef, settings: AgentSettings) -> list[ResolvedDisk]:
    """The disks `storage.provision_disks` would produce, worked out without libvirt (for `render` dry runs)."""
    return [_planned_disk(disk, vm, settings) for disk in spec.disks]
