"""Reading the counter guest's console (lvo_testing.guest_counter): whole lines only, a reboot seen.

The texts are shaped as the bed's console logs were in a real move (tests/test_libvirt_hosts_e2e.py
moves the guest itself).
"""

from __future__ import annotations

import pytest

from lvo_testing.guest_counter import Count, boots, counts, shows_reboot

pytestmark = pytest.mark.unit

SOURCE = ("LVO-GUEST-BOOTED g\r\nLVO-DISK vda LVO-BASE-DISK-x\r\nLVO-GUEST-READY g\r\n"
          "LVO-COUNT 1 disk=none\r\nLVO-COUNT 2 disk=1\r\nLVO-COUNT 3 disk=2\r\n")
DESTINATION = "LVO-COUNT 4 disk=3\r\nLVO-COUNT 5 disk=4\r\n"


def test_counts_are_read_with_what_the_guest_read_back_from_its_disk() -> None:
    assert counts(SOURCE) == [Count(1, None), Count(2, 1), Count(3, 2)]
    assert boots(SOURCE) == 1 and boots(DESTINATION) == 0


def test_a_line_cut_by_a_move_counts_on_neither_host() -> None:
    source, destination = SOURCE + "LVO-COUNT 4", " disk=3\r\nLVO-COUNT 5 disk=4\r\n"
    assert counts(source)[-1] == Count(3, 2)
    assert counts(destination) == [Count(5, 4)]
    assert counts("LVO-COUNT 41 disk=4") == []   # the end of a line still being written


def test_a_guest_that_went_on_shows_no_reboot() -> None:
    assert not shows_reboot(SOURCE + DESTINATION)


@pytest.mark.parametrize("after", [
    "LVO-GUEST-BOOTED g\r\n",                         # booted again, not counting yet
    "LVO-COUNT 1 disk=3\r\n",                         # counting again from 1, the boot line lost
])
def test_a_second_boot_or_a_count_going_back_shows_a_reboot(after: str) -> None:
    assert shows_reboot(SOURCE + after)
