"""The VirtualMachine CRD on a real API server: bad specs are refused at admission, naming the field."""

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
