"""What QEMU may read on a host whose libvirt runs it under the DAC security driver.

libvirt runs QEMU as an unprivileged user (Debian: `libvirt-qemu`) and chowns to it the files a
domain names, restoring the owner when the domain stops, refcounted, for the files it remembers.
Files several VMs share read-only (the base under a clone, an `http` base, a read-only image or
CD-ROM) are neither remembered nor restored: libvirt would leave them owned, and writable, by every
QEMU. The agent therefore tells libvirt not to relabel them (`<seclabel model='dac' relabel='no'/>`)
and checks here, before defining, that QEMU's user can read them as they are.
Nothing here imports libvirt.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from libvirt_operator.spec import SpecError

SHARED_BASE_MODE = 0o644
"""http bases the agent downloads: readable by QEMU's user, writable by the agent alone."""
REACHABLE_DIR_MODE = 0o711
"""Directories the agent makes for files QEMU opens (NVRAM): QEMU's user may pass through, not list."""


@dataclass(frozen=True)
class QemuIdentity:
    uid: int
    gid: int

    def groups(self) -> list[int]:
        """The supplementary groups libvirt gives QEMU (its user's), where this host's passwd names the uid."""
        try:
            return os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid)
        except KeyError:
            return [self.gid]


def identity_from_capabilities(capabilities_xml: str, domain_type: str) -> QemuIdentity | None:
    """The `+uid:+gid` libvirt's DAC driver runs `domain_type` guests as; None without a DAC driver."""
    host = etree.fromstring(capabilities_xml.encode()).find("host")
    labels = host.findall("secmodel[model='dac']/baselabel") if host is not None else []
    label = next((b for b in labels if b.get("type") == domain_type), labels[0] if labels else None)
    if label is None or not label.text:
        return None
    uid, _, gid = label.text.strip().partition(":")
    return QemuIdentity(int(uid.lstrip("+")), int(gid.lstrip("+")))


def _permits(stat: os.stat_result, identity: QemuIdentity, groups: set[int], bit: int) -> bool:
    """POSIX mode bits alone: the owner's bits for the owner, else the group's for a member, else the others'."""
    if stat.st_uid == identity.uid:
        return bool(stat.st_mode & (bit << 6))
    if stat.st_gid in groups:
        return bool(stat.st_mode & (bit << 3))
    return bool(stat.st_mode & bit)


def can_read(identity: QemuIdentity, path: str) -> bool:
    """Whether a process of `identity` can open `path` for reading, by the mode bits of the file and of every
    directory above it (ACLs aside). Worked out, not tried: the agent's container holds no CAP_SETUID."""
    if identity.uid == 0:
        return True
    groups = set(identity.groups())
    resolved = Path(os.path.realpath(path))
    try:
        if not all(_permits(d.stat(), identity, groups, 0o1) for d in resolved.parents):
            return False
        return _permits(resolved.stat(), identity, groups, 0o4)
    except FileNotFoundError:
        return False


def require_readable(identity: QemuIdentity | None, path: str, field: str) -> None:
    """SpecError naming `field` unless QEMU can read the shared file `path` without libvirt relabelling it."""
    if identity is None or can_read(identity, path):
        return
    raise SpecError(field, f"QEMU runs as uid {identity.uid} gid {identity.gid} on this node (libvirt's DAC "
                    f"driver) and cannot read {path}; files VMs share are not relabelled by libvirt, so make it "
                    "readable to that user (e.g. chmod a+r, and a+x on its directories)")


def can_write(identity: QemuIdentity, path: str) -> bool:
    """Whether a process of `identity` may write the file `path`, by its mode bits (ACLs aside)."""
    return identity.uid == 0 or _permits(os.stat(path), identity, set(identity.groups()), 0o2)


def seal_shared_base(path: str, identity: QemuIdentity | None, field: str) -> None:
    """An http base the agent made: owned by the agent, mode 0644 (also one an older agent let libvirt chown);
    SpecError naming `field` if QEMU's user could still write it (an agent without CAP_CHOWN cannot take it back)."""
    stat = os.stat(path)
    with contextlib.suppress(PermissionError):  # the DaemonSet holds no CAP_CHOWN/CAP_FOWNER
        if (stat.st_uid, stat.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(path, os.geteuid(), os.getegid())
        if stat.st_mode & 0o7777 != SHARED_BASE_MODE:
            os.chmod(path, SHARED_BASE_MODE)
    if identity is not None and identity.uid != 0 and can_write(identity, path):
        raise SpecError(field, f"the downloaded base {path} is writable by QEMU's user (uid {identity.uid}; libvirt "
                        "relabelled it for an older agent), so one guest could change what others boot from; delete "
                        "it (virsh vol-delete) and the agent downloads it again")


def make_reachable_dir(path: Path) -> None:
    """Creates `path` and its missing parents with mode 0711 whatever the umask, so QEMU's user reaches files in it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for directory in missing:
        directory.chmod(REACHABLE_DIR_MODE)
