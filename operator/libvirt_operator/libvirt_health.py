"""Whether the agent's libvirtd answers: connected, disconnected, or not answering within the call bound.

The Host records what its calls and its connection see; the agent turns a change into status (every VM
of the node reads Unknown, the LibvirtNode says so) without waiting for libvirt. Nothing here imports
libvirt.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

CONNECTED, DISCONNECTED, NOT_RESPONDING = "Connected", "Disconnected", "NotResponding"


@dataclass(frozen=True)
class LibvirtHealth:
    state: str
    since: datetime.datetime
    message: str = ""

    @property
    def answering(self) -> bool:
        return self.state == CONNECTED

    def to_status(self) -> dict[str, str]:
        status = {"state": self.state, "since": self.since.strftime("%Y-%m-%dT%H:%M:%SZ")}
        if self.message:
            status["message"] = self.message
        return status


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class HealthTracker:
    """The current LibvirtHealth of one URI; `listener` hears every change of state."""

    def __init__(self, uri: str, clock: Callable[[], datetime.datetime] = _now) -> None:
        self.uri = uri
        self.clock = clock
        self.current = LibvirtHealth(DISCONNECTED, clock(), f"{uri}: not connected yet")
        self.listeners: list[Callable[[LibvirtHealth], None]] = []

    def connected(self) -> None:
        self._become(CONNECTED, "")

    def answered(self) -> None:
        """A call returned: libvirtd answers (a connection that is down stays down until reconnected)."""
        if self.current.state == NOT_RESPONDING:
            self._become(CONNECTED, "")

    def disconnected(self, why: str) -> None:
        self._become(DISCONNECTED, f"{self.uri}: {why}")

    def not_responding(self, seconds: float, call: str) -> None:
        if self.current.state == CONNECTED:
            self._become(NOT_RESPONDING, f"{self.uri} did not answer {call} within {seconds:g} s")

    def _become(self, state: str, message: str) -> None:
        if self.current.state == state:
            return
        self.current = LibvirtHealth(state, self.clock(), message)
        for listener in list(self.listeners):
            listener(self.current)
