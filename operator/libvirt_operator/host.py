"""Host: the libvirt connection, its events, domain listing, bulk statistics and capacity.

Every libvirt call runs in a worker thread through `Host.call`, which counts it, and turns a
lost connection into `HostUnavailable` plus a background reconnect. Event callbacks run on the
asyncio loop (libvirtaio, fed through `LoopEvents`) and only record what happened and tell the listeners.
The Host's connection carries the events and the keepalive; each worker thread makes its calls on a
connection of its own (`ThreadConnections`), so that no call waits behind another thread's.

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
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import libvirt
import libvirtaio
from lxml import etree

from libvirt_operator import METADATA_NAMESPACE, metadata
from libvirt_operator.libvirt_health import HealthTracker
from libvirt_operator.model import DOMAIN_STATES, InterfaceFacts, OwnerMetadata, Tuning

log = logging.getLogger(__name__)

T = TypeVar("T")
Stats = dict[str, float | int | str]
EventKind = Literal["lifecycle", "reboot", "device-removed", "metadata", "reconnected", "disconnected"]


LibvirtError = libvirt.libvirtError
"""libvirt's error, for modules that must not import libvirt themselves."""


class HostUnavailable(Exception):
    """The libvirt connection is down; the Host is reconnecting in the background."""


@dataclass(frozen=True)
class HostEvent:
    """Something libvirt told us about a domain (`uuid`) or about the connection (`uuid` None)."""

    kind: EventKind
    uuid: str | None
    event: int = 0
    detail: int = 0


@dataclass(frozen=True)
class ListedDomain:
    uuid: str
    name: str
    owner: OwnerMetadata | None
    domain: libvirt.virDomain


@dataclass(frozen=True)
class DomainFacts:
    """One domain as read by `Host.read_domain`: state and statistics plus its XML's facts."""

    uuid: str
    name: str
    state: str
    reason: str
    id: int | None
    persistent: bool
    config_owner: OwnerMetadata | None
    live_owner: OwnerMetadata | None
    interfaces: tuple[InterfaceFacts, ...]
    stats: Stats
    config_digest: str | None = None

    @property
    def owner(self) -> OwnerMetadata | None:
        return self.live_owner or self.config_owner


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


STATS_NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
"""Skip figures that need a domain job (a guest stuck mid-start would block the bulk call for 30 s)."""
SNAPSHOT_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL,
    libvirt.VIR_DOMAIN_STATS_STATE,
)
"""The groups read for domain snapshots, best first (a driver that refuses one set gets the next).

Only groups libvirtd answers without asking QEMU: with the balloon, vCPU or block groups the bulk
call waits on every guest's monitor in turn (50 booting TCG guests: 28.6 s instead of 2.0 s).
Memory and vCPUs come from the domain XML instead (`metadata.sizing_from_domain`)."""
CAPACITY_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU,
    libvirt.VIR_DOMAIN_STATS_STATE,
)
"""The groups for host capacity, which counts foreign domains too (their XML is never read)."""

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
LOCAL_ACCESSORS = frozenset({"UUIDString", "UUID", "name", "ID", "connect", "c_pointer"})
"""Methods answered from the client-side object, without a call to the driver."""

_COUNTED_TYPES = frozenset({
    libvirt.virConnect, libvirt.virDomain, libvirt.virStoragePool, libvirt.virStorageVol, libvirt.virNetwork,
})
_LOST_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
_LOST_IN_TRANSPORT = frozenset({libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR})
_TRANSPORT_DOMAINS = frozenset({libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC})
_UNSUPPORTED = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED})
_DOMAIN_EVENTS: dict[int, EventKind] = {
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: "lifecycle",
    libvirt.VIR_DOMAIN_EVENT_ID_REBOOT: "reboot",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: "device-removed",
}
if hasattr(libvirt, "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE"):
    _DOMAIN_EVENTS[libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE] = "metadata"
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3


def connection_lost(err: libvirt.libvirtError) -> bool:
    """Whether `err` means the connection is gone: decided by error code and domain only."""
    code = err.get_error_code()
    return code in _LOST_CODES or (code in _LOST_IN_TRANSPORT and err.get_error_domain() in _TRANSPORT_DOMAINS)


def _has_code(err: libvirt.libvirtError, *codes: int) -> bool:
    return err.get_error_code() in codes


def reason_name(state: str, reason: int) -> str:
    names = REASONS.get(state, ())
    return names[reason] if 0 <= reason < len(names) else "unknown"


def state_name(state: int) -> str:
    return DOMAIN_STATES[state] if 0 <= state < len(DOMAIN_STATES) else "nostate"


Count = Callable[[str, Sequence[str], float], None]


class Counted:
    """A libvirt object whose driver calls are counted; the objects its calls return are too.

    Arguments are unwrapped before the real call, so a Counted domain can be passed wherever
    libvirt expects a `virDomain`.
    """

    __slots__ = ("target", "_count")

    def __init__(self, target: Any, count: Count) -> None:
        self.target = target
        self._count = count

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's names; spelled out as the hot local accessors
        return self.target.UUIDString()

    def name(self) -> str:
        return self.target.name()

    def ID(self) -> int:  # noqa: N802
        return self.target.ID()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if name in LOCAL_ACCESSORS or name.startswith("_") or not callable(attr):
            return attr
        return functools.partial(self._invoke, name, attr)

    def _invoke(self, name: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raw = [unwrap(arg) for arg in args]
        result = None
        began = time.monotonic()
        try:
            result = method(*raw, **kwargs)
            return wrap(result, self._count)
        finally:
            self._count(name, _domain_uuids(self.target, result, raw), time.monotonic() - began)


def _domain_uuids(target: Any, result: Any, args: list[Any]) -> list[str]:
    """The domains a call concerns: its object, a domain it returns, domains among its arguments."""
    nested = [item for arg in args if isinstance(arg, list | tuple) for item in arg]
    return [obj.UUIDString() for obj in (target, result, *args, *nested) if isinstance(obj, libvirt.virDomain)]


def wrap(value: Any, count: Count) -> Any:
    kind = type(value)
    if kind in _COUNTED_TYPES:
        return Counted(value, count)
    if kind is list or kind is tuple:
        return kind([wrap(item, count) for item in value])
    return value


def unwrap(value: Any) -> Any:
    kind = type(value)
    if kind is Counted:
        return value.target
    if kind is list or kind is tuple:
        return kind([unwrap(item) for item in value])
    return value


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error; they reach us as exceptions anyway."""


_event_impl_lock = threading.Lock()
_event_impl: LoopEvents | None = None


class LoopEvents:
    """The event implementation libvirt calls; everything it does happens on `loop`.

    libvirt calls its event implementation from whichever thread needs it: a thread blocked in an
    RPC reads the events that arrive meanwhile and arms the dispatch timer, and takes the socket
    away from the loop while it reads. libvirtaio acts in the calling thread, which asyncio's loop
    does not allow and which does not wake the loop: an event read by a busy worker waited for the
    loop's next wake-up, so a `virsh suspend` beside a guest being started reached the agent when
    that start returned, about a second late.

    Calls no longer share the events' connection (`ThreadConnections`), but every worker thread still
    calls the implementation around each of its calls: the loop watches its connection's socket between
    calls, and the thread takes it away while it reads.

    Here each call is queued to the loop (`call_soon_threadsafe`) in the order libvirt made it, and
    runs there through libvirtaio unchanged. libvirt gets ids of this class's own, since an id must
    be returned before the queued call has run.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
        self._ids = itertools.count(1)
        self._live: set[int] = set()
        """Ids added and not removed yet, as libvirt sees them (any thread)."""
        self._inner: dict[int, int] = {}
        """Our id -> libvirtaio's, for the adds that have run on the loop."""

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.impl.loop = loop

    def register(self) -> None:
        libvirt.virEventRegisterImpl(self._add_handle, self._update_handle, self._remove_handle,
                                     self._add_timeout, self._update_timeout, self._remove_timeout)

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        return self._add(self.impl._add_handle, fd, event, cb, opaque)

    def _update_handle(self, watch: int, event: int) -> None:
        self._on_loop(self._update, self.impl._update_handle, watch, event)

    def _remove_handle(self, watch: int) -> int:
        return self._remove(self.impl._remove_handle, watch)

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        return self._add(self.impl._add_timeout, timeout, cb, opaque)

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._on_loop(self._update, self.impl._update_timeout, timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        return self._remove(self.impl._remove_timeout, timer)

    def _add(self, add: Callable[..., int], *args: Any) -> int:
        outer = next(self._ids)
        self._live.add(outer)
        self._on_loop(self._run_add, outer, add, args)
        return outer

    def _run_add(self, outer: int, add: Callable[..., int], args: tuple[Any, ...]) -> None:
        self._inner[outer] = add(*args)

    def _update(self, update: Callable[[int, int], None], outer: int, value: int) -> None:
        inner = self._inner.get(outer)
        if inner is not None:
            update(inner, value)

    def _remove(self, remove: Callable[[int], int], outer: int) -> int:
        try:
            self._live.remove(outer)
        except KeyError:
            return -1
        self._on_loop(self._run_remove, remove, outer)
        return 0

    def _run_remove(self, remove: Callable[[int], int], outer: int) -> None:
        inner = self._inner.pop(outer, None)
        if inner is not None:
            remove(inner)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed, and with it everything it watched
            pass


class ThreadConnections:
    """The connection each worker thread makes its calls on, opened on the thread's first call.

    libvirt's client lets threads share a connection, but a call made while another thread's call
    holds it can wait until that call ends: libvirt 9.0's `virNetClientIO` wakes the holding thread
    with `g_main_loop_quit`, which is lost when the holder has unlocked the client and not yet
    entered `g_main_loop_run`. A `suspend` issued right after a lookup, beside a QEMU start on the
    same connection, waited for the whole start. A thread alone on its connection never waits so.

    `close_all` (reconnect, stop) closes the idle connections at once and the busy ones when their
    call returns (closing a connection under a running call would free it beneath that call); every
    thread opens a new one on its next call.
    """

    def __init__(self, uri: str, opened: Callable[[], None]) -> None:
        self.uri = uri
        self._note_opened = opened
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: set[libvirt.virConnect] = set()
        """The connections in service; one closed by `close_all` is no longer among them."""
        self._busy: set[libvirt.virConnect] = set()

    @contextlib.contextmanager
    def use(self) -> Iterator[libvirt.virConnect]:
        conn = self._claim()
        try:
            yield conn
        finally:
            with self._lock:
                self._busy.discard(conn)
                retired = conn not in self._opened
            if retired:
                _close_quietly(conn)

    def _claim(self) -> libvirt.virConnect:
        """This thread's connection, marked busy (in one step, so `close_all` cannot close it meanwhile);
        a new one when the thread has none or its own was closed."""
        with self._lock:
            conn = getattr(self._local, "conn", None)
            if conn in self._opened:
                self._busy.add(conn)
                return conn
        self._note_opened()
        conn = libvirt.open(self.uri)
        with self._lock:
            self._opened.add(conn)
            self._busy.add(conn)
        self._local.conn = conn
        return conn

    def close_all(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, set()
            idle = opened - self._busy
        for conn in idle:
            _close_quietly(conn)


def _close_quietly(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _bind_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Registers the event implementation on `loop` once per process (libvirt allows one).

    A later loop takes over only once the earlier one is closed (as between `asyncio.run`s);
    connections opened on the closed loop must have been closed with it.
    """
    global _event_impl
    with _event_impl_lock:
        if _event_impl is None:
            libvirt.registerErrorHandler(_quiet, None)
            _event_impl = LoopEvents(loop)
            _event_impl.register()
        elif _event_impl.loop is not loop and _event_impl.loop.is_closed():
            _event_impl.rebind(loop)
    if _event_impl.loop is not loop:
        raise RuntimeError("libvirt events are bound to another running asyncio loop: run every Host on one loop")


def legacy_list_domains(conn: Any, flags: int = 0) -> list[Any]:
    """The pre-0.9.13 listing, O(N) calls and racy; only the active/inactive flag group applies."""
    group = flags & (libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)
    domains = []
    if group != libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE:
        domains += _lookup_each(conn.lookupByID, conn.listDomainsID())
    if group != libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE:
        domains += _lookup_each(conn.lookupByName, conn.listDefinedDomains())
    return domains


def _lookup_each(lookup: Callable[[Any], Any], keys: Iterable[Any]) -> list[Any]:
    found = []
    for key in keys:
        try:
            found.append(lookup(key))
        except libvirt.libvirtError as err:
            if not _has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                raise
    return found


def list_all_domains(conn: Any, flags: int = 0) -> list[Any]:
    """One `listAllDomains` call; the legacy calls only where the driver lacks it."""
    try:
        return conn.listAllDomains(flags)
    except libvirt.libvirtError as err:
        if not _has_code(err, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        return legacy_list_domains(conn, flags)


def read_owner(dom: Any) -> OwnerMetadata | None:
    """The operator's mark from the domain's current definition; None for a foreign domain."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE)
    except libvirt.libvirtError as err:
        if _has_code(err, libvirt.VIR_ERR_NO_DOMAIN_METADATA):
            return None
        raise
    element = metadata.parse(xml)
    if etree.QName(element).localname != etree.QName(metadata.OWNER_TAG).localname:
        return None
    element.tag = metadata.OWNER_TAG  # libvirt hands the element back without its namespace
    return metadata.owner_from_element(element)


@dataclass(frozen=True)
class _XmlFacts:
    persistent: bool
    config_owner: OwnerMetadata | None
    live_owner: OwnerMetadata | None
    interfaces: tuple[InterfaceFacts, ...]
    config_digest: str | None
    sizing: dict[str, int]


def _read_xml(dom: Any, active: bool) -> _XmlFacts:
    live = metadata.parse(dom.XMLDesc(0))
    persistent = bool(dom.isPersistent())
    config = metadata.parse(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if active and persistent else live
    return _XmlFacts(
        persistent=persistent,
        config_owner=metadata.owner_from_domain(config) if persistent else None,
        live_owner=metadata.owner_from_domain(live) if active else None,
        interfaces=metadata.interfaces_from_domain(live),
        config_digest=hashlib.sha256(etree.tostring(config, method="c14n")).hexdigest() if persistent else None,
        sizing=metadata.sizing_from_domain(live),
    )


def _with_addresses(dom: Any, interfaces: tuple[InterfaceFacts, ...]) -> tuple[InterfaceFacts, ...]:
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


_UNKNOWN: Any = object()


@dataclass
class _Learned:
    """What one worker job found out, stored by the loop thread if no event made it stale."""

    owners: dict[str, OwnerMetadata | None] = field(default_factory=dict)
    xml: dict[str, _XmlFacts] = field(default_factory=dict)
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
        self.xml: dict[str, _XmlFacts] = {}
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
        _bind_event_loop(self._loop)
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
        capacity = await self.call(_host_capacity, pool_name)
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
                    if not _has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
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
                return _domain_stats(conn, domains, group)
            except libvirt.libvirtError as err:
                if err.get_error_code() not in _UNSUPPORTED:
                    raise
                self._refused_stats.add(group)
        return _domain_stats(conn, domains, usable[-1])

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
            if _has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
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
                if not _has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                    raise
                continue
            if include_foreign or found.owner is not None:
                facts.append(found)
        return facts

    def _ours(self, xml: _XmlFacts) -> _XmlFacts:
        """`xml` with the marks of other clusters read as no mark: their domains are foreign here."""
        return dataclasses.replace(xml, config_owner=metadata.belongs_to(xml.config_owner, self.cluster_id),
                                   live_owner=metadata.belongs_to(xml.live_owner, self.cluster_id))

    def _facts(self, dom: Counted, stats: Stats, learned: _Learned, known: _XmlFacts | None) -> DomainFacts:
        uuid = dom.UUIDString()
        state = state_name(int(stats.get("state.state", 0)))
        active = state not in INACTIVE_STATES
        xml = known or self._ours(_read_xml(dom, active))
        if active and xml.interfaces and not any(nic.ip_addresses for nic in xml.interfaces):
            xml = dataclasses.replace(xml, interfaces=_with_addresses(dom, xml.interfaces))
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


def _domain_stats(conn: Counted, domains: Sequence[Any] | None, groups: int) -> list[tuple[Counted, Stats]]:
    if domains is None:
        return conn.getAllDomainStats(groups, STATS_NOWAIT)
    return conn.domainListGetStats(list(domains), groups, STATS_NOWAIT)


def _host_capacity(conn: Counted, pool_name: str) -> HostCapacity:
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


def _pool_free(conn: Counted, pool_name: str) -> int | None:
    try:
        return int(conn.storagePoolLookupByName(pool_name).info()[3])
    except libvirt.libvirtError as err:
        if _has_code(err, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
