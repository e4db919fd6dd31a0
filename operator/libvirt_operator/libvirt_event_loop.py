"""libvirt's event loop on the operator's asyncio loop: libvirtaio, with every call queued onto the loop."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio


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


def bind_event_loop(loop: asyncio.AbstractEventLoop) -> None:
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
