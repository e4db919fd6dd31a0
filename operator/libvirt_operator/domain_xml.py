"""Where a spec field becomes domain XML and is read back: one `XMLProperty` per field the operator models.

`render` sets the fields on a new `<domain>`; `DomainDefinition.from_xml` reads them back; `merge` writes
them into a live definition and leaves everything else (a `<features>` flag, an `<os>` child, a device
the operator does not make, addresses libvirt gave) as it was. Pure: no libvirt here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from pathlib import Path

from lxml import etree

from libvirt_operator.metadata import (
    DISK_ALIAS_PREFIX, INTERFACE_ALIAS_PREFIX, OWNER_TAG, owner_element, owner_from_domain, spec_name,
)
from libvirt_operator.model import AgentSettings, InterfaceFacts, OwnerMetadata, VMRef
from libvirt_operator.spec import Interface as SpecInterface, VMSpec
from libvirt_operator.disk_plan import ResolvedDisk
from libvirt_operator.xmlbuilder import Field, XMLChildren, XMLObject, XMLProperty, new_child

TARGET_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd"}


def nvram_path(uid: str, settings: AgentSettings) -> Path:
    return settings.state_dir / "nvram" / f"{uid}_VARS.fd"


def console_log_path(vm: VMRef, settings: AgentSettings) -> Path:
    return settings.console_log_dir / f"{vm.domain_name}.log"


def stable_mac(uid: str, interface_name: str) -> str:
    """A locally administered MAC (QEMU's 52:54:00 prefix) that stays the same for one VM's interface."""
    digest = hashlib.sha256(f"{uid}/{interface_name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{octet:02x}" for octet in digest[:3])


# --- Devices --------------------------------------------------------------------------------------


class Disk(XMLObject):
    tag = "disk"
    kind = XMLProperty("@type")
    device = XMLProperty("@device")
    driver = XMLProperty("driver/@name")
    format = XMLProperty("driver/@type")
    path = XMLProperty("source/@file")
    block_device = XMLProperty("source/@dev")
    pool = XMLProperty("source/@pool")
    volume = XMLProperty("source/@volume")
    backing_kind = XMLProperty("backingStore/@type")
    backing_format = XMLProperty("backingStore/format/@type")
    backing_path = XMLProperty("backingStore/source/@file")
    backing_ends = XMLProperty("backingStore/backingStore", bool)
    """An empty `<backingStore/>` under the base: the chain ends there, libvirt probes nothing."""
    not_relabelled = XMLProperty("source/seclabel[@model='dac'][@relabel='no']", bool)
    backing_not_relabelled = XMLProperty("backingStore/source/seclabel[@model='dac'][@relabel='no']", bool)
    """On files VMs share read-only: libvirt's DAC driver would chown them to QEMU's user for good (see
    qemu_access). Found by its model, so another driver's `<seclabel>` on the disk stays as it is."""
    target = XMLProperty("target/@dev")
    bus = XMLProperty("target/@bus")
    boot_order = XMLProperty("boot/@order", int)
    read_only = XMLProperty("readonly", bool)
    alias = XMLProperty("alias/@name")

    @property
    def name(self) -> str:
        """The spec's disk name (from the user alias), else the target."""
        return spec_name(self.element, DISK_ALIAS_PREFIX) or self.target or ""

    def key(self) -> Hashable:
        return ("disk", self.name, self.bus)  # a disk that changes bus is a new device


class NetworkInterface(XMLObject):
    tag = "interface"
    kind = XMLProperty("@type")
    mac_address = XMLProperty("mac/@address")
    network = XMLProperty("source/@network")
    bridge = XMLProperty("source/@bridge")
    model = XMLProperty("model/@type")
    alias = XMLProperty("alias/@name")

    @property
    def name(self) -> str | None:
        return spec_name(self.element, INTERFACE_ALIAS_PREFIX)

    def key(self) -> Hashable:
        return ("interface", self.name or self.mac_address)


class Serial(XMLObject):
    tag = "serial"
    kind = XMLProperty("@type")
    port = XMLProperty("target/@port")
    log_file = XMLProperty("log/@file")
    log_append = XMLProperty("log/@append")

    def key(self) -> Hashable:
        return ("serial", self.port)


class Console(XMLObject):
    tag = "console"
    kind = XMLProperty("@type")
    target_type = XMLProperty("target/@type")
    port = XMLProperty("target/@port")

    def key(self) -> Hashable:
        return ("console", self.port)


class Rng(XMLObject):
    tag = "rng"
    model = XMLProperty("@model")
    backend_model = XMLProperty("backend/@model")
    backend = XMLProperty("backend")


class MemBalloon(XMLObject):
    tag = "memballoon"
    model = XMLProperty("@model")


class Controller(XMLObject):
    tag = "controller"
    kind = XMLProperty("@type")
    index = XMLProperty("@index")
    model = XMLProperty("@model")

    def key(self) -> Hashable:
        return ("controller", self.kind, self.index)


class Timer(XMLObject):
    tag = "timer"
    name = XMLProperty("@name")
    tick_policy = XMLProperty("@tickpolicy")
    present = XMLProperty("@present")

    def key(self) -> Hashable:
        return ("timer", self.name)


class FirmwareFeature(XMLObject):
    tag = "feature"
    enabled = XMLProperty("@enabled")
    name = XMLProperty("@name")

    def key(self) -> Hashable:
        return ("feature", self.name)


# --- The domain -----------------------------------------------------------------------------------


class OwnerMark(Field):
    """The operator's `<lvo:vm>` element under `<metadata>`; other programs' metadata stays beside it."""

    def read(self, element: etree._Element) -> OwnerMetadata | None:
        return owner_from_domain(element)

    def write(self, element: etree._Element, value: OwnerMetadata | None, order: tuple[str, ...]) -> None:
        metadata = element.find("metadata")
        if metadata is None:
            if value is None:
                return
            metadata = new_child(element, "metadata", order)
        for mark in metadata.findall(OWNER_TAG):
            metadata.remove(mark)
        if value is not None:
            metadata.append(owner_element(value))


class DomainDefinition(XMLObject):
    """A domain's XML as the operator models it; what it does not model rides along untouched."""

    tag = "domain"
    order = (
        "name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory", "currentMemory",
        "blkiotune", "memtune", "memoryBacking", "vcpu", "vcpus", "iothreads", "iothreadids", "cputune", "numatune",
        "resource", "sysinfo", "bootloader", "bootloader_args", "os", "idmap", "features", "cpu", "clock",
        "on_poweroff", "on_reboot", "on_crash", "pm", "perf", "devices", "seclabel", "keywrap", "launchSecurity",
    )
    """libvirt's own order of a domain's elements."""
    domain_type = XMLProperty("@type")
    name = XMLProperty("name")
    uuid = XMLProperty("uuid")
    owner = OwnerMark()
    memory = XMLProperty("memory", int)
    memory_unit = XMLProperty("memory/@unit")
    current_memory = XMLProperty("currentMemory", int)
    current_memory_unit = XMLProperty("currentMemory/@unit")
    vcpus = XMLProperty("vcpu", int)
    vcpu_placement = XMLProperty("vcpu/@placement")
    vcpus_online = XMLProperty("vcpu/@current", int)
    """Never rendered: every vCPU the spec gives is online (a `virsh setvcpus --config` count goes)."""
    cpu_mode = XMLProperty("cpu/@mode")
    cpu_match = XMLProperty("cpu/@match")
    cpu_model = XMLProperty("cpu/model")
    cpu_model_fallback = XMLProperty("cpu/model/@fallback")
    sockets = XMLProperty("cpu/topology/@sockets", int)
    dies = XMLProperty("cpu/topology/@dies", int)
    cores = XMLProperty("cpu/topology/@cores", int)
    threads = XMLProperty("cpu/topology/@threads", int)
    vcpu_sched_vcpus = XMLProperty("cputune/vcpusched/@vcpus")
    vcpu_scheduler = XMLProperty("cputune/vcpusched/@scheduler")
    os_type = XMLProperty("os/type")
    arch = XMLProperty("os/type/@arch")
    machine = XMLProperty("os/type/@machine")
    firmware = XMLProperty("os/@firmware")
    firmware_features = XMLChildren(FirmwareFeature, "os/firmware")
    loader = XMLProperty("os/loader", bool)
    """Never rendered: libvirt picks the firmware for `firmware='efi'`, again at every define."""
    nvram = XMLProperty("os/nvram", owned=True)
    boot_devices = XMLProperty("os/boot", bool)
    """Never rendered: libvirt adds `<boot dev='hd'/>`, which it refuses beside a disk's boot order."""
    kernel = XMLProperty("os/kernel")
    initrd = XMLProperty("os/initrd")
    cmdline = XMLProperty("os/cmdline")
    acpi = XMLProperty("features/acpi", bool)
    apic = XMLProperty("features/apic", bool)
    clock_offset = XMLProperty("clock/@offset")
    timers = XMLChildren(Timer, "clock", drop_unmatched=False)
    on_poweroff = XMLProperty("on_poweroff")
    on_reboot = XMLProperty("on_reboot")
    on_crash = XMLProperty("on_crash")
    disks = XMLChildren(Disk, "devices")
    controllers = XMLChildren(Controller, "devices", drop_unmatched=False)
    network_interfaces = XMLChildren(NetworkInterface, "devices")
    serials = XMLChildren(Serial, "devices")
    consoles = XMLChildren(Console, "devices")
    rngs = XMLChildren(Rng, "devices")
    memballoons = XMLChildren(MemBalloon, "devices")

    @property
    def memory_kib(self) -> int:
        return _kib(self.memory or 0, self.memory_unit)

    @property
    def interfaces(self) -> tuple[InterfaceFacts, ...]:
        """Each interface's spec name (from its user alias, else `netN`) and MAC address."""
        return tuple(InterfaceFacts(name=nic.name or f"net{index}", mac_address=nic.mac_address or "")
                     for index, nic in enumerate(self.network_interfaces))

    @property
    def sizing(self) -> dict[str, int]:
        """Memory (KiB) and vCPUs, named as libvirt's balloon and vcpu statistics name them."""
        sizing: dict[str, int] = {}
        if self.memory is not None:
            sizing["balloon.maximum"] = self.memory_kib
        if self.current_memory is not None:
            sizing["balloon.current"] = _kib(self.current_memory, self.current_memory_unit)
        if self.vcpus is not None:
            sizing["vcpu.maximum"] = self.vcpus
            sizing["vcpu.current"] = self.vcpus_online or self.vcpus
        return sizing


_UNITS_IN_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "KiB": 1, "M": 1024, "MiB": 1024, "G": 1024**2, "GiB": 1024**2}


def _kib(amount: int, unit: str | None) -> int:
    return int(amount * _UNITS_IN_KIB.get(unit or "KiB", 1))


# --- Rendering: a spec's values for every modelled field ------------------------------------------


def _target_name(prefix: str, index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return prefix + letters


def _disk(disk: ResolvedDisk, target: str) -> Disk:
    backing_path, backing_format = disk.backing or (None, None)
    return Disk(
        kind=disk.kind, device=disk.device, driver="qemu", format=disk.format,
        path=disk.path if disk.kind == "file" else None, pool=disk.pool, volume=disk.volume,
        backing_kind="file" if disk.backing else None, backing_format=backing_format, backing_path=backing_path,
        backing_ends=disk.backing is not None, target=target, bus=disk.bus, boot_order=disk.boot_order,
        read_only=disk.read_only, alias=f"{DISK_ALIAS_PREFIX}{disk.name}",
        not_relabelled=disk.read_only and not disk.owned, backing_not_relabelled=disk.backing is not None,
    )


def _disks(disks: Sequence[ResolvedDisk]) -> list[Disk]:
    used = {prefix: 0 for prefix in TARGET_PREFIX.values()}
    elements = []
    for disk in disks:
        prefix = TARGET_PREFIX[disk.bus]
        elements.append(_disk(disk, _target_name(prefix, used[prefix])))
        used[prefix] += 1
    return elements


def _interface(interface: SpecInterface, vm: VMRef) -> NetworkInterface:
    return NetworkInterface(
        kind=interface.kind, mac_address=interface.mac_address or stable_mac(vm.uid, interface.name),
        network=interface.source if interface.kind == "network" else None,
        bridge=interface.source if interface.kind == "bridge" else None,
        model=interface.model, alias=f"{INTERFACE_ALIAS_PREFIX}{interface.name}",
    )


def _set_cpu(domain: DomainDefinition, spec: VMSpec, domain_type: str, settings: AgentSettings) -> None:
    cpu = spec.cpu
    mode = cpu.mode or ("host-model" if domain_type == "kvm" else None)
    domain.cpu_mode, domain.cpu_match = mode, "exact" if mode == "custom" else None
    domain.cpu_model, domain.cpu_model_fallback = cpu.model, "allow" if cpu.model else None
    domain.sockets, domain.dies, domain.cores, domain.threads = cpu.sockets, 1, cpu.cores, cpu.threads
    scheduler = None if settings.guest_vcpu_scheduler == "normal" else settings.guest_vcpu_scheduler
    if scheduler is not None:  # the host's vCPU scheduling policy for this guest; nothing for libvirt's default
        domain.vcpu_sched_vcpus = "0" if cpu.vcpus == 1 else f"0-{cpu.vcpus - 1}"
        domain.vcpu_scheduler = scheduler


def _set_os(domain: DomainDefinition, spec: VMSpec, vm: VMRef, settings: AgentSettings) -> None:
    """UEFI through libvirt's firmware autoselection (the host's firmware descriptors say where OVMF is),
    without Secure Boot: the guest's own kernels, and direct kernel boot, are not signed for it."""
    uefi = spec.firmware == "uefi"
    domain.os_type, domain.arch, domain.machine = "hvm", "x86_64", "q35"
    domain.firmware = "efi" if uefi else None
    for feature in ("secure-boot", "enrolled-keys") if uefi else ():
        domain.add(FirmwareFeature(enabled="no", name=feature))
    domain.nvram = str(nvram_path(vm.uid, settings)) if uefi else None
    kernel = spec.kernel_boot
    domain.kernel = kernel.kernel if kernel else None
    domain.initrd = kernel.initrd if kernel else None
    domain.cmdline = kernel.cmdline if kernel else None


def _add_devices(domain: DomainDefinition, spec: VMSpec, vm: VMRef, settings: AgentSettings,
                 disks: Sequence[ResolvedDisk]) -> None:
    for disk in _disks(disks):
        domain.add(disk)
    if any(disk.bus == "scsi" for disk in disks):
        domain.add(Controller(kind="scsi", index="0", model="virtio-scsi"))
    for interface in spec.interfaces:
        domain.add(_interface(interface, vm))
    log = str(console_log_path(vm, settings)) if spec.console.log else None
    domain.add(Serial(kind="pty", port="0", log_file=log, log_append="on" if log else None))
    domain.add(Console(kind="pty", target_type="serial", port="0"))
    domain.add(Rng(model="virtio", backend_model="random", backend="/dev/urandom"))
    domain.add(MemBalloon(model="virtio"))


def definition(spec: VMSpec, vm: VMRef, settings: AgentSettings, *, owner: OwnerMetadata,
               disks: Sequence[ResolvedDisk]) -> DomainDefinition:
    """The domain `spec` gives, every modelled field set (in the order they appear in the XML)."""
    domain_type = spec.domain_type or settings.domain_type
    memory_kib = -(-spec.memory // 1024)
    domain = DomainDefinition(
        domain_type=domain_type, name=vm.domain_name, uuid=vm.uid, owner=owner,
        memory=memory_kib, memory_unit="KiB", current_memory=memory_kib, current_memory_unit="KiB",
        vcpus=spec.cpu.vcpus, vcpu_placement="static",
    )
    _set_cpu(domain, spec, domain_type, settings)
    _set_os(domain, spec, vm, settings)
    domain.acpi = domain.apic = True
    domain.clock_offset = "utc"
    for name, tick_policy in (("rtc", "catchup"), ("pit", "delay")):
        domain.add(Timer(name=name, tick_policy=tick_policy))
    domain.add(Timer(name="hpet", present="no"))
    domain.on_poweroff, domain.on_reboot, domain.on_crash = "destroy", "restart", "destroy"
    _add_devices(domain, spec, vm, settings, disks)
    return domain


def render(
    spec: VMSpec, vm: VMRef, settings: AgentSettings, *, generation: int, spec_hash: str, disks: Sequence[ResolvedDisk],
) -> str:
    """The domain XML for `spec`; the same arguments always give the same bytes."""
    owner = OwnerMetadata(uid=vm.uid, namespace=vm.namespace, name=vm.name, generation=generation, spec_hash=spec_hash,
                          cluster=settings.cluster_id)
    return definition(spec, vm, settings, owner=owner, disks=disks).to_xml()


def merge(live_xml: str, rendered_xml: str) -> str:
    """`live_xml` with every field the operator models taken from `rendered_xml`.

    Everything else in the live definition stays: `<seclabel>`, `<resource>`, other programs' metadata,
    a `<features>` flag, an `<os>` child, a `<cputune>` setting, a device the operator does not make, the
    addresses libvirt gave devices that are still there. A disk or interface removed from the spec
    disappears; one whose bus changed is a new device (its old PCI address goes with the old one).
    """
    live = DomainDefinition.from_xml(live_xml)
    live.element.attrib.pop("id", None)
    live.update_from(DomainDefinition.from_xml(rendered_xml))
    return live.to_xml()
