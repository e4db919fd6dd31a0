"""The connection each libvirt worker thread makes its calls on."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import libvirt


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
