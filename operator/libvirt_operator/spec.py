"""The VirtualMachine spec (DESIGN.md §1) as validated, frozen data.

`parse_spec` takes the spec as the API server hands it over (camelCase, defaults possibly
missing) and either returns a `VMSpec` or raises `SpecError` naming the offending field with
a message that says what is allowed. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from libvirt_operator.spec_fields import SpecError, SpecObject, size_field

MIN_MEMORY = 16 * 1024**2
MIN_DISK = 1024**2
RUN_STRATEGIES = ("Always", "Halted", "Manual", "RerunOnFailure", "Once")
UPDATE_STRATEGIES = ("OnRestart", "Restart")
FIRMWARES = ("bios", "uefi")
DOMAIN_TYPES = ("kvm", "qemu")
CPU_MODES = ("host-model", "host-passthrough", "custom")
BUSES = ("virtio", "sata", "scsi")
IMAGE_FORMATS = ("raw", "qcow2")
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
DISK_SOURCES = ("image", "emptyDisk", "cloudInit", "volume", "http", "cdrom")
CDROM_BUSES = ("sata", "scsi")
INTERFACE_KINDS = ("network", "bridge", "user")
RUNTIME_FIELDS = ("runStrategy", "paused", "updateStrategy", "terminationGracePeriodSeconds", "nodeName", "nodeSelector")
"""Spec fields that steer the reconciler but do not change the domain definition."""

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


@dataclass(frozen=True)
class CPU:
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    mode: str | None = None
    model: str | None = None

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads


@dataclass(frozen=True)
class KernelBoot:
    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class ImageSource:
    path: str
    clone: bool = False
    format: str | None = None
    """raw or qcow2 as the user says; None: what the file's contents say (never a backing file either way)."""


@dataclass(frozen=True)
class EmptyDiskSource:
    size: int


@dataclass(frozen=True)
class CloudInitSource:
    user_data: str | None = None
    user_data_secret: str | None = None
    network_data: str | None = None


@dataclass(frozen=True)
class VolumeSource:
    pool: str
    name: str


@dataclass(frozen=True)
class HttpSource:
    url: str
    sha256: str


DiskSource = Union[ImageSource, EmptyDiskSource, CloudInitSource, VolumeSource, HttpSource]


@dataclass(frozen=True)
class Disk:
    name: str
    source: DiskSource
    bus: str
    boot_order: int | None = None
    read_only: bool = False
    cdrom: bool = False
    """A read-only CD-ROM (`cdrom: {image: ...}` or `cdrom: {http: ...}`); `source` is what it holds."""

    @property
    def source_key(self) -> str:
        """The spec's key for this disk's source, e.g. `emptyDisk`."""
        return "cdrom" if self.cdrom else _SOURCE_KEYS[type(self.source)]

    def field_path(self, index: int) -> str:
        """Where this disk's source fields live in the spec: `spec.disks[i]`, or `spec.disks[i].cdrom`."""
        return f"spec.disks[{index}]" + (".cdrom" if self.cdrom else "")


@dataclass(frozen=True)
class Interface:
    name: str
    kind: str
    source: str | None
    model: str = "virtio"
    mac_address: str | None = None


@dataclass(frozen=True)
class Console:
    log: bool = False


@dataclass(frozen=True)
class VMSpec:
    memory: int
    cpu: CPU = CPU()
    firmware: str = "bios"
    kernel_boot: KernelBoot | None = None
    disks: tuple[Disk, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    console: Console = Console()
    domain_type: str | None = None
    run_strategy: str = "Always"
    paused: bool = False
    update_strategy: str = "OnRestart"
    node_name: str | None = None
    node_selector: tuple[tuple[str, str], ...] = ()
    """Labels a LibvirtNode must carry for the VM to be placed there."""
    termination_grace_period_seconds: int = 30


_SOURCE_KEYS: dict[type, str] = {
    ImageSource: "image", EmptyDiskSource: "emptyDisk", CloudInitSource: "cloudInit",
    VolumeSource: "volume", HttpSource: "http",
}


def _name(obj: SpecObject, seen: set[str]) -> str:
    name = obj.string("name")
    if not _NAME.match(name):
        raise SpecError(obj.at("name"), f"{name!r} must be a DNS label: lowercase letters, digits and '-', at most 63")
    if name in seen:
        raise SpecError(obj.at("name"), f"{name!r} is used twice; names must be unique")
    seen.add(name)
    return name


def _cpu(spec: SpecObject) -> CPU:
    obj = spec.child("cpu", ("sockets", "cores", "threads", "mode", "model"))
    mode = obj.choice("mode", CPU_MODES, None)
    model = obj.string("model", None)
    if (model is None) != (mode != "custom"):
        raise SpecError(obj.at("model"), "is required with mode custom and allowed only with it")
    return CPU(
        sockets=obj.integer("sockets", 1, minimum=1), cores=obj.integer("cores", 1, minimum=1),
        threads=obj.integer("threads", 1, minimum=1), mode=mode, model=model,
    )


def _memory(spec: SpecObject) -> int:
    memory = size_field(spec, "memory")
    if memory < MIN_MEMORY:
        raise SpecError(spec.at("memory"), f"{memory:f} bytes is too small; give at least 16Mi")
    return math.ceil(memory)


def _kernel_boot(spec: SpecObject) -> KernelBoot | None:
    if not spec.has("kernelBoot"):
        return None
    obj = spec.child("kernelBoot", ("kernel", "initrd", "cmdline"))
    return KernelBoot(kernel=obj.file_path("kernel"), initrd=obj.file_path("initrd", None), cmdline=obj.string("cmdline", None))


def _image(obj: SpecObject) -> ImageSource:
    return ImageSource(path=obj.file_path("path"), clone=obj.boolean("clone", False),
                       format=obj.choice("format", IMAGE_FORMATS, None))


def _empty_disk(obj: SpecObject) -> EmptyDiskSource:
    size = size_field(obj, "size")
    if size <= 0:
        raise SpecError(obj.at("size"), f"{obj.raw('size')!r} must be a positive size such as 10Gi")
    return EmptyDiskSource(size=max(math.ceil(size), MIN_DISK))


def _cloud_init(obj: SpecObject) -> CloudInitSource:
    given = obj.exactly_one(("userData", "userDataSecretRef"))
    network_data = obj.string("networkData", None)
    if given == "userData":
        return CloudInitSource(user_data=obj.string("userData"), network_data=network_data)
    secret = obj.child("userDataSecretRef", ("name",)).string("name")
    return CloudInitSource(user_data_secret=secret, network_data=network_data)


def _volume(obj: SpecObject) -> VolumeSource:
    return VolumeSource(pool=obj.object_name("pool"), name=obj.object_name("name"))


def _http(obj: SpecObject) -> HttpSource:
    url = obj.string("url")
    if not url.startswith(("http://", "https://")):
        raise SpecError(obj.at("url"), f"{url!r} must start with http:// or https://")
    sha256 = obj.string("sha256").lower()
    if not _SHA256.match(sha256):
        raise SpecError(obj.at("sha256"), "must be 64 hexadecimal digits (the output of sha256sum)")
    return HttpSource(url=url, sha256=sha256)


def _cdrom(obj: SpecObject) -> ImageSource | HttpSource:
    """What a CD-ROM holds: an image used as it is, or an http download (a read-only overlay over it)."""
    if obj.exactly_one(("image", "http")) == "image":
        return _image(obj.child("image", ("path", "format")))
    return _http(obj.child("http", ("url", "sha256")))


_SOURCE_PARSERS = {
    "image": (_image, ("path", "clone", "format")),
    "emptyDisk": (_empty_disk, ("size",)),
    "cloudInit": (_cloud_init, ("userData", "userDataSecretRef", "networkData")),
    "volume": (_volume, ("pool", "name")),
    "cdrom": (_cdrom, ("image", "http")),
    "http": (_http, ("url", "sha256")),
}


def _disk(obj: SpecObject, names: set[str], boot_orders: set[int]) -> Disk:
    name = _name(obj, names)
    key = obj.exactly_one(DISK_SOURCES)
    parser, allowed = _SOURCE_PARSERS[key]
    source = parser(obj.child(key, allowed))
    boot_order = obj.integer("bootOrder", None, minimum=1)
    if boot_order is not None and boot_order in boot_orders:
        raise SpecError(obj.at("bootOrder"), f"{boot_order} is used by another disk; boot orders must be unique")
    if boot_order is not None:
        boot_orders.add(boot_order)
    bus = obj.choice("bus", BUSES, "sata" if key in ("cloudInit", "cdrom") else "virtio")
    read_only = obj.boolean("readOnly", False)
    if key == "cdrom" and bus not in CDROM_BUSES:
        raise SpecError(obj.at("bus"), f"a CD-ROM sits on bus {' or '.join(CDROM_BUSES)}, not {bus}")
    if read_only and bus == "sata" and key not in ("cloudInit", "cdrom"):
        raise SpecError(obj.at("readOnly"), "QEMU cannot make a SATA disk read-only; use bus virtio or scsi, or a "
                        "cdrom disk")
    return Disk(name=name, source=source, bus=bus, boot_order=boot_order,
                read_only=read_only or key in ("cloudInit", "cdrom"), cdrom=key == "cdrom")


def _interface(obj: SpecObject, names: set[str], macs: set[str]) -> Interface:
    name = _name(obj, names)
    kind = obj.exactly_one(INTERFACE_KINDS)
    if kind == "user":
        obj.child("user", ())
        source = None
    else:
        source = obj.string(kind)
    if kind == "bridge" and not _IFNAME.match(source):
        raise SpecError(obj.at(kind), f"{source!r} is not a network interface name (at most 15 of A-Z a-z 0-9 _ . : -)")
    mac = obj.string("macAddress", None)
    if mac is not None:
        mac = _mac(mac.lower(), obj.at("macAddress"), macs)
    return Interface(name=name, kind=kind, source=source, model=obj.choice("model", NIC_MODELS, "virtio"), mac_address=mac)


def _mac(mac: str, field: str, seen: set[str]) -> str:
    if not _MAC.match(mac):
        raise SpecError(field, f"{mac!r} is not a MAC address; write six hex pairs like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise SpecError(field, f"{mac} is a multicast address; the first octet must be even (52:54:00:... is usual)")
    if mac in seen:
        raise SpecError(field, f"{mac} is used by another interface")
    seen.add(mac)
    return mac


SPEC_FIELDS = (
    "runStrategy", "paused", "updateStrategy", "nodeName", "nodeSelector", "domainType", "cpu", "memory", "firmware",
    "kernelBoot", "terminationGracePeriodSeconds", "disks", "interfaces", "console",
)
DISK_FIELDS = ("name", "bus", "bootOrder", "readOnly", *DISK_SOURCES)
INTERFACE_FIELDS = ("name", "model", "macAddress", *INTERFACE_KINDS)


def parse_spec(data: Mapping[str, Any]) -> VMSpec:
    """Validates a VirtualMachine `spec` and returns it with defaults filled in."""
    spec = SpecObject(data, "spec", SPEC_FIELDS)
    disk_names: set[str] = set()
    boot_orders: set[int] = set()
    disks = tuple(
        _disk(SpecObject(item, f"spec.disks[{i}]", DISK_FIELDS), disk_names, boot_orders)
        for i, item in enumerate(spec.items("disks"))
    )
    nic_names: set[str] = set()
    macs: set[str] = set()
    interfaces = tuple(
        _interface(SpecObject(item, f"spec.interfaces[{i}]", INTERFACE_FIELDS), nic_names, macs)
        for i, item in enumerate(spec.items("interfaces"))
    )
    return VMSpec(
        memory=_memory(spec),
        cpu=_cpu(spec),
        firmware=spec.choice("firmware", FIRMWARES, "bios"),
        kernel_boot=_kernel_boot(spec),
        disks=disks,
        interfaces=interfaces,
        console=Console(log=spec.child("console", ("log",)).boolean("log", False)),
        domain_type=spec.choice("domainType", DOMAIN_TYPES, None),
        run_strategy=spec.choice("runStrategy", RUN_STRATEGIES, "Always"),
        paused=spec.boolean("paused", False),
        update_strategy=spec.choice("updateStrategy", UPDATE_STRATEGIES, "OnRestart"),
        node_name=spec.string("nodeName", None),
        node_selector=spec.labels("nodeSelector"),
        termination_grace_period_seconds=spec.integer("terminationGracePeriodSeconds", 30),
    )


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the spec fields that shape the domain definition."""
    shaping = {key: value for key, value in spec.items() if key not in RUNTIME_FIELDS}
    canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
