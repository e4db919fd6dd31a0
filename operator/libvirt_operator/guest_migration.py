"""A guest's live move between hosts, libvirt's side: the target's preparation, the source's migration
call, its progress, its abort, and the downtime the target measured.

The move copies only the VM's own layer (`NON_SHARED_INC`): each owned overlay and empty disk is created
fresh on the target first (libvirt 9.0 does not pre-create them), with the same virtual size and backing,
and the bases must be on the target at the same path. Disks the VM uses where they are (read-only images,
volumes in a pool the target has) are not copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import libvirt

from libvirt_operator.domain_xml import DomainDefinition
from libvirt_operator.guest import Guest, check_kernel_boot, prepare_host_dirs
from libvirt_operator.libvirt_errors import connection_lost, has_code, lookup
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.paths import confine_spec
from libvirt_operator.spec import VMSpec
from libvirt_operator.storage import Provisioner, UserDataLookup, delete_owned_volumes

MOVE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
              | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


class TargetNotEmpty(Exception):
    """The target already holds a domain of the VM: a move would make a second one."""


class PeerLost(Exception):
    """The source libvirtd lost its connection to the target's mid-move; this agent's own connection is fine."""


def prepare_incoming(conn: libvirt.virConnect, spec: VMSpec, vm: VMRef, settings: AgentSettings,
                     user_data_lookup: UserDataLookup) -> list[str]:
    """Makes this host ready to receive the VM: its files checked and its own disks created fresh (anything
    left of an earlier attempt deleted first). Returns the volumes created. Raises SpecError naming the field
    when this host lacks what the spec needs (a base, a network, a pool)."""
    if Guest.find(conn, vm.uid) is not None:
        raise TargetNotEmpty(f"node {settings.node_name} already holds a domain of this VM")
    delete_owned_volumes(conn, vm.uid, settings)
    spec = confine_spec(spec, settings.allowed_roots)
    check_kernel_boot(spec)
    provisioner = Provisioner(conn, vm, settings, user_data_lookup)
    with provisioner.rolling_back():
        provisioner.provision(spec)
        prepare_host_dirs(spec, settings)
    return [volume.name() for volume in provisioner.created]


def owned_disk_targets(xml: str, uid: str) -> list[str]:
    """The target devices of the VM's own writable disks (named `{uid}-...` in the pool): what the move copies."""
    return [disk.target for disk in DomainDefinition.from_xml(xml).disks
            if disk.device == "disk" and not disk.read_only and disk.path and PurePath(disk.path).name.startswith(f"{uid}-")]


@dataclass(frozen=True)
class Destination:
    uri: str
    """The target's libvirtd, as the source's libvirtd reaches it (its LibvirtNode's status.migration.uri)."""
    address: str | None = None
    """Where the target receives the migration and disk streams; None: libvirt's default (the target's hostname)."""
    tls: bool = False
    bandwidth_mib: int = 0
    """0: no limit."""


def migrate(conn: libvirt.virConnect, uuid: str, destination: Destination) -> None:
    """Moves the running guest to `destination`, peer to peer; returns once the target runs it and the source
    no longer holds it (undefined). Raises libvirt's error otherwise; the guest then still runs here."""
    domain = Guest.lookup(conn, uuid).domain
    disks = owned_disk_targets(domain.XMLDesc(0), uuid)
    params: dict[str, object] = {}
    flags = MOVE_FLAGS | (libvirt.VIR_MIGRATE_TLS if destination.tls else 0)
    if destination.bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = destination.bandwidth_mib
    if disks:
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = disks
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
    if destination.address:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{destination.address}"
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = destination.address
        if disks:
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{destination.address}"
    try:
        domain.migrateToURI3(destination.uri, params, flags)
    except libvirt.libvirtError as error:
        # libvirtd relays its own link to the target breaking as a transport error, which would read as this
        # agent's connection lost (and drop it): only while that connection lives is it the peer's.
        if connection_lost(error) and conn.isAlive() == 1:
            raise PeerLost(f"the link to {destination.uri} broke mid-move: {error}") from error
        raise


@dataclass(frozen=True)
class JobProgress:
    elapsed_ms: int
    total: int
    processed: int
    remaining: int


def job_progress(conn: libvirt.virConnect, uuid: str) -> JobProgress | None:
    """The running job of the guest (a migration), None when it has none or the guest is gone."""
    guest = Guest.find(conn, uuid)
    # The move may end (the guest undefined here) between the lookup and the call.
    stats = lookup(lambda: guest.domain.jobStats(0), libvirt.VIR_ERR_NO_DOMAIN) if guest is not None else None
    if stats is None:
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return JobProgress(int(stats.get("time_elapsed", 0)), int(stats.get("data_total", 0)),
                       int(stats.get("data_processed", 0)), int(stats.get("data_remaining", 0)))


def holds(conn: libvirt.virConnect, uuid: str) -> bool:
    """Whether this host still has a domain of the guest (after a move: it stayed here)."""
    return Guest.find(conn, uuid) is not None


def abort_job(conn: libvirt.virConnect, uuid: str) -> None:
    """Aborts the guest's job; nothing when the job (OPERATION_INVALID) or the guest already ended."""
    guest = Guest.find(conn, uuid)
    if guest is None:
        return
    try:
        guest.domain.abortJob()
    except libvirt.libvirtError as error:
        if not has_code(error, libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise


def incoming_downtime_ms(conn: libvirt.virConnect, uuid: str) -> int | None:
    """The downtime of the move that brought the guest here, as this (the target's) libvirtd measured it."""
    guest = Guest.find(conn, uuid)
    if guest is None:
        return None
    try:
        stats = guest.domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return None
    downtime = stats.get("downtime")
    return int(downtime) if downtime is not None else None
