"""Helpers shared by the end-to-end tests: manifests, waiting on status, reading the API server's write counts."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from pathlib import Path

from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.libvirt_env import GuestImage
from lvo_testing.libvirt_hosts import LibvirtHosts

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
CRDS = Path(__file__).parent.parent / "crds"
CRD_NAMES = tuple(f"crd/{plural}.libvirt-operator.io"
                  for plural in ("virtualmachines", "libvirtnodes", "virtualmachinemigrations"))
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE")
_REQUESTS = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def vm_manifest(name: str, namespace: str, **spec: Any) -> str:
    return yaml.safe_dump({"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachine",
                           "metadata": {"name": name, "namespace": namespace}, "spec": spec})


def guest_spec(image: GuestImage, node: str | None, *, marker: str = "e2e", poweroff_after: int | None = None,
               counter: bool = False, **extra: Any) -> dict[str, Any]:
    """A real QEMU guest booting the busybox initramfs, console logged (counting, with `counter`: guest_counter.py);
    placed by the operator when `node` is None."""
    spec = {"nodeName": node, "memory": "128Mi", "domainType": "qemu", "terminationGracePeriodSeconds": 5,
            "kernelBoot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                           "cmdline": image.cmdline(marker=marker, poweroff_after=poweroff_after, counter=counter)},
            "console": {"log": True}, **extra}
    return {key: value for key, value in spec.items() if value is not None}


def get_vm(kubectl: Kubectl, name: str, namespace: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "vm", name, "-n", namespace, "-o", "json").stdout)


def wait_vm(kubectl: Kubectl, name: str, namespace: str, condition: str, timeout: int = 90) -> float:
    """`kubectl wait` for a condition or `jsonpath=...`; returns the seconds it took."""
    began = time.monotonic()
    kubectl("wait", f"--for={condition}", f"vm/{name}", "-n", namespace, f"--timeout={timeout}s", timeout=timeout + 30)
    return time.monotonic() - began


def wait_until(predicate: Callable[[], Any], timeout: float = 90, every: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"not true after {timeout}s: {what}")


def events_for(kubectl: Kubectl, name: str, namespace: str) -> list[dict[str, Any]]:
    listed = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json",
                                f"--field-selector=involvedObject.name={name}").stdout)
    return listed["items"]


def event_reasons(kubectl: Kubectl, name: str, namespace: str) -> Counter[str]:
    return Counter(event["reason"] for event in events_for(kubectl, name, namespace))


VM_RESOURCES = ("virtualmachines", "virtualmachines/status", "events")
"""What the operator writes about a VM (its LibvirtNode heartbeats are per node, not per VM)."""


def write_counts(metrics_text: str) -> Counter[tuple[str, str]]:
    """apiserver_request_total for writes, by (verb, resource[/subresource])."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in metrics_text.splitlines():
        match = _REQUESTS.match(line)
        if not match:
            continue
        labels = dict(part.split("=", 1) for part in _split_labels(match["labels"]))
        labels = {key: value.strip('"') for key, value in labels.items()}
        if labels.get("verb") in WRITE_VERBS:
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[(labels["verb"], resource)] += int(float(match["value"]))
    return counts


def _split_labels(text: str) -> Iterator[str]:
    for match in re.finditer(r'(\w+="[^"]*")', text):
        yield match.group(1)


def virsh(*args: str, uri: str = "qemu:///system", check: bool = True) -> str:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=check, timeout=60).stdout


def install_crds(kubectl: Kubectl, namespace: str) -> None:
    """Applies the CRDs, waits until they serve, and creates `namespace`."""
    kubectl("apply", "-f", str(CRDS))
    kubectl("wait", "--for=condition=Established", *CRD_NAMES, "--timeout=30s")
    kubectl("create", "namespace", namespace, check=False)


def namespace_agent(control_plane: ControlPlane, uri: str, workdir: Path, namespace: str, node: str,
                    *extra_args: str) -> Iterator[AgentProcess]:
    """The body of a module fixture: the CRDs and `namespace`, one agent process for `node` on `uri`; its
    VMs deleted (finalizers run) before the agent stops."""
    install_crds(control_plane.kubectl, namespace)
    with AgentProcess(workdir, control_plane.admin_kubeconfig, libvirt_uri=uri, node_name=node,
                      extra_args=extra_args) as process:
        yield process
        control_plane.kubectl("delete", "vm", "--all", "-n", namespace, "--timeout=120s", timeout=150, check=False)


@contextlib.contextmanager
def bed_agents(bed: LibvirtHosts, control_plane: ControlPlane, workdir: Path, namespace: str,
               *extra_args: str) -> Iterator[dict[str, AgentProcess]]:
    """An agent per host of the bed on the test API server, by node name; the namespace's VMs deleted after."""
    install_crds(control_plane.kubectl, namespace)
    with contextlib.ExitStack() as stack:
        yield {host.name: stack.enter_context(bed.agent(host, workdir, control_plane.admin_kubeconfig, *extra_args))
               for host in bed.hosts}
        control_plane.kubectl("delete", "vm", "--all", "-n", namespace, "--timeout=120s", timeout=150, check=False)
