"""The host's own figures: hypervisor, CPUs, memory, pools, networks (usage is summed by the Host)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from libvirt_operator import metadata
from libvirt_operator.libvirt_errors import has_code

CAPACITY_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU,
    libvirt.VIR_DOMAIN_STATS_STATE,
)
"""The groups for host capacity, which counts foreign domains too (their XML is never read)."""


@dataclass(frozen=True)
class HostCapacity:
    hypervisor_type: str
    hypervisor_version: str
    libvirt_version: str
    hostname: str
    cpu_model: str | None
    vcpus: int
    vcpus_used: int
    memory_bytes: int
    memory_used_bytes: int
    storage_pool_free_bytes: int | None
    domain_types: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    """libvirt networks defined on the host, active or not."""
    pools: tuple[str, ...] = ()


def read_capacity(conn: Any, pool_name: str) -> HostCapacity:
    """Everything but usage, which the caller sums from the bulk statistics."""
    info = conn.getInfo()
    caps = metadata.parse(conn.getCapabilities())
    return HostCapacity(
        hypervisor_type=conn.getType(), hypervisor_version=_version(conn.getVersion()),
        libvirt_version=_version(conn.getLibVersion()), hostname=conn.getHostname(),
        cpu_model=caps.findtext("host/cpu/model"), vcpus=int(info[2]), vcpus_used=0,
        memory_bytes=int(info[1]) * 1024 * 1024, memory_used_bytes=0,
        storage_pool_free_bytes=_pool_free(conn, pool_name),
        domain_types=tuple(sorted({d.get("type", "") for d in caps.findall("guest/arch/domain")})),
        networks=tuple(sorted({*conn.listNetworks(), *conn.listDefinedNetworks()})),
        pools=tuple(sorted({*conn.listStoragePools(), *conn.listDefinedStoragePools()})),
    )


def _pool_free(conn: Any, pool_name: str) -> int | None:
    try:
        return int(conn.storagePoolLookupByName(pool_name).info()[3])
    except libvirt.libvirtError as err:
        if has_code(err, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
