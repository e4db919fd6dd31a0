"""libvirt's event loop on the agent's asyncio loop, safe to drive from libvirt's worker threads.

libvirt calls its event implementation from whichever thread needs it: a thread blocked in an
RPC reads the events that arrive meanwhile and arms the dispatch timer, and takes the socket
away from the loop while it reads. libvirtaio acts in the calling thread, which asyncio's loop
does not allow and which does not wake the loop: an event read by a busy worker waited for the
loop's next wake-up, so a `virsh suspend` beside a guest being started reached the agent when
that start returned, about a second late.

Here each call is queued to the loop (`call_soon_threadsafe`) in the order libvirt made it, and
runs there through libvirtaio unchanged. libvirt gets ids of this module's own, since an id must
be returned before the queued call has run.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio

_lock = threading.Lock()
_current: LoopEvents | None = None


class LoopEvents:
    """The event implementation libvirt calls; everything it does happens on `loop`."""

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


def bind_event_loop(loop: asyncio.AbstractEventLoop, on_first: Callable[[], None] = lambda: None) -> LoopEvents:
    """Registers the event implementation on `loop` once per process (libvirt allows one).

    A later loop takes over only once the earlier one is closed (as between `asyncio.run`s);
    connections opened on the closed loop must have been closed with it.
    """
    global _current
    with _lock:
        if _current is None:
            on_first()
            _current = LoopEvents(loop)
            _current.register()
        elif _current.loop is not loop and _current.loop.is_closed():
            _current.rebind(loop)
    if _current.loop is not loop:
        raise RuntimeError("libvirt events are bound to another running asyncio loop: run every Host on one loop")
    return _current
