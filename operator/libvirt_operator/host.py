"""Host: the libvirt connection, its events, domain listing, bulk statistics and capacity.

Every libvirt call runs in a worker thread through `Host.call`, which counts it (`counted_calls`), and turns a
lost connection into `HostUnavailable` plus a background reconnect. Event callbacks run on the
asyncio loop (`libvirt_event_loop`) and only record what happened and tell the listeners.
The Host's connection carries the events and the keepalive; each worker thread makes its calls on a
connection of its own (`thread_connections`), so that no call waits behind another thread's.

The Host remembers nothing about domains: the reads (`DomainReader`) take what the caller knows
already, and the domain cache keeps that knowledge, dated by its revisions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import libvirt

from libvirt_operator import METADATA_NAMESPACE
from libvirt_operator.counted_calls import Counted, unwrap, wrap
from libvirt_operator.domain_listing import ListedDomain
from libvirt_operator.domain_reading import (
    INACTIVE_STATES, SNAPSHOT_STATS, DomainListing, DomainReader, Foreign, Owners, Stats, state_name,
)
from libvirt_operator.host_capacity import CAPACITY_STATS, HostCapacity, read_capacity
from libvirt_operator.libvirt_errors import HostUnavailable, connection_lost
from libvirt_operator.libvirt_event_loop import bind_event_loop
from libvirt_operator.libvirt_health import HealthTracker
from libvirt_operator.model import DomainFacts, Tuning
from libvirt_operator.thread_connections import ThreadConnections

log = logging.getLogger(__name__)

T = TypeVar("T")
EventKind = Literal["lifecycle", "reboot", "device-removed", "metadata", "reconnected", "disconnected"]


LISTING_TIMEOUT_FACTOR = 20
"""A listing reads every domain's mark and XML: on a host with thousands of domains (an agent's restart) it takes
longer than one call may, by nature (10,000 on libvirtd's test driver: 42 s). It gets this many call timeouts;
the other calls, running beside it, still tell a libvirtd that stopped answering."""


@dataclass(frozen=True)
class HostEvent:
    """Something libvirt told us about a domain (`uuid`) or about the connection (`uuid` None)."""

    kind: EventKind
    uuid: str | None
    event: int = 0
    detail: int = 0
    ownership: bool = False
    """The event can change whose the domain is: defined, undefined, or the operator's metadata changed."""


_DOMAIN_EVENTS: dict[int, EventKind] = {
    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: "lifecycle",
    libvirt.VIR_DOMAIN_EVENT_ID_REBOOT: "reboot",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: "device-removed",
}
if hasattr(libvirt, "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE"):
    _DOMAIN_EVENTS[libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE] = "metadata"
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3
_NOTHING_KNOWN: Owners = MappingProxyType({})
_NOTHING_CURRENT: Mapping[str, DomainFacts] = MappingProxyType({})


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
        self.reader = DomainReader()

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
    def cluster_id(self) -> str:
        """This cluster's identity: domains whose mark names another cluster are foreign (none: every mark is ours)."""
        return self.reader.cluster_id

    @cluster_id.setter
    def cluster_id(self, cluster_id: str) -> None:
        self.reader.cluster_id = cluster_id

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

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Runs `fn(conn, *args)` in a worker thread, `conn` being that thread's own connection.

        `conn`, and every libvirt object among `args`, arrive as `Counted` proxies: each call
        made through them (and through the objects they return) is added to `calls`. Pass
        libvirt objects as arguments rather than closing over them, or their calls go uncounted.
        libvirt objects in the result are handed back unwrapped; they stay bound to the connection
        that made them (libvirt refuses to mix connections in one call, as `domainListGetStats`).
        A lost connection raises HostUnavailable and starts the reconnect; other errors raise
        `libvirt.libvirtError`. `timeout`: for a call that is long by nature (a migration), instead of
        `call_timeout`.
        """
        conn = self._conn
        timeout = timeout or self.call_timeout
        if conn is None:
            raise HostUnavailable(f"{self.uri}: not connected")
        try:
            # The worker cannot be interrupted: a call libvirtd never answers keeps its thread (and that
            # thread's connection) until it does; the agent stops waiting.
            result = await asyncio.wait_for(self._run(self._in_worker, fn, args), timeout)
        except TimeoutError as err:
            self.health.not_responding(timeout, getattr(fn, "__name__", "a call"))
            raise HostUnavailable(f"{self.uri}: no answer within {timeout:g} s") from err
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

    async def list_domains(self, *, include_foreign: bool = False, flags: int = 0,
                           known: Owners = _NOTHING_KNOWN) -> list[ListedDomain]:
        """One listAllDomains call (`flags`: its VIR_CONNECT_LIST_DOMAINS_* groups; 0 is all).

        Owners not `known` are read from each domain's metadata.
        """
        listed = await self.call(self.reader.list, flags, known)
        return [domain for domain in listed if include_foreign or domain.owner is not None]

    async def all_domain_stats(
        self, *, include_foreign: bool = False, groups: tuple[int, ...] = SNAPSHOT_STATS, known: Owners = _NOTHING_KNOWN,
    ) -> dict[str, Stats]:
        """Statistics by UUID of every owned domain (every domain with `include_foreign`), in one call."""
        return await self.call(self.reader.stats, include_foreign, groups, known)

    async def read_domain(
        self, uuid: str, *, include_foreign: bool = False, owned: bool = False,
    ) -> DomainFacts | Foreign | None:
        """Everything about one domain now; None if there is no such domain, `FOREIGN` if it is not ours.

        `owned`: the caller knows it for its own, so its XML is read without reading its mark first.
        """
        return await self.call(self.reader.read_one, uuid, include_foreign, owned)

    async def read_domains(self, *, include_foreign: bool = False, known: Owners = _NOTHING_KNOWN,
                           current: Mapping[str, DomainFacts] = _NOTHING_CURRENT) -> DomainListing:
        """Every owned domain: a listing, one stats call, and XML reads but for the facts still `current`.

        IP addresses are read again for active domains that have interfaces but no address yet.
        """
        return await self.call(self.reader.read_all, include_foreign, known, current,
                               timeout=self.call_timeout * LISTING_TIMEOUT_FACTOR)

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
            ownership = event in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED)
        else:
            ownership = kind == "metadata" and METADATA_NAMESPACE in (payload[1], None)
        self._notify(HostEvent(kind, uuid, event, detail, ownership))

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
        self._notify(HostEvent("reconnected", None))

    def _notify(self, event: HostEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("host event listener %r failed on %r", listener, event)
