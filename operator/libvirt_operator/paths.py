"""Host paths named in a spec, confined to the agent's allowed roots."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

from libvirt_operator.spec import ImageSource, SpecError, VMSpec, VolumeSource

OWNED_NAME = re.compile(r"^(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")
"""Disks a VM owns are named `<its uid>-<disk>...` (guest.owned_volume_name, seed_volume_name)."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(path: str, roots: Iterable[Path], field: str) -> Path:
    """`path` with symlinks and `..` resolved; SpecError naming `field` if it leaves every root."""
    roots = tuple(roots)
    allowed = ", ".join(str(root) for root in roots)
    if "\x00" in path or not os.path.isabs(path):
        raise SpecError(field, f"{path!r} must be an absolute path under one of the allowed roots {allowed}")
    resolved = Path(os.path.realpath(path))
    if any(_inside(resolved, Path(os.path.realpath(root))) for root in roots):
        return resolved
    shown = path if str(resolved) == path else f"{path} (resolving to {resolved})"
    raise SpecError(field, f"{shown} is outside the allowed roots {allowed}; put images under one of them")


def confine_spec(spec: VMSpec, roots: Iterable[Path]) -> VMSpec:
    """`spec` with every host path (images, kernel, initrd) confined and resolved."""
    roots = tuple(roots)
    disks = tuple(
        dataclasses.replace(
            disk, source=ImageSource(str(confine(disk.source.path, roots, f"spec.disks[{i}].image.path")), disk.source.clone),
        )
        if isinstance(disk.source, ImageSource) else disk
        for i, disk in enumerate(spec.disks)
    )
    kernel_boot = spec.kernel_boot
    if kernel_boot is not None:
        kernel_boot = dataclasses.replace(
            kernel_boot,
            kernel=str(confine(kernel_boot.kernel, roots, "spec.kernelBoot.kernel")),
            initrd=kernel_boot.initrd and str(confine(kernel_boot.initrd, roots, "spec.kernelBoot.initrd")),
        )
    return dataclasses.replace(spec, disks=disks, kernel_boot=kernel_boot)


def refuse_other_vms_disks(spec: VMSpec, uid: str) -> None:
    """SpecError if an image or volume is a disk another VM owns (its clone, empty disk or seed)."""
    for i, disk in enumerate(spec.disks):
        if isinstance(disk.source, ImageSource):
            name, field = Path(disk.source.path).name, f"spec.disks[{i}].image.path"
        elif isinstance(disk.source, VolumeSource):
            name, field = disk.source.name, f"spec.disks[{i}].volume.name"
        else:
            continue
        owner = OWNED_NAME.match(name)
        if owner and owner["uid"] != uid:
            raise SpecError(field, f"{name} is a disk of another VirtualMachine (uid {owner['uid']}); "
                            "use an image or volume of your own")
