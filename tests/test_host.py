"""Host and DomainCache against libvirt's test driver and a real libvirtd.

Every test runs on one session-wide asyncio loop: libvirt accepts one event implementation
per process, and libvirtaio binds it to the loop that registered it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_asyncio
from lxml import etree
from lxml.builder import E

from libvirt_operator import domains, metadata
from libvirt_operator.domain_reading import FOREIGN, Owners
from libvirt_operator.domains import DomainCache
from libvirt_operator.domain_listing import list_all_domains, read_owner
from libvirt_operator.host import Host, HostEvent
from libvirt_operator.libvirt_errors import HostUnavailable
from libvirt_operator.model import OwnerMetadata
from lvo_testing import libvirt_env

pytestmark = pytest.mark.asyncio(loop_scope="session")

PREFIX = "lvo-test-host"
OTHER_NAMESPACE = "https://example.org/not-the-operator"
Calls = collections.Counter[str]


def owner_for(uuid: str) -> OwnerMetadata:
    return OwnerMetadata(uid=uuid, namespace="default", name=f"vm-{uuid[:8]}", generation=1, spec_hash="h")


def domain_xml(name: str, uuid: str, *, domain_type: str, metadata_xml: str = "", nics: int = 0) -> str:
    arch = {"arch": "x86_64"} if domain_type == "qemu" else {}
    interfaces = [
        E.interface(E.source(network="default"), E.mac(address=f"52:54:00:{uuid[:2]}:{uuid[2:4]}:{index:02x}"),
                    type="network")
        for index in range(nics)
    ]
    domain = E.domain(
        E.name(name), E.uuid(uuid), E.memory("64", unit="MiB"), E.vcpu("1"), E.os(E.type("hvm", **arch)),
        E.devices(*interfaces), type=domain_type,
    )
    if metadata_xml:
        domain.insert(3, E.metadata(etree.fromstring(metadata_xml)))
    return etree.tostring(domain, encoding="unicode")


def owned_xml(name: str, uuid: str, domain_type: str, nics: int = 0) -> str:
    return domain_xml(name, uuid, domain_type=domain_type, metadata_xml=metadata.owner_xml(owner_for(uuid)), nics=nics)


FOREIGN_MARKS = (
    "",
    f'<vm xmlns="{OTHER_NAMESPACE}" uid="x" namespace="default" name="x" generation="1" specHash="h"/>',
)
"""No metadata at all, and a look-alike mark in another namespace URI."""


def _define_all(conn: Any, xmls: list[str]) -> list[str]:
    return [conn.defineXML(xml).UUIDString() for xml in xmls]


async def define_owned(host: Host, prefix: str, count: int, domain_type: str, nics: int = 0) -> list[str]:
    """Defines `count` owned domains through `host`."""
    uuids = [str(uuidlib.uuid4()) for _ in range(count)]
    xmls = [owned_xml(f"{prefix}-{u[:13]}", u, domain_type, nics) for u in uuids]
    await host.call(_define_all, xmls)
    return uuids


async def elsewhere(uri: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(conn, *args)` on a connection of its own, as another program would: nothing is counted."""
    def run() -> Any:
        conn = libvirt.open(uri)
        try:
            return fn(conn, *args)
        finally:
            conn.close()

    return await asyncio.to_thread(run)


async def define_foreign(uri: str, prefix: str, domain_type: str) -> list[str]:
    """Defined by another program: no mark at all, and a look-alike mark in another namespace."""
    xmls = [domain_xml(f"{prefix}-foreign-{i}", str(uuidlib.uuid4()), domain_type=domain_type, metadata_xml=mark)
            for i, mark in enumerate(FOREIGN_MARKS)]
    return await elsewhere(uri, _define_all, xmls)


async def counted(host: Host, work: Callable[[], Awaitable[Any]]) -> tuple[Calls, collections.Counter[tuple[str, str]]]:
    """The calls `work` made, by API name and by (domain, API name)."""
    calls, domain_calls = host.calls.copy(), host.domain_calls.copy()
    await work()
    return host.calls - calls, host.domain_calls - domain_calls


async def list_and_stats(host: Host, known: Owners) -> None:
    await host.list_domains(known=known)
    await host.all_domain_stats(known=known)


async def owners_listed(host: Host) -> dict[str, OwnerMetadata | None]:
    """Whose every domain is, read from its mark: what a caller knows after one listing."""
    return {domain.uuid: domain.owner for domain in await host.list_domains(include_foreign=True)}


@contextlib.asynccontextmanager
async def started_cache(host: Host) -> AsyncIterator[DomainCache]:
    """A DomainCache following `host` that relists only when told to."""
    cache = DomainCache(host, relist_interval=3600)
    await cache.start()
    try:
        yield cache
    finally:
        await cache.stop()


async def defined_and_read(cache: DomainCache, log: EventLog, uuids: list[str]) -> None:
    """Waits until the define event of each of `uuids` has come and been read by `cache`."""
    for uuid in uuids:  # a define's event arriving after a read would rightly make what it read stale
        await log.wait(lambda e, u=uuid: e.uuid == u and e.event == libvirt.VIR_DOMAIN_EVENT_DEFINED)
    await cache.settle()


def calls_on(domain_calls: collections.Counter[tuple[str, str]], uuids: set[str]) -> Calls:
    return collections.Counter({api: n for (u, api), n in domain_calls.items() if u in uuids})


class EventLog:
    """A Host listener that lets a test wait for an event without polling."""

    def __init__(self, host: Host) -> None:
        self.events: list[HostEvent] = []
        self._arrived = asyncio.Condition()
        host.subscribe(self._record)

    def _record(self, event: HostEvent) -> None:
        self.events.append(event)
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._arrived:
            self._arrived.notify_all()

    async def wait(self, predicate: Callable[[HostEvent], bool], timeout: float = 30) -> HostEvent:
        async with asyncio.timeout(timeout), self._arrived:
            while True:
                found = next((event for event in self.events if predicate(event)), None)
                if found is not None:
                    return found
                await self._arrived.wait()


@pytest_asyncio.fixture(loop_scope="session")
async def test_host(test_uri: str) -> AsyncIterator[Host]:
    host = Host(test_uri)
    await host.start()
    yield host
    await host.stop()


@pytest.fixture
def system_prefix(system_uri: str) -> Iterator[str]:
    """A unique name prefix on qemu:///system; every domain carrying it is removed afterwards."""
    prefix = f"{PREFIX}-{uuidlib.uuid4().hex[:6]}"
    yield prefix
    conn = libvirt.open(system_uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
    finally:
        conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def system_host(system_uri: str) -> AsyncIterator[Host]:
    host = Host(system_uri, reconnect_min=0.2, reconnect_max=2.0)
    await host.start()
    yield host
    await host.stop()


# --- listing costs ---------------------------------------------------------------------------


@pytest.mark.libvirt
async def test_listing_costs_the_same_calls_for_10_and_1000_owned_domains(test_host: Host, test_uri: str) -> None:
    log = EventLog(test_host)
    async with started_cache(test_host) as cache:
        owned = await define_owned(test_host, PREFIX, 10, "test")
        await defined_and_read(cache, log, owned)
        relist_10, _ = await counted(test_host, cache.relist)
        known = await owners_listed(test_host)
        at_10, _ = await counted(test_host, lambda: list_and_stats(test_host, known))
        more = await define_owned(test_host, PREFIX, 990, "test")
        await defined_and_read(cache, log, more)
        relist_1000, _ = await counted(test_host, cache.relist)
        known |= {uuid: owner_for(uuid) for uuid in more}
        at_1000, _ = await counted(test_host, lambda: list_and_stats(test_host, known))

    assert relist_10 == relist_1000 == {"listAllDomains": 1, "domainListGetStats": 1}
    assert at_10 == at_1000 == {"listAllDomains": 1, "getAllDomainStats": 1}
    assert {d.uuid for d in await test_host.list_domains(known=known)} == set(owned + more)
    assert set(owned + more) <= set(cache.snapshots())

    fresh = Host(test_uri)
    await fresh.start()
    try:
        every = len(await owners_listed(fresh))
        assert fresh.calls["metadata"] == every >= 1001
    finally:
        await fresh.stop()


@pytest.mark.libvirt
async def test_foreign_domains_are_never_returned_nor_touched(test_uri: str) -> None:
    host = Host(test_uri)  # open first: the test driver forgets its domains when its last connection closes
    await host.start()
    cache = DomainCache(host, relist_interval=3600)
    try:
        foreign = set(await define_foreign(test_uri, PREFIX, "test"))
        test_domain = await elsewhere(test_uri, lambda conn: conn.lookupByName("test").UUIDString())
        owned = set(await define_owned(host, PREFIX, 3, "test", nics=1))
        listed = await host.list_domains(include_foreign=True)
        assert foreign | {test_domain} <= {d.uuid for d in listed if d.owner is None}
        known = {d.uuid: d.owner for d in listed}
        assert {d.uuid for d in await host.list_domains(known=known)} == owned
        assert set(await host.all_domain_stats(known=known)) == owned
        assert {f.uuid for f in (await host.read_domains(known=known)).facts} == owned
        by_host = host.domain_calls.copy()

        await cache.start()
        for _ in range(2):
            await cache.relist()
        await elsewhere(test_uri, _start_and_destroy, sorted(foreign | {test_domain}))
        await asyncio.sleep(0.1)
        await cache.settle()
        await cache.relist()
        assert set(cache.snapshots()) == owned
        assert cache.foreign_domains == len(foreign | {test_domain})
    finally:
        await cache.stop()
        await host.stop()
    by_cache = host.domain_calls - by_host
    for uuid in foreign | {test_domain}:
        assert calls_on(by_host, {uuid}) == calls_on(by_cache, {uuid}) == {"metadata": 1}


def _start_and_destroy(conn: Any, uuids: list[str]) -> None:
    for uuid in uuids:
        dom = conn.lookupByUUIDString(uuid)
        if dom.isActive():
            dom.suspend()
            dom.resume()
        else:
            dom.create()
            dom.destroy()


@pytest.mark.libvirt
async def test_system_listing_costs_the_same_for_10_and_1000_and_skips_foreign(
    system_uri: str, system_prefix: str,
) -> None:
    foreign = set(await define_foreign(system_uri, system_prefix, "qemu"))
    host = Host(system_uri)
    await host.start()
    try:
        owned = set(await define_owned(host, system_prefix, 10, "qemu"))
        known = await owners_listed(host)
        at_10, on_domains_10 = await counted(host, lambda: list_and_stats(host, known))
        more = set(await define_owned(host, system_prefix, 990, "qemu"))
        known |= {uuid: owner_for(uuid) for uuid in more}
        owned |= more
        at_1000, on_domains_1000 = await counted(host, lambda: list_and_stats(host, known))
        mine = {d.uuid for d in await host.list_domains(known=known) if d.name.startswith(system_prefix)}
    finally:
        await host.stop()

    on_domains = on_domains_10 + on_domains_1000
    others = sum(n for (u, api), n in on_domains.items() if api == "metadata" and u not in owned | foreign)
    assert at_10 + at_1000 - collections.Counter(metadata=others) == {"listAllDomains": 2, "getAllDomainStats": 2}
    assert at_10["listAllDomains"] == at_1000["listAllDomains"] == 1
    assert not calls_on(on_domains, owned | foreign)
    assert mine == owned
    for uuid in foreign:
        assert calls_on(host.domain_calls, {uuid}) == {"metadata": 1}


@pytest.mark.libvirt
async def test_legacy_listing_only_when_list_all_domains_is_not_supported(test_host: Host) -> None:
    owned = set(await define_owned(test_host, PREFIX, 4, "test"))
    unsupported = await test_host.call(_no_support_error)

    class WithoutListAll:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

        def listAllDomains(self, flags: int = 0) -> list[Any]:  # noqa: N802 - libvirt's name
            raise unsupported

    def legacy(conn: Any) -> set[str]:
        return {dom.UUIDString() for dom in list_all_domains(WithoutListAll(conn))}

    before = test_host.calls.copy()
    found = await test_host.call(legacy)
    made = test_host.calls - before
    assert owned <= found
    assert made["listDomainsID"] == made["listDefinedDomains"] == 1
    assert made["lookupByName"] >= len(owned)
    modern, _ = await counted(test_host, lambda: test_host.list_domains(known={uuid: owner_for(uuid) for uuid in owned}))
    assert modern["listAllDomains"] == 1 and not modern.keys() & {"listDomainsID", "listDefinedDomains"}


def _no_support_error(conn: Any) -> libvirt.libvirtError:
    try:
        conn.setKeepAlive(5, 3)  # the test driver has no keepalive: VIR_ERR_NO_SUPPORT
    except libvirt.libvirtError as err:
        assert err.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT
        return err
    raise AssertionError("the test driver supports keepalive now; pick another unsupported call")


# --- reading domains -------------------------------------------------------------------------


@pytest.mark.libvirt
async def test_read_domain_reports_state_reason_owner_and_addresses(test_host: Host, test_uri: str) -> None:
    persistent, = await define_owned(test_host, PREFIX, 1, "test", nics=1)
    transient = str(uuidlib.uuid4())
    await test_host.call(lambda conn, xml: conn.createXML(xml), owned_xml(f"{PREFIX}-transient", transient, "test"))

    stopped = await test_host.read_domain(persistent)
    assert stopped is not None
    assert (stopped.state, stopped.reason, stopped.id, stopped.persistent) == ("shutoff", "unknown", None, True)
    assert stopped.config_owner == owner_for(persistent) and stopped.live_owner is None
    assert stopped.interfaces[0].ip_addresses == ()

    domain = await _lookup(test_host, persistent)
    await test_host.call(lambda conn, dom: (dom.create(), dom.suspend()), domain)
    paused = await test_host.read_domain(persistent)
    assert paused is not None and (paused.state, paused.reason) == ("paused", "user") and paused.id is not None
    assert paused.live_owner == paused.config_owner == owner_for(persistent)
    assert paused.interfaces[0].ip_addresses  # the test driver invents a lease
    assert paused.stats["state.state"] == libvirt.VIR_DOMAIN_PAUSED

    running = await test_host.read_domain(transient)
    assert running is not None and not running.persistent
    assert (running.state, running.reason, running.config_owner, running.live_owner) == (
        "running", "booted", None, owner_for(transient))

    await test_host.call(lambda conn, dom: dom.destroy(), domain)
    assert await test_host.read_domain(str(uuidlib.uuid4())) is None


@pytest.mark.libvirt
async def test_snapshot_stats_never_ask_qemu_and_take_memory_and_vcpus_from_the_xml(
    system_host: Host, system_prefix: str,
) -> None:
    """Balloon, vCPU and block statistics make libvirtd ask each guest's QEMU monitor in turn,
    which starved guests answer slowly; snapshots ask only for groups libvirtd knows itself."""
    uuid, = await define_owned(system_host, system_prefix, 1, "qemu")
    await system_host.call(lambda conn, dom: dom.create(), await _lookup(system_host, uuid))  # SeaBIOS, no OS

    running = await system_host.read_domain(uuid)
    assert running is not None and running.state == "running"
    assert (running.stats["balloon.current"], running.stats["balloon.maximum"]) == (64 * 1024, 64 * 1024)
    assert (running.stats["vcpu.current"], running.stats["vcpu.maximum"]) == (1, 1)
    asked_qemu = [key for key in running.stats if key.startswith(("balloon.rss", "vcpu.0.", "block."))]
    assert not asked_qemu and "cpu.time" in running.stats

    capacity = await system_host.capacity(libvirt_env.DEFAULT_POOL)
    assert capacity.vcpus_used >= 1 and capacity.memory_used_bytes >= 64 * 1024 * 1024


@pytest.mark.libvirt
async def test_relisting_reads_xml_only_of_domains_an_event_touched(test_host: Host) -> None:
    log = EventLog(test_host)
    async with started_cache(test_host) as cache:
        uuids = await define_owned(test_host, PREFIX, 20, "test")
        await defined_and_read(cache, log, uuids)
        again, _ = await counted(test_host, cache.relist)
        assert again == {"listAllDomains": 1, "domainListGetStats": 1}

        async with cache.reads_held(uuids[0]):  # the event's own read waits: the relist sees the event alone
            await test_host.call(lambda conn, dom: dom.create(), await _lookup(test_host, uuids[0]))
            await log.wait(lambda e: e.uuid == uuids[0] and e.event == libvirt.VIR_DOMAIN_EVENT_STARTED)
            touched, on_domains = await counted(test_host, cache.relist)
        assert set(u for u, api in on_domains if api == "XMLDesc") == {uuids[0]}
        assert touched["listAllDomains"] == touched["domainListGetStats"] == 1 and not touched["metadata"]
        started = cache.get(uuids[0])
        assert started.state == "running" and started.live_owner == owner_for(uuids[0])

        await cache.settle()
        fresh = DomainCache(test_host)
        cold, _ = await counted(test_host, fresh.relist)
        assert cold["XMLDesc"] >= 20 and cold["metadata"] >= 20


@pytest.mark.libvirt
async def test_a_domain_the_agent_defined_is_read_without_reading_its_mark(test_host: Host) -> None:
    """The agent tells the cache the mark it defined a domain with; the define's event is then read at once
    from the XML. A domain defined by another program has its mark read first (it may be foreign)."""
    log = EventLog(test_host)
    async with started_cache(test_host) as cache:
        claimed, unclaimed = (str(uuidlib.uuid4()) for _ in range(2))
        cache.remember_owner(claimed, owner_for(claimed))
        await test_host.call(_define_all, [owned_xml(f"{PREFIX}-{u[:13]}", u, "test") for u in (claimed, unclaimed)])
        await defined_and_read(cache, log, [claimed, unclaimed])
        assert cache.get(claimed).owner == owner_for(claimed) and cache.get(unclaimed).owner == owner_for(unclaimed)
    assert _calls_about(test_host, claimed)["metadata"] == 0
    assert _calls_about(test_host, unclaimed)["metadata"] == 1


async def _lookup(host: Host, uuid: str) -> libvirt.virDomain:
    return await host.call(lambda conn, u: conn.lookupByUUIDString(u), uuid)


@pytest.mark.libvirt
async def test_marking_a_foreign_domain_makes_it_owned(test_host: Host, test_uri: str) -> None:
    log = EventLog(test_host)
    plain, _ = await define_foreign(test_uri, PREFIX, "test")
    async with started_cache(test_host) as cache:
        assert plain not in cache.snapshots()
        mark = etree.tostring(E.vm(dict(metadata.owner_element(owner_for(plain)).attrib)), encoding="unicode")
        await test_host.call(
            lambda conn, dom, xml: dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, metadata.METADATA_PREFIX,
                                                   metadata.METADATA_NAMESPACE, 0),
            await _lookup(test_host, plain), mark,
        )
        await log.wait(lambda e: e.uuid == plain and e.kind == "metadata")
        await cache.settle()
        assert cache.get(plain).owner == owner_for(plain)
        await cache.relist()
        assert cache.get(plain).owner == owner_for(plain)
    assert await test_host.call(lambda conn, dom: read_owner(dom), await _lookup(test_host, plain)) == owner_for(plain)


@pytest.mark.libvirt
async def test_capacity_on_the_test_driver_and_on_qemu(test_host: Host, system_host: Host) -> None:
    test = await test_host.capacity("default")
    assert (test.hypervisor_type, test.storage_pool_free_bytes) == ("TEST", None)
    assert test.vcpus > 0 and test.memory_bytes > 0 and test.libvirt_version.count(".") == 2

    qemu = await system_host.capacity(libvirt_env.DEFAULT_POOL)
    assert qemu.hypervisor_type == "QEMU" and qemu.hypervisor_version.count(".") == 2
    assert qemu.hostname and qemu.cpu_model and qemu.vcpus >= 1 and qemu.memory_bytes > 0
    assert qemu.storage_pool_free_bytes is not None and qemu.storage_pool_free_bytes > 0
    assert (await system_host.capacity("no-such-pool")).storage_pool_free_bytes is None


# --- the cache -------------------------------------------------------------------------------


def _steps(n: int) -> list[str]:
    """Each domain goes a different way, so the final states differ."""
    return ["create", "suspend", "resume", "destroy"][: 1 + n % 4]


def _act(conn: Any, dom: Any, step: str) -> None:
    getattr(dom, step)()


@pytest.mark.libvirt
async def test_cache_follows_200_domains_acted_on_concurrently(test_host: Host) -> None:
    uuids = await define_owned(test_host, PREFIX, 200, "test")
    cache = DomainCache(test_host, relist_interval=3600)
    seen: dict[str, list[int]] = collections.defaultdict(list)
    cache.subscribe(lambda u: seen[u].append(cache.get(u).revision if cache.get(u) else -1))
    await cache.start()
    try:
        domains = [await _lookup(test_host, u) for u in uuids]

        async def walk(index: int, dom: Any) -> None:
            for step in _steps(index):
                await test_host.call(_act, dom, step)

        await asyncio.gather(*(walk(i, dom) for i, dom in enumerate(domains)))
        await asyncio.sleep(0.2)
        await cache.settle()

        snapshots = cache.snapshots()
        assert set(uuids) <= set(snapshots)
        for index, uuid in enumerate(uuids):
            fresh = await test_host.read_domain(uuid)
            held = snapshots[uuid]
            assert fresh is not None
            assert (held.state, held.reason, held.id) == (fresh.state, fresh.reason, fresh.id), uuid
            assert held.state == {0: "running", 1: "paused", 2: "running", 3: "shutoff"}[index % 4]
        for uuid in uuids:
            revisions = seen[uuid]
            assert revisions and all(a < b for a, b in zip(revisions, revisions[1:], strict=False)), revisions
    finally:
        await cache.stop()


def _calls_about(host: Host, uuid: str) -> collections.Counter[str]:
    return collections.Counter({name: count for (about, name), count in host.domain_calls.items() if about == uuid})


@pytest.mark.libvirt
async def test_no_read_of_a_domain_starts_while_reads_of_it_are_held(test_host: Host) -> None:
    """The agent's own calls on a domain run with its reads held (`DomainCache.reads_held`): a
    call about a starting domain waits inside libvirtd holding the lock every define needs.

    Events that come meanwhile are read once, after; a `refresh` inside the hold covers those before
    it; `wait_for_change` inside the hold lets the reads it waits for run.
    """
    held, refreshed, waited = await define_owned(test_host, PREFIX, 3, "test")
    cache = DomainCache(test_host, relist_interval=3600)
    await cache.start()
    try:
        dom = await _lookup(test_host, held)
        before = _calls_about(test_host, held)
        async with cache.reads_held(held):
            await test_host.call(_act, dom, "create")
            await asyncio.sleep(0.3)  # the Started event arrives meanwhile
            assert _calls_about(test_host, held) - before == collections.Counter({"create": 1})
            assert cache.get(held).state == "shutoff"
        await cache.settle()
        assert cache.get(held).state == "running"

        dom = await _lookup(test_host, refreshed)
        async with cache.reads_held(refreshed):
            await test_host.call(_act, dom, "create")
            await asyncio.sleep(0.3)
            assert (await cache.refresh(refreshed)).state == "running"
            after_refresh = _calls_about(test_host, refreshed)
        await asyncio.sleep(0.3)
        await cache.settle()
        assert _calls_about(test_host, refreshed) == after_refresh, "the refresh already read what the event said"

        dom = await _lookup(test_host, waited)
        async with cache.reads_held(waited):
            revision = cache.get(waited).revision
            await test_host.call(_act, dom, "create")
            changed = await cache.wait_for_change(waited, revision, timeout=10)
            assert changed is not None and changed.state == "running"
    finally:
        await cache.stop()


@pytest.mark.libvirt
async def test_a_first_listing_that_fails_or_takes_longer_than_a_call_still_starts_the_cache(
        test_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent restarted on a host with thousands of domains: its first listing takes longer than one call may
    (42 s for 10,000 on libvirtd's test driver, against a 30 s call timeout), and libvirtd may refuse it once.
    The cache must start all the same: before, the agent never reconciled anything and said it was healthy."""
    host = Host(test_uri, call_timeout=0.2)
    await host.start()
    listings = []
    original = host.reader.read_all

    def refused_then_slow(conn: Any, *args: Any) -> Any:
        listings.append(time.monotonic())
        if len(listings) == 1:
            raise libvirt.libvirtError("libvirtd refused the first listing")
        time.sleep(0.6)  # three call timeouts
        return original(conn, *args)

    monkeypatch.setattr(host.reader, "read_all", refused_then_slow)
    monkeypatch.setattr(domains, "FIRST_LISTING_RETRY_SECONDS", 0.05)
    cache = DomainCache(host, relist_interval=3600)
    try:
        await asyncio.wait_for(cache.start(), 20)
        assert len(listings) == 2
    finally:
        await cache.stop()
        await host.stop()


@pytest.mark.unit
async def test_cache_drops_snapshots_older_than_what_it_holds() -> None:
    cache = DomainCache(Host("test:///default"))
    changes: list[str] = []
    cache.subscribe(changes.append)
    uuid = str(uuidlib.uuid4())
    older, newer = cache.next_revision(), cache.next_revision()

    assert cache.offer(_snapshot(uuid, newer, "running"))
    assert not cache.offer(_snapshot(uuid, older, "shutoff"))  # read earlier, delivered later
    assert cache.get(uuid).state == "running" and cache.get(uuid).revision == newer

    removal = cache.next_revision()
    late = cache.next_revision()
    assert cache.offer_removal(uuid, removal)
    assert cache.get(uuid) is None and uuid not in cache.snapshots()
    assert not cache.offer(_snapshot(uuid, newer, "paused"))  # older than the tombstone
    assert not cache.offer_removal(uuid, older)
    assert cache.offer(_snapshot(uuid, late, "running"))
    assert cache.get(uuid).revision == late
    assert changes == [uuid, uuid, uuid]

    same_facts = cache.next_revision()
    assert cache.offer(_snapshot(uuid, same_facts, "running", cpu=5))  # stats only: stored, no change
    assert changes == [uuid, uuid, uuid]
    waiter = asyncio.create_task(cache.wait_for_change(uuid, same_facts, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    cache.offer(_snapshot(uuid, cache.next_revision(), "paused"))
    assert (await waiter).state == "paused"
    assert await cache.wait_for_change(uuid, cache.next_revision(), timeout=0.01) is None


def _snapshot(uuid: str, revision: int, state: str, cpu: int = 0) -> Any:
    from libvirt_operator.model import DomainSnapshot

    return DomainSnapshot(uuid=uuid, name="n", revision=revision, state=state, reason="unknown", id=None,
                          persistent=True, config_owner=owner_for(uuid), stats={"cpu.time": cpu})


# --- a real libvirtd dies and comes back -------------------------------------------------------


@pytest.mark.libvirt
async def test_host_reconnects_after_libvirtd_is_killed_and_events_flow_again(
    system_host: Host, system_prefix: str, system_uri: str,
) -> None:
    log = EventLog(system_host)
    kept, gone = await define_owned(system_host, system_prefix, 2, "qemu")
    cache = DomainCache(system_host, relist_interval=3600)
    await cache.start()
    try:
        assert {kept, gone} <= set(cache.snapshots())
        await asyncio.to_thread(libvirt_env.kill_libvirtd)
        await log.wait(lambda e: e.kind == "disconnected")
        assert not system_host.connected
        with pytest.raises(HostUnavailable):
            await system_host.list_domains()

        await asyncio.to_thread(libvirt_env.restart_libvirtd)
        await log.wait(lambda e: e.kind == "reconnected", timeout=60)
        assert system_host.connected
        await system_host.call(lambda conn, u: conn.lookupByUUIDString(u).undefine(), gone)
        await system_host.call(lambda conn, u: conn.lookupByUUIDString(u).create(), kept)
        started = await log.wait(lambda e: e.uuid == kept and e.event == libvirt.VIR_DOMAIN_EVENT_STARTED)
        assert started.kind == "lifecycle"
        await log.wait(lambda e: e.uuid == gone and e.event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED)

        await asyncio.sleep(0.2)
        await cache.settle()
        truth = await asyncio.to_thread(_owned_states, system_uri, system_prefix)
        held = {u: s.state for u, s in cache.snapshots().items() if s.name.startswith(system_prefix)}
        assert held == truth == {kept: "running"}
        assert (await system_host.capacity(libvirt_env.DEFAULT_POOL)).vcpus_used >= 1
    finally:
        await cache.stop()


def _owned_states(uri: str, prefix: str) -> dict[str, str]:
    """listAllDomains on a connection of its own: the owned domains with `prefix` and their states."""
    conn = libvirt.open(uri)
    try:
        return {
            dom.UUIDString(): ("running" if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING else "other")
            for dom in conn.listAllDomains()
            if dom.name().startswith(prefix) and read_owner(dom) is not None
        }
    finally:
        conn.close()


# --- while a call is held up inside libvirt ----------------------------------------------------


def _suspend_on(conn: Any, uuid: str) -> libvirt.virConnect:
    conn.lookupByUUIDString(uuid).suspend()
    return conn.target


@contextlib.asynccontextmanager
async def call_held_in_libvirt(host: Host, uuid: str) -> AsyncIterator[asyncio.Future[Any]]:
    """A call held up inside libvirt for real: the suspend of a guest whose QEMU is SIGSTOPped.

    Yields the call's future, whose result is the connection the call was made on; on leaving, QEMU
    continues and the call is awaited.
    """
    await host.call(lambda conn, u: conn.lookupByUUIDString(u).create(), uuid)
    name = await host.call(lambda conn, u: conn.lookupByUUIDString(u).name(), uuid)
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        blocked = asyncio.ensure_future(host.call(_suspend_on, uuid))
        await asyncio.sleep(0.5)
        assert not blocked.done(), "the call was not held up: the test proves nothing"
        yield blocked
    finally:
        os.kill(pid, signal.SIGCONT)
    await blocked


@pytest.mark.libvirt
async def test_an_event_arrives_at_once_while_a_call_is_held_up_in_libvirt(system_uri: str, system_prefix: str) -> None:
    """Events that arrive while a call waits in libvirt must reach the loop at once, not when the
    loop happens to wake up. (When calls shared the events' connection, the thread waiting in a call
    read them and libvirt called the event implementation from that thread: see `LoopEvents`.)

    The other guest is suspended from a plain thread (as by another program) while the loop sleeps;
    this Host's keepalive is slowed so that no libvirt timer wakes the loop meanwhile either.
    """
    host = Host(system_uri, keepalive_interval=600)
    await host.start()
    log = EventLog(host)
    arrived: dict[str, float] = {}

    def note_suspended(event: HostEvent) -> None:
        if event.event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            arrived.setdefault(event.uuid, time.monotonic())

    host.subscribe(note_suspended)
    held, observed = await define_owned(host, system_prefix, 2, "qemu")
    try:
        await host.call(lambda conn, u: conn.lookupByUUIDString(u).create(), observed)
        async with call_held_in_libvirt(host, held) as blocked:
            suspended: dict[str, float] = {}

            def suspend_elsewhere() -> None:
                subprocess.run(["virsh", "-c", system_uri, "suspend", observed], check=True, capture_output=True)
                suspended["at"] = time.monotonic()

            elsewhere_thread = threading.Thread(target=suspend_elsewhere)
            elsewhere_thread.start()
            await asyncio.sleep(3)
            elsewhere_thread.join()
            assert not blocked.done(), "the call did not stay blocked: the test proves nothing"
            assert observed in arrived and arrived[observed] - suspended["at"] < 1.0
        await log.wait(lambda e: e.uuid == held and e.event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED)
    finally:
        await host.stop()


def _lookup_read_suspend_resume(conn: Any, uuid: str, rounds: int) -> libvirt.virConnect:
    """Calls back to back, each issued the moment the previous reply is in; returns the connection used."""
    for _ in range(rounds):
        dom = conn.lookupByUUIDString(uuid)
        dom.XMLDesc(0)
        dom.suspend()
        dom.resume()
    return conn.target


@pytest.mark.libvirt
async def test_calls_beside_a_call_held_up_in_libvirt_use_connections_of_their_own(
    system_uri: str, system_prefix: str,
) -> None:
    """While one call waits inside libvirt, calls from other threads go on other connections and finish.

    Sharing the held call's connection is what must not happen: libvirt 9.0's client can then lose
    the wake-up that sends the next call, which waits for the held call to end (see
    `ThreadConnections`; a lookup beside a QEMU start waited 0.2 s, the whole start, in about one
    round of four). That race needs a thread preempted between two instructions and cannot be forced
    here, so this checks what rules it out.
    """
    host = Host(system_uri)
    await host.start()
    held, *others = await define_owned(host, system_prefix, 3, "qemu")
    try:
        for other in others:
            await host.call(lambda conn, u: conn.lookupByUUIDString(u).create(), other)
        async with call_held_in_libvirt(host, held) as blocked:
            async with asyncio.timeout(60):
                used = await asyncio.gather(*(host.call(_lookup_read_suspend_resume, other, 10) for other in others))
            assert not blocked.done(), "the call did not stay blocked: the test proves nothing"
        held_connection = blocked.result()
        assert held_connection is not None and held_connection not in used
    finally:
        await host.stop()


def marked_xml(name: str, uuid: str, cluster: str) -> str:
    owner = dataclasses.replace(owner_for(uuid), cluster=cluster)
    return domain_xml(name, uuid, domain_type="test", metadata_xml=metadata.owner_xml(owner))


@pytest.mark.libvirt
async def test_a_mark_naming_another_cluster_is_foreign_and_one_from_before_cluster_identities_is_not(
        test_uri: str) -> None:
    host = Host(test_uri)
    host.cluster_id = "cluster-a"
    await host.start()
    log = EventLog(host)
    cache = DomainCache(host, relist_interval=3600)
    try:
        ours, others, legacy = (str(uuidlib.uuid4()) for _ in range(3))
        await elsewhere(test_uri, _define_all, [
            marked_xml(f"{PREFIX}-ours", ours, "cluster-a"), marked_xml(f"{PREFIX}-others", others, "cluster-b"),
            marked_xml(f"{PREFIX}-legacy", legacy, "")])
        assert {d.uuid for d in await host.list_domains()} == {ours, legacy}
        assert {f.uuid for f in (await host.read_domains()).facts} == {ours, legacy}
        assert await host.read_domain(others) == FOREIGN
        assert {d.uuid for d in await host.list_domains(include_foreign=True) if d.owner is None} >= {others}
        await cache.start()
        assert set(cache.snapshots()) == {ours, legacy}
        assert cache.foreign_domains >= 1
        before = cache.foreign_domains
        await elsewhere(test_uri, lambda conn: conn.lookupByUUIDString(others).undefine())
        await log.wait(lambda e: e.uuid == others and e.event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED)
        assert cache.foreign_domains == before - 1
    finally:
        await cache.stop()
        await host.stop()
