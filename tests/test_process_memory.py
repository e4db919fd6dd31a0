"""The agent's memory as the host counts it: free pages handed back after a burst."""

from __future__ import annotations

import pytest

from libvirt_operator.process_memory import release_free_memory

pytestmark = pytest.mark.unit


def rss_mib() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024


def test_the_pages_a_burst_left_free_go_back_to_the_host() -> None:
    release_free_memory()
    before = rss_mib()
    burst = [bytes(2000) + str(i).encode() for i in range(100_000)]  # 200 MB from malloc, not Python's arenas
    kept = burst[::50]  # what stays scatters over the heap: nothing at its top to give back by itself
    del burst
    after_burst = rss_mib()
    release_free_memory()
    assert after_burst - before > 150, (before, after_burst)
    assert rss_mib() - before < 40, (before, after_burst, rss_mib())
    assert len(kept) == 2000
