"""Scenario 3: steady state. With every VM Ready, nothing changing, count for a window:
Kubernetes writes per minute (API server counters: VM-related, and the agents' LibvirtNode
heartbeats apart) and, per agent, libvirt calls and reconciles per minute (the agent's /metrics).

Two agents with different N run in the same window (each on its own private test driver),
started with --resync-seconds 10 --relist-seconds 10, so several resyncs fall in the window:
libvirt calls per resync should be the same for both whatever N.
"""

from __future__ import annotations

import time

from common import VM_RESOURCES, Bench, agent_metrics, agent_writes, diff, proc_usage
from lvo_testing.agent_process import AgentProcess

RESYNC_SECONDS = 10
STEADY_ARGS = ("--resync-seconds", str(RESYNC_SECONDS), "--relist-seconds", str(RESYNC_SECONDS))


def measure(bench: Bench, agents: list[tuple[str, AgentProcess, int]], window: float,
            scenario: str = "steady-test") -> None:
    """`agents`: (label, agent, VMs it owns)."""
    writes_before = bench.api_writes()
    metrics_before = {label: agent_metrics(agent) for label, agent, _ in agents}
    cpu_before = {label: proc_usage(agent.process.pid)[1] for label, agent, _ in agents}
    began = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - began
    per_minute = 60 / elapsed
    writes = diff(agent_writes(bench.api_writes()), agent_writes(writes_before))
    vm_writes = sum(value for key, value in writes.items() if key[1] in VM_RESOURCES)
    node_writes = sum(value for key, value in writes.items() if key[1].startswith("libvirtnodes"))
    bench.add(scenario, "window_seconds", elapsed, "s")
    bench.add(scenario, "vm_writes_per_minute", vm_writes * per_minute, "writes/min",
              f"all agents, API server counters; target 0 ({dict(writes)})")
    bench.add(scenario, "libvirtnode_writes_per_minute", node_writes * per_minute, "writes/min",
              f"{len(agents)} agents' heartbeats (one per agent every 20 s), not per VM")
    for label, agent, n in agents:
        after = agent_metrics(agent)
        bench.add(scenario, f"agent_cpu_seconds_per_minute {label} N={n}",
                  (proc_usage(agent.process.pid)[1] - cpu_before[label]) * per_minute, "s/min", "utime+stime")
        if not after.available:
            bench.add(scenario, f"libvirt_calls_per_minute {label} N={n}", "n/a", "calls/min", "no agent /metrics")
            continue
        before = metrics_before[label]
        calls = diff(after.libvirt_calls, before.libvirt_calls)
        total = sum(calls.values())
        resyncs = elapsed / RESYNC_SECONDS
        bench.add(scenario, f"libvirt_calls_per_minute {label} N={n}", total * per_minute, "calls/min",
                  ", ".join(f"{api}={value:g}" for api, value in calls.most_common(6)))
        bench.add(scenario, f"libvirt_calls_per_resync {label} N={n}", total / resyncs, "calls/resync",
                  f"resync and relist every {RESYNC_SECONDS}s; should not grow with N")
        bench.add(scenario, f"reconciles_per_minute {label} N={n}", (after.reconciles - before.reconciles) * per_minute,
                  "reconciles/min")
        agent_vm_writes = sum(v for k, v in diff(after.kube_writes, before.kube_writes).items() if k[1] in VM_RESOURCES)
        bench.add(scenario, f"agent_counted_vm_writes_per_minute {label} N={n}", agent_vm_writes * per_minute,
                  "writes/min", "the agent's own write counter")
