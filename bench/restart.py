"""Scenario 4: SIGKILL the agent with its VMs Ready, start it again.

Figures: seconds until caught up (from the restart until the agent has reconciled every VM
with an idle queue, per its /metrics, and its last VM write, found by waiting for 5 s without
any), writes made, VMs still Ready, and domains restarted (`virsh list` ids before and after).

On the test driver the hypervisor lives inside the agent process, so killing the agent kills
its domains: restarting there re-creates them, a property of the test driver. The
"domains restarted" figure that matters comes from qemu:///system.
"""

from __future__ import annotations

import time

from common import VM_RESOURCES, Bench, agent_metrics, agent_writes, diff, domain_ids, log
from lvo_testing.agent_process import AgentProcess


def restart(bench: Bench, scenario: str, agent: AgentProcess, namespace: str, n: int,
            domain_prefix: str | None = None, note: str = "") -> None:
    ids_before = domain_ids(domain_prefix) if domain_prefix else {}
    writes_before = bench.api_writes()
    agent.kill()
    killed = time.time()
    agent.start(timeout=120)
    healthy = time.time()
    reconciled = None
    deadline = time.monotonic() + max(60, n * 0.2)
    while time.monotonic() < deadline:
        metrics = agent_metrics(agent)
        if not metrics.available:
            time.sleep(0.2)  # busy, or no /metrics at all: then the last write decides
            continue
        if metrics.reconciles >= n and metrics.queue_depth == 0:
            reconciled = time.time()
            break
        time.sleep(0.1)
    last_write = bench.wait_quiet(quiet=5.0, timeout=max(120, n * 0.5))
    writes = diff(agent_writes(bench.api_writes()), agent_writes(writes_before))
    vm_writes = {key: value for key, value in writes.items() if key[1] in VM_RESOURCES}
    ends = [healthy] + ([reconciled] if reconciled else []) + ([last_write] if vm_writes else [])
    vms = bench.list_vms(namespace)
    ready = sum(1 for vm in vms if (vm.get("status") or {}).get("ready") is True)
    bench.add(scenario, "vms", n, "VMs", note)
    bench.add(scenario, "restart_to_healthy_seconds", healthy - killed, "s", "new process until /healthz answers")
    bench.add(scenario, "restart_to_caught_up_seconds", max(ends) - killed, "s",
              "until every VM reconciled with an idle queue and the last VM write" +
              ("" if reconciled else " (agent /metrics n/a: last write or healthy)"))
    bench.add(scenario, "writes", sum(vm_writes.values()), "writes",
              ", ".join(f"{verb} {resource}={value}" for (verb, resource), value in sorted(vm_writes.items()))
              or "none; target 0 for unchanged VMs")
    bench.add(scenario, "vms_ready_after", ready, "VMs", f"of {len(vms)}")
    if domain_prefix:
        ids_after = domain_ids(domain_prefix)
        changed = sorted(name for name in ids_before if ids_after.get(name) != ids_before[name])
        bench.add(scenario, "domains_restarted", len(changed), "domains",
                  f"virsh list ids compared for {len(ids_before)} domains; target 0" + (f": {changed}" if changed else ""))
    log(f"{scenario}: done")
