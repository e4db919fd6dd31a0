"""The state a libvirt that does not answer leaves: the tracker's transitions and the Unknown status."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from libvirt_operator.libvirt_health import CONNECTED, DISCONNECTED, NOT_RESPONDING, HealthTracker
from libvirt_operator.model import DomainSnapshot, OwnerMetadata
from libvirt_operator.reconcile import VMView, decide, unknown_status

pytestmark = pytest.mark.unit

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
UID = "00000000-0000-4000-8000-000000000009"


def test_the_tracker_says_each_change_once_and_a_down_connection_stays_down_until_reconnected() -> None:
    times = iter(T0 + datetime.timedelta(seconds=s) for s in range(100))
    tracker = HealthTracker("qemu:///system", clock=lambda: next(times))
    heard: list[str] = []
    tracker.listeners.append(lambda health: heard.append(health.state))
    tracker.connected()
    tracker.answered()
    tracker.not_responding(3, "lookup")
    tracker.not_responding(3, "lookup")
    assert tracker.current.state == NOT_RESPONDING and "qemu:///system did not answer lookup within 3 s" \
        in tracker.current.message
    tracker.answered()
    tracker.disconnected("connection lost")
    tracker.answered()
    tracker.not_responding(3, "lookup")
    assert tracker.current.state == DISCONNECTED
    tracker.connected()
    assert heard == [CONNECTED, NOT_RESPONDING, CONNECTED, DISCONNECTED, CONNECTED]


def test_while_libvirt_does_not_answer_the_vm_reads_unknown_and_keeps_its_bookkeeping() -> None:
    owner = OwnerMetadata(UID, "default", "vm", 1, "h")
    running = DomainSnapshot(uuid=UID, name="default_vm", revision=5, state="running", reason="booted", id=7,
                             persistent=True, config_owner=owner, live_owner=owner)
    view = VMView(name="vm", generation=1, spec={"runStrategy": "Always", "memory": "64Mi"}, spec_hash="h",
                  status={}, has_finalizer=True)
    truth = decide(view, running, T0, "node-a", None).status
    truth["restartCount"] = 2
    later = T0 + datetime.timedelta(minutes=1)
    status = unknown_status(dataclasses.replace(view, status=truth), running, later, "node-a",
                            "LibvirtNotResponding", "qemu:///system did not answer within 3 s")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["printableStatus"] == "Unknown" and status["ready"] is False
    assert ready["status"] == "Unknown" and ready["reason"] == "LibvirtNotResponding"
    assert ready["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    assert status["restartCount"] == 2 and status["lifecycle"] == truth["lifecycle"]
    again = unknown_status(dataclasses.replace(view, status=status), running, later + datetime.timedelta(hours=1),
                           "node-a", "LibvirtNotResponding", "qemu:///system did not answer within 3 s")
    assert again == status, "a second reconcile while libvirt hangs would write again"
