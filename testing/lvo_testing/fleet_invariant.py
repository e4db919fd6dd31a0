"""The fleet invariant on the test bed of libvirt hosts: what must hold after any fault, once things settle.

- At most one running domain per VM across the hosts, counted from libvirt (virsh on each host) and from
  each agent's /metrics (`libvirt_operator_domains{state="running"}`), the two counts agreeing per host.
- No domain of a VM on a host other than its `status.nodeName`, and no domain of no VM at all.
- No owned volume (a `{uid}-...` file in the host's /var/lib/libvirt/images, read directly) on a host that
  does not run that VM.
- Status is the truth: `status.nodeName` is where the domain runs, `Ready` is True, and `status.migration`
  ended (Succeeded or Failed), nothing left Scheduled, TargetReady or Running.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lvo_testing.agent_process import AgentProcess
from lvo_testing.libvirt_hosts import POOL_PATH, BedHost

Kubectl = Callable[..., subprocess.CompletedProcess[str]]

_OWNED_VOLUME = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")
_RUNNING_METRIC = re.compile(r'^libvirt_operator_domains\{state="running"\} ([0-9.e+]+)$', re.MULTILINE)
ENDED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class HostTruth:
    """What one bed host holds, read from libvirt and from its disk."""

    name: str
    domains: dict[str, str]
    """uuid -> state (`virsh domstate`: running, paused, shut off, ...)."""
    volume_owners: dict[str, list[str]]
    """uid -> the owned volume files of that VM here."""
    running_by_metrics: int | None
    """The host's agent's `libvirt_operator_domains{state="running"}`; None without an agent answering."""

    @classmethod
    def read(cls, host: BedHost, agent: AgentProcess | None) -> HostTruth:
        domains = {}
        for uuid in host.virsh("list", "--all", "--uuid").split():
            domains[uuid] = host.virsh("domstate", uuid, check=False).strip() or "gone"
        owners: dict[str, list[str]] = {}
        for path in sorted(host.path(POOL_PATH).iterdir()):
            found = _OWNED_VOLUME.match(path.name)
            if found:
                owners.setdefault(found.group(1), []).append(path.name)
        return cls(host.name, domains, owners, running_by_metrics(agent) if agent is not None else None)

    @property
    def running(self) -> list[str]:
        return [uuid for uuid, state in self.domains.items() if state == "running"]


def running_by_metrics(agent: AgentProcess) -> int | None:
    try:
        found = _RUNNING_METRIC.search(agent.metrics())
    except OSError:
        return None
    return int(float(found.group(1))) if found else 0


def violations(vms: Sequence[Mapping[str, Any]], hosts: Sequence[HostTruth]) -> list[str]:
    """Each way the fleet breaks the invariant, in words; [] when it holds."""
    found: list[str] = []
    by_uid = {vm["metadata"]["uid"]: vm for vm in vms}
    for host in hosts:
        if host.running_by_metrics is None:
            found.append(f"{host.name}: no agent answers /metrics")
        elif host.running_by_metrics != len(host.running):
            found.append(f"{host.name}: its agent's metrics say {host.running_by_metrics} running domain(s), "
                         f"libvirt {len(host.running)}")
        for uuid, state in host.domains.items():
            vm = by_uid.get(uuid)
            placed = ((vm or {}).get("status") or {}).get("nodeName")
            if vm is None:
                found.append(f"{host.name}: domain {uuid} ({state}) of no VirtualMachine")
            elif placed != host.name:
                found.append(f"{host.name}: domain of {_name(vm)} ({state}), whose status.nodeName is {placed}")
        for uid, files in host.volume_owners.items():
            vm = by_uid.get(uid)
            if vm is None or uid not in host.running:
                found.append(f"{host.name}: owned volume(s) {files} of "
                             f"{_name(vm) if vm else 'no VirtualMachine'}, which does not run here")
    for uid, vm in by_uid.items():
        found.extend(_status_untrue(vm, [host.name for host in hosts if uid in host.running]))
    return found


def _status_untrue(vm: Mapping[str, Any], running_on: list[str]) -> list[str]:
    status, name = vm.get("status") or {}, _name(vm)
    found = []
    if len(running_on) != 1:
        found.append(f"{name} runs on {running_on or 'no host'} (want exactly one)")
    elif status.get("nodeName") != running_on[0]:
        found.append(f"{name} runs on {running_on[0]}, its status.nodeName is {status.get('nodeName')}")
    ready = ready_of(status)
    if ready != "True":
        found.append(f"{name}: Ready is {ready}")
    phase = (status.get("migration") or {}).get("phase")
    if phase is not None and phase not in ENDED_PHASES:
        found.append(f"{name}: status.migration.phase is {phase}, not ended")
    return found


def ready_of(status: Mapping[str, Any]) -> str | None:
    """The status of the Ready condition ("True", "False", "Unknown"), None without one."""
    return next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)


def _name(vm: Mapping[str, Any]) -> str:
    return f"{vm['metadata']['namespace']}/{vm['metadata']['name']}"


def list_vms(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return json.loads(kubectl("get", "vm", "-n", namespace, "-o", "json").stdout)["items"]


def assert_fleet_invariant(kubectl: Kubectl, namespace: str, hosts: Sequence[BedHost],
                           agents: Mapping[str, AgentProcess], timeout: float = 180) -> None:
    """Waits up to `timeout` for the invariant to hold over every VM of `namespace` and every host of the bed
    (whose domains and owned volumes are all this namespace's); fails naming each violation still seen."""
    deadline = time.monotonic() + timeout
    while True:
        vms = list_vms(kubectl, namespace)
        found = violations(vms, [HostTruth.read(host, agents.get(host.name)) for host in hosts])
        if not found:
            return
        if time.monotonic() > deadline:
            statuses = {_name(vm): vm.get("status") for vm in vms}
            raise AssertionError(f"the fleet invariant does not hold after {timeout:g}s:\n- " + "\n- ".join(found)
                                 + "\nstatuses: " + json.dumps(statuses, indent=1))
        time.sleep(1)
