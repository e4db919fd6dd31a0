"""The agent's memory as the host counts it (RSS), with glibc's allocator.

glibc gives threads that allocate their own arenas (up to 8 per core) and keeps what is freed: with the libvirt
worker threads an agent on the test driver grew by 120 KiB of RSS per VM, by 90 KiB with 2 arenas. After a burst
(a restart's first listing of 10,000 domains and as many watch events) the free pages handed back took RSS from 422
to 411 MiB; the rest was Python's own heap, which only smaller bursts keep small (the lists in pages, Tuning's
list_chunk_size). Elsewhere than glibc: nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import os

ARENAS = 2
M_ARENA_MAX = -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas(arenas: int = ARENAS) -> None:
    """MALLOC_ARENA_MAX, unless the environment sets it; before any worker thread starts."""
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Hands the pages the allocator holds free back to the host (malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
