"""The cached view of this host's owned domains, built from a listing and kept by events.

libvirt versions nothing (seed 004), so the cache does: every snapshot and every removal is
stamped from one monotonic counter when its read *starts*. A read that started earlier can
never replace one that started later, however the two finish, so stale event reads and stale
listings are dropped. A periodic relist repairs whatever events missed.

What the cache knows also spares libvirt calls (the Host remembers nothing): a relist reads the XML
only of domains an event touched since their snapshot's read began, and the operator's mark only of
domains not known to be ours or foreign; an event about a domain known to be foreign costs nothing.
Both are judged by the same revisions: an event or a reconnect is stamped with one too.

While the agent acts on a domain, no read of it starts (`reads_held`): libvirtd keeps a domain
locked through most of its start, and a call about it waits for that lock while holding the
domain list's lock, which every other domain's define needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from libvirt_operator.domain_reading import FOREIGN
from libvirt_operator.host import Host, HostEvent
from libvirt_operator.libvirt_errors import HostUnavailable, LibvirtError
from libvirt_operator.model import DomainSnapshot, OwnerMetadata

log = logging.getLogger(__name__)

FIRST_LISTING_RETRY_SECONDS = 5.0
FIRST_LISTING_RETRY_MAX_SECONDS = 60.0


@dataclass(frozen=True)
class _Entry:
    revision: int
    snapshot: DomainSnapshot | None
    """None: a tombstone, the domain was gone (or no longer owned) at `revision`."""


def _facts_differ(old: DomainSnapshot | None, new: DomainSnapshot | None) -> bool:
    """Whether anything but the revision and the statistics changed."""
    if old is None or new is None:
        return old is not new
    return dataclasses.replace(old, revision=0, stats={}) != dataclasses.replace(new, revision=0, stats={})


class DomainCache:
    """Versioned snapshots of the owned domains of one Host (see the module docstring)."""

    def __init__(self, host: Host, *, relist_interval: float = 60.0) -> None:
        self._host = host
        self._relist_interval = relist_interval
        self._revisions = itertools.count(1)
        self._entries: dict[str, _Entry] = {}
        self._changed_at: dict[str, int] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._subscribers: list[Callable[[str], None]] = []
        self._reads: dict[str, asyncio.Task[None]] = {}
        self._read_again: set[str] = set()
        self._held: set[str] = set()
        self._deferred: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._event_at: dict[str, int] = {}
        """The revision at each domain's last event: a snapshot read before it has stale facts."""
        self._ownership_event_at: dict[str, int] = {}
        """The same for the events that can change whose a domain is (`HostEvent.ownership`): knowing a domain
        foreign outlives its other events, so another program's guests starting and stopping cost no call."""
        self._reset_at = 0
        """The revision at the last reconnect: events may have been missed before it."""
        self._foreign: dict[str, int] = {}
        """Domains read as not ours, with the revision of that read."""
        self._claimed: set[str] = set()
        """Domains the agent defined and no read has come back for yet (`remember_owner`)."""

    async def start(self) -> None:
        """Follows the Host's events, reads every owned domain (again until libvirt answers), then relists
        periodically."""
        self._host.subscribe(self._on_host_event)
        delay = FIRST_LISTING_RETRY_SECONDS
        while True:
            try:
                await self.relist()
                break
            except (HostUnavailable, LibvirtError) as err:
                log.warning("domain cache: the first listing failed (%s); again in %.0fs", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, FIRST_LISTING_RETRY_MAX_SECONDS)
        self._spawn(self._relist_periodically())

    async def stop(self) -> None:
        self._host.unsubscribe(self._on_host_event)
        tasks = [*self._background, *self._reads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def next_revision(self) -> int:
        return next(self._revisions)

    def get(self, uuid: str) -> DomainSnapshot | None:
        entry = self._entries.get(uuid)
        return entry.snapshot if entry is not None else None

    def snapshots(self) -> dict[str, DomainSnapshot]:
        """Safe from another thread (the /metrics server's): the entries are copied in one step, under the GIL."""
        return {uuid: entry.snapshot for uuid, entry in list(self._entries.items()) if entry.snapshot is not None}

    @property
    def foreign_domains(self) -> int:
        """Listed domains that are not this cluster's (unmarked, or marked by another cluster), as far as known."""
        return sum(1 for uuid in list(self._foreign) if self._known_foreign(uuid))

    def remember_owner(self, uuid: str, owner: OwnerMetadata | None) -> None:
        """The mark the agent just defined `uuid` with: the next read of it reads its XML straight away."""
        if owner is not None:
            self._claimed.add(uuid)
            self._foreign.pop(uuid, None)

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """`callback(uuid)` runs whenever a domain's stored facts change or it is removed."""
        self._subscribers.append(callback)

    def offer(self, snapshot: DomainSnapshot) -> bool:
        """Stores `snapshot` unless what is held is as new or newer; False when dropped as stale."""
        return self._store(snapshot.uuid, _Entry(snapshot.revision, snapshot))

    def offer_removal(self, uuid: str, revision: int) -> bool:
        """A tombstone: the domain was gone at `revision`; False when something newer is held."""
        return self._store(uuid, _Entry(revision, None))

    async def refresh(self, uuid: str) -> DomainSnapshot | None:
        """Reads `uuid`, which the agent acts on as its own, now and returns what the cache holds afterwards
        (events so far need no read of their own)."""
        self._deferred.discard(uuid)
        await self._read(uuid, owned=True)
        return self.get(uuid)

    @contextlib.asynccontextmanager
    async def reads_held(self, uuid: str) -> AsyncIterator[None]:
        """Around the agent's own calls on `uuid`: no read of it starts meanwhile, one starts after if
        events came (unless `refresh` read it since). A read already running is waited for first.

        libvirtd holds a domain's lock through most of a start (and a destroy's wait for QEMU to
        exit). A call about that domain (lookup, XMLDesc...) waits for it while holding the read side
        of the lock on the whole domain list, which every define takes for writing: in a 50-guest
        rollout, event reads of starting domains held other VMs' defines for up to 5.6 s.
        """
        try:
            await self._hold(uuid)
            yield
        finally:
            self._release(uuid)

    async def relist(self) -> None:
        """Reads every owned domain; cached ones no longer listed get a tombstone."""
        revision = self.next_revision()
        listing = await self._host.read_domains(known=self._known_owners(), current=self._current_snapshots())
        for facts in listing.facts:
            self.offer(DomainSnapshot.stamped(facts, revision))
        present = {facts.uuid for facts in listing.facts}
        for uuid in [uuid for uuid, entry in self._entries.items() if entry.snapshot and uuid not in present]:
            self.offer_removal(uuid, revision)
        self._learn_foreign(listing.foreign, revision)
        self._forget_unlisted(present | listing.foreign, revision)

    async def wait_for_change(self, uuid: str, after_revision: int, timeout: float) -> DomainSnapshot | None:
        """Waits until `uuid` changes at a revision above `after_revision`; None on timeout or removal.

        Reads held for `uuid` run meanwhile (the change is what is waited for), and are done when this returns.
        """
        held = uuid in self._held
        if held:
            self._release(uuid)
        try:
            async with asyncio.timeout(timeout):
                while self._changed_at.get(uuid, 0) <= after_revision:
                    await self._wakeups.setdefault(uuid, asyncio.Event()).wait()
        except TimeoutError:
            return None
        finally:
            if held:
                await self._hold(uuid)
        return self.get(uuid)

    async def settle(self) -> None:
        """Waits until no event-driven read is running or pending."""
        while self._reads:
            await asyncio.gather(*self._reads.values(), return_exceptions=True)

    def _store(self, uuid: str, entry: _Entry) -> bool:
        self._claimed.discard(uuid)
        held = self._entries.get(uuid)
        if held is not None and held.revision >= entry.revision:
            return False
        self._entries[uuid] = entry
        if _facts_differ(held.snapshot if held else None, entry.snapshot):
            self._changed(uuid, entry.revision)
        return True

    def _changed(self, uuid: str, revision: int) -> None:
        self._changed_at[uuid] = revision
        wakeup = self._wakeups.pop(uuid, None)
        if wakeup is not None:
            wakeup.set()
        for callback in list(self._subscribers):
            try:
                callback(uuid)
            except Exception:
                log.exception("domain cache subscriber %r failed on %s", callback, uuid)

    def _on_host_event(self, event: HostEvent) -> None:
        if event.kind == "reconnected":
            self._reset_at = self.next_revision()
            self._spawn(self._quietly(self.relist()))
        elif event.uuid is not None:
            self._event_at[event.uuid] = self.next_revision()
            if event.ownership:
                self._ownership_event_at[event.uuid] = self._event_at[event.uuid]
            self._schedule_read(event.uuid)

    def _known_foreign(self, uuid: str) -> bool:
        seen = self._foreign.get(uuid, 0)
        return seen > self._ownership_event_at.get(uuid, 0) and seen > self._reset_at

    def _known_owners(self) -> dict[str, OwnerMetadata | None]:
        """Whose each domain is, as far as the cache knows: the XML of the owned ones is read unless current."""
        owners: dict[str, OwnerMetadata | None] = {
            uuid: entry.snapshot.owner for uuid, entry in self._entries.items() if entry.snapshot is not None}
        owners.update((uuid, None) for uuid in self._foreign if self._known_foreign(uuid))
        return owners

    def _current_snapshots(self) -> dict[str, DomainSnapshot]:
        """The snapshots no event (nor reconnect) has come for since their read began."""
        return {uuid: entry.snapshot for uuid, entry in self._entries.items()
                if entry.snapshot is not None and entry.revision > max(self._event_at.get(uuid, 0), self._reset_at)}

    def _learn_foreign(self, uuids: Iterable[str], revision: int) -> None:
        for uuid in uuids:
            self._foreign[uuid] = max(revision, self._foreign.get(uuid, 0))

    def _forget_unlisted(self, listed: set[str] | frozenset[str], revision: int) -> None:
        """Drops what is known of domains gone at `revision` (unless learned since)."""
        for known in (self._foreign, self._event_at, self._ownership_event_at):
            for uuid in [uuid for uuid, at in known.items() if at < revision and uuid not in listed]:
                del known[uuid]

    def _schedule_read(self, uuid: str) -> None:
        """At most one read per domain runs; events meanwhile make exactly one more follow it."""
        if uuid in self._held:
            self._deferred.add(uuid)
        elif uuid in self._reads:
            self._read_again.add(uuid)
        else:
            self._reads[uuid] = asyncio.create_task(self._read_until_current(uuid))

    async def _read_until_current(self, uuid: str) -> None:
        try:
            while True:
                self._read_again.discard(uuid)
                await self._quietly(self._read(uuid))
                if uuid not in self._read_again:
                    return
        finally:
            del self._reads[uuid]

    async def _hold(self, uuid: str) -> None:
        self._held.add(uuid)
        task = self._reads.get(uuid)
        if task is not None:
            await asyncio.wait({task})

    def _release(self, uuid: str) -> None:
        self._held.discard(uuid)
        if uuid in self._deferred:
            self._deferred.discard(uuid)
            self._schedule_read(uuid)

    async def _read(self, uuid: str, *, owned: bool = False) -> None:
        """A domain known to be foreign is not read; one known to be ours is read without its mark first."""
        revision = self.next_revision()
        if not owned and self._known_foreign(uuid):
            self.offer_removal(uuid, revision)
            return
        held = self.get(uuid)
        facts = await self._host.read_domain(uuid, owned=owned or held is not None or uuid in self._claimed)
        if facts is None or facts == FOREIGN:
            self.offer_removal(uuid, revision)
        else:
            self.offer(DomainSnapshot.stamped(facts, revision))
        if facts == FOREIGN:
            self._learn_foreign([uuid], revision)

    async def _relist_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._relist_interval)
            await self._quietly(self.relist())

    async def _quietly(self, work: Coroutine[Any, Any, None]) -> None:
        """Background work: a lost connection is repaired by the relist after reconnecting."""
        try:
            await work
        except HostUnavailable as err:
            log.info("domain cache: %s", err)
        except LibvirtError:
            log.exception("domain cache: libvirt refused a read")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
