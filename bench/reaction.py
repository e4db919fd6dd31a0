"""Scenario 5: out-of-band `virsh destroy` / `virsh suspend` of real QEMU domains.

One command at a time, alternating, each on another VM: from `virsh` returning to the first
sign through the API that the agent saw it: a watch event of the VM whose status shows it
(domain id or state changed, or restartCount went up) or the agent's Event for the VM
(Restarted, Resumed: a suspended domain is resumed at once, and the status it ends with equals
the one before, so no status patch is sent for it). The bench waits for the VM to be running and
Ready again before the next command.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from common import Bench, log, percentile, virsh

SIGNAL_EVENTS = {"destroy": ("Restarted", "Started"), "suspend": ("Resumed",)}


def _status(bench: Bench, namespace: str, name: str) -> dict[str, Any]:
    vm = bench.watch.latest.get((namespace, name)) or {}
    return vm.get("status") or {}


def _settled(bench: Bench, namespace: str, name: str) -> bool:
    status = _status(bench, namespace, name)
    return status.get("ready") is True and (status.get("domain") or {}).get("state") == "running"


def react(bench: Bench, namespace: str, names: list[str], count: int, uri: str) -> None:
    scenario = "reaction-qemu"
    latencies: dict[str, list[float]] = {"destroy": [], "suspend": []}
    status_latencies: dict[str, list[float]] = {"destroy": [], "suspend": []}
    via: dict[str, int] = {}
    for index in range(count):
        kind = "destroy" if index % 2 == 0 else "suspend"
        name = names[index % len(names)]
        deadline = time.monotonic() + 60
        while not _settled(bench, namespace, name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not running and Ready before {kind}")
            time.sleep(0.05)
        before = _status(bench, namespace, name)
        old_id = (before.get("domain") or {}).get("id")
        old_restarts = before.get("restartCount", 0)
        seen, status_seen = threading.Event(), threading.Event()
        found: dict[str, Any] = {}

        def listener(arrived: float, event_type: str, obj: dict[str, Any]) -> None:
            if "involvedObject" in obj:
                involved = obj.get("involvedObject") or {}
                if involved.get("name") == name and involved.get("namespace") == namespace \
                        and obj.get("reason") in SIGNAL_EVENTS[kind] and "event" not in found:
                    found["event"] = arrived
                    seen.set()
                return
            meta = obj.get("metadata") or {}
            if meta.get("name") != name or meta.get("namespace") != namespace or "status" in found:
                return
            status = obj.get("status") or {}
            domain = status.get("domain") or {}
            if domain.get("id") != old_id or domain.get("state") != "running" \
                    or status.get("restartCount", 0) != old_restarts:
                found["status"] = arrived
                seen.set()
                status_seen.set()

        bench.watch.listeners.append(listener)
        try:
            virsh(kind, f"{namespace}_{name}", uri=uri)
            returned = time.time()
            if not seen.wait(30):
                raise TimeoutError(f"no reaction to {kind} of {name} within 30 s")
            if kind == "destroy":
                status_seen.wait(30)
        finally:
            bench.watch.listeners.remove(listener)
        first = min(found.values())
        latencies[kind].append(max(0.0, first - returned))
        if "status" in found:
            status_latencies[kind].append(max(0.0, found["status"] - returned))
        signal = "status" if found.get("status") == first else "event"
        via[f"{kind} first seen via {signal}"] = via.get(f"{kind} first seen via {signal}", 0) + 1
    everything = latencies["destroy"] + latencies["suspend"]
    bench.add(scenario, "commands", count, "commands", ", ".join(f"{k}: {v}" for k, v in sorted(via.items())))
    for kind, values in (*latencies.items(), ("all", everything)):
        if values:
            bench.add(scenario, f"{kind}_p50", percentile(values, 50), "s")
            bench.add(scenario, f"{kind}_p99", percentile(values, 99), "s",
                      "first sign (status or Event); target < 1 s" if kind == "all" else "first sign (status or Event)")
    for kind, values in status_latencies.items():
        if values:
            bench.add(scenario, f"{kind}_status_patch_p50", percentile(values, 50), "s")
            bench.add(scenario, f"{kind}_status_patch_p99", percentile(values, 99), "s", "until the status patch landed")
        else:
            bench.add(scenario, f"{kind}_status_patch_p99", "n/a", "s",
                      "no status patch: the domain is resumed before the status is computed, so nothing changes")
    log(f"{scenario}: done")
