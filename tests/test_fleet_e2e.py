"""A fleet of three agents on one real API server: placement by capacity, nodeSelector, a VM too big for
any node, cordon, a nodeName edit, an agent stopped past its lease, one killed and fenced.

Each agent uses libvirt's test:///default driver, private to its process, so a VM run twice shows as two
running domains in the agents' own `/metrics` (libvirt_operator_domains{state="running"}); the tests count
them at every step. A killed agent takes its test driver's domains with it: the host is gone, as fencing
says.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from e2e import Kubectl, event_reasons, events_for, install_crds, vm_manifest, wait_until
from libvirt_operator.scheduler import DISK_LOSS_ANNOTATION
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

NAMESPACE = "fleet"
LEASE = 8
NODES = {"fleet-a": "2Gi", "fleet-b": "2Gi", "fleet-c": "1Gi"}
RUNNING = re.compile(r'^libvirt_operator_domains\{state="running"\} (\S+)$', re.M)


def agent_args(memory: str) -> tuple[str, ...]:
    return ("--storage-pool", "default-pool", "--relist-seconds", "5", "--heartbeat-seconds", "1",
            "--lease-seconds", str(LEASE), "--capacity-memory", memory, "--resync-seconds", "5")


@pytest.fixture(scope="module")
def fleet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProcess]]:
    kubectl = control_plane.kubectl
    install_crds(kubectl, NAMESPACE)
    workdir = tmp_path_factory.mktemp("fleet")
    agents: dict[str, AgentProcess] = {}
    with contextlib.ExitStack() as stack:
        for node, memory in NODES.items():
            agents[node] = stack.enter_context(AgentProcess(
                workdir, control_plane.admin_kubeconfig, libvirt_uri="test:///default", node_name=node,
                extra_args=agent_args(memory)))
        wait_until(lambda: all(node_status(kubectl, n).get("allocatable") for n in NODES), 60, what="nodes announced")
        for _ in range(3):  # the placing agent places only on nodes it has seen renew
            first = {n: node_status(kubectl, n)["heartbeatTime"] for n in NODES}
            wait_until(lambda: all(node_status(kubectl, n)["heartbeatTime"] != first[n] for n in NODES), 30,
                       what="a renewal of every node")
        kubectl("label", "libvirtnode", "fleet-c", "rack=b", "--overwrite")
        yield agents
        for agent in agents.values():
            if agent.process is not None and agent.process.poll() is None:
                os.killpg(agent.process.pid, signal.SIGCONT)
        kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=60s", "--wait=false", check=False, timeout=90)
        wait_until(lambda: not vms(kubectl), 60, what="the fleet's VMs deleted")
        for node in NODES:
            kubectl("delete", "libvirtnode", node, "--ignore-not-found", check=False)


def node_status(kubectl: Kubectl, node: str) -> dict[str, Any]:
    found = kubectl("get", "libvirtnode", node, "-o", "json", check=False)
    return json.loads(found.stdout).get("status") or {} if found.returncode == 0 else {}


def vms(kubectl: Kubectl) -> dict[str, dict[str, Any]]:
    items = json.loads(kubectl("get", "vm", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    return {item["metadata"]["name"]: item for item in items}


def running(agents: dict[str, AgentProcess], skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Running domains per agent, from each agent's own /metrics (agents in `skip` cannot answer)."""
    counts = {}
    for node, agent in agents.items():
        if node not in skip and agent.process is not None and agent.process.poll() is None:
            counts[node] = int(float(RUNNING.search(agent.metrics()).group(1)))
    return counts


def apply(kubectl: Kubectl, name: str, **spec: Any) -> None:
    kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, memory=spec.pop("memory", "256Mi"), **spec))


def condition(vm: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in vm.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def placed_ready(kubectl: Kubectl) -> dict[str, str]:
    """VM name -> node, of the fleet's Ready VMs."""
    return {name: vm["status"]["nodeName"] for name, vm in vms(kubectl).items() if vm.get("status", {}).get("ready")}


def placed_on(kubectl: Kubectl) -> dict[str, int]:
    """VMs per node, by status.nodeName."""
    counts: dict[str, int] = {}
    for vm in vms(kubectl).values():
        node = vm.get("status", {}).get("nodeName")
        counts[node] = counts.get(node, 0) + 1
    return counts


def assert_one_domain_per_running_vm(kubectl: Kubectl, agents: dict[str, AgentProcess],
                                     skip: tuple[str, ...] = ()) -> None:
    """No agent runs more domains than VMs are placed on it, read before and after its count (a move may
    land between the reads), and all agents together run no more domains than there are VMs."""
    before = placed_on(kubectl)
    counts = running(agents, skip)
    after = placed_on(kubectl)
    for node, count in counts.items():
        assert count <= max(before.get(node, 0), after.get(node, 0)), (counts, before, after)
    assert sum(counts.values()) <= sum(after.values()), (counts, after)


def test_vms_without_node_name_are_placed_by_capacity_and_spread(fleet: dict[str, AgentProcess],
                                                                control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    for i in range(4):
        apply(kubectl, f"spread-{i}")
    apply(kubectl, "picky", nodeSelector={"rack": "b"})
    apply(kubectl, "huge", memory="64Gi")
    wait_until(lambda: len(placed_ready(kubectl)) == 5, 90, what="five VMs Ready")
    placed = placed_ready(kubectl)
    assert placed["picky"] == "fleet-c"
    assert len({placed[f"spread-{i}"] for i in range(4)}) >= 2, placed
    huge = wait_until(lambda: condition(vms(kubectl)["huge"], "Scheduled").get("status") == "False"
                      and vms(kubectl)["huge"], 30, what="huge Pending")
    assert huge["status"]["printableStatus"] == "Pending"
    message = condition(huge, "Scheduled")["message"]  # other modules' stopped agents count as not ready
    assert message.startswith("0/") and "3 insufficient memory (need 64Gi + 64Mi overhead)" in message, message
    assert "nodeName" not in huge["spec"] and "nodeName" not in vms(kubectl)["spread-0"]["spec"], "no spec edited"
    scheduled = condition(vms(kubectl)["spread-0"], "Scheduled")
    assert scheduled["status"] == "True" and placed["spread-0"] in scheduled["message"]
    assert_one_domain_per_running_vm(kubectl, fleet)
    apply(kubectl, "waits", nodeSelector={"rack": "z"}, memory="64Mi")
    waiting = wait_until(lambda: condition(vms(kubectl)["waits"], "Scheduled").get("reason") == "Unschedulable"
                         and vms(kubectl)["waits"], 30, what="waits Pending")
    assert "3 didn't match spec.nodeSelector" in condition(waiting, "Scheduled")["message"]
    kubectl("label", "libvirtnode", "fleet-a", "rack=z")
    wait_until(lambda: placed_ready(kubectl).get("waits") == "fleet-a", 30, what="placed once a node fits")
    table = kubectl("get", "libvirtnodes", *NODES).stdout
    assert re.search(r"fleet-c\s+Ready\s+\d+\s+\d+\s+1Gi\s+\S+Mi\s+\d+", table), table
    kubectl("delete", "vm", "huge", "-n", NAMESPACE)


def test_a_cordoned_node_takes_no_new_vms_and_keeps_its_own(fleet: dict[str, AgentProcess],
                                                           control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    before = placed_ready(kubectl)
    kubectl("patch", "libvirtnode", "fleet-a", "--type=merge", "-p", '{"spec": {"unschedulable": true}}')
    try:
        wait_until(lambda: node_status(kubectl, "fleet-a").get("state") == "Cordoned", 30, what="fleet-a Cordoned")
        for i in range(3):
            apply(kubectl, f"after-cordon-{i}", memory="128Mi")
        wait_until(lambda: all(f"after-cordon-{i}" in placed_ready(kubectl) for i in range(3)), 60, what="placed")
        placed = placed_ready(kubectl)
        assert all(placed[f"after-cordon-{i}"] != "fleet-a" for i in range(3)), placed
        assert {name: node for name, node in placed.items() if name in before} == before, "running VMs stay"
        assert_one_domain_per_running_vm(kubectl, fleet)
    finally:
        kubectl("patch", "libvirtnode", "fleet-a", "--type=merge", "-p", '{"spec": {"unschedulable": false}}')


def test_a_vm_placed_past_a_nodes_room_is_handed_back_by_that_node_and_never_runs_there(
        fleet: dict[str, AgentProcess], control_plane: ControlPlane) -> None:
    """The test writes the placement a stale decider would (one that has not seen it lost the Lease)."""
    kubectl = control_plane.kubectl
    apply(kubectl, "stale", nodeSelector={"rack": "nowhere"}, memory="1Gi")  # no decider of the fleet places it
    wait_until(lambda: condition(vms(kubectl)["stale"], "Scheduled").get("reason") == "Unschedulable", 30,
               what="stale Pending")
    before = running(fleet)["fleet-c"]
    kubectl("patch", "vm", "stale", "-n", NAMESPACE, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"nodeName": "fleet-c"}}))
    wait_until(lambda: "NodeFull" in event_reasons(kubectl, "stale", NAMESPACE), 30, what="fleet-c hands it back")
    wait_until(lambda: "nodeName" not in vms(kubectl)["stale"]["status"], 30, what="status.nodeName cleared")
    message = next(event["message"] for event in events_for(kubectl, "stale", NAMESPACE) if event["reason"] == "NodeFull")
    assert message.startswith("placed on fleet-c, which has no room left for it"), message
    assert running(fleet)["fleet-c"] == before
    assert_one_domain_per_running_vm(kubectl, fleet)
    kubectl("delete", "vm", "stale", "-n", NAMESPACE)


def test_a_node_name_edit_moves_the_vm_old_node_first(fleet: dict[str, AgentProcess], control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    apply(kubectl, "mover", nodeName="fleet-a", memory="128Mi")
    apply(kubectl, "keeper", nodeName="fleet-a", memory="128Mi",
          disks=[{"name": "data", "emptyDisk": {"size": "1Gi"}}])
    wait_until(lambda: {"mover", "keeper"} <= set(placed_ready(kubectl)), 60, what="pinned VMs Ready")
    kubectl("patch", "vm", "mover", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"nodeName": "fleet-b"}}')
    kubectl("patch", "vm", "keeper", "-n", NAMESPACE, "--type=merge", "-p", '{"spec": {"nodeName": "fleet-b"}}')

    def moved() -> bool:
        assert_one_domain_per_running_vm(kubectl, fleet)
        return placed_ready(kubectl).get("mover") == "fleet-b"

    wait_until(moved, 60, every=0.1, what="mover Ready on fleet-b")
    keeper = wait_until(lambda: condition(vms(kubectl)["keeper"], "Stalled").get("status") == "True"
                        and vms(kubectl)["keeper"], 30, what="keeper Stalled")
    assert condition(keeper, "Stalled")["message"].startswith("spec.nodeName: moving this VM from fleet-a to fleet-b"), \
        condition(keeper, "Stalled")
    assert "spec.disks[0] (data)" in condition(keeper, "Stalled")["message"]
    assert keeper["status"]["nodeName"] == "fleet-a" and keeper["status"]["printableStatus"] == "Running"
    kubectl("delete", "vm", "keeper", "-n", NAMESPACE)


def test_an_agent_stopped_past_its_lease_reads_unknown_and_nothing_runs_twice(
        fleet: dict[str, AgentProcess], control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    stopped = "fleet-b"
    mine = [name for name, node in placed_ready(kubectl).items() if node == stopped]
    assert mine, placed_ready(kubectl)
    before = running(fleet, skip=(stopped,))
    os.killpg(fleet[stopped].process.pid, signal.SIGSTOP)
    try:
        def unknown() -> bool:
            assert running(fleet, skip=(stopped,)) == before, "another agent started a stopped agent's VM"
            current = vms(kubectl)
            return all(current[name]["status"]["printableStatus"] == "Unknown" for name in mine)

        wait_until(unknown, LEASE * 4, every=0.5, what=f"{stopped}'s VMs Unknown")
        ready = condition(vms(kubectl)[mine[0]], "Ready")
        assert ready["status"] == "Unknown" and ready["reason"] == "NodeUnreachable"
        assert stopped in ready["message"] and "has not renewed" in ready["message"], ready
        assert node_status(kubectl, stopped).get("state") == "NotReady"
        wait_until(lambda: running(fleet, skip=(stopped,)) == before, 1, what="no copies")
    finally:
        os.killpg(fleet[stopped].process.pid, signal.SIGCONT)
    wait_until(lambda: all(vms(kubectl)[name]["status"]["printableStatus"] == "Running" for name in mine), 60,
               what="Running again after SIGCONT")
    assert_one_domain_per_running_vm(kubectl, fleet)


def test_a_killed_agent_s_vms_move_only_once_its_node_is_fenced(fleet: dict[str, AgentProcess],
                                                               control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    lost = "fleet-b"
    others = [node for node in NODES if node != lost]
    for node in others:  # so that with-data lands on the node to be lost
        kubectl("patch", "libvirtnode", node, "--type=merge", "-p", '{"spec": {"unschedulable": true}}')
    try:
        wait_until(lambda: all(node_status(kubectl, n).get("state") == "Cordoned" for n in others), 30, what="cordoned")
        apply(kubectl, "with-data", memory="128Mi", disks=[{"name": "data", "emptyDisk": {"size": "1Gi"}}])
        wait_until(lambda: "with-data" in placed_ready(kubectl), 60, what="with-data Ready")
    finally:
        for node in others:
            kubectl("patch", "libvirtnode", node, "--type=merge", "-p", '{"spec": {"unschedulable": false}}')
    assert placed_ready(kubectl)["with-data"] == lost
    current = vms(kubectl)
    stateless = [name for name, node in placed_ready(kubectl).items()
                 if node == lost and name != "with-data" and not current[name]["spec"].get("nodeName")]
    assert stateless, placed_ready(kubectl)
    fleet[lost].kill()
    wait_until(lambda: vms(kubectl)["with-data"]["status"]["printableStatus"] == "Unknown", LEASE * 4,
               what="Unknown after the kill")
    assert all(vms(kubectl)[name]["status"]["nodeName"] == lost for name in stateless), "not moved before fencing"
    kubectl("delete", "libvirtnode", lost)
    wait_until(lambda: all(placed_ready(kubectl).get(name) not in (None, lost) for name in stateless), 60,
               what="stateless VMs placed again")
    with_data = wait_until(lambda: condition(vms(kubectl)["with-data"], "Scheduled").get("reason") == "NodeLost"
                           and vms(kubectl)["with-data"], 30, what="with-data NodeLost")
    assert DISK_LOSS_ANNOTATION in condition(with_data, "Scheduled")["message"]
    assert with_data["status"]["printableStatus"] == "Pending"
    kubectl("annotate", "vm", "with-data", "-n", NAMESPACE, f"{DISK_LOSS_ANNOTATION}=true")
    wait_until(lambda: placed_ready(kubectl).get("with-data") not in (None, lost), 60, what="with-data placed again")
    assert_one_domain_per_running_vm(kubectl, fleet, skip=(lost,))
