"""Every benchmark in one run: `make bench` (`.venv/bin/python bench/run_all.py [--quick]`).

Starts a local control plane (etcd + kube-apiserver), then:
  1+2. ceiling (plain client, no agent) and rollout of N test-driver VMs 100 ms apart
  3.   steady state: two agents (N and N/10 VMs) in one window, resync/relist every 10 s
  4.   restart: SIGKILL + start of the N-VM test-driver agent (domains re-created: test driver)
  1.   rollout of real QEMU guests on qemu:///system
  4.   restart of the QEMU agent: domains restarted must be 0
  5.   reaction to out-of-band virsh destroy / suspend
  6.   live moves on a bed of two libvirt hosts: operator vs virsh migrate, downtime, a drain (bench/migration.py)
  +    bench/host_listing.py (Host listing + bulk stats vs legacy per-domain calls)
Prints a table, then one JSON object per line per figure (scenario, figure, value, unit[, note]).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleet  # noqa: E402
import migration  # noqa: E402
import reaction  # noqa: E402
import restart  # noqa: E402
import rollout  # noqa: E402
import steady_state  # noqa: E402
from common import Bench, Figure, bench_environment, exit_on_signals, log, remove_domains  # noqa: E402

SIZES = {
    # test-driver N, second (small) N, steady window s, QEMU guests, restart guests (min), reaction commands
    False: dict(n=1000, small=100, window=60, qemu=50, qemu_restart=10, reactions=50, listing=(),
                fleet_n=10_000, fleet_k=10, fleet_window=60, one_agent_n=10_000, move_rounds=5, moves=20, drained=10),
    True: dict(n=60, small=6, window=12, qemu=5, qemu_restart=3, reactions=5, listing=("--quick",),
               fleet_n=300, fleet_k=3, fleet_window=20, one_agent_n=300, move_rounds=2, moves=4, drained=4),
}
STEADY_ARGS = steady_state.STEADY_ARGS


def test_driver_scenarios(bench: Bench, size: dict, profile_dir: Path | None) -> None:
    ceiling = rollout.ceiling(bench, size["n"])
    agent_a = rollout.test_driver(bench, size["n"], "bench-a", "bench-test", ceiling["paced"], extra=STEADY_ARGS,
                                  profile=profile_dir / "agent-test.pyisession" if profile_dir else None)
    agent_b = bench.start_agent("bench-b", rollout.TEST_DRIVER_URI, (*rollout.TEST_DRIVER_ARGS, *STEADY_ARGS))
    bench.namespace("bench-test-small")
    small = [f"s-{i:04d}" for i in range(size["small"])]
    bench.create_paced("bench-test-small", small, lambda _: {"nodeName": "bench-b", "memory": "64Mi"}, interval=0)
    bench.watch.wait_ready("bench-test-small", small, timeout=120)
    bench.wait_quiet(quiet=3.0, timeout=120)
    steady_state.measure(bench, [("agent-a", agent_a, size["n"]), ("agent-b", agent_b, size["small"])], size["window"])
    restart.restart(bench, "restart-test", agent_a, "bench-test", size["n"],
                    note="test driver: the hypervisor dies with the agent, so domains are re-created")
    began = time.monotonic()
    bench.delete_all("bench-test")
    bench.delete_all("bench-test-small")
    bench.add("cleanup-test", "delete_all_seconds", time.monotonic() - began, "s",
              f"{size['n'] + size['small']} VMs deleted, finalizers run")
    agent_a.stop()
    agent_b.stop()


def qemu_scenarios(bench: Bench, size: dict, profile_dir: Path | None) -> None:
    from lvo_testing.libvirt_env import build_guest_image, running_libvirtd

    with running_libvirtd(guest_cpu_cgroup=size["guest_cpu_cgroup"]) as uri:
        image = build_guest_image()
        namespace = "bench-qemu"
        no_os_namespace = f"{namespace}-no-os"
        idle_namespace = f"{namespace}-idle-vcpus"
        for leftover in (namespace, no_os_namespace, idle_namespace):  # an earlier run's, killed before its cleanup
            remove_domains(f"{leftover}_")
        agent = None
        try:
            guests = max(size["qemu"], size["qemu_restart"])
            logs = console_logs(namespace, [f"q-{i:03d}" for i in range(guests)])
            agent = rollout.qemu(bench, guests, "bench-qemu", namespace, image, uri, domain_type=size["domain_type"],
                                 profile=profile_dir / "agent-qemu.pyisession" if profile_dir else None)
            began = time.monotonic()
            wait_guests_booted(logs, timeout=300)
            bench.add("restart-qemu", "guests_booted_wait", time.monotonic() - began, "s",
                      "after all Ready, until every guest's console says LVO-GUEST-READY: the restart then "
                      "measures the agent, not 50 kernels booting")
            restart.restart(bench, "restart-qemu", agent, namespace, guests, domain_prefix=f"{namespace}_")
            names = [f"q-{i:03d}" for i in range(guests)]
            reaction.react(bench, namespace, names, size["reactions"], uri)
            began = time.monotonic()
            bench.delete_all(namespace)
            bench.add("cleanup-qemu", "delete_all_seconds", time.monotonic() - began, "s",
                      f"{guests} guests: shutdown, undefine, finalizer")
            rollout.qemu_without_os(bench, agent, size["qemu"], "bench-qemu", no_os_namespace)
            bench.delete_all(no_os_namespace)
            agent.stop()
            agent = rollout.qemu_idle_vcpus(bench, size["qemu"], "bench-qemu", idle_namespace, image, uri,
                                            domain_type=size["domain_type"])
            bench.delete_all(idle_namespace)
        finally:
            for leftover in (namespace, no_os_namespace, idle_namespace):
                if agent is not None and bench.list_vms(leftover):
                    try:  # a failed run: let the agent's finalizers remove what they can first
                        bench.delete_all(leftover, timeout=120)
                    except Exception as error:  # noqa: BLE001
                        log(f"cleanup: {error}")
            if agent is not None:
                agent.stop()
            left = sum(remove_domains(f"{name}_") for name in (namespace, no_os_namespace, idle_namespace))
            if left:
                log(f"removed {left} leftover domains")


def console_logs(namespace: str, names: list[str]) -> dict[Path, int]:
    """Each guest's console log and its size now (logs are appended to across runs)."""
    from libvirt_operator.domain_xml import console_log_path
    from libvirt_operator.model import AgentSettings, VMRef

    settings = AgentSettings()
    paths = [console_log_path(VMRef(uid="", namespace=namespace, name=name), settings) for name in names]
    return {path: path.stat().st_size if path.exists() else 0 for path in paths}


def wait_guests_booted(logs: dict[Path, int], timeout: float) -> None:
    """Until every log says LVO-GUEST-READY after the offset it had."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() and b"LVO-GUEST-READY" in path.read_bytes()[offset:] for path, offset in logs.items()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guests did not all boot within {timeout}s")
        time.sleep(1)


def host_listing(bench: Bench, size: dict) -> None:
    script = Path(__file__).resolve().parent / "host_listing.py"
    out = subprocess.run([sys.executable, str(script), *size["listing"]], capture_output=True, text=True, check=True,
                         timeout=600).stdout
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            n = row["n"]
            bench.add("host-listing", f"host_calls N={n}", row["host_calls"], "calls", "list_domains + all_domain_stats")
            bench.add("host-listing", f"host_seconds N={n}", row["host_seconds"], "s")
            bench.add("host-listing", f"legacy_calls N={n}", row["legacy_calls"], "calls", "per-domain lookups + info()")
            bench.add("host-listing", f"legacy_seconds N={n}", row["legacy_seconds"], "s")


def print_figures(figures: list[Figure]) -> None:
    widths = [max(len(str(getattr(f, attr))) for f in figures) for attr in ("scenario", "figure", "value", "unit")]
    widths = [max(w, len(t)) for w, t in zip(widths, ("scenario", "figure", "value", "unit"))]
    print(" | ".join(t.ljust(w) for t, w in zip(("scenario", "figure", "value", "unit"), widths)) + " | note")
    print("-+-".join("-" * w for w in widths) + "-+-----")
    for f in figures:
        print(" | ".join(str(v).ljust(w) for v, w in zip((f.scenario, f.figure, f.value, f.unit), widths))
              + f" | {f.note}")
    print()
    for f in figures:
        print(f.json())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, under two minutes")
    parser.add_argument("--only", choices=("test", "fleet", "one-agent", "qemu", "migration", "listing"), action="append",
                        help="run only these parts (repeatable; default all)")
    parser.add_argument("--domain-type", choices=("qemu", "kvm"), default="qemu",
                        help="spec.domainType of the real guests (default qemu: TCG, as the e2e tests)")
    parser.add_argument("--guest-cpu-cgroup", choices=("on", "off"), default="on",
                        help="libvirt's cpu cgroup controller for the real guests (default on, as on hosts; "
                             "off: every guest thread competes with libvirtd and the agent as an equal)")
    parser.add_argument("--profile-dir", type=Path, help="run the rollout agents under pyinstrument, reports here")
    args = parser.parse_args()
    size = {**SIZES[args.quick], "domain_type": args.domain_type, "guest_cpu_cgroup": args.guest_cpu_cgroup == "on"}
    parts = args.only or ["test", "fleet", "one-agent", "qemu", "migration", "listing"]
    began = time.monotonic()
    exit_on_signals()
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    with bench_environment(args.quick) as bench:
        try:
            if "test" in parts:
                test_driver_scenarios(bench, size, args.profile_dir)
            if "fleet" in parts:
                fleet.fleet(bench, size["fleet_n"], size["fleet_k"], size["fleet_window"])
                fleet.decision_cost(bench)
            if "one-agent" in parts:
                fleet.one_agent(bench, size["one_agent_n"], size["fleet_window"])
            if "qemu" in parts:
                qemu_scenarios(bench, size, args.profile_dir)
            if "migration" in parts:
                migration.migration(bench, size["move_rounds"], size["moves"], size["drained"])
            if "listing" in parts:
                host_listing(bench, size)
        finally:
            bench.add("bench", "wall_seconds", time.monotonic() - began, "s", "quick" if args.quick else "full")
            print_figures(bench.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
