"""The CRDs on a real API server: bad specs are refused at admission, naming the field; what the agents write
into status is kept; kubectl shows it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from e2e import install_crds
from libvirt_operator.spec import SpecError, parse_spec
from test_guest_properties import MANIFESTS

pytestmark = pytest.mark.e2e

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
CRD = Path(__file__).parent.parent / "crds" / "virtualmachine.yaml"
NAMESPACE = "admission"


@pytest.fixture(scope="module")
def vm_crd(kubectl: Kubectl) -> Kubectl:
    kubectl("apply", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/virtualmachines.libvirt-operator.io", "--timeout=30s")
    kubectl("create", "namespace", NAMESPACE, check=False)
    return kubectl


def manifest(name: str, **spec: object) -> str:
    body = {"memory": "64Mi", **spec}
    return yaml.safe_dump({"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachine",
                           "metadata": {"name": name, "namespace": NAMESPACE}, "spec": body})


def server_dry_run(kubectl: Kubectl, text: str) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)


REJECTED = {
    "wrong-type": ({"cpu": {"cores": "two"}}, 'spec.cpu.cores: Invalid value: "string": spec.cpu.cores in body must be of type integer'),
    "unknown-enum": ({"runStrategy": "Sometimes"}, 'spec.runStrategy: Unsupported value: "Sometimes": supported values: "Always", "Halted", "Manual", "RerunOnFailure", "Once"'),
    "zero-cores": ({"cpu": {"cores": 0}}, "spec.cpu.cores: Invalid value: 0: spec.cpu.cores in body should be greater than or equal to 1"),
    "small-memory": ({"memory": "8Mi"}, "spec.memory: Invalid value: \"\": memory must be a quantity of at least 16Mi"),
    "small-memory-int": ({"memory": 1024}, "spec.memory: Invalid value: \"\": memory must be a quantity of at least 16Mi"),
    "zero-disk": ({"disks": [{"name": "data", "emptyDisk": {"size": "0"}}]}, 'spec.disks[0].emptyDisk.size: Invalid value: "0"' ),
    "two-sources": ({"disks": [{"name": "root", "image": {"path": "/var/lib/libvirt/images/a.qcow2"},
                                "emptyDisk": {"size": "1Gi"}}]},
                    "spec.disks[0]: Invalid value: \"object\": each disk needs exactly one source"),
    "no-source": ({"disks": [{"name": "root"}]}, "each disk needs exactly one source"),
    "duplicate-disks": ({"disks": [{"name": "root", "emptyDisk": {"size": "1Gi"}},
                                   {"name": "root", "emptyDisk": {"size": "2Gi"}}]},
                        'spec.disks[1]: Duplicate value: map[string]interface {}{"name":"root"}'),
    "duplicate-boot-order": ({"disks": [{"name": "a", "bootOrder": 1, "emptyDisk": {"size": "1Gi"}},
                                        {"name": "b", "bootOrder": 1, "emptyDisk": {"size": "1Gi"}}]},
                             "disks[].bootOrder values must be unique"),
    "two-backends": ({"interfaces": [{"name": "net", "network": "default", "bridge": "br0"}]},
                     "spec.interfaces[0]: Invalid value: \"object\": each interface needs exactly one of network, bridge or user"),
    "duplicate-interfaces": ({"interfaces": [{"name": "a", "network": "default"}, {"name": "a", "user": {}}]},
                             'spec.interfaces[1]: Duplicate value: map[string]interface {}{"name":"a"}'),
    "bad-mac": ({"interfaces": [{"name": "a", "user": {}, "macAddress": "52:54:00:zz:00:01"}]},
                'spec.interfaces[0].macAddress: Invalid value: "52:54:00:zz:00:01"'),
    "bad-checksum-format": ({"disks": [{"name": "os", "http": {"url": "http://x/y.qcow2", "sha256": "abc"}}]},
                            "spec.disks[0].http.sha256: Invalid value: \"abc\""),
    "model-without-custom": ({"cpu": {"model": "qemu64"}}, "cpu.model is only allowed with cpu.mode: custom"),
    "two-userdata": ({"disks": [{"name": "seed", "cloudInit": {"userData": "x", "userDataSecretRef": {"name": "s"}}}]},
                     "cloudInit needs exactly one of userData or userDataSecretRef"),
    "negative-grace": ({"terminationGracePeriodSeconds": -1},
                       "spec.terminationGracePeriodSeconds: Invalid value: -1"),
    "relative-kernel": ({"kernelBoot": {"kernel": "boot/vmlinuz"}}, 'spec.kernelBoot.kernel: Invalid value: "boot/vmlinuz"'),
    "newline-in-path": ({"disks": [{"name": "root", "image": {"path": "/var/lib/libvirt/images/a\n.qcow2"}}]},
                        "spec.disks[0].image.path: Invalid value:"),
    "slash-in-volume": ({"disks": [{"name": "v", "volume": {"pool": "default", "name": "../etc/passwd"}}]},
                        'spec.disks[0].volume.name: Invalid value: "../etc/passwd"'),
    "dot-volume": ({"disks": [{"name": "v", "volume": {"pool": "default", "name": ".."}}]},
                   "volume.pool and volume.name cannot be . or .."),
    "read-only-sata": ({"disks": [{"name": "d", "bus": "sata", "readOnly": True, "emptyDisk": {"size": "1Gi"}}]},
                       "QEMU cannot attach a SATA disk read-only"),
    "multicast-mac": ({"interfaces": [{"name": "a", "user": {}, "macAddress": "01:00:5e:00:00:01"}]},
                      'spec.interfaces[0].macAddress: Invalid value: "01:00:5e:00:00:01"'),
    "duplicate-mac": ({"interfaces": [{"name": "a", "user": {}, "macAddress": "52:54:00:00:00:01"},
                                      {"name": "b", "user": {}, "macAddress": "52:54:00:00:00:01"}]},
                      "interfaces[].macAddress values must be unique"),
    "bad-bridge": ({"interfaces": [{"name": "a", "bridge": "br0;reboot"}]},
                   'spec.interfaces[0].bridge: Invalid value: "br0;reboot"'),
    "cdrom-on-virtio": ({"disks": [{"name": "cd", "bus": "virtio", "cdrom": {"image": {"path": "/var/lib/libvirt/x.iso"}}}]},
                        "a cdrom disk sits on bus sata (the default) or scsi, not virtio"),
    "cdrom-two-sources": ({"disks": [{"name": "cd", "cdrom": {"image": {"path": "/var/lib/libvirt/x.iso"},
                                                              "http": {"url": "http://x/y.iso", "sha256": "a" * 64}}}]},
                          "a cdrom holds exactly one of image or http"),
    "cdrom-and-image": ({"disks": [{"name": "cd", "image": {"path": "/var/lib/libvirt/x.img"},
                                    "cdrom": {"image": {"path": "/var/lib/libvirt/x.iso"}}}]},
                        "each disk needs exactly one source: image, emptyDisk, cloudInit, volume, http or cdrom"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_bad_spec_is_rejected_naming_the_field(vm_crd: Kubectl, case: str) -> None:
    spec, expected = REJECTED[case]
    result = server_dry_run(vm_crd, manifest(f"bad-{case}", **spec))
    assert result.returncode != 0, result.stdout
    assert f'The VirtualMachine "bad-{case}" is invalid' in result.stderr
    assert expected in result.stderr


def test_missing_memory_is_rejected(vm_crd: Kubectl) -> None:
    text = manifest("no-memory").replace("memory: 64Mi", "runStrategy: Always")
    result = server_dry_run(vm_crd, text)
    assert 'spec.memory: Required value' in result.stderr


def test_full_spec_is_admitted_with_defaults(vm_crd: Kubectl) -> None:
    text = manifest(
        "full", runStrategy="RerunOnFailure", paused=False, updateStrategy="Restart", nodeName="node-a",
        domainType="qemu", cpu={"cores": 2, "sockets": 1, "threads": 1, "mode": "custom", "model": "qemu64"},
        memory="1Gi", firmware="uefi", terminationGracePeriodSeconds=5,
        kernelBoot={"kernel": "/var/lib/libvirt/boot/vmlinuz", "initrd": "/var/lib/libvirt/boot/initrd.img",
                    "cmdline": "console=ttyS0"},
        disks=[{"name": "root", "bus": "virtio", "bootOrder": 1,
                "image": {"path": "/var/lib/libvirt/images/debian.qcow2", "clone": True}},
               {"name": "data", "emptyDisk": {"size": "10Gi"}},
               {"name": "seed", "cloudInit": {"userDataSecretRef": {"name": "web-userdata"}}},
               {"name": "shared", "bus": "scsi", "readOnly": True, "volume": {"pool": "default", "name": "shared"}},
               {"name": "os", "bus": "sata", "http": {"url": "http://images.example/debian.qcow2", "sha256": "a" * 64}},
               {"name": "installer", "cdrom": {"image": {"path": "/var/lib/libvirt/images/installer.iso"}}}],
        interfaces=[{"name": "default", "network": "default", "macAddress": "52:54:00:12:34:56"},
                    {"name": "lan", "bridge": "br0", "model": "e1000"}, {"name": "out", "user": {}}],
        console={"log": True},
    )
    vm_crd("apply", "-f", "-", input=text)
    stored = yaml.safe_load(vm_crd("get", "vm", "full", "-n", NAMESPACE, "-o", "yaml").stdout)
    assert "bus" not in stored["spec"]["disks"][1], "the bus default depends on the kind: the agent fills it in"
    assert stored["spec"]["disks"][5]["cdrom"] == {"image": {"path": "/var/lib/libvirt/images/installer.iso"}}
    assert stored["spec"]["interfaces"][0]["model"] == "virtio"
    minimal = yaml.safe_load(server_dry_run(vm_crd, manifest("minimal")).stdout and
                             vm_crd("apply", "--dry-run=server", "-o", "yaml", "-f", "-",
                                    input=manifest("minimal")).stdout)
    assert minimal["spec"]["runStrategy"] == "Always"
    assert minimal["spec"]["cpu"] == {"cores": 1, "sockets": 1, "threads": 1}
    assert minimal["spec"]["terminationGracePeriodSeconds"] == 30
    vm_crd("delete", "vm", "full", "-n", NAMESPACE)


def test_explain_reads_the_descriptions(vm_crd: Kubectl) -> None:
    text = vm_crd("explain", "vm.spec.disks").stdout
    assert "each with exactly one source" in text
    assert "cloudInit" in text and "emptyDisk" in text


def test_short_names_and_category(vm_crd: Kubectl) -> None:
    for name in ("vm", "vms", "virtualmachines", "libvirt"):
        assert vm_crd("get", name, "-n", NAMESPACE).returncode == 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(MANIFESTS, min_size=25, max_size=25))
def test_the_generated_specs_are_what_admission_admits(vm_crd: Kubectl, manifests: list[dict[str, Any]]) -> None:
    """The specs test_guest_properties renders are the ones the API server accepts, so rendering is proven
    for what users can really submit."""
    documents = [{"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachine",
                  "metadata": {"name": f"drawn-{i}", "namespace": NAMESPACE}, "spec": m["spec"]}
                 for i, m in enumerate(manifests)]
    # JSON, not YAML: kubectl reads YAML 1.1, where a drawn name like `y` or `on` would be a boolean.
    result = server_dry_run(vm_crd, json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))
    assert result.returncode == 0, result.stderr


_NUMBERS = st.one_of(st.integers(0, 10**6).map(str), st.decimals(0, 10**4, places=3).map(str),
                     st.integers(0, 999).map(lambda n: f".{n}"), st.integers(0, 999).map(lambda n: f"{n}."))
QUANTITIES = st.one_of(
    st.builds(lambda sign, number, suffix: sign + number + suffix,
              st.sampled_from(["", "", "+", "-"]), _NUMBERS,
              st.sampled_from(["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E", "m", "u", "n"])),
    st.builds(lambda number, e, exponent: f"{number}{e}{exponent}", _NUMBERS, st.sampled_from(["e", "E", "e+", "e-0"]),
              st.one_of(st.integers(-12, 20), st.integers(-2**63, 2**64), st.sampled_from([2**31, 2**32, 2**32 + 7]))),
    st.builds(lambda number, junk: number + junk, _NUMBERS,
              st.sampled_from([" Gi", "GB", "ki", "e", "e+", "iB", "Mi ", "_1", "KI", "0x", "K", "e3k", "Infinity"])),
    st.builds(lambda sign, suffix: sign + suffix, st.sampled_from(["", "+", "-", ".", "+.", "0"]),
              st.sampled_from(["", "Gi", "Ti", "Pi", "Ei", "k", "n", "e9", "e-9", "e-10", "E"])),
    st.sampled_from(["1.2.3", "0x10", "1e2147483648", "1e-2147483649", "200.E-35508178434748", "16777215.9999999999", "16777215.999999999", "1152921504606846976.0000000001",
                     "1" * 33, "0" * 30 + "64Mi", "1.00000000000000000000000000001Gi"]),
    st.integers(-10, 2**40),
    st.sampled_from([16 * 2**20 - 1, 16 * 2**20, 2**60, 2**60 + 1, 2**63 - 1]),
)
"""Kubernetes quantities in every form its grammar has (signs, decimals, binary and decimal suffixes,
exponents up to int64 and past it), apimachinery's quirks (no digits, 32-bit exponents, nano rounding), the
CRD's bounds (16Mi, 1Ei, 32 characters), and near misses."""


def admitted_names(kubectl: Kubectl, specs: dict[str, dict[str, Any]]) -> set[str]:
    """The names, among these VMs, that the API server admits (one server-side dry run of a List)."""
    items = [{"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachine",
              "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec} for name, spec in specs.items()]
    result = server_dry_run(kubectl, json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return {name for name in specs if f"/{name} created (server dry run)" in result.stdout}


def agent_accepts(spec: dict[str, Any]) -> bool:
    try:
        parse_spec(spec)
    except SpecError:
        return False
    return True


# No shrinking: the failure names every disagreeing quantity of its batch already, and each shrink step is a
# round trip to the API server (a failure shrank for over five minutes).
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(QUANTITIES, min_size=20, max_size=20))
def test_admission_and_the_agent_accept_the_same_quantities(vm_crd: Kubectl, quantities: list[Any]) -> None:
    specs: dict[str, dict[str, Any]] = {}
    for i, quantity in enumerate(quantities):
        specs[f"memory-{i}"] = {"memory": quantity}
        specs[f"disk-{i}"] = {"memory": "64Mi", "disks": [{"name": "data", "emptyDisk": {"size": quantity}}]}
    admitted = admitted_names(vm_crd, specs)
    disagreements = {name: specs[name] for name in specs if (name in admitted) != agent_accepts(specs[name])}
    assert disagreements == {}, f"admitted by the API server: {sorted(admitted & set(disagreements))}"


# The migration API (DESIGN.md section 3): VirtualMachineMigration, VM status.migration, LibvirtNode status.drain.

@pytest.fixture(scope="module")
def crds(kubectl: Kubectl) -> Kubectl:
    install_crds(kubectl, NAMESPACE)
    return kubectl


def migration(name: str, **spec: object) -> str:
    return json.dumps({"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "VirtualMachineMigration",
                       "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})


def patch_status(kubectl: Kubectl, resource: str, status: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kubectl("patch", resource, "-n", NAMESPACE, "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": status}), check=False)


def stored_status(kubectl: Kubectl, resource: str) -> dict[str, Any]:
    return json.loads(kubectl("get", resource, "-n", NAMESPACE, "-o", "json").stdout)["status"]


MIGRATION_REJECTED = {
    "no-vm-name": ({"targetNode": "node-b"}, "spec.vmName: Required value"),
    "bad-vm-name": ({"vmName": "Web_1"}, 'spec.vmName: Invalid value: "Web_1"'),
    "long-vm-name": ({"vmName": "a" * 64}, "spec.vmName: Too long"),
    "bad-target": ({"vmName": "web-1", "targetNode": "node..b"}, 'spec.targetNode: Invalid value: "node..b"'),
}


@pytest.mark.parametrize("case", sorted(MIGRATION_REJECTED))
def test_a_bad_migration_is_refused_naming_the_field(crds: Kubectl, case: str) -> None:
    spec, expected = MIGRATION_REJECTED[case]
    result = server_dry_run(crds, migration(f"bad-{case}", **spec))
    assert f'The VirtualMachineMigration "bad-{case}" is invalid' in result.stderr
    assert expected in result.stderr


def test_a_migration_needs_a_spec_and_the_target_node_is_optional(crds: Kubectl) -> None:
    without_spec = json.loads(migration("no-spec"))
    del without_spec["spec"]
    assert "spec: Required value" in server_dry_run(crds, json.dumps(without_spec)).stderr
    for name, spec in (("anywhere", {"vmName": "web-1"}), ("there", {"vmName": "web-1", "targetNode": "node-b.rack-2"})):
        result = server_dry_run(crds, migration(name, **spec))
        assert result.returncode == 0, result.stderr


def test_a_migration_is_never_reused(crds: Kubectl) -> None:
    crds("apply", "-f", "-", input=migration("once", vmName="web-1"))
    try:
        for change in ({"targetNode": "node-b"}, {"vmName": "web-2"}):
            result = crds("patch", "vmim", "once", "-n", NAMESPACE, "--type=merge", "-p", json.dumps({"spec": change}),
                          check=False)
            assert "a VirtualMachineMigration is never reused: create a new one" in result.stderr, result
    finally:
        crds("delete", "vmim", "once", "-n", NAMESPACE)


MIGRATION_STATUS = {"phase": "Failed", "sourceNode": "node-a", "targetNode": "node-b",
                    "startTime": "2026-12-06T15:00:00Z", "endTime": "2026-12-06T15:00:04Z",
                    "message": "no progress for 150s: aborted; the guest runs on node-a",
                    "downtimeMilliseconds": 42, "dataTotalBytes": 134217728, "dataProcessedBytes": 100663296}


def test_a_migration_keeps_its_status_and_kubectl_shows_it(crds: Kubectl) -> None:
    crds("apply", "-f", "-", input=migration("shown", vmName="web-1", targetNode="node-b"))
    try:
        assert 'Unsupported value: "Migrating"' in patch_status(crds, "vmim/shown", {"phase": "Migrating"}).stderr
        assert patch_status(crds, "vmim/shown", MIGRATION_STATUS).returncode == 0
        assert stored_status(crds, "vmim/shown") == MIGRATION_STATUS
        table = crds("get", "vmim", "shown", "-n", NAMESPACE).stdout.splitlines()
        assert table[0].split() == ["NAME", "VM", "SOURCE", "TARGET", "PHASE", "AGE"]
        assert table[1].split()[:5] == ["shown", "web-1", "node-a", "node-b", "Failed"]
        wide = crds("get", "virtualmachinemigrations", "shown", "-n", NAMESPACE, "-o", "wide").stdout.splitlines()
        assert wide[0].split()[-1] == "MESSAGE" and wide[1].endswith(MIGRATION_STATUS["message"])
        assert "shown" in crds("get", "libvirt", "-n", NAMESPACE).stdout
        assert "never reused" in crds("explain", "vmim").stdout
        assert "the placement picks one" in crds("explain", "vmim.spec.targetNode").stdout
    finally:
        crds("delete", "vmim", "shown", "-n", NAMESPACE)


def test_a_vm_keeps_its_migration_status(crds: Kubectl) -> None:
    # Pinned to a node no agent serves: no agent of a later module takes it.
    crds("apply", "-f", "-", input=manifest("moving", nodeName="node-nowhere"))
    status = {"migration": {"id": "nodeName-2", "trigger": "NodeName", "migrationName": "move-web-1",
                            "source": "node-a", "target": "node-b", "phase": "Running",
                            "startTime": "2026-12-06T15:00:00Z", "endTime": "2026-12-06T15:00:04Z",
                            "message": "copying memory", "downtimeMilliseconds": 12, "dataTotalBytes": 134217728,
                            "dataProcessedBytes": 1048576, "failures": 1},
              "conditions": [{"type": "Ready", "status": "True", "reason": "RunningAsDesired"},
                             {"type": "Migrating", "status": "True", "reason": "Running", "message": "to node-b"},
                             {"type": "Migratable", "status": "True", "reason": "Movable"}]}
    try:
        assert 'Unsupported value: "Queued"' in patch_status(
            crds, "vm/moving", {"migration": {"phase": "Queued"}}).stderr
        assert patch_status(crds, "vm/moving", status).returncode == 0
        assert stored_status(crds, "vm/moving") == status
    finally:
        crds("delete", "vm", "moving", "-n", NAMESPACE)


def test_a_libvirt_node_keeps_its_drain_status(crds: Kubectl) -> None:
    node = "admission-drained"
    crds("apply", "-f", "-", input=json.dumps({"apiVersion": "libvirt-operator.io/v1alpha1", "kind": "LibvirtNode",
                                               "metadata": {"name": node}, "spec": {"drain": True}}))
    drain = {"state": "Blocked", "remaining": 1,
             "blockedBy": [{"vm": f"{NAMESPACE}/pinned", "reason": "pinned to this node by spec.nodeName"}]}
    try:
        assert patch_status(crds, f"lvnode/{node}", {"drain": drain}).returncode == 0
        assert stored_status(crds, f"lvnode/{node}")["drain"] == drain
        assert 'Unsupported value: "Emptying"' in patch_status(crds, f"lvnode/{node}", {"drain": {"state": "Emptying"}}).stderr
    finally:
        crds("delete", "lvnode", node)
