"""Two agents with different node names on one API server each run only their own VMs.

Each agent uses libvirt's test:///default driver, which is private to its process: a domain
an agent defines exists only in that agent's hypervisor, so a VM acted on twice would show
as two domains, which the status (domain uuid and node) would reveal.
"""

from __future__ import annotations

import contextlib

import json
from collections.abc import Iterator

import pytest

from e2e import Kubectl, get_vm, install_crds, vm_manifest, wait_vm
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

NAMESPACE = "two-agents"
TEST_DRIVER_ARGS = ("--storage-pool", "default-pool", "--relist-seconds", "5")


@pytest.fixture(scope="module")
def agents(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    kubectl = control_plane.kubectl
    install_crds(kubectl, NAMESPACE)
    workdir = tmp_path_factory.mktemp("two-agents")
    running = {}
    with contextlib.ExitStack() as stack:
        for node in ("node-a", "node-b"):
            running[node] = stack.enter_context(AgentProcess(
                workdir, control_plane.admin_kubeconfig, libvirt_uri="test:///default", node_name=node,
                extra_args=TEST_DRIVER_ARGS))
        yield running
        kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=60s", check=False, timeout=90)


def test_each_agent_runs_only_its_own_vms(agents: dict[str, AgentProcess], control_plane: ControlPlane) -> None:
    kubectl: Kubectl = control_plane.kubectl
    for name, node in (("on-a", "node-a"), ("on-b", "node-b")):
        kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, nodeName=node, memory="64Mi"))
    for name in ("on-a", "on-b"):
        wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=60)
    for name, node in (("on-a", "node-a"), ("on-b", "node-b")):
        vm = get_vm(kubectl, name, NAMESPACE)
        assert vm["status"]["nodeName"] == node
        assert vm["status"]["domain"]["uuid"] == vm["metadata"]["uid"]
        assert vm["status"]["printableStatus"] == "Running"
    nodes = {n["metadata"]["name"]: n["status"] for n in json.loads(kubectl("get", "libvirtnodes", "-o", "json").stdout)["items"]}
    assert nodes["node-a"]["vms"] == 1 or nodes["node-a"]["connected"]
    assert {"node-a", "node-b"} <= set(nodes)
    for node in ("node-a", "node-b"):
        log = agents[node].log_path.read_text()
        other = "on-b" if node == "node-a" else "on-a"
        assert f"{NAMESPACE}_{other}" not in log


def test_without_node_name_a_vm_is_placed_on_one_agent(agents: dict[str, AgentProcess], control_plane: ControlPlane) -> None:
    kubectl: Kubectl = control_plane.kubectl
    kubectl("apply", "-f", "-", input=vm_manifest("anywhere", NAMESPACE, memory="64Mi"))
    wait_vm(kubectl, "anywhere", NAMESPACE, "condition=Ready", timeout=60)
    status = get_vm(kubectl, "anywhere", NAMESPACE)["status"]
    assert status["nodeName"] in ("node-a", "node-b")
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "True" and status["nodeName"] in scheduled["message"], scheduled
    kubectl("delete", "vm", "anywhere", "-n", NAMESPACE, "--timeout=30s")


def test_agent_metrics_count_reconciles_calls_writes_and_domains(agents: dict[str, AgentProcess]) -> None:
    text = agents["node-a"].metrics()
    for name in ("libvirt_operator_reconciles_total", "libvirt_operator_libvirt_calls_total{api=\"listAllDomains\"}",
                 "libvirt_operator_kubernetes_writes_total{resource=\"virtualmachines/status\",verb=\"patch\"}",
                 "libvirt_operator_domains{state=\"running\"}", "libvirt_operator_event_to_status_seconds_bucket",
                 "libvirt_operator_queue_depth", "libvirt_operator_libvirt_connected 1.0"):
        assert name in text, name


def test_an_agent_started_after_its_vms_reads_them_in_pages_and_runs_every_one(
        agents: dict[str, AgentProcess], control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Its first list of the VMs comes in pages of 2 (`--list-chunk-size`): a VM on a page after the first one
    would otherwise never reach it (the watch starts after the list)."""
    kubectl: Kubectl = control_plane.kubectl
    names = [f"paged-{i}" for i in range(5)]
    for name in names:
        kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, nodeName="node-c", memory="64Mi"))
    with AgentProcess(tmp_path_factory.mktemp("paged"), control_plane.admin_kubeconfig, libvirt_uri="test:///default",
                      node_name="node-c", extra_args=(*TEST_DRIVER_ARGS, "--list-chunk-size", "2")):
        for name in names:
            wait_vm(kubectl, name, NAMESPACE, "condition=Ready", timeout=60)
        kubectl("delete", "vm", *names, "-n", NAMESPACE, "--timeout=60s")
    kubectl("delete", "libvirtnode", "node-c", "--ignore-not-found")
