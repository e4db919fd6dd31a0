"""`libvirt-operator run`: the agent's command line, turned into settings and a running kopf operator."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from libvirt_operator.model import (
    VCPU_SCHEDULERS, AgentSettings, DownloadPolicy, MigrationPolicy, PlacementPolicy, Tuning,
)
from libvirt_operator.spec_fields import SpecError, parse_quantity


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, tuning = AgentSettings(), Tuning()
    parser.add_argument("--libvirt-uri", default=os.environ.get("LIBVIRT_URI", defaults.libvirt_uri),
                        help="libvirt connection URI (default qemu:///system; test:///default for a demo)")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME", socket.gethostname()),
                        help="this node's name: the agent owns VMs whose spec.nodeName is this (default $NODE_NAME)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig file (default: in-cluster ServiceAccount, else $KUBECONFIG)")
    parser.add_argument("--liveness-port", type=int, default=8080, help="port of the /healthz endpoint")
    parser.add_argument("--metrics-port", type=int, default=9090, help="port of the Prometheus /metrics endpoint; 0: off")
    parser.add_argument("--domain-type", choices=("kvm", "qemu"), default=defaults.domain_type,
                        help="domain type for VMs that do not set spec.domainType")
    parser.add_argument("--guest-vcpu-scheduler", choices=VCPU_SCHEDULERS, default=defaults.guest_vcpu_scheduler,
                        help="scheduling policy of guest vCPU threads in domains this agent defines: normal (libvirt's "
                             "default), batch, or idle: guests get only the CPU the host's own processes leave, so "
                             "libvirtd, this agent and starting guests never wait for running ones")
    parser.add_argument("--allowed-root", type=Path, action="append", dest="allowed_roots",
                        help="a directory VM paths may point into (repeatable; default /var/lib/libvirt)")
    parser.add_argument("--storage-pool", default=defaults.storage_pool,
                        help="libvirt storage pool for the disks the operator creates")
    parser.add_argument("--state-dir", type=Path, default=defaults.state_dir, help="per-VM files such as UEFI NVRAM")
    parser.add_argument("--console-log-dir", type=Path, default=defaults.console_log_dir,
                        help="where serial console logs go (spec.console.log)")
    parser.add_argument("--workers", type=int, default=tuning.workers,
                        help="VMs reconciled at the same time (libvirtd's max_workers should allow it + 4)")
    parser.add_argument("--resync-seconds", type=float, default=tuning.resync_seconds,
                        help="how often every VM is looked at again")
    parser.add_argument("--heartbeat-seconds", type=float, default=tuning.heartbeat_seconds,
                        help="how often the LibvirtNode (and the placement Lease, when held) is renewed (default 20)")
    parser.add_argument("--lease-seconds", type=int, default=tuning.lease_seconds,
                        help="how long without a renewal before other agents count this one as gone (default 40)")
    parser.add_argument("--list-chunk-size", type=int, default=tuning.list_chunk_size,
                        help="objects per page when the agent lists the cluster's VMs, nodes and requests (default 500)")
    parser.add_argument("--relist-seconds", type=float, default=60.0,
                        help="how often the domain list is read in full, to repair missed events")
    parser.add_argument("--allowed-network", action="append", dest="allowed_networks",
                        help="a libvirt network VMs may name (repeatable; '*': any; default: default)")
    parser.add_argument("--allowed-bridge", action="append", dest="allowed_bridges",
                        help="a host bridge VMs may name (repeatable; '*': any; default: none)")
    parser.add_argument("--allowed-pool", action="append", dest="allowed_pools",
                        help="a storage pool whose volumes VMs may name (repeatable; '*': any; default: default)")
    parser.add_argument("--allow-user-networking", action="store_true",
                        help="allow `user` interfaces: QEMU's user-mode network reaches this node's loopback "
                             "services through 10.0.2.2, so only on nodes whose loopback serves nothing sensitive")
    parser.add_argument("--http-max-bytes", type=int, default=defaults.download_policy.max_bytes,
                        help="largest http disk image fetched (bytes; default 64 GiB)")
    parser.add_argument("--http-deadline-seconds", type=float, default=defaults.download_policy.deadline_seconds,
                        help="longest time one http disk image may take to download (default 3600)")
    parser.add_argument("--http-allowed-network", action="append", dest="http_allowed_networks", default=[],
                        help="a network (CIDR) http disks may be fetched from although refused by default: loopback, "
                             "link-local and cloud metadata addresses (repeatable)")
    parser.add_argument("--libvirt-call-timeout-seconds", type=float, default=tuning.libvirt_call_timeout_seconds,
                        help="longest wait for one libvirt call; past it libvirt counts as not responding and the "
                             "node's VMs read Unknown until it answers (default 30)")
    parser.add_argument("--cluster-id", default="",
                        help="this cluster's identity in every domain's mark (default: the uid of namespace kube-system); "
                             "domains marked by another cluster on the same host are never touched")
    parser.add_argument("--migration-uri", default=None,
                        help="the libvirt URI other hosts' libvirtd use to reach this host's, e.g. "
                             "qemu+tls://node-a/system; published in LibvirtNode.status.migration (default: none)")
    parser.add_argument("--migration-address", default=None,
                        help="the address where this host receives the migration stream; published in "
                             "LibvirtNode.status.migration (default: none)")
    moves = defaults.migration
    parser.add_argument("--migration-tls", action="store_true",
                        help="send the migration stream over TLS (VIR_MIGRATE_TLS; libvirt's TLS certificates on every "
                             "host); with a qemu+tls --migration-uri, the production setting")
    parser.add_argument("--migration-progress-timeout", type=float, default=moves.progress_timeout_seconds,
                        help="abort a move whose data left to send has not shrunk for this many seconds (default 150)")
    parser.add_argument("--migration-completion-timeout-per-gib", type=float,
                        default=moves.completion_timeout_per_gib_seconds,
                        help="abort a move taking longer than this many seconds per GiB of memory and copied disk "
                             "(default 150)")
    parser.add_argument("--migration-bandwidth", type=int, default=moves.bandwidth_mib,
                        help="the most one move may send per second, in MiB/s (default 0: no limit)")
    parser.add_argument("--parallel-migrations-per-node", type=int, default=moves.parallel_per_node,
                        help="moves in flight from or to one node at a time (default 2)")
    parser.add_argument("--parallel-migrations-per-cluster", type=int, default=moves.parallel_per_cluster,
                        help="moves in flight in the cluster at a time (default 5)")
    placement = defaults.placement
    parser.add_argument("--cpu-allocation-ratio", type=float, default=placement.cpu_allocation_ratio,
                        help="vCPUs placed per host CPU (default 4.0)")
    parser.add_argument("--memory-allocation-ratio", type=float, default=placement.memory_allocation_ratio,
                        help="guest memory placed per byte of host memory (default 1.0)")
    parser.add_argument("--vm-memory-overhead", type=_quantity, default=placement.vm_memory_overhead,
                        help="memory counted per VM beyond spec.memory (a quantity; default 64Mi)")
    parser.add_argument("--capacity-vcpus", type=int, default=None,
                        help="count the host as this many CPUs instead of what libvirt reports")
    parser.add_argument("--capacity-memory", type=_quantity, default=None,
                        help="count the host as this much memory (a quantity) instead of what libvirt reports")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", placement.lease_namespace),
                        help="namespace of the Lease electing the agent that places VMs (default $POD_NAMESPACE, "
                             "else kube-system)")
    parser.add_argument("--log-level", default="INFO")


def _quantity(text: str) -> int:
    try:
        return parse_quantity(text, "quantity")
    except SpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


HOST_SPARE_THREADS = 4
"""libvirt threads beyond one per reconcile worker: relists, heartbeats and orphan removals never wait for a slow start."""


def settings_from(args: argparse.Namespace) -> AgentSettings:
    defaults = AgentSettings()
    return AgentSettings(
        libvirt_uri=args.libvirt_uri, node_name=args.node_name, domain_type=args.domain_type, cluster_id=args.cluster_id,
        guest_vcpu_scheduler=args.guest_vcpu_scheduler,
        allowed_roots=tuple(args.allowed_roots or defaults.allowed_roots), storage_pool=args.storage_pool,
        state_dir=args.state_dir, console_log_dir=args.console_log_dir,
        download_policy=DownloadPolicy(args.http_max_bytes, args.http_deadline_seconds, tuple(args.http_allowed_networks)),
        allowed_networks=tuple(args.allowed_networks or defaults.allowed_networks),
        allowed_bridges=tuple(args.allowed_bridges or defaults.allowed_bridges),
        allowed_pools=tuple(args.allowed_pools or defaults.allowed_pools),
        allow_user_networking=args.allow_user_networking,
        migration_uri=args.migration_uri, migration_address=args.migration_address,
        migration=MigrationPolicy(
            progress_timeout_seconds=args.migration_progress_timeout,
            completion_timeout_per_gib_seconds=args.migration_completion_timeout_per_gib,
            parallel_per_node=args.parallel_migrations_per_node, parallel_per_cluster=args.parallel_migrations_per_cluster,
            bandwidth_mib=args.migration_bandwidth, tls=args.migration_tls),
        placement=PlacementPolicy(
            cpu_allocation_ratio=args.cpu_allocation_ratio, memory_allocation_ratio=args.memory_allocation_ratio,
            vm_memory_overhead=args.vm_memory_overhead, capacity_vcpus=args.capacity_vcpus,
            capacity_memory=args.capacity_memory, lease_namespace=args.lease_namespace),
    )


def run(args: argparse.Namespace) -> int:
    from libvirt_operator import handlers, metrics, process_memory
    from libvirt_operator.agent import Agent
    from libvirt_operator.domains import DomainCache
    from libvirt_operator.host import Host
    from libvirt_operator.kube import KubeClient

    process_memory.limit_malloc_arenas()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("kopf.objects", "kopf.activities.probe", "aiohttp.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = str(args.kubeconfig)
    settings = settings_from(args)
    tuning = Tuning(workers=args.workers, resync_seconds=args.resync_seconds, heartbeat_seconds=args.heartbeat_seconds,
                    lease_seconds=args.lease_seconds,
                    libvirt_call_timeout_seconds=args.libvirt_call_timeout_seconds,
                    list_chunk_size=args.list_chunk_size)

    def make_agent() -> Agent:
        host = Host(settings.libvirt_uri, workers=tuning.workers + HOST_SPARE_THREADS,
                    call_timeout=tuning.libvirt_call_timeout_seconds)
        kube = KubeClient.from_environment("libvirt-operator", settings.node_name, args.kubeconfig and str(args.kubeconfig),
                                           page_size=tuning.list_chunk_size)
        agent = Agent(settings, kube, host, DomainCache(host, relist_interval=args.relist_seconds), tuning)
        if args.metrics_port:
            metrics.serve(agent.readings, args.metrics_port)
        return agent

    handlers.run(make_agent, liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz")
    return 0
