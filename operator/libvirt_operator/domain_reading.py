"""Reading domains in a worker thread: state names, the statistics groups, the XML's facts, `DomainReader`."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import libvirt
from lxml import etree

from libvirt_operator import metadata
from libvirt_operator.domain_listing import ListedDomain, list_all_domains, read_owner
from libvirt_operator.domain_xml import DomainDefinition
from libvirt_operator.libvirt_errors import UNSUPPORTED, has_code
from libvirt_operator.model import DOMAIN_STATES, DomainFacts, InterfaceFacts, OwnerMetadata

Stats = dict[str, float | int | str]

STATS_NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
"""Skip figures that need a domain job (a guest stuck mid-start would block the bulk call for 30 s)."""
SNAPSHOT_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL,
    libvirt.VIR_DOMAIN_STATS_STATE,
)
"""The groups read for domain snapshots, best first (a driver that refuses one set gets the next).

Only groups libvirtd answers without asking QEMU: with the balloon, vCPU or block groups the bulk
call waits on every guest's monitor in turn (50 booting TCG guests: 28.6 s instead of 2.0 s).
Memory and vCPUs come from the domain XML instead (`domain_xml.DomainDefinition.sizing`)."""

REASONS: dict[str, tuple[str, ...]] = {
    "running": (
        "unknown", "booted", "migrated", "restored", "from snapshot", "unpaused", "migration canceled",
        "save canceled", "wakeup", "crashed", "post-copy", "post-copy failed",
    ),
    "paused": (
        "unknown", "user", "migration", "save", "dump", "ioerror", "watchdog", "from snapshot", "shutting down",
        "snapshot", "api error", "starting up", "post-copy", "post-copy failed",
    ),
    "shutoff": (
        "unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot", "daemon",
    ),
    "shutdown": ("unknown", "user"),
    "crashed": ("unknown", "panicked"),
}
"""libvirt's state reasons by state, as `virsh domstate --reason` names them."""

INACTIVE_STATES = frozenset({"nostate", "shutoff"})
SIZING_KEYS = ("balloon.maximum", "balloon.current", "vcpu.maximum", "vcpu.current")
"""The statistics `DomainDefinition.sizing` takes from the XML (no snapshot group asks libvirt for them)."""


def reason_name(state: str, reason: int) -> str:
    names = REASONS.get(state, ())
    return names[reason] if 0 <= reason < len(names) else "unknown"


def state_name(state: int) -> str:
    return DOMAIN_STATES[state] if 0 <= state < len(DOMAIN_STATES) else "nostate"


@dataclass(frozen=True)
class XmlFacts:
    persistent: bool
    config_owner: OwnerMetadata | None
    live_owner: OwnerMetadata | None
    interfaces: tuple[InterfaceFacts, ...]
    config_digest: str | None
    sizing: dict[str, int]

    @classmethod
    def within(cls, facts: DomainFacts) -> XmlFacts:
        """The XML's facts among `facts` read earlier (the sizing is among their statistics)."""
        return cls(facts.persistent, facts.config_owner, facts.live_owner, facts.interfaces, facts.config_digest,
                   {key: int(facts.stats[key]) for key in SIZING_KEYS if key in facts.stats})


def read_xml(dom: Any, active: bool) -> XmlFacts:
    live = metadata.parse(dom.XMLDesc(0))
    persistent = bool(dom.isPersistent())
    config = metadata.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if active and persistent else live
    definition = DomainDefinition(live)
    return XmlFacts(
        persistent=persistent,
        config_owner=metadata.owner_from_domain(config) if persistent else None,
        live_owner=metadata.owner_from_domain(live) if active else None,
        interfaces=definition.interfaces,
        config_digest=hashlib.sha256(etree.tostring(config, method="c14n")).hexdigest() if persistent else None,
        sizing=definition.sizing,
    )


def with_addresses(dom: Any, interfaces: tuple[InterfaceFacts, ...]) -> tuple[InterfaceFacts, ...]:
    """Fills IP addresses from DHCP leases, else the ARP table; none when both fail."""
    by_mac: dict[str, tuple[str, ...]] = {}
    for source in (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP):
        try:
            found = dom.interfaceAddresses(source)
        except libvirt.libvirtError:
            continue
        by_mac = {
            str(nic.get("hwaddr") or "").lower(): tuple(addr["addr"] for addr in nic.get("addrs") or ())
            for nic in found.values()
        }
        if any(by_mac.values()):
            break
    return tuple(
        dataclasses.replace(nic, ip_addresses=by_mac.get(nic.mac_address.lower(), ())) for nic in interfaces
    )


def domain_stats(conn: Any, domains: Sequence[Any] | None, groups: int) -> list[tuple[Any, Stats]]:
    if domains is None:
        return conn.getAllDomainStats(groups, STATS_NOWAIT)
    return conn.domainListGetStats(list(domains), groups, STATS_NOWAIT)



@dataclass(frozen=True)
class DomainListing:
    """The owned domains' facts, and the listed domains that are not this cluster's."""

    facts: list[DomainFacts]
    foreign: frozenset[str]


Foreign = Literal["foreign"]
FOREIGN: Final[Foreign] = "foreign"
"""`read_one`'s answer for a domain that is there but not this cluster's."""
Owners = Mapping[str, OwnerMetadata | None]
"""Whose each domain is, as the caller knows it already (None: not ours); the marks of the others are read."""
_UNKNOWN: Any = object()


class DomainReader:
    """The Host's domain reads, run in a worker thread on that thread's connection.

    It keeps nothing about domains: what the caller knows already comes in with each read (`Owners`;
    facts no event has made stale), so one listing of N domains whose owners are known costs one
    `listAllDomains` and one statistics call whatever N is (seeds 000, 002, 003). The domain cache
    holds that knowledge, dated by its revisions.
    """

    def __init__(self) -> None:
        self.cluster_id = ""
        """This cluster's identity: domains whose mark names another cluster are foreign (none: every mark is ours)."""
        self._refused_stats: set[int] = set()

    def list(self, conn: Any, flags: int, known: Owners) -> list[ListedDomain]:
        return self._listed([(dom.UUIDString(), dom) for dom in list_all_domains(conn, flags)], known)

    def stats(self, conn: Any, keep_all: bool, groups: tuple[int, ...], known: Owners) -> dict[str, Stats]:
        records = {dom.UUIDString(): (dom, stats) for dom, stats in self._stats(conn, None, groups)}
        if keep_all:
            return {uuid: stats for uuid, (_, stats) in records.items()}
        owners = self._owners(((uuid, dom) for uuid, (dom, _) in records.items()), known)
        return {uuid: stats for uuid, (_, stats) in records.items() if owners.get(uuid) is not None}

    def read_one(
        self, conn: Any, uuid: str, include_foreign: bool, owned: bool,
    ) -> DomainFacts | Foreign | None:
        """None when there is no such domain. With `owned` (the caller knows the domain for its own) the XML
        is read without reading the mark first."""
        try:
            dom = conn.lookupByUUIDString(uuid)
            if not (owned or include_foreign) and metadata.belongs_to(read_owner(dom), self.cluster_id) is None:
                return FOREIGN
            facts = self._facts_of(conn, [dom], include_foreign=True, current={})
        except libvirt.libvirtError as err:
            if has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise
        if not facts:
            return None
        return facts[0] if include_foreign or facts[0].owner is not None else FOREIGN

    def read_all(self, conn: Any, include_foreign: bool, known: Owners, current: Mapping[str, DomainFacts]) -> DomainListing:
        """Facts in `current` are taken as they are but for the statistics: no XML read for those."""
        listed = self.list(conn, 0, known)
        facts = self._facts_of(conn, [d.domain for d in listed if include_foreign or d.owner is not None],
                               include_foreign, current)
        ours = {found.uuid for found in facts if found.owner is not None}
        return DomainListing(facts, frozenset(d.uuid for d in listed if d.uuid not in ours))

    def _listed(self, found: list[tuple[str, Any]], known: Owners) -> list[ListedDomain]:
        owners = self._owners(found, known)
        return [ListedDomain(uuid, dom.name(), owners[uuid], dom.target) for uuid, dom in found if uuid in owners]

    def _owners(self, domains: Iterable[tuple[str, Any]], known: Owners) -> dict[str, OwnerMetadata | None]:
        """Each domain's owner: as known, else one metadata read. Vanished ones are left out."""
        owners: dict[str, OwnerMetadata | None] = {}
        for uuid, dom in domains:
            owner = known.get(uuid, _UNKNOWN)
            if owner is _UNKNOWN:
                try:
                    owner = metadata.belongs_to(read_owner(dom), self.cluster_id)
                except libvirt.libvirtError as err:
                    if not has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                        raise
                    continue
            owners[uuid] = owner
        return owners

    def _stats(self, conn: Any, domains: Sequence[Any] | None,
               groups: tuple[int, ...] = SNAPSHOT_STATS) -> list[tuple[Any, Stats]]:
        if domains is not None and not domains:
            return []
        usable = [g for g in groups if g not in self._refused_stats] or [groups[-1]]
        for group in usable[:-1]:
            try:
                return domain_stats(conn, domains, group)
            except libvirt.libvirtError as err:
                if err.get_error_code() not in UNSUPPORTED:
                    raise
                self._refused_stats.add(group)
        return domain_stats(conn, domains, usable[-1])

    def _facts_of(self, conn: Any, domains: list[Any], include_foreign: bool,
                  current: Mapping[str, DomainFacts]) -> list[DomainFacts]:
        """DomainFacts of `domains` (the owned ones only, without `include_foreign`), one stats call."""
        facts = []
        for dom, stats in self._stats(conn, domains):
            try:
                found = self._facts(dom, stats, current.get(dom.UUIDString()))
            except libvirt.libvirtError as err:
                if not has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                    raise
                continue
            if include_foreign or found.owner is not None:
                facts.append(found)
        return facts

    def _ours(self, xml: XmlFacts) -> XmlFacts:
        """`xml` with the marks of other clusters read as no mark: their domains are foreign here."""
        return dataclasses.replace(xml, config_owner=metadata.belongs_to(xml.config_owner, self.cluster_id),
                                   live_owner=metadata.belongs_to(xml.live_owner, self.cluster_id))

    def _facts(self, dom: Any, stats: Stats, known: DomainFacts | None) -> DomainFacts:
        uuid = dom.UUIDString()
        state = state_name(int(stats.get("state.state", 0)))
        active = state not in INACTIVE_STATES
        xml = XmlFacts.within(known) if known else self._ours(read_xml(dom, active))
        if active and xml.interfaces and not any(nic.ip_addresses for nic in xml.interfaces):
            xml = dataclasses.replace(xml, interfaces=with_addresses(dom, xml.interfaces))
        domain_id = dom.ID()
        return DomainFacts(
            uuid=uuid, name=dom.name(), state=state, reason=reason_name(state, int(stats.get("state.reason", 0))),
            id=domain_id if active and domain_id >= 0 else None, persistent=xml.persistent,
            config_owner=xml.config_owner, live_owner=xml.live_owner, interfaces=xml.interfaces,
            stats={**xml.sizing, **stats}, config_digest=xml.config_digest,
        )
