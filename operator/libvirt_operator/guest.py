"""Guest: one libvirt domain, looked up once, and its lifecycle; defining a VM's domain from its spec.

The domain XML is domain_xml.py's, the volumes behind the disks storage.py's. The functions taking a
`virConnect` first are what the agent runs off the event loop with `await host.call(fn, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import libvirt

from libvirt_operator import qemu_access
from libvirt_operator.domain_xml import merge, render
from libvirt_operator.model import AgentSettings, OwnerMetadata, VMRef
from libvirt_operator.paths import confine_spec
from libvirt_operator.spec import SpecError, VMSpec
from libvirt_operator.libvirt_errors import UNSUPPORTED, has_code, lookup
from libvirt_operator.storage import Provisioner, UserDataLookup, delete_owned_volumes

"""What a failed libvirt call raises, for callers that must not import libvirt."""

_REFUSED_DEFINITION = (
    libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA,
)
_UNSUPPORTED_FLAGS = UNSUPPORTED | {libvirt.VIR_ERR_INVALID_ARG}
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
)


def _with_flags(call: Callable[[int], object], flag_sets: Sequence[int]) -> None:
    """`call(flags)` with the first of `flag_sets` the driver accepts."""
    for flags in flag_sets[:-1]:
        try:
            call(flags)
            return
        except libvirt.libvirtError as error:
            if not has_code(error, *_UNSUPPORTED_FLAGS):
                raise
    call(flag_sets[-1])


def _unless_already(done: bool, action: Callable[[], object]) -> None:
    """`action()` unless the domain is `done`; libvirt's "already in that state" answer
    (VIR_ERR_OPERATION_INVALID, after a race with the guest or another client) counts as done too."""
    if done:
        return
    try:
        action()
    except libvirt.libvirtError as error:
        if not has_code(error, libvirt.VIR_ERR_OPERATION_INVALID):
            raise


class Guest:
    """One domain (as Nova's libvirt `Guest`): each lifecycle call asks for a state, and one already
    reached is not an error."""

    def __init__(self, domain: libvirt.virDomain) -> None:
        self.domain = domain

    @classmethod
    def lookup(cls, conn: libvirt.virConnect, uuid: str) -> Guest:
        return cls(conn.lookupByUUIDString(uuid))

    @classmethod
    def find(cls, conn: libvirt.virConnect, uuid: str) -> Guest | None:
        """The domain with `uuid`, or None when there is none."""
        domain = lookup(lambda: conn.lookupByUUIDString(uuid), libvirt.VIR_ERR_NO_DOMAIN)
        return None if domain is None else cls(domain)

    @classmethod
    def define(cls, conn: libvirt.virConnect, xml: str) -> Guest:
        """Defines (or redefines) the domain, letting libvirt validate the XML against its schema."""
        try:
            return cls(conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))
        except libvirt.libvirtError as error:
            if has_code(error, *_REFUSED_DEFINITION):
                raise SpecError("spec", f"libvirt refused the domain definition: {error}") from error
            raise

    @property
    def name(self) -> str:
        return self.domain.name()

    @property
    def uuid(self) -> str:
        return self.domain.UUIDString()

    def is_active(self) -> bool:
        return bool(self.domain.isActive())

    def is_paused(self) -> bool:
        return self.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    def persistent_xml(self) -> str:
        return self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    def start(self, paused: bool = False, *, seen_off: bool = False) -> None:
        """Starts the domain, paused if asked (start-then-suspend where the driver cannot start paused).

        `seen_off`: the caller saw it off just now, so it is not asked again (a domain started meanwhile
        by someone else makes libvirt answer "already running", which counts as done).
        """
        dom = self.domain
        active = False if seen_off else self.is_active()
        if not paused:
            _unless_already(active, dom.create)
            return
        _unless_already(active, lambda: _with_flags(dom.createWithFlags, (libvirt.VIR_DOMAIN_START_PAUSED, 0)))
        _unless_already(self.is_paused(), dom.suspend)

    def shutdown(self) -> None:
        """Presses the ACPI power button (or the driver's default shutdown where it has no such flag)."""
        flags = (libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN, 0)
        _unless_already(not self.is_active(), lambda: _with_flags(self.domain.shutdownFlags, flags))

    def destroy(self) -> None:
        _unless_already(not self.is_active(), self.domain.destroy)

    def suspend(self) -> None:
        _unless_already(self.is_paused(), self.domain.suspend)

    def resume(self) -> None:
        _unless_already(not self.is_paused(), self.domain.resume)

    def reset(self) -> None:
        self.domain.reset(0)

    def undefine(self) -> None:
        """Undefines with managed save, snapshot and checkpoint metadata and NVRAM, as far as the driver allows."""
        _with_flags(self.domain.undefineFlags, _UNDEFINE_FLAGS)


# --- A VM's domain from its spec ------------------------------------------------------------------


def prepare_host_dirs(spec: VMSpec, settings: AgentSettings) -> None:
    if spec.firmware == "uefi":
        qemu_access.make_reachable_dir(settings.state_dir / "nvram")  # QEMU opens the NVRAM file itself
    if spec.console.log:
        settings.console_log_dir.mkdir(parents=True, exist_ok=True)


def check_kernel_boot(spec: VMSpec) -> None:
    kernel_boot = spec.kernel_boot
    if kernel_boot is None:
        return
    for key, path in (("kernel", kernel_boot.kernel), ("initrd", kernel_boot.initrd)):
        if path is not None and not Path(path).is_file():
            raise SpecError(f"spec.kernelBoot.{key}", f"{path} does not exist on this node; put the file there or fix the path")


class Definition(NamedTuple):
    xml: str
    guest: Guest


def provision_and_define(
    conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings, *, generation: int, spec_hash: str,
    user_data_lookup: UserDataLookup, existing_xml: str | None, domain_active: bool = False,
) -> Definition:
    """Provisions the disks, renders (merged into `existing_xml` when given) and defines; returns the XML
    defined and the guest.

    If anything fails, the volumes this call created are deleted again.
    """
    spec = confine_spec(spec, settings.allowed_roots)
    check_kernel_boot(spec)
    provisioner = Provisioner(conn, vm, settings, user_data_lookup, domain_active)
    with provisioner.rolling_back():
        disks = provisioner.provision(spec)
        xml = render(spec, vm, settings, generation=generation, spec_hash=spec_hash, disks=disks)
        if existing_xml is not None:
            xml = merge(existing_xml, xml)
        prepare_host_dirs(spec, settings)
        guest = Guest.define(conn, xml)
    return Definition(xml, guest)


def apply_definition(conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings,
                     owner: OwnerMetadata, user_data_lookup: UserDataLookup) -> None:
    """Defines the domain for `owner`'s generation, merged into the existing definition if there is one."""
    _apply(conn, spec, vm, settings, owner, user_data_lookup)


def _apply(conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings,
           owner: OwnerMetadata, user_data_lookup: UserDataLookup) -> Guest:
    existing = Guest.find(conn, vm.uid)
    namesake = lookup(lambda: conn.lookupByName(vm.domain_name), libvirt.VIR_ERR_NO_DOMAIN)
    if namesake is not None and namesake.UUIDString() != vm.uid:
        raise SpecError("metadata.name", f"another domain named {vm.domain_name} (uuid {namesake.UUIDString()}) "
                        "already exists on this node; remove it or rename the VirtualMachine")
    return provision_and_define(conn, spec, vm, settings, generation=owner.generation, spec_hash=owner.spec_hash,
                                user_data_lookup=user_data_lookup,
                                existing_xml=existing.persistent_xml() if existing is not None else None,
                                domain_active=existing is not None and existing.is_active()).guest


def apply_definition_and_start(conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings,
                               owner: OwnerMetadata, user_data_lookup: UserDataLookup,
                               paused: bool) -> libvirt.libvirtError | None:
    """`apply_definition`, then the start of the domain it defined, which the caller saw off (no lookup,
    no state query). The start's error is returned, not raised: the definition stands either way."""
    guest = _apply(conn, spec, vm, settings, owner, user_data_lookup)
    try:
        guest.start(paused, seen_off=True)
    except libvirt.libvirtError as error:
        return error
    return None


def undefine_and_delete(conn: libvirt.virConnect, uuid: str, settings: AgentSettings) -> list[str]:
    """Destroys and undefines the domain if it exists, then deletes the volumes it owns; returns what it
    removed (`domain NAME` first, when there was one, then the volumes)."""
    guest = Guest.find(conn, uuid)
    removed = []
    if guest is not None:
        removed.append(f"domain {guest.name}")
        guest.destroy()
        guest.undefine()
    return removed + delete_owned_volumes(conn, uuid, settings)


# --- One call per job, for `host.call` (which hands the worker thread's connection first) ---------


def start(conn: libvirt.virConnect, uuid: str, paused: bool = False) -> None:
    Guest.lookup(conn, uuid).start(paused)


def shutdown(conn: libvirt.virConnect, uuid: str) -> None:
    Guest.lookup(conn, uuid).shutdown()


def destroy(conn: libvirt.virConnect, uuid: str) -> None:
    Guest.lookup(conn, uuid).destroy()


def suspend(conn: libvirt.virConnect, uuid: str) -> None:
    Guest.lookup(conn, uuid).suspend()


def resume(conn: libvirt.virConnect, uuid: str) -> None:
    Guest.lookup(conn, uuid).resume()
