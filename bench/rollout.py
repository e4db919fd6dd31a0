"""Scenarios 1 and 2: rollout of N VMs created 100 ms apart, and the ceiling of a plain client.

Rollout: creation-to-Ready p50/p95/max (first watch event with status.ready true, minus the
wall time just before the VM's POST), rollout time (first POST to last Ready), Kubernetes writes
per VM by verb (apiserver_request_total, the bench's own POSTs of VirtualMachines left out),
libvirt calls per VM (the agent's /metrics), the agent's peak RSS and CPU seconds.

Ceiling: with no agent running, a plain Python client creates the same N objects on the same
100 ms schedule and patches one status each right after each creation; also once as fast as
it can (unpaced). The rollout/ceiling ratio says how far the agent is from keeping up.

QEMU ceiling: with no agent and no API server in the loop, the same N guests' domain XML (rendered
by the operator's own `domain_xml.render`) is defined and started straight through libvirt, one thread
per guest on the same 100 ms schedule: what this machine gives when nothing but libvirtd and
QEMU does the work.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import (
    GROUP, PLURAL, TEST_DRIVER_ARGS, TEST_DRIVER_URI, VERSION, AgentMetrics, Bench, add_cpu_split, agent_metrics,
    agent_writes, cpu_by_command, diff, guest_cpu_cgroups, host_cpu, log, percentile, proc_usage, remove_domains,
)
from lvo_testing.agent_process import AgentProcess

INTERVAL = 0.1
CEILING_QEMU_PREFIX = "bench-ceiling-qemu_"
READY_STATUS = {"printableStatus": "Running", "ready": True, "nodeName": "nowhere"}


def ceiling(bench: Bench, n: int, scenario: str = "ceiling-test") -> dict[str, float]:
    """Paced and unpaced create + one status write per object, with no agent running; seconds."""
    namespace = bench.namespace("bench-ceiling")
    names = [f"c-{i:04d}" for i in range(n)]

    def write_status(name: str) -> None:
        bench.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                           {"status": READY_STATUS})

    began = time.monotonic()
    bench.create_paced(namespace, names, lambda _: {"nodeName": "nowhere", "memory": "64Mi"},
                       interval=INTERVAL, after_each=write_status)
    paced = time.monotonic() - began
    bench.delete_all(namespace)
    began = time.monotonic()
    bench.create_paced(namespace, names, lambda _: {"nodeName": "nowhere", "memory": "64Mi"},
                       interval=0, after_each=write_status)
    unpaced = time.monotonic() - began
    bench.delete_all(namespace)
    bench.add(scenario, "ceiling_paced_seconds", paced, "s", f"N={n}, 100 ms apart, create + 1 status patch each")
    bench.add(scenario, "ceiling_unpaced_seconds", unpaced, "s", f"N={n}, back to back, create + 1 status patch each")
    return {"paced": paced, "unpaced": unpaced}


def qemu_ceiling(bench: Bench, n: int, node: str, image: Any, uri: str, domain_type: str) -> dict[str, float]:
    """Define + start of `n` guests through libvirt alone, 100 ms apart; the domains are removed after."""
    import libvirt
    from e2e import guest_spec
    from libvirt_operator.disk_plan import plan_disks
    from libvirt_operator.domain_xml import render
    from libvirt_operator.model import AgentSettings, VMRef
    from libvirt_operator.spec import parse_spec

    scenario, settings = "ceiling-qemu", AgentSettings()
    settings.console_log_dir.mkdir(parents=True, exist_ok=True)
    xmls = []
    for i in range(n):
        vm = VMRef(uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{CEILING_QEMU_PREFIX}{i}")), namespace="bench-ceiling-qemu",
                   name=f"c-{i:03d}")
        spec = parse_spec(guest_spec(image, node, marker=vm.name, domainType=domain_type))
        xmls.append(render(spec, vm, settings, generation=1, spec_hash="", disks=plan_disks(spec, vm, settings)))
    connections = [libvirt.open(uri) for _ in range(n)]  # one each, as the agent's threads have (README)
    log(f"{scenario}: {n} domains rendered, starting them")
    latencies: list[float] = [0.0] * n
    domains: list[Any] = []
    host_before, split_before = host_cpu(), cpu_by_command()
    began = time.monotonic()

    def define_and_start(i: int) -> None:
        due = began + i * INTERVAL
        time.sleep(max(0.0, due - time.monotonic()))
        domain = connections[i].defineXML(xmls[i])
        domains.append(domain)
        domain.create()
        latencies[i] = time.monotonic() - due

    threads = [threading.Thread(target=define_and_start, args=(i,)) for i in range(n)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        busy, cpu_total = (after - before for after, before in zip(host_cpu(), host_before))
        add_cpu_split(bench, scenario, split_before, time.monotonic() - began)
    finally:
        with ThreadPoolExecutor(len(domains) or 1) as pool:  # a booting QEMU takes ~1.5 s to exit on SIGTERM
            list(pool.map(_destroy_and_undefine, domains))
        for conn in connections:
            conn.close()
        remove_domains(CEILING_QEMU_PREFIX, uri)
    bench.add(scenario, "define_start_p50", percentile(latencies, 50), "s")
    bench.add(scenario, "define_start_p95", percentile(latencies, 95), "s",
              f"{n} guests, defineXML + create, one thread each, 100 ms apart; no agent, no API server")
    bench.add(scenario, "define_start_max", max(latencies), "s")
    bench.add(scenario, "host_cpu_busy", 100 * busy / cpu_total, "%", f"all {os.cpu_count()} cores, first define to last start")
    return {"p95": percentile(latencies, 95)}


def _destroy_and_undefine(domain: Any) -> None:
    domain.destroy()
    domain.undefine()


def rollout(bench: Bench, scenario: str, agent: AgentProcess, namespace: str, names: list[str],
            spec: Callable[[str], dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Creates `names` 100 ms apart and waits until each is Ready; records the figures."""
    n = len(names)
    writes_before = bench.api_writes()
    metrics_before = agent_metrics(agent)
    _, cpu_before = proc_usage(agent.process.pid)
    host_before, split_before = host_cpu(), cpu_by_command()
    created = bench.create_paced(namespace, names, spec, interval=INTERVAL)
    ready = bench.watch.wait_ready(namespace, names, timeout=timeout)
    all_ready = time.time()
    host_after = host_cpu()
    add_cpu_split(bench, scenario, split_before, all_ready - min(created.values()))
    bench.wait_quiet(quiet=2.0, timeout=120)  # writes still in flight for the last VMs (their events)
    writes = diff(agent_writes(bench.api_writes()), agent_writes(writes_before))
    metrics_after = agent_metrics(agent)
    rss, cpu_after = proc_usage(agent.process.pid)
    latencies = [ready[name] - created[name] for name in names]
    total = max(ready.values()) - min(created.values())
    bench.add(scenario, "vms", n, "VMs")
    bench.add(scenario, "create_to_ready_p50", percentile(latencies, 50), "s")
    bench.add(scenario, "create_to_ready_p95", percentile(latencies, 95), "s")
    bench.add(scenario, "create_to_ready_max", max(latencies), "s")
    bench.add(scenario, "rollout_seconds", total, "s", "first POST to last Ready")
    vm_writes = {key: value for key, value in writes.items() if not key[1].startswith("libvirtnodes")}
    for (verb, resource), value in sorted(vm_writes.items()):
        bench.add(scenario, f"writes_per_vm {verb} {resource}", value / n, "writes/VM")
    bench.add(scenario, "writes_per_vm", sum(vm_writes.values()) / n, "writes/VM",
              "all agent writes to virtualmachines, virtualmachines/status, events; target <= 3")
    node_writes = sum(value for key, value in writes.items() if key[1].startswith("libvirtnodes"))
    bench.add(scenario, "libvirtnode_writes", node_writes, "writes", f"heartbeats during the {total:.0f}s rollout")
    _libvirt_figures(bench, scenario, metrics_before, metrics_after, n)
    bench.add(scenario, "agent_peak_rss", rss, "MiB", "VmHWM of the agent process")
    bench.add(scenario, "agent_cpu_seconds", cpu_after - cpu_before, "s", "utime+stime during the rollout")
    busy, cpu_total = (after - before for after, before in zip(host_after, host_before))
    bench.add(scenario, "host_cpu_busy", 100 * busy / cpu_total, "%",
              f"every process on all {os.cpu_count()} cores, first POST to last Ready (guests, libvirtd, API server, agent)")
    log(f"{scenario}: all {n} Ready {all_ready - min(created.values()):.1f}s after the first POST")
    return {"rollout_seconds": total, "latencies": latencies, "writes": writes}


def _libvirt_figures(bench: Bench, scenario: str, before: AgentMetrics, after: AgentMetrics, n: int) -> None:
    if not after.available:
        bench.add(scenario, "libvirt_calls_per_vm", "n/a", "calls/VM", "the agent exposes no /metrics")
        return
    calls = diff(after.libvirt_calls, before.libvirt_calls)
    bench.add(scenario, "libvirt_calls_per_vm", sum(calls.values()) / n, "calls/VM",
              ", ".join(f"{api}={value / n:.2f}" for api, value in calls.most_common(8)))
    bench.add(scenario, "libvirt_connections_opened", after.connections_opened - before.connections_opened,
              "connections", f"{after.connections_opened:.0f} since the agent started: its own and one per libvirt "
              "worker thread, opened on the thread's first call and kept")
    seconds = diff(after.libvirt_seconds, before.libvirt_seconds)
    bench.add(scenario, "libvirt_seconds_per_vm", sum(seconds.values()) / n, "s/VM",
              "time inside libvirt calls: " + ", ".join(f"{api}={value / n:.3f}" for api, value in seconds.most_common(4)))


def test_driver(bench: Bench, n: int, node: str, namespace: str, ceiling_seconds: float,
                extra: tuple[str, ...] = (), profile: Any = None) -> AgentProcess:
    """The test-driver rollout; returns the agent (left running with its N VMs Ready)."""
    scenario = "rollout-test"
    agent = bench.start_agent(node, TEST_DRIVER_URI, (*TEST_DRIVER_ARGS, *extra), profile=profile)
    bench.namespace(namespace)
    result = rollout(bench, scenario, agent, namespace, [f"t-{i:04d}" for i in range(n)],
                     lambda _: {"nodeName": node, "memory": "64Mi"}, timeout=max(120, n * 0.5))
    bench.add(scenario, "rollout_over_ceiling", result["rollout_seconds"] / ceiling_seconds, "x",
              "rollout time / paced ceiling time; target <= 2")
    return agent


def qemu(bench: Bench, n: int, node: str, namespace: str, image: Any, uri: str, domain_type: str = "qemu",
         profile: Any = None) -> AgentProcess:
    """The real-QEMU rollout (128Mi busybox guests), after its ceiling; returns the agent (left running)."""
    from e2e import guest_spec

    ceiling_p95 = qemu_ceiling(bench, n, node, image, uri, domain_type)["p95"]
    agent = bench.start_agent(node, uri, profile=profile)
    bench.namespace(namespace)
    bench.add("rollout-qemu", "domain_type", domain_type, "", "qemu: TCG emulation; kvm: hardware virtualisation")
    result = rollout(bench, "rollout-qemu", agent, namespace, [f"q-{i:03d}" for i in range(n)],
                     lambda name: guest_spec(image, node, marker=name, domainType=domain_type), timeout=max(120, n * 4))
    bench.add("rollout-qemu", "p95_over_ceiling", percentile(result["latencies"], 95) / ceiling_p95, "x",
              "creation-to-Ready p95 / define+start p95 of ceiling-qemu")
    placed = guest_cpu_cgroups(f"{namespace}_")
    bench.add("rollout-qemu", "guest_cpu_cgroups", ", ".join(f"{path} x{count}" for path, count in placed.items()), "",
              "top-level cpu cgroup of the guests' QEMU processes: /machine when libvirt's cpu controller is on "
              "(all guests share one weight against the host's processes), / when off (each guest thread weighs "
              "as much as libvirtd's)")
    return agent


IDLE_VCPUS = ("--guest-vcpu-scheduler", "idle")


def qemu_idle_vcpus(bench: Bench, n: int, node: str, namespace: str, image: Any, uri: str,
                    domain_type: str = "qemu") -> AgentProcess:
    """The same rollout by an agent started with `--guest-vcpu-scheduler idle`: the guests' vCPUs get
    only the CPU that libvirtd, QEMU starting other guests, the API server and the agent leave."""
    from e2e import guest_spec

    agent = bench.start_agent(node, uri, IDLE_VCPUS)
    bench.namespace(namespace)
    rollout(bench, "rollout-qemu-idle-vcpus", agent, namespace, [f"i-{i:03d}" for i in range(n)],
            lambda name: guest_spec(image, node, marker=name, domainType=domain_type, terminationGracePeriodSeconds=0),
            timeout=max(120, n * 4))
    return agent


def qemu_without_os(bench: Bench, agent: AgentProcess, n: int, node: str, namespace: str) -> None:
    """The same rollout with guests that boot no OS (SeaBIOS finds no boot device and idles): what the
    agent and libvirtd reach when the guests' own kernels do not take the CPU."""
    bench.namespace(namespace)
    rollout(bench, "rollout-qemu-no-os", agent, namespace, [f"n-{i:03d}" for i in range(n)],
            lambda _: {"nodeName": node, "memory": "128Mi", "domainType": "qemu", "terminationGracePeriodSeconds": 0},
            timeout=max(120, n * 4))
