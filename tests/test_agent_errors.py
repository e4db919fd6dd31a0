"""An error the agent does not expect still reaches the VM's status and an Event, once per message.

The reconcile is made to fail by replacing it (fault injection: the point is what happens to an error
nobody foresaw, which no real input is known to cause); the Kubernetes side is a recorder of the
writes the agent would send, since what is checked is their content and count.
"""

from __future__ import annotations

from typing import Any

import pytest

from libvirt_operator.agent import Agent
from libvirt_operator.domains import DomainCache
from libvirt_operator.host import Host
from libvirt_operator.model import AgentSettings

pytestmark = pytest.mark.unit

UID = "00000000-0000-4000-8000-00000000000e"


class RecordedKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    async def patch_vm_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(patch)
        return {"metadata": {"uid": UID, "name": name, "namespace": namespace, "resourceVersion": "2"},
                "status": patch}

    async def post_event(self, involved: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        self.events.append((event_type, reason, message))


async def test_an_unexpected_error_is_reported_as_reconciling_with_a_warning_once() -> None:
    kube = RecordedKube()
    agent = Agent(AgentSettings(node_name="node-a"), kube, Host("test:///default"),  # type: ignore[arg-type]
                  DomainCache(Host("test:///default")))
    agent.bodies[UID] = {"metadata": {"uid": UID, "name": "vm", "namespace": "default", "generation": 1,
                                      "resourceVersion": "1", "finalizers": ["libvirt-operator.io/domain"]},
                         "spec": {"memory": "64Mi", "nodeName": "node-a"}, "status": {}}

    async def broken(uid: str) -> None:
        raise KeyError("something nobody foresaw")

    agent.reconcile = broken  # type: ignore[method-assign]
    for _ in range(3):
        await agent.reconcile_safely(UID)
    assert len(kube.patches) == 1, kube.patches
    conditions = {c["type"]: c for c in kube.patches[0]["conditions"]}
    assert conditions["Reconciling"]["status"] == "True" and conditions["Reconciling"]["reason"] == "ReconcileError"
    assert "KeyError" in conditions["Ready"]["message"] and conditions["Stalled"]["status"] == "False"
    assert [(kind, reason) for kind, reason, _ in kube.events] == [("Warning", "Failed")]
    agent.queue.close()
