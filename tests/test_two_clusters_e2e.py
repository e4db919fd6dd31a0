"""Two clusters, one libvirt host: each cluster's agent keeps to the domains its own cluster marked.

Two real control planes (each its own kube-system uid), one agent each, both on the same real libvirtd
with QEMU guests. An agent's restart lists the host's domains and removes its cluster's orphans: the
other cluster's domains (and unmarked ones) must come through untouched, counted as foreign.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.libvirt_env import GuestImage
from e2e import Kubectl, get_vm, guest_spec, install_crds, virsh, vm_manifest, wait_until, wait_vm

pytestmark = pytest.mark.e2e

NAMESPACE = "two-clusters"


class Cluster:
    def __init__(self, name: str, plane: ControlPlane, workdir: Path, uri: str) -> None:
        self.name = name
        self.node = f"{name}-node"
        self.kubectl: Kubectl = plane.kubectl
        install_crds(self.kubectl, NAMESPACE)
        self.agent = AgentProcess(workdir / name, plane.admin_kubeconfig, libvirt_uri=uri, node_name=self.node)

    def domain(self, vm: str) -> str:
        return f"{NAMESPACE}_{vm}"

    def restart_agent(self) -> None:
        self.agent.stop()
        self.agent.start()
        wait_until(lambda: (self.agent.probe() or {}).get("agent", {}).get("domainsListed"), timeout=120,
                   what=f"agent of {self.name} listed its domains (and removed its orphans)")

    def foreign_metric(self) -> float:
        match = re.search(r"^libvirt_operator_foreign_domains (\S+)$", self.agent.metrics(), re.M)
        assert match, "no foreign_domains metric"
        return float(match.group(1))


@pytest.fixture(scope="module")
def clusters(control_plane: ControlPlane, system_uri: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Cluster]]:
    workdir = tmp_path_factory.mktemp("two-clusters")
    with contextlib.ExitStack() as stack:
        other_plane = stack.enter_context(ControlPlane(workdir / "plane-b"))
        a = Cluster("a", control_plane, workdir, system_uri)
        b = Cluster("b", other_plane, workdir, system_uri)
        for cluster in (a, b):
            stack.enter_context(cluster.agent)
            stack.callback(cluster.kubectl, "delete", "vm", "--all", "-n", NAMESPACE, "--timeout=120s",
                           timeout=150, check=False)
        yield a, b


LEGACY_UID = "0e0e0e0e-1111-4222-8333-444455556666"
LEGACY = "two-clusters_legacy"
LEGACY_XML = f"""<domain type='qemu'><name>{LEGACY}</name><uuid>{LEGACY_UID}</uuid><memory unit='MiB'>32</memory>
<metadata><lvo:vm xmlns:lvo="https://libvirt-operator.io/xmlns/domain/v1" uid="{LEGACY_UID}" namespace="{NAMESPACE}"
 name="legacy" generation="1" specHash="x"/></metadata><os><type arch='x86_64'>hvm</type></os></domain>"""
"""A mark from before cluster identities, of a VM neither cluster has: it may be a third cluster's."""


@pytest.fixture
def legacy_domain(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "legacy.xml"
    path.write_text(LEGACY_XML)
    virsh("define", str(path))
    yield LEGACY
    virsh("undefine", LEGACY, check=False)


def domain_id(domain: str) -> str:
    return virsh("domid", domain, check=False).strip()


def test_each_cluster_keeps_its_vms_across_the_other_clusters_agent_restarts(
        clusters: tuple[Cluster, Cluster], guest_image: GuestImage, legacy_domain: str) -> None:
    a, b = clusters
    for cluster in (a, b):
        cluster.kubectl("apply", "-f", "-", input=vm_manifest(
            f"vm-{cluster.name}", NAMESPACE, **guest_spec(guest_image, cluster.node, disks=[
                {"name": "data", "emptyDisk": {"size": "16Mi"}}])))
    for cluster in (a, b):
        wait_vm(cluster.kubectl, f"vm-{cluster.name}", NAMESPACE, "condition=Ready", timeout=120)
    ids = {cluster.name: domain_id(cluster.domain(f"vm-{cluster.name}")) for cluster in (a, b)}
    assert all(ids.values()), ids

    for restarted, other in ((b, a), (a, b)):
        restarted.restart_agent()
        assert domain_id(other.domain(f"vm-{other.name}")) == ids[other.name], \
            f"the restart of {restarted.name}'s agent touched {other.name}'s domain"
        wait_vm(restarted.kubectl, f"vm-{restarted.name}", NAMESPACE, "condition=Ready", timeout=120)
        assert domain_id(restarted.domain(f"vm-{restarted.name}")) == ids[restarted.name]
        vm = get_vm(restarted.kubectl, f"vm-{restarted.name}", NAMESPACE)
        assert vm["status"]["restartCount"] == 0
        assert legacy_domain in virsh("list", "--all", "--name").split(), "a legacy-marked domain was removed"

    for cluster, other in ((a, b), (b, a)):
        # The other cluster's domain at least; unmarked domains of other tests count too.
        wait_until(lambda: cluster.foreign_metric() >= 1, timeout=60, what=f"{cluster.name} counts foreign domains")
        wait_until(lambda: int(cluster.kubectl("get", "libvirtnode", cluster.node, "-o",
                                               "jsonpath={.status.foreignDomains}").stdout or 0) >= 1,
                   timeout=60, what=f"{cluster.name}'s LibvirtNode counts foreign domains")
        assert other.domain(f"vm-{other.name}") in virsh("list", "--name").split()
