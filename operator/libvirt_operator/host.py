"""Host: the libvirt connection, its events, domain listing, bulk statistics and capacity.

Every libvirt call runs in a worker thread through `Host.call`, which counts it (`counted_calls`), and turns a
lost connection into `HostUnavailable` plus a background reconnect. Event callbacks run on the
asyncio loop (`libvirt_event_loop`) and only record what happened and tell the listeners.
The Host's connection carries the events and the keepalive; each worker thread makes its calls on a
connection of its own (`thread_connections`), so that no call waits behind another thread's.

What the Host learns per domain (whether it is the operator's, the facts in its XML) is kept
until an event for that domain or a reconnect makes it stale, so listing N owned domains costs
one `listAllDomains` call whatever N is (seeds 000, 002, 003).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import libvirt

from libvirt_operator import METADATA_NAMESPACE, metadata
from libvirt_operator.counted_calls import Counted, unwrap, wrap
from libvirt_operator.domain_listing import ListedDomain, list_all_domains, read_owner
from libvirt_operator.domain_reading import (
    INACTIVE_STATES, SNAPSHOT_STATS, Stats, XmlFacts, domain_stats, read_xml, reason_name, state_name, with_addresses,
)
from libvirt_operator.host_capacity import CAPACITY_STATS, HostCapacity, read_capacity
from libvirt_operator.libvirt_errors import UNSUPPORTED, HostUnavailable, connection_lost, has_code
from libvirt_operator.libvirt_event_loop import bind_event_loop
from libvirt_operator.libvirt_health import HealthTracker
from libvirt_operator.model import DomainFacts, OwnerMetadata, Tuning
from libvirt_operator.thread_connections import ThreadConnections

log = logging.getLogger(__name__)

T = TypeVar("T")
EventKind = Literal["lifecycle", "reboot", "device-removed", "metadata", "reconnected", "disconnected"]


@dataclass(frozen=True)
class HostEvent:
    """Something libvirt told us about a domain (`uuid`) or about the connection (`uuid` None)."""

    kind: EventKind
    uuid: str | None
    event: int = 0
    detail: int = 0


_DOMAIN_EVENTS: dict[int, EventKind] = {
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: "lifecycle",
    libvirt.VIR_DOMAIN_EVENT_ID_REBOOT: "reboot",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: "device-removed",
}
if hasattr(libvirt, "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE"):
    _DOMAIN_EVENTS[libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE] = "metadata"
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3


_UNKNOWN: Any = object()


@dataclass
class _Learned:
    """What one worker job found out, stored by the loop thread if no event made it stale."""

    owners: dict[str, OwnerMetadata | None] = field(default_factory=dict)
    xml: dict[str, XmlFacts] = field(default_factory=dict)
    listed: frozenset[str] | None = None


class _Memos:
    """Ownership and XML facts per domain, each valid until an event for that domain.

    `seq` counts events; a read that began at mark m is stored only if no event for its domain
    (and no reconnect) came after m. Owners given by `remember` survive define and metadata
    events (the definer asserted them); a later read of the XML corrects them if needed.
    Mutated on the loop thread only; workers read it.
    """

    def __init__(self) -> None:
        self.owners: dict[str, OwnerMetadata | None] = {}
        self.xml: dict[str, XmlFacts] = {}
        self.remembered: set[str] = set()
        self.seq = 0
        self.reset_at = 0
        self.last_event: dict[str, int] = {}

    def fresh(self, uuid: str, mark: int) -> bool:
        return mark >= self.reset_at and self.last_event.get(uuid, 0) <= mark

    def touch(self, uuid: str) -> None:
        self.seq += 1
        self.last_event[uuid] = self.seq

    def on_event(self, uuid: str, *, ownership: bool = False, removed: bool = False) -> None:
        self.touch(uuid)
        self.xml.pop(uuid, None)
        if removed:
            self.remembered.discard(uuid)
        if removed or (ownership and uuid not in self.remembered):
            self.owners.pop(uuid, None)

    def remember(self, uuid: str, owner: OwnerMetadata | None) -> None:
        self.touch(uuid)
        self.owners[uuid] = owner
        self.remembered.add(uuid)

    def learn(self, learned: _Learned, mark: int) -> None:
        for uuid, owner in learned.owners.items():
            if self.fresh(uuid, mark):
                self.owners[uuid] = owner
                if owner is None:
                    self.remembered.discard(uuid)
        for uuid, xml in learned.xml.items():
            if self.fresh(uuid, mark):
                self.xml[uuid] = xml
        if learned.listed is not None:
            self._prune(learned.listed, mark)

    def _prune(self, listed: frozenset[str], mark: int) -> None:
        for uuid in [uuid for uuid in self.owners if uuid not in listed and self.fresh(uuid, mark)]:
            self.owners.pop(uuid, None)
            self.xml.pop(uuid, None)
            self.remembered.discard(uuid)

    def reset(self) -> None:
        self.seq += 1
        self.reset_at = self.seq
        self.owners.clear()
        self.xml.clear()
        self.remembered.clear()
        self.last_event.clear()


class Host:
    """One libvirt connection to `uri`, kept alive; see the module docstring."""

    def __init__(self, uri: str, *, reconnect_min: float = 0.5, reconnect_max: float = 10.0, workers: int = 8,
                 keepalive_interval: int = KEEPALIVE_INTERVAL,
                 call_timeout: float = Tuning.libvirt_call_timeout_seconds) -> None:
        self.uri = uri
        self.call_timeout = call_timeout
        """No call is waited for longer: a hung libvirtd makes the call fail and the host read NotResponding."""
        self.health = HealthTracker(uri)
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.keepalive_interval = keepalive_interval
        self.calls: collections.Counter[str] = collections.Counter()
        """Driver calls by API name."""
        self.domain_calls: collections.Counter[tuple[str, str]] = collections.Counter()
        """Driver calls by (domain UUID, API name), for calls that concern one or a list of domains."""
        self.call_seconds: collections.Counter[str] = collections.Counter()
        """Seconds spent in driver calls, by API name."""
        self.connections_opened = 0
        """Connections opened: the Host's own (once per reconnect) and each worker thread's."""
        self._count_lock = threading.Lock()
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: libvirt.virConnect | None = None
        """The Host's own connection: events, keepalive, the close callback; calls go to `_threads`."""
        self._threads = ThreadConnections(uri, self._note_opened)
        self._callback_ids: list[int] = []
        self._listeners: list[Callable[[HostEvent], None]] = []
        self._reconnect_task: asyncio.Task[None] | None = None
        self._memos = _Memos()
        self._refused_stats: set[int] = set()
        self.cluster_id = ""
        """This cluster's identity: domains whose mark names another cluster are foreign (none: every mark is ours)."""

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def subscribe(self, listener: Callable[[HostEvent], None]) -> None:
        """`listener` is called on the loop thread for every HostEvent; it must be cheap."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[HostEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @property
    def foreign_domains(self) -> int:
        """Domains of the last listing that are not this cluster's (unmarked, or marked by another cluster)."""
        return sum(1 for owner in self._memos.owners.values() if owner is None)

    def remember_owner(self, uuid: str, owner: OwnerMetadata | None) -> None:
        """Tells the Host the mark the caller just defined `uuid` with, sparing a metadata read."""
        self._memos.remember(uuid, owner)

    async def start(self) -> None:
        """Opens the connection; when libvirtd does not answer yet, keeps trying in the background."""
        self._loop = asyncio.get_running_loop()
        bind_event_loop(self._loop)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="libvirt")
        try:
            await self._open()
        except libvirt.libvirtError as err:
            if not connection_lost(err):
                raise
            log.warning("%s: not reachable (%s); retrying in the background", self.uri, err)
            self._reconnect_task = asyncio.create_task(self._reconnect(None))

    async def stop(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._run(self._discard, conn, self._callback_ids)
        if self._executor is not None:
            await self._run(self._threads.close_all)
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(conn, *args)` in a worker thread, `conn` being that thread's own connection.

        `conn`, and every libvirt object among `args`, arrive as `Counted` proxies: each call
        made through them (and through the objects they return) is added to `calls`. Pass
        libvirt objects as arguments rather than closing over them, or their calls go uncounted.
        libvirt objects in the result are handed back unwrapped; they stay bound to the connection
        that made them (libvirt refuses to mix connections in one call, as `domainListGetStats`).
        A lost connection raises HostUnavailable and starts the reconnect; other errors raise
        `libvirt.libvirtError`.
        """
        conn = self._conn
        if conn is None:
            raise HostUnavailable(f"{self.uri}: not connected")
        try:
            # The worker cannot be interrupted: a call libvirtd never answers keeps its thread (and that
            # thread's connection) until it does; the agent stops waiting.
            result = await asyncio.wait_for(self._run(self._in_worker, fn, args), self.call_timeout)
        except TimeoutError as err:
            self.health.not_responding(self.call_timeout, getattr(fn, "__name__", "a call"))
            raise HostUnavailable(f"{self.uri}: no answer within {self.call_timeout:g} s") from err
        except libvirt.libvirtError as err:
            if not connection_lost(err):
                self.health.answered()
                raise
            self._connection_lost(conn)
            raise HostUnavailable(f"{self.uri}: {err}") from err
        self.health.answered()
        return unwrap(result)

    def _in_worker(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._threads.use() as conn:
            return fn(Counted(conn, self._count), *(wrap(arg, self._count) for arg in args))

    async def list_domains(self, *, include_foreign: bool = False, flags: int = 0) -> list[ListedDomain]:
        """One listAllDomains call (`flags`: its VIR_CONNECT_LIST_DOMAINS_* groups; 0 is all).

        Ownership comes from the memo, else one metadata read per domain, once per connection.
        """
        mark = self._memos.seq
        listed, learned = await self.call(self._list_job, flags)
        self._memos.learn(learned, mark)
        return [domain for domain in listed if include_foreign or domain.owner is not None]

    async def all_domain_stats(
        self, *, include_foreign: bool = False, groups: tuple[int, ...] = SNAPSHOT_STATS,
    ) -> dict[str, Stats]:
        """Statistics by UUID of every owned domain (every domain with `include_foreign`), in one call."""
        mark = self._memos.seq
        stats, learned = await self.call(self._stats_job, include_foreign, groups)
        self._memos.learn(learned, mark)
        return stats

    async def read_domain(self, uuid: str, *, include_foreign: bool = False) -> DomainFacts | None:
        """Everything about one domain now; None if there is no such domain or it is foreign."""
        mark = self._memos.seq
        facts, learned = await self.call(self._read_one_job, uuid, include_foreign)
        self._memos.learn(learned, mark)
        return facts

    async def read_domains(self, *, include_foreign: bool = False) -> list[DomainFacts]:
        """Every owned domain: a listing, one stats call, and XML reads only where none is known.

        IP addresses are read again for active domains that have interfaces but no address yet.
        """
        mark = self._memos.seq
        facts, learned = await self.call(self._read_all_job, include_foreign)
        self._memos.learn(learned, mark)
        return facts

    async def capacity(self, pool_name: str) -> HostCapacity:
        """Seed 001's host figures; usage sums every active domain's, foreign ones included."""
        stats = await self.all_domain_stats(include_foreign=True, groups=CAPACITY_STATS)
        capacity = await self.call(read_capacity, pool_name)
        active = [s for s in stats.values() if state_name(int(s.get("state.state", 0))) not in INACTIVE_STATES]
        return dataclasses.replace(
            capacity,
            vcpus_used=sum(int(s.get("vcpu.current", 0)) for s in active),
            memory_used_bytes=1024 * sum(int(s.get("balloon.current", s.get("balloon.maximum", 0))) for s in active),
        )

    def _note_opened(self) -> None:
        with self._count_lock:
            self.connections_opened += 1

    def _count(self, name: str, uuids: Sequence[str] = (), seconds: float = 0.0) -> None:
        with self._count_lock:
            self.calls[name] += 1
            self.call_seconds[name] += seconds
            self.domain_calls.update((uuid, name) for uuid in uuids)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise HostUnavailable(f"{self.uri}: not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def _open(self) -> None:
        self._conn, self._callback_ids = await self._run(self._connect)
        self.health.connected()

    def _connect(self) -> tuple[libvirt.virConnect, list[int]]:
        self._note_opened()
        raw = libvirt.open(self.uri)
        conn = Counted(raw, self._count)
        try:
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(self.keepalive_interval, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._on_close, None)
            return raw, [conn.domainEventRegisterAny(None, event_id, self._callback(kind), None)
                         for event_id, kind in _DOMAIN_EVENTS.items()]
        except BaseException:
            raw.close()
            raise

    def _callback(self, kind: EventKind) -> Callable[..., None]:
        return functools.partial(self._on_domain_event, kind)

    def _discard(self, conn: libvirt.virConnect, callback_ids: list[int]) -> None:
        """Best effort: the connection may be dead already."""
        for callback_id in callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _on_domain_event(
        self, kind: EventKind, conn: libvirt.virConnect, dom: libvirt.virDomain, *payload: Any,
    ) -> None:
        if conn is not self._conn:
            return
        uuid = dom.UUIDString()
        numbers = [value for value in payload[:-1] if isinstance(value, int)] + [0, 0]
        event, detail = numbers[0], numbers[1]
        if kind == "lifecycle":
            self._memos.on_event(
                uuid,
                ownership=event == libvirt.VIR_DOMAIN_EVENT_DEFINED,
                removed=event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
            )
        else:
            self._memos.on_event(uuid, ownership=kind == "metadata" and METADATA_NAMESPACE in (payload[1], None))
        self._notify(HostEvent(kind, uuid, event, detail))

    def _on_close(self, conn: libvirt.virConnect, _reason: int, _opaque: object) -> None:
        """May run on any thread: hands over to the loop."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._connection_lost, conn)

    def _connection_lost(self, conn: libvirt.virConnect) -> None:
        if conn is not self._conn:
            return
        log.warning("%s: connection lost; reconnecting", self.uri)
        self._conn = None
        self.health.disconnected("connection lost; reconnecting")
        self._notify(HostEvent("disconnected", None))
        self._reconnect_task = asyncio.create_task(self._reconnect(conn))

    async def _reconnect(self, dead: libvirt.virConnect | None) -> None:
        if dead is not None:
            await self._run(self._discard, dead, self._callback_ids)
        await self._run(self._threads.close_all)
        delay = self.reconnect_min
        while True:
            try:
                await self._open()
                break
            except libvirt.libvirtError as err:
                log.info("%s: reconnect failed (%s); next try in %.1f s", self.uri, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)
        log.info("%s: reconnected", self.uri)
        self._memos.reset()
        self._notify(HostEvent("reconnected", None))

    def _notify(self, event: HostEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("host event listener %r failed on %r", listener, event)

    # Worker-thread jobs below: they read the memos and return what they learned.

    def _list_job(self, conn: Counted, flags: int) -> tuple[list[ListedDomain], _Learned]:
        return self._listed([(dom.UUIDString(), dom) for dom in list_all_domains(conn, flags)], complete=flags == 0)

    def _listed(self, found: list[tuple[str, Counted]], *, complete: bool) -> tuple[list[ListedDomain], _Learned]:
        owners, learned = self._owners(found)
        if complete:
            learned.listed = frozenset(owners)
        listed = [ListedDomain(uuid, dom.name(), owners[uuid], dom.target) for uuid, dom in found if uuid in owners]
        return listed, learned

    def _owners(self, domains: Iterable[tuple[str, Counted]]) -> tuple[dict[str, OwnerMetadata | None], _Learned]:
        """Each domain's owner: from the memo, else one metadata read. Vanished ones are left out."""
        owners: dict[str, OwnerMetadata | None] = {}
        learned = _Learned()
        memo = self._memos.owners
        for uuid, dom in domains:
            owner = memo.get(uuid, _UNKNOWN)
            if owner is _UNKNOWN:
                try:
                    owner = learned.owners[uuid] = metadata.belongs_to(read_owner(dom), self.cluster_id)
                except libvirt.libvirtError as err:
                    if not has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                        raise
                    continue
            owners[uuid] = owner
        return owners, learned

    def _stats(self, conn: Counted, domains: Sequence[Any] | None,
               groups: tuple[int, ...] = SNAPSHOT_STATS) -> list[tuple[Counted, Stats]]:
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

    def _stats_job(
        self, conn: Counted, keep_all: bool, groups: tuple[int, ...],
    ) -> tuple[dict[str, Stats], _Learned]:
        records = {dom.UUIDString(): (dom, stats) for dom, stats in self._stats(conn, None, groups)}
        if keep_all:
            return {uuid: stats for uuid, (_, stats) in records.items()}, _Learned()
        owners, learned = self._owners((uuid, dom) for uuid, (dom, _) in records.items())
        return {uuid: stats for uuid, (_, stats) in records.items() if owners.get(uuid) is not None}, learned

    def _read_one_job(self, conn: Counted, uuid: str, include_foreign: bool) -> tuple[DomainFacts | None, _Learned]:
        learned = _Learned()
        if self._memos.owners.get(uuid, _UNKNOWN) is None and not include_foreign:
            return None, learned
        try:
            listed, learned = self._listed([(uuid, conn.lookupByUUIDString(uuid))], complete=False)
        except libvirt.libvirtError as err:
            if has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                return None, learned
            raise
        facts = self._facts_of(conn, listed, include_foreign, learned, use_memo=False)
        return (facts[0] if facts else None), learned

    def _read_all_job(self, conn: Counted, include_foreign: bool) -> tuple[list[DomainFacts], _Learned]:
        listed, learned = self._list_job(conn, 0)
        return self._facts_of(conn, listed, include_foreign, learned, use_memo=True), learned

    def _facts_of(
        self, conn: Counted, listed: list[ListedDomain], include_foreign: bool, learned: _Learned, *, use_memo: bool,
    ) -> list[DomainFacts]:
        """DomainFacts for the owned ones of `listed` (all with include_foreign), one stats call.

        With `use_memo`, XML facts already known are not read again.
        """
        wanted = [domain.domain for domain in listed if include_foreign or domain.owner is not None]
        facts = []
        for dom, stats in self._stats(conn, wanted):
            try:
                found = self._facts(dom, stats, learned, self._memos.xml.get(dom.UUIDString()) if use_memo else None)
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

    def _facts(self, dom: Counted, stats: Stats, learned: _Learned, known: XmlFacts | None) -> DomainFacts:
        uuid = dom.UUIDString()
        state = state_name(int(stats.get("state.state", 0)))
        active = state not in INACTIVE_STATES
        xml = known or self._ours(read_xml(dom, active))
        if active and xml.interfaces and not any(nic.ip_addresses for nic in xml.interfaces):
            xml = dataclasses.replace(xml, interfaces=with_addresses(dom, xml.interfaces))
        if xml is not known:
            learned.xml[uuid] = xml
            learned.owners[uuid] = xml.live_owner if active else xml.config_owner
        domain_id = dom.ID()
        return DomainFacts(
            uuid=uuid, name=dom.name(), state=state, reason=reason_name(state, int(stats.get("state.reason", 0))),
            id=domain_id if active and domain_id >= 0 else None, persistent=xml.persistent,
            config_owner=xml.config_owner, live_owner=xml.live_owner, interfaces=xml.interfaces, stats={**xml.sizing, **stats},
            config_digest=xml.config_digest,
        )
