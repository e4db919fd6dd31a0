"""The volumes behind a VM's disks: clones (qcow2 overlays over checked bases), empty disks, the http
download cache, NoCloud seed ISOs, pool volumes; made through libvirt's storage API, images inspected
with qemu-img (never probed by libvirt), and removed again when a provisioning call fails.

Refusals name the spec field (`spec.disks[i]...`) and say what to do.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import libvirt
import pycdlib
import yaml

from libvirt_operator import allowlist, downloads, images, qemu_access
from libvirt_operator.disk_plan import ResolvedDisk, http_cache_name, owned_volume_name, resolved, seed_volume_name
from libvirt_operator.domain_xml import nvram_path
from libvirt_operator.libvirt_errors import lookup
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.paths import confine_spec, refuse_agent_files
from libvirt_operator.spec import (
    CloudInitSource, Disk, EmptyDiskSource, HttpSource, ImageSource, SpecError, VMSpec, VolumeSource,
)
from libvirt_operator.xmlbuilder import XMLObject, XMLProperty

SYS_CLASS_NET = Path("/sys/class/net")
MIN_SIMULATED_SIZE = 1 << 20
"""The virtual size given to overlays over the test driver's http volumes, which hold no bytes."""
UserDataLookup = Callable[[str], "str | bytes | None"]


class Volume(XMLObject):
    """A storage volume's XML, as `virStoragePool.createXML` takes it and `XMLDesc` gives it back."""

    tag = "volume"
    name = XMLProperty("name")
    capacity = XMLProperty("capacity", int)
    capacity_unit = XMLProperty("capacity/@unit")
    format = XMLProperty("target/format/@type")
    backing_path = XMLProperty("backingStore/path")
    backing_format = XMLProperty("backingStore/format/@type")


def _volume_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None) -> str:
    backing_path, backing_format = backing or (None, None)
    return Volume(name=name, capacity=capacity, capacity_unit="bytes", format=fmt, backing_path=backing_path,
                  backing_format=backing_format).to_xml()


def seed_iso(user_data: str | bytes, meta_data: str, network_data: str | None) -> bytes:
    """A NoCloud seed: an ISO9660 volume labelled `cidata` holding user-data, meta-data, network-config."""
    files = {"user-data": user_data, "meta-data": meta_data}
    if network_data is not None:
        files["network-config"] = network_data
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text if isinstance(text, bytes) else text.encode()
        iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def _upload(conn: libvirt.virConnect, volume: libvirt.virStorageVol, data: BinaryIO, length: int) -> None:
    if conn.getType() == "TEST":
        return  # libvirt's test driver simulates pools: its volumes have a size but hold no bytes
    stream = conn.newStream(0)
    volume.upload(stream, 0, length, 0)
    try:
        stream.sendAll(lambda _stream, nbytes, source: source.read(nbytes), data)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise


def _holds_file(volume: libvirt.virStorageVol) -> bool:
    """Whether a volume has a file to inspect; the test driver's volumes have a size but no bytes."""
    return Path(volume.path()).exists()


@dataclass
class Provisioner:
    """One provisioning call: what it may touch, and the volumes it created (deleted if it fails)."""

    conn: libvirt.virConnect
    vm: VMRef
    settings: AgentSettings
    user_data_lookup: UserDataLookup
    domain_active: bool = False
    """A running domain holds its owned disks open: they are replaced or grown at its next boot instead."""
    created: list[libvirt.virStorageVol] = field(default_factory=list)
    domain_type: str = "qemu"
    _pool: libvirt.virStoragePool | None = None

    @functools.cached_property
    def qemu(self) -> qemu_access.QemuIdentity | None:
        return qemu_access.identity_from_capabilities(self.conn.getCapabilities(), self.domain_type)

    def require_qemu_reads(self, path: str, field_path: str) -> None:
        """A file VMs share, which libvirt leaves as it is: QEMU's user must be able to read it."""
        qemu_access.require_readable(self.qemu, path, field_path)

    def pool(self, field_path: str) -> libvirt.virStoragePool:
        if self._pool is None:
            name = self.settings.storage_pool
            pool = lookup(lambda: self.conn.storagePoolLookupByName(name), libvirt.VIR_ERR_NO_STORAGE_POOL)
            if pool is None or not pool.isActive():
                raise SpecError(field_path, f"storage pool {name!r} (agent setting storage_pool) is missing or "
                                f"inactive on node {self.settings.node_name}; define and start it")
            self._pool = pool
        return self._pool

    def existing(self, name: str, field_path: str) -> libvirt.virStorageVol | None:
        pool = self.pool(field_path)
        return lookup(lambda: pool.storageVolLookupByName(name), libvirt.VIR_ERR_NO_STORAGE_VOL)

    def create(self, xml: str, field_path: str) -> libvirt.virStorageVol:
        volume = self.pool(field_path).createXML(xml, 0)
        self.created.append(volume)
        return volume

    @contextlib.contextmanager
    def rolling_back(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            for volume in reversed(self.created):
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
            raise

    def owned_volume(self, name: str, field_path: str) -> tuple[libvirt.virStorageVol | None, images.ImageInfo | None]:
        """The owned volume `name` if it exists, and what qemu-img reads in it as qcow2 (None when it holds no
        file: the test driver's)."""
        volume = self.existing(name, field_path)
        if volume is None or not _holds_file(volume):
            return volume, None
        return volume, images.inspect(volume.path(), "qcow2", field_path)

    def overlay(self, disk: Disk, field_path: str, base: images.ImageInfo) -> ResolvedDisk:
        """The VM's own qcow2 over `base` (checked): a new one when the base changed, at the next boot (a
        running guest holds the old one)."""
        name = owned_volume_name(self.vm.uid, disk.name)
        volume, info = self.owned_volume(name, field_path)
        stale = info is not None and not images.overlay_matches(info, base.path, base.format)
        if volume is not None and stale and not self.domain_active:
            volume.delete(0)
            volume = None
        if volume is None:
            volume = self.create(_volume_xml(name, base.virtual_size, "qcow2", (base.path, base.format)), field_path)
        return resolved(disk, kind="file", path=volume.path(), format="qcow2", owned=True,
                         backing=(base.path, base.format))

    def image(self, disk: Disk, field_path: str) -> ResolvedDisk:
        source = disk.source
        info = images.checked_image(source.path, source.format, f"{field_path}.image.path")
        if source.clone or disk.read_only:
            self.require_qemu_reads(source.path, f"{field_path}.image.path")
        if source.clone:
            return self.overlay(disk, field_path, info)
        return resolved(disk, kind="file", path=source.path, format=info.format)

    def empty_disk(self, disk: Disk, field_path: str) -> ResolvedDisk:
        """A new qcow2 of the spec's size; one that is smaller grows at the next boot, never shrinks."""
        name, size = owned_volume_name(self.vm.uid, disk.name), disk.source.size
        volume, info = self.owned_volume(name, field_path)
        if volume is None:
            volume = self.create(_volume_xml(name, size, "qcow2"), field_path)
        elif info is not None:
            images.refuse_external_files(info, field_path)
            if info.virtual_size > size:
                raise SpecError(f"{field_path}.emptyDisk.size", f"the disk already holds {info.virtual_size} bytes, "
                                f"more than {size}; a disk never shrinks: give at least its size")
            if info.virtual_size < size and not self.domain_active:
                volume.resize(size, 0)
        return resolved(disk, kind="file", path=volume.path(), format="qcow2", owned=True)

    def user_data(self, source: CloudInitSource, field_path: str) -> str | bytes:
        if source.user_data is not None:
            return source.user_data
        user_data = self.user_data_lookup(source.user_data_secret)
        if user_data is None:
            raise SpecError(f"{field_path}.cloudInit.userDataSecretRef.name", f"Secret {source.user_data_secret} not "
                            f"found in namespace {self.vm.namespace} (key `userdata`); create it or fix the name")
        return user_data

    def cloud_init(self, disk: Disk, field_path: str) -> ResolvedDisk:
        """A fresh seed every time: the user data (a Secret's, say) may have changed."""
        meta_data = yaml.safe_dump({"instance-id": self.vm.uid, "local-hostname": self.vm.name})
        iso = seed_iso(self.user_data(disk.source, field_path), meta_data, disk.source.network_data)
        name = seed_volume_name(self.vm.uid, disk.name)
        stale = self.existing(name, field_path)
        if stale is not None:
            stale.delete(0)
        volume = self.create(_volume_xml(name, len(iso), "raw"), field_path)
        _upload(self.conn, volume, io.BytesIO(iso), len(iso))
        return resolved(disk, kind="file", path=volume.path(), format="raw", owned=True)

    def http(self, disk: Disk, field_path: str) -> ResolvedDisk:
        source = disk.source
        name = http_cache_name(source.sha256)
        cached = self.existing(name, field_path) or self.fetch(source, name, field_path)
        if not _holds_file(cached):
            return self.overlay(disk, field_path, images.ImageInfo(cached.path(), "raw", MIN_SIMULATED_SIZE,
                                                                   None, None, None))
        qemu_access.seal_shared_base(cached.path(), self.qemu, f"{field_path}.http.url")
        self.require_qemu_reads(cached.path(), f"{field_path}.http.url")
        return self.overlay(disk, field_path, images.checked_image(cached.path(), None, f"{field_path}.http.url"))

    def fetch(self, source: HttpSource, name: str, field_path: str) -> libvirt.virStorageVol:
        """Downloads `source` to a temporary file, checks it (sha256, then as an image), and only then gives it
        the cache name `name` in the pool, by a rename: a crash or another VM never sees a partial base."""
        settings = self.settings
        part = downloads.download(source.url, source.sha256, settings.state_dir / "downloads",
                                  settings.download_policy, field_path)
        try:
            if self.conn.getType() == "TEST":  # its pools hold no files
                return self.create(_volume_xml(name, part.stat().st_size, "raw"), field_path)
            images.checked_image(str(part), None, f"{field_path}.http.url")
            staged = settings.storage_pool_path / f".{part.name}"
            shutil.move(part, staged)  # a copy when the pool is on another file system, then the atomic rename
            os.replace(staged, settings.storage_pool_path / name)
        finally:
            part.unlink(missing_ok=True)
        refresh_pool(self.pool(field_path))
        return self.existing(name, field_path)

    def volume(self, disk: Disk, field_path: str) -> ResolvedDisk:
        source = disk.source
        pool = lookup(lambda: self.conn.storagePoolLookupByName(source.pool), libvirt.VIR_ERR_NO_STORAGE_POOL)
        if pool is None:
            raise SpecError(f"{field_path}.volume.pool", f"storage pool {source.pool!r} not found on node "
                            f"{self.settings.node_name}; name an existing pool")
        volume = lookup(lambda: pool.storageVolLookupByName(source.name), libvirt.VIR_ERR_NO_STORAGE_VOL)
        if volume is None:
            raise SpecError(f"{field_path}.volume.name", f"volume {source.name!r} not found in pool {source.pool!r}; "
                            "create it first or name an existing one")
        if not _holds_file(volume):
            return resolved(disk, kind="volume", pool=source.pool, volume=source.name,
                            format=Volume.from_xml(volume.XMLDesc(0)).format)
        info = images.checked_image(volume.path(), None, f"{field_path}.volume.name")
        if disk.read_only:
            self.require_qemu_reads(volume.path(), f"{field_path}.volume.name")
        return resolved(disk, kind="volume", pool=source.pool, volume=source.name, format=info.format)

    def check_interfaces(self, spec: VMSpec) -> None:
        for i, interface in enumerate(spec.interfaces):
            field_path = f"spec.interfaces[{i}].{interface.kind}"
            where = f"on node {self.settings.node_name}"
            if interface.kind == "network" and lookup(
                lambda: self.conn.networkLookupByName(interface.source), libvirt.VIR_ERR_NO_NETWORK,
            ) is None:
                raise SpecError(field_path, f"libvirt network {interface.source!r} not found {where}; "
                                "create it (virsh net-define) or name an existing one")
            if interface.kind == "bridge" and not (SYS_CLASS_NET / interface.source).exists():
                raise SpecError(field_path, f"bridge {interface.source!r} not found {where}; create it or name another")

    def provision(self, spec: VMSpec) -> list[ResolvedDisk]:
        """The volumes behind `spec`'s disks (its paths confined), once it names nothing the agent forbids."""
        self.domain_type = spec.domain_type or self.settings.domain_type
        refuse_agent_files(spec, self.settings)
        allowlist.refuse_unlisted(spec, self.settings)
        self.check_interfaces(spec)
        by_source = {
            ImageSource: self.image, EmptyDiskSource: self.empty_disk, CloudInitSource: self.cloud_init,
            VolumeSource: self.volume, HttpSource: self.http,
        }
        return [by_source[type(disk.source)](disk, disk.field_path(i)) for i, disk in enumerate(spec.disks)]


def provision_disks(
    conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings, *, user_data_lookup: UserDataLookup,
) -> list[ResolvedDisk]:
    """Creates (or reuses) the volumes `spec`'s disks need; on failure deletes what this call created."""
    provisioner = Provisioner(conn, vm, settings, user_data_lookup)
    with provisioner.rolling_back():
        return provisioner.provision(confine_spec(spec, settings.allowed_roots))


POOL_BUSY_RETRIES = 50


def refresh_pool(pool: libvirt.virStoragePool) -> None:
    """Rescans the pool's directory; libvirt refuses while a volume of it is being built or uploaded (another VM's
    disk), for a moment: tried again."""
    for attempt in range(POOL_BUSY_RETRIES):
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as error:
            busy = error.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR and "asynchronous jobs" in str(error)
            if not busy or attempt == POOL_BUSY_RETRIES - 1:  # libvirt gives this refusal no code of its own
                raise
            time.sleep(0.1)


def delete_owned_volumes(conn: libvirt.virConnect, uid: str, settings: AgentSettings) -> list[str]:
    """Deletes the VM's own volumes (named `{uid}-...`) and NVRAM file; returns the deleted volume names."""
    if not uid:
        raise ValueError("an empty uid would match other VMs' volumes")
    nvram_path(uid, settings).unlink(missing_ok=True)
    pool = lookup(lambda: conn.storagePoolLookupByName(settings.storage_pool), libvirt.VIR_ERR_NO_STORAGE_POOL)
    if pool is None or not pool.isActive():
        return []
    refresh_pool(pool)
    deleted = []
    for volume in pool.listAllVolumes(0):
        if volume.name().startswith(f"{uid}-"):
            volume.delete(0)
            deleted.append(volume.name())
    return deleted

