"""A bounded soak: 200 VMs on the test driver under random runStrategy / paused / restart edits.

The test driver lives inside the agent process, so libvirt's truth is read from the agent's own
metrics (owned domains by state) and compared with what the VMs' statuses say.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from e2e import Kubectl, install_crds, vm_manifest, wait_until
from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

NAMESPACE = "soak"
NODE = "node-soak"
COUNT = 200
SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
DOMAINS = re.compile(r'^libvirt_operator_domains\{state="(\w+)"\} (\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def agent(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    install_crds(control_plane.kubectl, NAMESPACE)
    with AgentProcess(tmp_path_factory.mktemp("soak"), control_plane.admin_kubeconfig, libvirt_uri="test:///default",
                      node_name=NODE, extra_args=("--storage-pool", "default-pool")) as process:
        yield process


def statuses(kubectl: Kubectl) -> list[dict]:
    return json.loads(kubectl("get", "vm", "-n", NAMESPACE, "-o", "json").stdout)["items"]


def agent_domains(agent: AgentProcess) -> Counter[str]:
    return Counter({state: int(float(value)) for state, value in DOMAINS.findall(agent.metrics()) if float(value)})


def test_random_edits_for_minutes_end_with_every_status_true(agent: AgentProcess, control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    names = [f"soak-{i:03d}" for i in range(COUNT)]
    kubectl("apply", "-f", "-", input="---\n".join(vm_manifest(n, NAMESPACE, nodeName=NODE, memory="32Mi") for n in names))
    config.load_kube_config(str(control_plane.admin_kubeconfig))
    api = client.CustomObjectsApi()
    rng = random.Random(42)
    edits = 0
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        name = rng.choice(names)
        choice = rng.random()
        if choice < 0.5:
            body = {"spec": {"runStrategy": rng.choice(["Always", "Halted", "Manual", "RerunOnFailure", "Once"])}}
        elif choice < 0.8:
            body = {"spec": {"paused": rng.random() < 0.5}}
        else:
            body = {"metadata": {"annotations": {"libvirt-operator.io/restart": str(edits)}}}
        api.patch_namespaced_custom_object("libvirt-operator.io", "v1alpha1", NAMESPACE, "virtualmachines", name, body)
        edits += 1
        time.sleep(rng.uniform(0.0, 0.1))

    def settled() -> bool:
        items = statuses(kubectl)
        return all(vm.get("status", {}).get("ready") and vm["status"].get("observedGeneration") == vm["metadata"]["generation"]
                   for vm in items)
    try:
        wait_until(settled, timeout=180, every=1, what="every VM Ready at its generation")
    except TimeoutError:
        for vm in statuses(kubectl):
            status = vm.get("status", {})
            if not status.get("ready") or status.get("observedGeneration") != vm["metadata"]["generation"]:
                ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
                print(vm["metadata"]["name"], vm["metadata"]["generation"], vm["spec"].get("runStrategy"),
                      vm["spec"].get("paused"), status.get("observedGeneration"), status.get("printableStatus"),
                      status.get("domain", {}).get("state"), status.get("domain", {}).get("reason"),
                      ready.get("reason"), ready.get("message"), status.get("lifecycle"))
        raise
    items = statuses(kubectl)
    told = Counter(vm["status"]["domain"]["state"] for vm in items)
    assert told == agent_domains(agent), (told, agent_domains(agent))
    for vm in items:
        status, spec = vm["status"], vm["spec"]
        assert status["domain"]["uuid"] == vm["metadata"]["uid"]
        if spec["runStrategy"] == "Halted":
            assert status["domain"]["state"] == "shutoff"
        if spec["runStrategy"] == "Always":
            assert status["domain"]["state"] == ("paused" if spec["paused"] else "running")
    print(f"soak: {edits} edits over {SECONDS:.0f}s; final states {dict(told)}")
    kubectl("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=180s", timeout=200)
    wait_until(lambda: not agent_domains(agent), timeout=60, what="no domain left in the agent's hypervisor")
