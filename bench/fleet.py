"""Scenario fleet-test: K agents on their own test drivers, with capacities that differ, and N VMs without
nodeName, created back to back. The agent holding the placement Lease places them.

Figures: placements per second (first POST to the last VM seen with status.nodeName, on the bench's watch),
creation-to-Ready p50/p95, Kubernetes writes per VM (placement included), VMs per node, then a quiet
window: VM writes per minute (target 0), renewal writes per agent per minute (LibvirtNode heartbeats and
the Lease; target at most 6), and each agent's RSS. Placement cost as the fleet grows: time per decision
with 10 and 100 synthetic nodes, in this process, through `placement.choose`.

Scenario one-agent-test: one agent on the test driver, hosted by libvirtd, holding N VMs (placed by it, the only node): its RSS
(target under 300 MB at N=10,000), libvirt calls per resync in a quiet window (compare with steady-test's N:
constant in N), and the time from a SIGKILL to caught up.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import restart
import steady_state
from common import (
    TEST_DRIVER_ARGS, TEST_DRIVER_URI, VM_RESOURCES, Bench, agent_writes, diff, log, percentile,
)
from libvirt_operator import nodes, placement
from libvirt_operator.spec import parse_spec

SCENARIO = "fleet-test"
ONE_AGENT = "one-agent-test"
DAEMON_TEST_DRIVER_URI = "test+unix:///default"
GI = 1 << 30


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib(pid: int) -> float:
    return rss_mib(pid, "VmHWM")


def fleet(bench: Bench, n: int, k: int, window: float) -> None:
    namespace = bench.namespace("bench-fleet")
    per_vm = 64 + 64  # MiB: spec.memory and the default per-VM overhead
    needed = n * per_vm / 1024 * 1.5 / k  # GiB per node on average, with room to spare
    agents = [bench.start_agent(f"fleet-{i:02d}", TEST_DRIVER_URI, (
        *TEST_DRIVER_ARGS, "--capacity-vcpus", str(int(n / k * (1 + i / k))),
        "--capacity-memory", f"{int(needed * (0.6 + 0.8 * i / k)) + 1}Gi", "--workers", "16")) for i in range(k)]
    deadline = time.monotonic() + 120
    while sum(1 for item in bench.custom.list_cluster_custom_object("libvirt-operator.io", "v1alpha1", "libvirtnodes")
              ["items"] if (item.get("status") or {}).get("allocatable")) < k:
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet's LibvirtNodes did not announce themselves")
        time.sleep(0.5)
    placed_at: dict[str, float] = {}
    lock = threading.Lock()

    def seen(arrived: float, _type: str, vm: dict[str, Any]) -> None:
        if vm["metadata"].get("namespace") == namespace and (vm.get("status") or {}).get("nodeName"):
            with lock:
                placed_at.setdefault(vm["metadata"]["name"], arrived)

    bench.watch.listeners.append(seen)
    names = [f"f-{i:05d}" for i in range(n)]
    created: dict[str, float] = {}
    writes_before = bench.api_writes()
    began = time.time()
    create_all(bench, namespace, names, created)
    ready = bench.watch.wait_ready(namespace, names, timeout=max(300, n / 5))
    bench.wait_quiet(quiet=5.0, timeout=600)
    bench.watch.listeners.remove(seen)
    writes = diff(agent_writes(bench.api_writes()), agent_writes(writes_before))
    latencies = [ready[name] - created[name] for name in names]
    bench.add(SCENARIO, "agents", k, "", "each on its own test:///default, capacities differ")
    bench.add(SCENARIO, "placements_per_second", n / (max(placed_at.values()) - began), "VMs/s",
              f"N={n}, first POST to the last VM seen placed")
    to_placed = [placed_at[name] - created[name] for name in names]
    bench.add(SCENARIO, "creation_to_placed_p50", percentile(to_placed, 50), "s", "POST to status.nodeName seen")
    bench.add(SCENARIO, "creation_to_placed_p95", percentile(to_placed, 95), "s",
              f"creation ran at {n / (max(created.values()) - began):.0f} POSTs/s; placement keeps up when these stay small")
    bench.add(SCENARIO, "creation_to_ready_p50", percentile(latencies, 50), "s")
    bench.add(SCENARIO, "creation_to_ready_p95", percentile(latencies, 95), "s", f"N={n} created back to back")
    vm_writes = sum(value for key, value in writes.items() if key[1] in VM_RESOURCES)
    bench.add(SCENARIO, "writes_per_vm", vm_writes / n, "writes/VM",
              "placement + finalizer + status + events: " + ", ".join(f"{v} {k[0]} {k[1]}" for k, v in writes.items()
                                                                     if k[1] in VM_RESOURCES))
    per_node: dict[str, int] = {}
    for vm in bench.list_vms(namespace):
        per_node[vm["status"]["nodeName"]] = per_node.get(vm["status"]["nodeName"], 0) + 1
    bench.add(SCENARIO, "vms_per_node", f"{min(per_node.values())}..{max(per_node.values())}", "VMs",
              " ".join(f"{node}={count}" for node, count in sorted(per_node.items())))
    quiet_before = bench.api_writes()
    started = time.monotonic()
    time.sleep(window)
    per_minute = 60 / (time.monotonic() - started)
    quiet = diff(bench.api_writes(), quiet_before)
    steady_vm = sum(value for key, value in agent_writes(quiet).items() if key[1] in VM_RESOURCES)
    renewals = sum(value for key, value in quiet.items() if key[1] in ("libvirtnodes/status", "leases"))
    bench.add(SCENARIO, "steady_vm_writes_per_minute", steady_vm * per_minute, "writes/min", "target 0")
    bench.add(SCENARIO, "renewal_writes_per_agent_per_minute", renewals * per_minute / k, "writes/min",
              f"LibvirtNode heartbeats and the placement Lease ({dict(quiet)}); target at most 6")
    rss = [rss_mib(agent.process.pid) for agent in agents]
    bench.add(SCENARIO, "agent_rss_max", max(rss), "MiB", f"mean {sum(rss) / len(rss):.0f} MiB, N={n} VMs watched by each")
    bench.delete_all(namespace, timeout=max(600, n / 5))
    for agent in agents:
        agent.stop()
        bench.agents.remove(agent)
    for node in (f"fleet-{i:02d}" for i in range(k)):
        bench.custom.delete_cluster_custom_object("libvirt-operator.io", "v1alpha1", "libvirtnodes", node)


def create_all(bench: Bench, namespace: str, names: list[str], created: dict[str, float]) -> None:
    """Creates the VMs back to back from 8 threads; name -> wall time just before its POST."""
    def create(name: str) -> None:
        created[name] = time.time()
        bench.create_vm(namespace, name, {"memory": "64Mi"})

    began = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, names))
    log(f"{namespace}: {len(names)} VMs created in {time.time() - began:.1f}s")


def one_agent(bench: Bench, n: int, window: float) -> None:
    """The test driver runs inside libvirtd here (`test+unix:///default`), as QEMU's domains do on a host: the agent's
    RSS is then the agent's own, and its restart finds the domains still there."""
    import libvirt
    from lvo_testing.libvirt_env import running_libvirtd

    with running_libvirtd():
        keeper = libvirt.open(DAEMON_TEST_DRIVER_URI)  # libvirtd drops the test driver's state with its last client
        try:
            _one_agent(bench, n, window)
        finally:
            keeper.close()


def _one_agent(bench: Bench, n: int, window: float) -> None:
    namespace = bench.namespace("bench-one-agent")
    agent = bench.start_agent("one-agent", DAEMON_TEST_DRIVER_URI, (
        *TEST_DRIVER_ARGS, *steady_state.STEADY_ARGS, "--capacity-vcpus", str(n), "--capacity-memory", f"{n // 4}Gi",
        "--workers", "16"))
    rss_idle = rss_mib(agent.process.pid)
    names = [f"o-{i:05d}" for i in range(n)]
    create_all(bench, namespace, names, {})
    bench.watch.wait_ready(namespace, names, timeout=max(300, n / 5))
    bench.wait_quiet(quiet=5.0, timeout=600)
    rss = rss_mib(agent.process.pid)
    bench.add(ONE_AGENT, "agent_rss", rss, "MiB", f"N={n} VMs held (and watched); {rss_idle:.0f} MiB before any; "
              "target under 300 MB")
    bench.add(ONE_AGENT, "agent_rss_per_vm", (rss - rss_idle) * 1024 / n, "KiB/VM")
    steady_state.measure(bench, [("one-agent", agent, n)], window, scenario=ONE_AGENT)
    restart.restart(bench, ONE_AGENT, agent, namespace, n, note="test driver inside libvirtd: the domains outlive the agent")
    time.sleep(steady_state.RESYNC_SECONDS + 1)  # a resync hands the restart's burst back (process_memory)
    bench.add(ONE_AGENT, "agent_rss_after_restart", rss_mib(agent.process.pid), "MiB", f"N={n}, caught up, one resync later")
    bench.add(ONE_AGENT, "agent_peak_rss_restart", peak_mib(agent.process.pid), "MiB",
              "VmHWM of the restarted process, start and catching up included; the DaemonSet's limit is 512Mi")
    bench.delete_all(namespace, timeout=max(600, n / 5))
    agent.stop()
    bench.agents.remove(agent)
    bench.custom.delete_cluster_custom_object("libvirt-operator.io", "v1alpha1", "libvirtnodes", "one-agent")


def decision_cost(bench: Bench, sizes: tuple[int, ...] = (10, 100), decisions: int = 2000) -> None:
    """Seconds per placement decision with `size` nodes, each decision booked in the ledger."""
    request = placement.request_of(parse_spec({"memory": "64Mi"}))
    for size in sizes:
        fleet_view = nodes.Fleet("bench")
        fleet_view.observe([{"metadata": {"name": f"n-{i:03d}"},
                             "status": {"heartbeatTime": "t", "allocatable": {"vcpus": 10_000, "memoryBytes": 1 << 50,
                                                                             "vmMemoryOverheadBytes": 64 << 20}}}
                            for i in range(size)])
        ledger = placement.Ledger()
        offers = placement.node_offers(fleet_view.nodes.values())
        began = time.perf_counter()
        for i in range(decisions):
            choice = placement.choose(request, offers, ledger)
            ledger.place(str(i), choice.node, offers[0].cost(request))
        bench.add(SCENARIO, f"decision_microseconds_{size}_nodes", (time.perf_counter() - began) / decisions * 1e6, "µs",
                  f"{decisions} decisions, each booked")
