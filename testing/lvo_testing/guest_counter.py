"""What the counter guest (`GuestImage.cmdline(counter=True)`) says on its serial console.

It prints `LVO-GUEST-BOOTED <marker>` once per boot, then every 0.2 s `LVO-COUNT <n> disk=<m>`: n counts
from 1 at each boot, m is what it read back from its disk before writing n there (`none` before the
first write). A guest moved live goes on counting on the destination; a rebooted one starts again at 1
and prints a second boot line. A move may cut a line in two, one part in each host's log: only whole
lines count. Each count also stays in a slot of its own on the guest's disk (`counts_on_disk`): the
read-back alone cannot prove that a move copied the disk, since the guest may read, on the destination,
only what it wrote there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lvo_testing.libvirt_env import BOOT_MARKER, COUNTER_OFFSET, COUNTER_SLOTS
from lvo_testing.libvirt_hosts import BedHost

_COUNT = re.compile(r"^LVO-COUNT (\d+) disk=(\d+|none)\r?\n", re.MULTILINE)
_DUMP_LINE = re.compile(r"^([0-9a-f]{8}): ((?: [0-9a-f]{2}){1,16})", re.MULTILINE)
_BOOT = re.compile(rf"^{BOOT_MARKER}\b", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    n: int
    disk: int | None   # the count the guest read back from its disk before writing n


def counts(log: str) -> list[Count]:
    """The whole `LVO-COUNT` lines of a console log, in order."""
    return [Count(int(n), None if disk == "none" else int(disk)) for n, disk in _COUNT.findall(log)]


def boots(log: str) -> int:
    """How many times the guest booted in this log."""
    return len(_BOOT.findall(log))


def shows_reboot(log: str) -> bool:
    """True if the guest booted more than once or its count went back (the logs of a move joined in order,
    source first, show no reboot when it went on)."""
    numbers = [count.n for count in counts(log)]
    return boots(log) > 1 or any(later <= earlier for earlier, later in zip(numbers, numbers[1:]))


def read_log(path: Path) -> str:
    """A console log as text ("" while it does not exist yet)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def counts_on_disk(host: BedHost, image: str, numbers: list[int]) -> dict[int, int | None]:
    """The counts the guest wrote to disk `image` (a path on `host`) in the slots of `numbers` (among its last
    COUNTER_SLOTS counts), read with qemu-io while the guest may run (its writes are synced; a slot never
    written reads None)."""
    reads = [arg for n in numbers for arg in ("-c", f"read -v {_slot_offset(n)} 16")]
    dump = host.run("qemu-io", "-U", "-r", "-f", "qcow2", *reads, image)
    slots = {int(offset, 16): bytes.fromhex(hexbytes).decode(errors="replace") for offset, hexbytes in
             _DUMP_LINE.findall(dump)}
    return {n: int(digits) if (digits := slots[_slot_offset(n)].strip(" \0")).isdigit() else None for n in numbers}


def _slot_offset(n: int) -> int:
    return COUNTER_OFFSET + (n % COUNTER_SLOTS) * 512
