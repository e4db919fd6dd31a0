"""The status writer against the real API server: a status that changes nothing a reader cares about is
not sent, stats alone wait, a failed write is kept as the last decided status (unless it was conditional on
the body it was decided on), Events are posted."""

from __future__ import annotations

import pytest

from e2e import events_for, get_vm, install_crds, vm_manifest
from libvirt_operator.kube import KubeClient
from libvirt_operator.model import Tuning
from libvirt_operator.reconcile import Event
from libvirt_operator.status_writer import StatusWriter
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

NAMESPACE = "status-writer"
PATCH = ("patch", "virtualmachines/status")


def status(state: str, *, cpu_seconds: float = 1.0, revision: int = 1) -> dict[str, object]:
    return {"printableStatus": state, "ready": state == "Running",
            "domain": {"name": "writer", "state": state.lower(), "resourceVersion": str(revision)},
            "stats": {"cpuTimeSeconds": cpu_seconds}}


async def test_only_what_a_reader_cares_about_is_patched(control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    install_crds(kubectl, NAMESPACE)
    kubectl("apply", "-f", "-", input=vm_manifest("writer", NAMESPACE, memory="64Mi"))
    body = get_vm(kubectl, "writer", NAMESPACE)
    uid = body["metadata"]["uid"]
    kube = KubeClient.from_environment("libvirt-operator", "node-writer", str(control_plane.admin_kubeconfig))
    writer = StatusWriter(kube, {uid: body}, Tuning(stats_seconds=600))
    try:
        await writer.write(body, status("Running"))
        await writer.write(body, status("Running"))  # the same
        await writer.write(body, status("Running", cpu_seconds=2.0, revision=2))  # stats and revision alone
        assert kube.writes[PATCH] == 1
        assert get_vm(kubectl, "writer", NAMESPACE)["status"]["stats"] == {"cpuTimeSeconds": 1.0}

        await writer.write(body, status("Paused", cpu_seconds=3.0))
        assert kube.writes[PATCH] == 2
        assert get_vm(kubectl, "writer", NAMESPACE)["status"]["printableStatus"] == "Paused"
        assert writer.bodies[uid]["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]

        with pytest.raises(Exception):  # the VM changed since: 409; a decision made on that body goes with it
            await writer.write(body, status("Stopped"), resource_version="1")
        assert writer.last_decided(body)["printableStatus"] == "Paused"
        gone = {**body, "metadata": {**body["metadata"], "name": "not-there"}}
        with pytest.raises(Exception):  # any other failed write: the status is kept, not lost
            await writer.write(gone, status("Stopped"))
        assert writer.last_decided(gone)["printableStatus"] == "Stopped"

        await writer.post_events(body, [Event("Normal", "Started", "started the domain")])
        assert [(e["reason"], e["message"]) for e in events_for(kubectl, "writer", NAMESPACE)] == \
            [("Started", "started the domain")]
    finally:
        kubectl("delete", "vm", "writer", "-n", NAMESPACE)
