"""An error the agent does not expect still reaches the VM's status and an Event, once per message.

The agent runs in this process against the real API server; only its reconcile is replaced by one that
raises (fault injection: the point is what happens to an error nobody foresaw, which no real input is
known to cause).
"""

from __future__ import annotations

import pytest

from e2e import events_for, get_vm, install_crds, vm_manifest
from libvirt_operator.agent import Agent
from libvirt_operator.domains import DomainCache
from libvirt_operator.host import Host
from libvirt_operator.kube import KubeClient
from libvirt_operator.model import AgentSettings
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

NAMESPACE = "agent-errors"
NODE = "node-errors"


async def test_an_unexpected_error_is_reported_as_reconciling_with_a_warning_once(control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    install_crds(kubectl, NAMESPACE)
    kubectl("apply", "-f", "-", input=vm_manifest("broken", NAMESPACE, nodeName=NODE, memory="64Mi"))
    body = get_vm(kubectl, "broken", NAMESPACE)
    uid = body["metadata"]["uid"]
    kube = KubeClient.from_environment("libvirt-operator", NODE, str(control_plane.admin_kubeconfig))
    host = Host("test:///default")
    agent = Agent(AgentSettings(node_name=NODE), kube, host, DomainCache(host))
    agent.bodies[uid] = body

    async def broken(_uid: str) -> None:
        raise KeyError("something nobody foresaw")

    agent.reconcile = broken  # type: ignore[method-assign]
    try:
        for _ in range(3):
            await agent.reconcile_safely(uid)
    finally:
        agent.queue.close()
    assert kube.writes[("patch", "virtualmachines/status")] == 1, kube.writes
    conditions = {c["type"]: c for c in get_vm(kubectl, "broken", NAMESPACE)["status"]["conditions"]}
    assert conditions["Reconciling"]["status"] == "True" and conditions["Reconciling"]["reason"] == "ReconcileError"
    assert "KeyError" in conditions["Ready"]["message"] and conditions["Stalled"]["status"] == "False"
    assert [(e["type"], e["reason"]) for e in events_for(kubectl, "broken", NAMESPACE)] == [("Warning", "Failed")]
    kubectl("delete", "vm", "broken", "-n", NAMESPACE)
