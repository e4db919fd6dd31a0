"""kopf wiring, and nothing else: watch VirtualMachines, VirtualMachineMigrations and LibvirtNodes, hand every
body to the agent.

Only `on.event` (level-triggered, no diff bookkeeping, no kopf annotations or finalizers on
the objects), startup/cleanup for the agent's lifetime, and a liveness probe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from libvirt_operator import API_GROUP, API_VERSION, PLURAL
from libvirt_operator.agent import Agent
from libvirt_operator.kube import MIGRATION_PLURAL, NODE_PLURAL

LIBVIRT_THREADS = 32
OBJECT_WORKER_IDLE_SECONDS = 0.5
"""How long kopf keeps an object's task after its last event (default 5 s): a restart's list starts one for each VM,
and with 10,000 of them alive at once the agent kept 25 MiB more after the burst (bench one-agent-test)."""


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """The API server as client-go's in-cluster config finds it: the `kubernetes` Service's address,
    which kubelet puts in every pod's environment. kopf's own in-pod login dials the DNS name
    `kubernetes.default.svc`, which needs cluster DNS."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def build_registry(make_agent: Callable[[], Agent]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        in_pod = kopf.login_with_service_account(**kwargs)
        if in_pod is not None:
            server = in_cluster_server(os.environ)
            return dataclasses.replace(in_pod, server=server) if server else in_pod
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def start_agent(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.enabled = False
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 660
        settings.batching.batch_window = 0.01
        settings.batching.idle_timeout = OBJECT_WORKER_IDLE_SECONDS
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(LIBVIRT_THREADS, thread_name_prefix="libvirt"))
        memo.agent = make_agent()
        settings.watching.chunk_size = memo.agent.tuning.list_chunk_size
        await memo.agent.start()

    @kopf.on.cleanup(registry=registry)
    async def stop_agent(memo: kopf.Memo, **_: Any) -> None:
        agent = getattr(memo, "agent", None)
        if agent is not None:
            await agent.stop()

    # Both handlers are `async`: kopf runs a plain `def` in a worker thread, and the agent's queue,
    # bodies and tasks belong to the event loop.
    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
    async def virtual_machine_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
        memo.agent.observe(event.get("type") or "ADDED", event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, MIGRATION_PLURAL, registry=registry)
    async def migration_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
        memo.agent.observe_migration(event.get("type") or "ADDED", event["object"])

    @kopf.on.event(API_GROUP, API_VERSION, NODE_PLURAL, registry=registry)
    async def libvirt_node_event(event: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
        memo.agent.observe_node(event.get("type") or "ADDED", event["object"])

    @kopf.on.probe(id="agent", registry=registry)
    async def agent_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        agent: Agent = memo.agent
        return {"libvirtConnected": agent.host.connected, "domainsListed": agent.listed, "queued": len(agent.queue),
                "vms": len(agent.bodies)}

    return registry


def run(make_agent: Callable[[], Agent], *, liveness_endpoint: str | None) -> None:
    """Runs the operator until SIGINT/SIGTERM."""
    kopf.run(registry=build_registry(make_agent), standalone=True, clusterwide=True,
             liveness_endpoint=liveness_endpoint, memo=kopf.Memo())
