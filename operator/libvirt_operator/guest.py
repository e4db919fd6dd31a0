"""Guest: a VirtualMachine spec as libvirt domain XML, the disks behind it, and one domain's lifecycle.

Rendering (`render`, `plan_disks`, `parse_domain`, `merge`) is pure. Everything that calls
libvirt takes a `virConnect` as its first argument, so the agent runs it off the event loop
with `await host.call(fn, ...)`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import libvirt
import pycdlib
import yaml
from lxml import etree

from libvirt_operator import allowlist, downloads, images, qemu_access
from libvirt_operator.metadata import (
    DISK_ALIAS_PREFIX, INTERFACE_ALIAS_PREFIX, OWNER_TAG, interfaces_from_domain, owner_element, owner_from_domain, parse,
    spec_name,
)
from libvirt_operator.model import AgentSettings, InterfaceFacts, OwnerMetadata, VMRef
from libvirt_operator.paths import confine_spec, refuse_agent_files
from libvirt_operator.spec import (
    CloudInitSource, Disk, EmptyDiskSource, HttpSource, ImageSource, Interface, SpecError, VMSpec, VolumeSource,
)

SYS_CLASS_NET = Path("/sys/class/net")
MIN_SIMULATED_SIZE = 1 << 20
"""The virtual size given to overlays over the test driver's http volumes, which hold no bytes."""
TARGET_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd"}
UserDataLookup = Callable[[str], "str | bytes | None"]
LIBVIRT_ERROR = libvirt.libvirtError
"""What a failed libvirt call raises, for callers that must not import libvirt."""


# --- Disks as the provisioning step resolved them -------------------------------------------------


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


def nvram_path(uid: str, settings: AgentSettings) -> Path:
    return settings.state_dir / "nvram" / f"{uid}_VARS.fd"


def console_log_path(vm: VMRef, settings: AgentSettings) -> Path:
    return settings.console_log_dir / f"{vm.domain_name}.log"


def stable_mac(uid: str, interface_name: str) -> str:
    """A locally administered MAC (QEMU's 52:54:00 prefix) that stays the same for one VM's interface."""
    digest = hashlib.sha256(f"{uid}/{interface_name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{octet:02x}" for octet in digest[:3])


def _resolved(disk: Disk, **source: object) -> ResolvedDisk:
    is_seed_cdrom = isinstance(disk.source, CloudInitSource) and disk.bus != "virtio"
    return ResolvedDisk(
        name=disk.name, device="cdrom" if is_seed_cdrom or disk.cdrom else "disk", bus=disk.bus,
        boot_order=disk.boot_order, read_only=disk.read_only, **source,
    )


def _planned_disk(disk: Disk, vm: VMRef, settings: AgentSettings) -> ResolvedDisk:
    source = disk.source
    in_pool = settings.storage_pool_path
    if isinstance(source, VolumeSource):
        return _resolved(disk, kind="volume", pool=source.pool, volume=source.name)
    if isinstance(source, ImageSource) and not source.clone:
        return _resolved(disk, kind="file", path=source.path, format=_named_format(source))
    if isinstance(source, CloudInitSource):
        return _resolved(disk, kind="file", path=str(in_pool / seed_volume_name(vm.uid, disk.name)), format="raw", owned=True)
    backing = None
    if isinstance(source, ImageSource):
        backing = (source.path, _named_format(source))
    elif isinstance(source, HttpSource):
        backing = (str(in_pool / http_cache_name(source.sha256)), "qcow2")
    return _resolved(disk, kind="file", path=str(in_pool / owned_volume_name(vm.uid, disk.name)), format="qcow2",
                     owned=True, backing=backing)


def _named_format(source: ImageSource) -> str:
    """The spec's format, else a guess from the name: for dry runs only, which read no file."""
    return source.format or ("qcow2" if source.path.endswith((".qcow2", ".qcow")) else "raw")


def plan_disks(spec: VMSpec, vm: VMRef, settings: AgentSettings) -> list[ResolvedDisk]:
    """The disks `provision_disks` would produce, worked out without libvirt (for `render` dry runs)."""
    return [_planned_disk(disk, vm, settings) for disk in spec.disks]


# --- Rendering ------------------------------------------------------------------------------------


def _e(tag: str, *children: etree._Element | None, text: str | None = None, **attrs: str | None) -> etree._Element:
    """An element with the given attributes and children; None attributes and children are left out."""
    element = etree.Element(tag, {key: value for key, value in attrs.items() if value is not None})
    element.text = text
    element.extend(child for child in children if child is not None)
    return element


def _cpu(spec: VMSpec, domain_type: str) -> etree._Element:
    cpu = spec.cpu
    mode = cpu.mode or ("host-model" if domain_type == "kvm" else None)
    return _e(
        "cpu",
        _e("model", text=cpu.model, fallback="allow") if cpu.model else None,
        _e("topology", sockets=str(cpu.sockets), dies="1", cores=str(cpu.cores), threads=str(cpu.threads)),
        mode=mode, match="exact" if mode == "custom" else None,
    )


def _cputune(spec: VMSpec, settings: AgentSettings) -> etree._Element | None:
    """The host's vCPU scheduling policy for this guest; nothing for libvirt's default."""
    if settings.guest_vcpu_scheduler == "normal":
        return None
    vcpus = spec.cpu.vcpus
    return _e("cputune", _e("vcpusched", vcpus="0" if vcpus == 1 else f"0-{vcpus - 1}",
                            scheduler=settings.guest_vcpu_scheduler))


def _os(spec: VMSpec, vm: VMRef, settings: AgentSettings) -> etree._Element:
    """UEFI through libvirt's firmware autoselection (the host's firmware descriptors say where OVMF is),
    without Secure Boot: the guest's own kernels, and direct kernel boot, are not signed for it."""
    uefi = spec.firmware == "uefi"
    kernel = spec.kernel_boot
    no_secure_boot = _e("firmware", _e("feature", enabled="no", name="secure-boot"),
                        _e("feature", enabled="no", name="enrolled-keys"))
    return _e(
        "os",
        _e("type", text="hvm", arch="x86_64", machine="q35"),
        no_secure_boot if uefi else None,
        _e("nvram", text=str(nvram_path(vm.uid, settings))) if uefi else None,
        _e("kernel", text=kernel.kernel) if kernel else None,
        _e("initrd", text=kernel.initrd) if kernel and kernel.initrd else None,
        _e("cmdline", text=kernel.cmdline) if kernel and kernel.cmdline else None,
        firmware="efi" if uefi else None,
    )


def _clock() -> etree._Element:
    return _e(
        "clock",
        _e("timer", name="rtc", tickpolicy="catchup"),
        _e("timer", name="pit", tickpolicy="delay"),
        _e("timer", name="hpet", present="no"),
        offset="utc",
    )


def _alias(prefix: str, name: str) -> etree._Element:
    return _e("alias", name=f"{prefix}{name}")


def _target_name(prefix: str, index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return prefix + letters


def _not_relabelled() -> etree._Element:
    """For a file VMs share read-only: libvirt's DAC driver would chown it to QEMU's user for good (see qemu_access)."""
    return _e("seclabel", model="dac", relabel="no")


def _backing_store(backing: tuple[str, str] | None) -> etree._Element | None:
    """The whole chain under an overlay, ending in an empty `<backingStore/>`: libvirt probes nothing."""
    if backing is None:
        return None
    path, fmt = backing
    return _e("backingStore", _e("format", type=fmt), _e("source", _not_relabelled(), file=path), _e("backingStore"),
              type="file")


def _disk(disk: ResolvedDisk, target: str) -> etree._Element:
    if disk.kind == "file":
        shared = disk.read_only and not disk.owned
        source = _e("source", _not_relabelled() if shared else None, file=disk.path)
    else:
        source = _e("source", pool=disk.pool, volume=disk.volume)
    return _e(
        "disk",
        _e("driver", name="qemu", type=disk.format),
        source,
        _backing_store(disk.backing),
        _e("target", dev=target, bus=disk.bus),
        _e("boot", order=str(disk.boot_order)) if disk.boot_order else None,
        _e("readonly") if disk.read_only else None,
        _alias(DISK_ALIAS_PREFIX, disk.name),
        type=disk.kind, device=disk.device,
    )


def _disks(disks: Sequence[ResolvedDisk]) -> list[etree._Element]:
    used = {prefix: 0 for prefix in TARGET_PREFIX.values()}
    elements = []
    for disk in disks:
        prefix = TARGET_PREFIX[disk.bus]
        elements.append(_disk(disk, _target_name(prefix, used[prefix])))
        used[prefix] += 1
    return elements


def _interface(interface: Interface, vm: VMRef) -> etree._Element:
    source = _e("source", **{interface.kind: interface.source}) if interface.source else None
    return _e(
        "interface",
        _e("mac", address=interface.mac_address or stable_mac(vm.uid, interface.name)),
        source,
        _e("model", type=interface.model),
        _alias(INTERFACE_ALIAS_PREFIX, interface.name),
        type=interface.kind,
    )


def _serial(spec: VMSpec, vm: VMRef, settings: AgentSettings) -> list[etree._Element]:
    log = _e("log", file=str(console_log_path(vm, settings)), append="on") if spec.console.log else None
    return [
        _e("serial", _e("target", port="0"), log, type="pty"),
        _e("console", _e("target", type="serial", port="0"), type="pty"),
    ]


def _devices(spec: VMSpec, vm: VMRef, settings: AgentSettings, disks: Sequence[ResolvedDisk]) -> etree._Element:
    scsi = any(disk.bus == "scsi" for disk in disks)
    return _e(
        "devices",
        *_disks(disks),
        _e("controller", type="scsi", index="0", model="virtio-scsi") if scsi else None,
        *(_interface(interface, vm) for interface in spec.interfaces),
        *_serial(spec, vm, settings),
        _e("rng", _e("backend", text="/dev/urandom", model="random"), model="virtio"),
        _e("memballoon", model="virtio"),
    )


def _to_xml(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def render(
    spec: VMSpec, vm: VMRef, settings: AgentSettings, *, generation: int, spec_hash: str, disks: Sequence[ResolvedDisk],
) -> str:
    """The domain XML for `spec`; the same arguments always give the same bytes."""
    owner = OwnerMetadata(uid=vm.uid, namespace=vm.namespace, name=vm.name, generation=generation, spec_hash=spec_hash,
                          cluster=settings.cluster_id)
    domain_type = spec.domain_type or settings.domain_type
    memory_kib = str(-(-spec.memory // 1024))
    root = _e(
        "domain",
        _e("name", text=vm.domain_name),
        _e("uuid", text=vm.uid),
        _e("metadata", owner_element(owner)),
        _e("memory", text=memory_kib, unit="KiB"),
        _e("currentMemory", text=memory_kib, unit="KiB"),
        _e("vcpu", text=str(spec.cpu.vcpus), placement="static"),
        _cpu(spec, domain_type),
        _cputune(spec, settings),
        _os(spec, vm, settings),
        _e("features", _e("acpi"), _e("apic")),
        _clock(),
        _e("on_poweroff", text="destroy"),
        _e("on_reboot", text="restart"),
        _e("on_crash", text="destroy"),
        _devices(spec, vm, settings, disks),
        type=domain_type,
    )
    return _to_xml(root)


# --- Reading a live definition back, and rewriting it ------------------------------------------


@dataclass(frozen=True)
class DiskFacts:
    """One `<disk>` of a domain; `name` is the spec's disk name (from the user alias) or the target."""

    name: str
    target: str
    bus: str | None
    device: str
    format: str | None
    path: str | None
    pool: str | None
    volume: str | None
    read_only: bool


@dataclass(frozen=True)
class DomainFacts:
    name: str
    uuid: str
    domain_type: str
    owner: OwnerMetadata | None
    memory_kib: int
    vcpus: int
    disks: tuple[DiskFacts, ...]
    interfaces: tuple[InterfaceFacts, ...]

    @property
    def mac_addresses(self) -> tuple[str, ...]:
        return tuple(interface.mac_address for interface in self.interfaces)


def _disk_facts(disk: etree._Element) -> DiskFacts:
    target = disk.find("target")
    source = disk.find("source")
    driver = disk.find("driver")
    dev = target.get("dev", "") if target is not None else ""
    attr = (lambda name: source.get(name)) if source is not None else (lambda name: None)
    return DiskFacts(
        name=spec_name(disk, DISK_ALIAS_PREFIX) or dev, target=dev, bus=target.get("bus") if target is not None else None,
        device=disk.get("device", "disk"), format=driver.get("type") if driver is not None else None,
        path=attr("file") or attr("dev"), pool=attr("pool"), volume=attr("volume"),
        read_only=disk.find("readonly") is not None,
    )


def parse_domain(xml: str) -> DomainFacts:
    """The facts the reconciler needs from a domain's XML."""
    root = parse(xml)
    memory = root.find("memory")
    return DomainFacts(
        name=root.findtext("name", ""),
        uuid=root.findtext("uuid", ""),
        domain_type=root.get("type", ""),
        owner=owner_from_domain(root),
        memory_kib=_kib(memory) if memory is not None else 0,
        vcpus=int(root.findtext("vcpu", "0")),
        disks=tuple(_disk_facts(disk) for disk in root.iterfind("devices/disk")),
        interfaces=interfaces_from_domain(root),
    )


_UNITS_IN_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "KiB": 1, "M": 1024, "MiB": 1024, "G": 1024**2, "GiB": 1024**2}


def _kib(memory: etree._Element) -> int:
    return int(int(memory.text or "0") * _UNITS_IN_KIB.get(memory.get("unit", "KiB"), 1))


MODELLED_DEVICES = ("disk", "interface", "serial", "console", "rng", "memballoon")
"""Devices `render` owns: live ones the rendering no longer has are dropped. Others (controllers,
inputs, channels, ...) are kept unless the rendering has the same one."""


def _device_key(device: etree._Element) -> tuple[str | None, ...]:
    """What identifies a device across a rewrite; a disk that changes bus is a new device."""
    target = device.find("target")
    target_attr = (lambda name: target.get(name)) if target is not None else (lambda name: None)
    if device.tag == "disk":
        return ("disk", spec_name(device, DISK_ALIAS_PREFIX) or target_attr("dev"), target_attr("bus"))
    if device.tag == "interface":
        mac = device.find("mac")
        return ("interface", spec_name(device, INTERFACE_ALIAS_PREFIX) or (mac.get("address") if mac is not None else None))
    if device.tag == "controller":
        return ("controller", device.get("type"), device.get("index"))
    if device.tag in ("serial", "console"):
        return (device.tag, target_attr("port"))
    return (device.tag,)


def _carry_devices(live: etree._Element, rendered: etree._Element) -> None:
    """Moves into `rendered` the live devices it does not model, and live addresses of devices it keeps."""
    wanted = {_device_key(device): device for device in rendered}
    for device in list(live):
        counterpart = wanted.get(_device_key(device))
        address = device.find("address")
        if counterpart is not None and address is not None and counterpart.find("address") is None:
            counterpart.append(address)
        elif counterpart is None and device.tag not in MODELLED_DEVICES:
            rendered.append(device)


def merge(live_xml: str, rendered_xml: str) -> str:
    """`rendered_xml`, plus what of `live_xml` the operator does not model.

    Carried over: top-level elements the rendering does not have (`<seclabel>`, `<resource>`, a
    `<cputune>` when the agent renders none, ...), other programs' metadata, unmodelled devices (controllers, channels, ...) and the addresses libvirt gave
    devices that are still there. Modelled elements and devices come from `rendered_xml` alone,
    so a disk removed from the spec disappears.
    """
    live, rendered = parse(live_xml), parse(rendered_xml)
    for name, value in live.attrib.items():
        if name not in rendered.attrib and name != "id":
            rendered.set(name, value)
    live_metadata = live.find("metadata")
    if live_metadata is not None:
        rendered.find("metadata").extend([child for child in live_metadata if child.tag != OWNER_TAG])
    live_devices = live.find("devices")
    if live_devices is not None:
        _carry_devices(live_devices, rendered.find("devices"))
    rendered_tags = {child.tag for child in rendered}
    rendered.extend([child for child in live if child.tag not in rendered_tags])
    etree.indent(rendered, space="  ")
    return _to_xml(rendered)


# --- Provisioning: the volumes behind the disks ---------------------------------------------------


def _error_code(error: libvirt.libvirtError) -> int:
    return error.get_error_code()


def _lookup(call: Callable[[], object], missing_code: int) -> object | None:
    """`call()`, or None when libvirt answers that the object does not exist."""
    try:
        return call()
    except libvirt.libvirtError as error:
        if _error_code(error) == missing_code:
            return None
        raise


def _volume_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None) -> str:
    volume = _e(
        "volume",
        _e("name", text=name),
        _e("capacity", text=str(capacity), unit="bytes"),
        _e("target", _e("format", type=fmt)),
        _e("backingStore", _e("path", text=backing[0]), _e("format", type=backing[1])) if backing else None,
    )
    return _to_xml(volume)


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
class _Provisioner:
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
            pool = _lookup(lambda: self.conn.storagePoolLookupByName(name), libvirt.VIR_ERR_NO_STORAGE_POOL)
            if pool is None or not pool.isActive():
                raise SpecError(field_path, f"storage pool {name!r} (agent setting storage_pool) is missing or "
                                f"inactive on node {self.settings.node_name}; define and start it")
            self._pool = pool
        return self._pool

    def existing(self, name: str, field_path: str) -> libvirt.virStorageVol | None:
        pool = self.pool(field_path)
        return _lookup(lambda: pool.storageVolLookupByName(name), libvirt.VIR_ERR_NO_STORAGE_VOL)

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
        return _resolved(disk, kind="file", path=volume.path(), format="qcow2", owned=True,
                         backing=(base.path, base.format))

    def image(self, disk: Disk, field_path: str) -> ResolvedDisk:
        source = disk.source
        info = images.checked_image(source.path, source.format, f"{field_path}.image.path")
        if source.clone or disk.read_only:
            self.require_qemu_reads(source.path, f"{field_path}.image.path")
        if source.clone:
            return self.overlay(disk, field_path, info)
        return _resolved(disk, kind="file", path=source.path, format=info.format)

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
        return _resolved(disk, kind="file", path=volume.path(), format="qcow2", owned=True)

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
        return _resolved(disk, kind="file", path=volume.path(), format="raw", owned=True)

    def http(self, disk: Disk, field_path: str) -> ResolvedDisk:
        source = disk.source
        name = http_cache_name(source.sha256)
        cached = self.existing(name, field_path) or self.fetch(source, name, field_path)
        if not _holds_file(cached):
            return self.overlay(disk, field_path, images.ImageInfo(cached.path(), "raw", MIN_SIMULATED_SIZE,
                                                                   None, None, None))
        qemu_access.seal_shared_base(cached.path())
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
        self.pool(field_path).refresh(0)
        return self.existing(name, field_path)

    def volume(self, disk: Disk, field_path: str) -> ResolvedDisk:
        source = disk.source
        pool = _lookup(lambda: self.conn.storagePoolLookupByName(source.pool), libvirt.VIR_ERR_NO_STORAGE_POOL)
        if pool is None:
            raise SpecError(f"{field_path}.volume.pool", f"storage pool {source.pool!r} not found on node "
                            f"{self.settings.node_name}; name an existing pool")
        volume = _lookup(lambda: pool.storageVolLookupByName(source.name), libvirt.VIR_ERR_NO_STORAGE_VOL)
        if volume is None:
            raise SpecError(f"{field_path}.volume.name", f"volume {source.name!r} not found in pool {source.pool!r}; "
                            "create it first or name an existing one")
        if not _holds_file(volume):
            fmt = parse(volume.XMLDesc(0)).find("target/format")
            return _resolved(disk, kind="volume", pool=source.pool, volume=source.name,
                             format=fmt.get("type") if fmt is not None else None)
        info = images.checked_image(volume.path(), None, f"{field_path}.volume.name")
        return _resolved(disk, kind="volume", pool=source.pool, volume=source.name, format=info.format)

    def check_interfaces(self, spec: VMSpec) -> None:
        for i, interface in enumerate(spec.interfaces):
            field_path = f"spec.interfaces[{i}].{interface.kind}"
            where = f"on node {self.settings.node_name}"
            if interface.kind == "network" and _lookup(
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
    provisioner = _Provisioner(conn, vm, settings, user_data_lookup)
    with provisioner.rolling_back():
        return provisioner.provision(confine_spec(spec, settings.allowed_roots))


# --- One domain: define, undefine, lifecycle ------------------------------------------------------

_REFUSED_DEFINITION = (
    libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA,
)
_UNSUPPORTED_FLAGS = (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED)


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    """Defines (or redefines) the domain, letting libvirt validate the XML against its schema."""
    try:
        return conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    except libvirt.libvirtError as error:
        if _error_code(error) in _REFUSED_DEFINITION:
            raise SpecError("spec", f"libvirt refused the domain definition: {error}") from error
        raise


def _with_flags(call: Callable[[int], object], flag_sets: Sequence[int]) -> None:
    """`call(flags)` with the first of `flag_sets` the driver accepts."""
    for flags in flag_sets[:-1]:
        try:
            call(flags)
            return
        except libvirt.libvirtError as error:
            if _error_code(error) not in _UNSUPPORTED_FLAGS:
                raise
    call(flag_sets[-1])


_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
)


def undefine(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    """Undefines with managed save, snapshot and checkpoint metadata and NVRAM, as far as the driver allows."""
    _with_flags(dom.undefineFlags, _UNDEFINE_FLAGS)


def delete_owned_volumes(conn: libvirt.virConnect, uid: str, settings: AgentSettings) -> list[str]:
    """Deletes the VM's own volumes (named `{uid}-...`) and NVRAM file; returns the deleted volume names."""
    if not uid:
        raise ValueError("an empty uid would match other VMs' volumes")
    nvram_path(uid, settings).unlink(missing_ok=True)
    pool = _lookup(lambda: conn.storagePoolLookupByName(settings.storage_pool), libvirt.VIR_ERR_NO_STORAGE_POOL)
    if pool is None or not pool.isActive():
        return []
    pool.refresh(0)
    deleted = []
    for volume in pool.listAllVolumes(0):
        if volume.name().startswith(f"{uid}-"):
            volume.delete(0)
            deleted.append(volume.name())
    return deleted


def _prepare_host_dirs(spec: VMSpec, settings: AgentSettings) -> None:
    if spec.firmware == "uefi":
        qemu_access.make_reachable_dir(settings.state_dir / "nvram")  # QEMU opens the NVRAM file itself
    if spec.console.log:
        settings.console_log_dir.mkdir(parents=True, exist_ok=True)


def _check_kernel_boot(spec: VMSpec) -> None:
    kernel_boot = spec.kernel_boot
    if kernel_boot is None:
        return
    for key, path in (("kernel", kernel_boot.kernel), ("initrd", kernel_boot.initrd)):
        if path is not None and not Path(path).is_file():
            raise SpecError(f"spec.kernelBoot.{key}", f"{path} does not exist on this node; put the file there or fix the path")


class Definition(NamedTuple):
    xml: str
    domain: libvirt.virDomain


def provision_and_define(
    conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings, *, generation: int, spec_hash: str,
    user_data_lookup: UserDataLookup, existing_xml: str | None, domain_active: bool = False,
) -> Definition:
    """Provisions the disks, renders (merged into `existing_xml` when given) and defines; returns the XML
    defined and the domain.

    If anything fails, the volumes this call created are deleted again.
    """
    spec = confine_spec(spec, settings.allowed_roots)
    _check_kernel_boot(spec)
    provisioner = _Provisioner(conn, vm, settings, user_data_lookup, domain_active)
    with provisioner.rolling_back():
        disks = provisioner.provision(spec)
        xml = render(spec, vm, settings, generation=generation, spec_hash=spec_hash, disks=disks)
        if existing_xml is not None:
            xml = merge(existing_xml, xml)
        _prepare_host_dirs(spec, settings)
        dom = define(conn, xml)
    return Definition(xml, dom)


def apply_definition(conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings,
                     owner: OwnerMetadata, user_data_lookup: UserDataLookup) -> libvirt.virDomain:
    """Defines the domain for `owner`'s generation, merged into the existing definition if there is one."""
    existing = _lookup(lambda: conn.lookupByUUIDString(vm.uid), libvirt.VIR_ERR_NO_DOMAIN)
    namesake = _lookup(lambda: conn.lookupByName(vm.domain_name), libvirt.VIR_ERR_NO_DOMAIN)
    if namesake is not None and namesake.UUIDString() != vm.uid:
        raise SpecError("metadata.name", f"another domain named {vm.domain_name} (uuid {namesake.UUIDString()}) "
                        "already exists on this node; remove it or rename the VirtualMachine")
    existing_xml = existing.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if existing is not None else None
    return provision_and_define(conn, spec, vm, settings, generation=owner.generation, spec_hash=owner.spec_hash,
                                user_data_lookup=user_data_lookup, existing_xml=existing_xml,
                                domain_active=existing is not None and bool(existing.isActive())).domain


def apply_definition_and_start(conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings,
                               owner: OwnerMetadata, user_data_lookup: UserDataLookup,
                               paused: bool) -> libvirt.libvirtError | None:
    """`apply_definition`, then the start of the domain it defined, which the caller saw off (no lookup,
    no state query). The start's error is returned, not raised: the definition stands either way."""
    dom = apply_definition(conn, spec, vm, settings, owner, user_data_lookup)
    try:
        start_domain(dom, paused, seen_off=True)
    except libvirt.libvirtError as error:
        return error
    return None


def undefine_and_delete(conn: libvirt.virConnect, uuid: str, settings: AgentSettings) -> list[str]:
    """Destroys and undefines the domain if it exists, then deletes the volumes it owns; returns what it
    removed (`domain NAME` first, when there was one, then the volumes)."""
    dom = _lookup(lambda: conn.lookupByUUIDString(uuid), libvirt.VIR_ERR_NO_DOMAIN)
    removed = []
    if dom is not None:
        removed.append(f"domain {dom.name()}")
        _unless_already(not dom.isActive(), dom.destroy)
        undefine(conn, dom)
    return removed + delete_owned_volumes(conn, uuid, settings)


def _domain(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    return conn.lookupByUUIDString(uuid)


def _unless_already(done: bool, action: Callable[[], object]) -> None:
    """`action()` unless the domain is `done`; libvirt's "already in that state" answer
    (VIR_ERR_OPERATION_INVALID, after a race with the guest or another client) counts as done too."""
    if done:
        return
    try:
        action()
    except libvirt.libvirtError as error:
        if _error_code(error) != libvirt.VIR_ERR_OPERATION_INVALID:
            raise


def _paused(dom: libvirt.virDomain) -> bool:
    return dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED


def start(conn: libvirt.virConnect, uuid: str, paused: bool = False) -> None:
    start_domain(_domain(conn, uuid), paused)


def start_domain(dom: libvirt.virDomain, paused: bool = False, *, seen_off: bool = False) -> None:
    """Starts the domain, paused if asked (start-then-suspend where the driver cannot start paused).

    `seen_off`: the caller saw it off just now, so it is not asked again (a domain started meanwhile
    by someone else makes libvirt answer "already running", which counts as done).
    """
    active = False if seen_off else dom.isActive()
    if not paused:
        _unless_already(active, dom.create)
        return
    _unless_already(active, lambda: _with_flags(dom.createWithFlags, (libvirt.VIR_DOMAIN_START_PAUSED, 0)))
    _unless_already(_paused(dom), dom.suspend)


def shutdown(conn: libvirt.virConnect, uuid: str) -> None:
    """Presses the ACPI power button (or the driver's default shutdown where it has no such flag)."""
    dom = _domain(conn, uuid)
    _unless_already(not dom.isActive(), lambda: _with_flags(dom.shutdownFlags, (libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN, 0)))


def destroy(conn: libvirt.virConnect, uuid: str) -> None:
    dom = _domain(conn, uuid)
    _unless_already(not dom.isActive(), dom.destroy)


def suspend(conn: libvirt.virConnect, uuid: str) -> None:
    dom = _domain(conn, uuid)
    _unless_already(_paused(dom), dom.suspend)


def resume(conn: libvirt.virConnect, uuid: str) -> None:
    dom = _domain(conn, uuid)
    _unless_already(not _paused(dom), dom.resume)


def reset(conn: libvirt.virConnect, uuid: str) -> None:
    _domain(conn, uuid).reset(0)
