"""The agent's own lists of the cluster's objects, against a real API server: read in pages, none missed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from e2e import install_crds, vm_manifest
from libvirt_operator.kube import KubeClient
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

NAMESPACE = "kube-lists"


def test_the_vms_are_listed_in_pages_and_every_one_is_found(control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    install_crds(kubectl, NAMESPACE)
    names = [f"listed-{i}" for i in range(5)]
    for name in names:  # on a node no agent serves: nothing acts on them
        kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, nodeName="no-such-node", memory="64Mi"))
    try:
        kube = KubeClient.from_environment("libvirt-operator", "test", str(control_plane.admin_kubeconfig), page_size=2)
        pages: list[dict[str, Any]] = []
        listing = kube.custom.list_cluster_custom_object

        def counted(*args: Any, **kwargs: Any) -> Any:
            pages.append(kwargs)
            return listing(*args, **kwargs)

        kube.custom.list_cluster_custom_object = counted  # type: ignore[method-assign]
        found = asyncio.run(kube.vm_uids())
        everything = {vm["metadata"]["uid"] for vm in json.loads(kubectl("get", "vm", "-A", "-o", "json").stdout)["items"]}
        assert found == everything and len(everything) >= len(names)
        assert len(pages) == -(-len(everything) // 2) and all(page["limit"] == 2 for page in pages), pages
    finally:
        kubectl("delete", "vm", *names, "-n", NAMESPACE, "--wait=false")
