"""Plain data shared by Host, Guest, the domain cache and the reconciler.

Nothing here does I/O or imports libvirt or kopf: these are the values that cross module
boundaries, so each module can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

VCPU_SCHEDULERS = ("normal", "batch", "idle")
"""Host policies for guest vCPU threads: `normal` is libvirt's default; `idle` (SCHED_IDLE) lets every
other process on the host, libvirtd and QEMU starting new guests among them, run first."""


DOMAIN_STATES = (
    "nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended",
)
"""libvirt's virDomainState values, by index, as the status reports them."""


@dataclass(frozen=True)
class Tuning:
    """How hard one agent works; `workers` VMs are reconciled at a time, each with its own libvirt call."""

    workers: int = 60
    resync_seconds: float = 60.0
    heartbeat_seconds: float = 20.0
    lease_seconds: int = 40
    """An agent not seen renewing its LibvirtNode (or the placement Lease) for this long counts as gone."""
    stats_seconds: float = 600.0
    stalled_retry_seconds: float = 60.0
    libvirt_call_timeout_seconds: float = 30.0
    """No libvirt call is waited for longer: past it libvirt counts as not responding (libvirt_health.py)."""
    list_chunk_size: int = 500
    """Objects per page in the agent's lists of the cluster's objects: kopf's, when a watch (re)starts, and its own. Read
    in one page, the 10,000 VMs of a restart were all in memory at once, and the holes they left kept the agent at
    415 MiB instead of 250 (bench one-agent-test)."""


@dataclass(frozen=True)
class DownloadPolicy:
    """Limits on fetching `http` disk sources (downloads.py)."""

    max_bytes: int
    deadline_seconds: float
    allowed_networks: tuple[str, ...] = ()
    """Networks the admin allows although they are refused by default (e.g. 127.0.0.0/8 for a local mirror)."""


@dataclass(frozen=True)
class PlacementPolicy:
    """What this node offers to placement (Nova's allocation ratios, KubeVirt's per-VM overhead)."""

    cpu_allocation_ratio: float = 4.0
    memory_allocation_ratio: float = 1.0
    vm_memory_overhead: int = 64 << 20
    """Memory counted per VM beyond its spec.memory (QEMU itself, its caches)."""
    capacity_vcpus: int | None = None
    capacity_memory: int | None = None
    """What to count as the host's size instead of what libvirt reports (a test driver posing as a bigger host)."""
    lease_namespace: str = "kube-system"
    """Where the Lease electing the agent that places VMs lives."""


@dataclass(frozen=True)
class MigrationPolicy:
    """How live moves run (KubeVirt's defaults)."""

    progress_timeout_seconds: float = 150.0
    """A move whose data left to send has not shrunk for this long is aborted."""
    completion_timeout_per_gib_seconds: float = 150.0
    """A move taking longer than this per GiB of memory and copied disk is aborted."""
    parallel_per_node: int = 2
    """Moves in flight from or to one node at a time."""
    parallel_per_cluster: int = 5
    prepare_timeout_seconds: float = 120.0
    """A target whose agent has not prepared within this long fails the move."""
    bandwidth_mib: int = 0
    """The most one move may send per second (MiB/s); 0: no limit."""
    tls: bool = False
    """The migration stream over TLS (VIR_MIGRATE_TLS); libvirt's own connection is TLS by its URI (qemu+tls)."""


@dataclass(frozen=True)
class AgentSettings:
    """How one agent is configured; passed in, never read from the environment inside Host/Guest."""

    libvirt_uri: str = "qemu:///system"
    cluster_id: str = ""
    """This cluster's identity (the uid of its kube-system namespace), written into every domain's mark."""
    node_name: str = "localhost"
    domain_type: str = "qemu"
    guest_vcpu_scheduler: str = "normal"
    allowed_roots: tuple[Path, ...] = (Path("/var/lib/libvirt"),)
    storage_pool: str = "default"
    storage_pool_path: Path = Path("/var/lib/libvirt/images")
    state_dir: Path = Path("/var/lib/libvirt/libvirt-operator")
    console_log_dir: Path = Path("/var/log/libvirt/libvirt-operator")
    allowed_networks: tuple[str, ...] = ("default",)
    """libvirt networks a VM may name ("*": any); allowlist.py."""
    allowed_bridges: tuple[str, ...] = ()
    allowed_pools: tuple[str, ...] = ("default",)
    allow_user_networking: bool = False
    download_policy: DownloadPolicy = DownloadPolicy(max_bytes=64 << 30, deadline_seconds=3600.0)
    placement: PlacementPolicy = PlacementPolicy()
    migration_uri: str | None = None
    """The libvirt URI other hosts' libvirtd use to reach this host's (DESIGN.md §3); None: not published."""
    migration_address: str | None = None
    """Where this host receives the migration stream; None: not published."""
    migration: MigrationPolicy = MigrationPolicy()


@dataclass(frozen=True)
class VMRef:
    """The identity of one VirtualMachine object; the domain UUID is `uid`."""

    uid: str
    namespace: str
    name: str

    @property
    def domain_name(self) -> str:
        return f"{self.namespace}_{self.name}"


@dataclass(frozen=True)
class OwnerMetadata:
    """What the operator's <metadata> element in a domain's XML says."""

    uid: str
    namespace: str
    name: str
    generation: int
    spec_hash: str
    cluster: str = ""
    """The identity of the cluster whose operator made the mark; empty in marks made before it was written."""


@dataclass(frozen=True)
class InterfaceFacts:
    """One interface of a domain as its XML and libvirt's address sources tell it."""

    name: str
    mac_address: str
    ip_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class DomainFacts:
    """One domain as libvirt answered at one moment: state and statistics plus its XML's facts.

    `live_owner` is the metadata of the running definition (None when the domain is inactive),
    `config_owner` that of the persistent definition: they differ when a redefinition waits for
    the next boot.
    """

    uuid: str
    name: str
    state: str
    reason: str
    id: int | None
    persistent: bool
    config_owner: OwnerMetadata | None
    live_owner: OwnerMetadata | None = None
    interfaces: tuple[InterfaceFacts, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)
    config_digest: str | None = None
    """A digest of the persistent definition's XML: changes when anyone redefines the domain."""

    @property
    def owner(self) -> OwnerMetadata | None:
        return self.live_owner or self.config_owner

    @property
    def active(self) -> bool:
        return self.id is not None and self.state != "shutoff"


@dataclass(frozen=True, kw_only=True)
class DomainSnapshot(DomainFacts):
    """The facts of one domain stamped with a cache revision.

    `revision` comes from one monotonic counter shared by every snapshot the cache stores, so a
    snapshot read earlier always has a smaller revision than one read later (seed 004).
    """

    revision: int

    @classmethod
    def stamped(cls, facts: DomainFacts, revision: int) -> DomainSnapshot:
        return cls(**vars(facts), revision=revision)
