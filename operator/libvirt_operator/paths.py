"""Host paths named in a spec, confined to the agent's allowed roots."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path

from libvirt_operator.model import AgentSettings
from libvirt_operator.spec import ImageSource, SpecError, VMSpec, VolumeSource

OWNED_NAME = re.compile(r"^(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")
"""Disks a VM owns are named `<its uid>-<disk>...` (disk_plan.owned_volume_name, seed_volume_name)."""


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
            disk, source=dataclasses.replace(disk.source, path=str(confine(disk.source.path, roots,
                                                                            f"{disk.field_path(i)}.image.path"))),
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


HTTP_CACHE_PREFIX = "http-"
"""Bases downloaded for `http` disks (disk_plan.http_cache_name): shared by VMs, read-only backing only."""


def _agent_file(path: Path, settings: AgentSettings) -> str | None:
    """What the agent keeps at `path` (a resolved path), if it is one of its own files: None otherwise."""
    if any(_inside(path, Path(os.path.realpath(d))) for d in (settings.state_dir, settings.console_log_dir)):
        return "a file of the agent's own (NVRAM, console logs, downloads)"
    if path.parent == Path(os.path.realpath(settings.storage_pool_path)):
        owner = OWNED_NAME.match(path.name)
        if owner:
            return f"a disk a VirtualMachine owns (uid {owner['uid']})"
        if path.name.startswith(HTTP_CACHE_PREFIX):
            return "a shared base the agent downloaded for http disks"
    return None


def refuse_agent_files(spec: VMSpec, settings: AgentSettings) -> None:
    """SpecError if a disk, kernel or initrd is one of the agent's files: a VM's own disks, NVRAM, seed or
    console log, or an http base (allowed only as the read-only base of a clone). `spec` is confined."""
    named: list[tuple[str, str, bool]] = []
    for i, disk in enumerate(spec.disks):
        if isinstance(disk.source, ImageSource):
            named.append((disk.source.path, f"{disk.field_path(i)}.image.path", disk.source.clone))
        elif isinstance(disk.source, VolumeSource) and disk.source.pool == settings.storage_pool:
            named.append((str(settings.storage_pool_path / disk.source.name), f"spec.disks[{i}].volume.name", False))
    if spec.kernel_boot is not None:
        named.append((spec.kernel_boot.kernel, "spec.kernelBoot.kernel", False))
        if spec.kernel_boot.initrd:
            named.append((spec.kernel_boot.initrd, "spec.kernelBoot.initrd", False))
    for path, field, clone in named:
        resolved = Path(os.path.realpath(path))
        what = _agent_file(resolved, settings)
        if what is None or (clone and resolved.name.startswith(HTTP_CACHE_PREFIX)):
            continue
        raise SpecError(field, f"{path} is {what}; a VM may use only images and volumes of its own choosing, "
                        "never the agent's files")
