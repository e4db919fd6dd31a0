"""Which libvirt networks, bridges and storage pools a VM may name, and whether `user` networking is
allowed: the admin's agent flags, checked before anything is made. Pure; no libvirt here."""

from __future__ import annotations

from libvirt_operator.model import AgentSettings
from libvirt_operator.spec import SpecError, VMSpec, VolumeSource

ANY = "*"


def is_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    return ANY in allowed or name in allowed


def _listed(allowed: tuple[str, ...]) -> str:
    return ", ".join(allowed) if allowed else "none"


def refuse_unlisted(spec: VMSpec, settings: AgentSettings) -> None:
    """SpecError naming the field and the flag when the spec names a network, bridge or pool the agent
    does not allow, or a `user` interface where it is not allowed."""
    flags = {"network": ("--allowed-network", settings.allowed_networks),
             "bridge": ("--allowed-bridge", settings.allowed_bridges)}
    for i, interface in enumerate(spec.interfaces):
        field = f"spec.interfaces[{i}].{interface.kind}"
        if interface.kind == "user":
            if not settings.allow_user_networking:
                raise SpecError(field, "user networking is off on this node: QEMU's user-mode network reaches the "
                                "node's own loopback services (kube-apiserver, etcd, the agent) through 10.0.2.2; "
                                "use a network, or ask the admin for --allow-user-networking")
            continue
        flag, allowed = flags[interface.kind]
        if not is_allowed(interface.source or "", allowed):
            raise SpecError(field, f"{interface.kind} {interface.source!r} is not one this node allows "
                            f"({flag}: {_listed(allowed)}); use one of those or ask the admin")
    for i, disk in enumerate(spec.disks):
        source = disk.source
        if isinstance(source, VolumeSource) and not is_allowed(source.pool, settings.allowed_pools):
            raise SpecError(f"spec.disks[{i}].volume.pool", f"storage pool {source.pool!r} is not one this node "
                            f"allows (--allowed-pool: {_listed(settings.allowed_pools)}); use one of those or ask "
                            "the admin")
