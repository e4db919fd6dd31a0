"""The VirtualMachine spec: quantities, defaults, every rejected input named by its field, the spec hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from libvirt_operator.spec import (
    CloudInitSource, EmptyDiskSource, HttpSource, ImageSource, SpecError, VolumeSource, parse_spec, spec_hash,
)
from libvirt_operator.spec_fields import POSITIVE_QUANTITY, parse_quantity

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("quantity", "expected"), [
    ("64Mi", 64 * 2**20), ("1.5Gi", 3 * 2**29), ("2G", 2 * 10**9), ("1k", 1000), ("1Ki", 1024),
    ("1Ti", 2**40), ("1048576", 2**20), (1048576, 2**20), ("0.5Ki", 512), ("1.0001k", 1001),
    # the rest of Kubernetes' grammar, which admission (CEL isQuantity) admits too
    ("1e9", 10**9), ("1E3", 1000), ("2e+3", 2000), ("5e-1", 1), ("1000m", 1), ("1500m", 2), ("1u", 1), ("+1Ki", 1024),
    (".5Ki", 512), ("5.", 5), ("1E", 10**18),
    # apimachinery's quirks: no digits reads as zero, a value rounds up to a nano unit, an exponent wraps at 32 bits
    ("Gi", 0), (".", 0), ("+", 0), ("16777215.9999999999", 16777216), ("1e4294967296", 1),
])
def test_quantities_become_whole_bytes(quantity: Any, expected: int) -> None:
    assert parse_quantity(quantity, "spec.memory") == expected


@pytest.mark.parametrize("quantity", ["1GB", "Pi", "e-10", "1K", "1e3k", "Infinity", "1_000", " 1", "2Ei",
                                      "1e99999999999999999999", "-1Gi", "1 Gi", "1.5.2Mi", "1e", "1e1.5", "0x10", "1ki", True, -5, [1]])
def test_malformed_quantities_are_refused_with_an_example(quantity: Any) -> None:
    with pytest.raises(SpecError) as error:
        parse_quantity(quantity, "spec.memory")
    assert error.value.field == "spec.memory"
    assert "512Mi" in error.value.message


def test_a_minimal_spec_gets_the_documented_defaults() -> None:
    spec = parse_spec({"memory": "1Gi"})
    assert spec.memory == 2**30
    assert (spec.cpu.sockets, spec.cpu.cores, spec.cpu.threads, spec.cpu.mode) == (1, 1, 1, None)
    assert (spec.firmware, spec.run_strategy, spec.update_strategy) == ("bios", "Always", "OnRestart")
    assert (spec.paused, spec.termination_grace_period_seconds, spec.domain_type) == (False, 30, None)
    assert spec.disks == () and spec.interfaces == () and spec.console.log is False and spec.kernel_boot is None


def test_every_disk_source_and_interface_kind_is_read() -> None:
    spec = parse_spec({
        "memory": "1Gi",
        "disks": [
            {"name": "a", "bootOrder": 1, "image": {"path": "/i.qcow2", "clone": True}},
            {"name": "b", "bus": "scsi", "readOnly": True, "emptyDisk": {"size": "1Gi"}},
            {"name": "c", "cloudInit": {"userDataSecretRef": {"name": "s"}, "networkData": "n"}},
            {"name": "d", "volume": {"pool": "p", "name": "v"}},
            {"name": "e", "http": {"url": "http://x/y", "sha256": "A" * 64}},
        ],
        "interfaces": [
            {"name": "n", "network": "default", "macAddress": "52:54:00:AB:cd:01"},
            {"name": "b", "bridge": "br0", "model": "e1000"},
            {"name": "u", "user": {}},
        ],
    })
    assert [d.source for d in spec.disks] == [
        ImageSource("/i.qcow2", True), EmptyDiskSource(2**30), CloudInitSource(user_data_secret="s", network_data="n"),
        VolumeSource("p", "v"), HttpSource("http://x/y", "a" * 64),
    ]
    assert [d.bus for d in spec.disks] == ["virtio", "scsi", "sata", "virtio", "virtio"]
    assert [d.read_only for d in spec.disks] == [False, True, True, False, False]
    assert [(i.kind, i.source, i.model, i.mac_address) for i in spec.interfaces] == [
        ("network", "default", "virtio", "52:54:00:ab:cd:01"), ("bridge", "br0", "e1000", None), ("user", None, "virtio", None),
    ]


def _disk(**source: Any) -> dict[str, Any]:
    return {"name": "root", **source}


BAD_SPECS = [
    ({"memory": "1Gi", "disks": [_disk(image={"path": "/a"}, emptyDisk={"size": "1Gi"})]}, "spec.disks[0]", "exactly one"),
    ({"memory": "1Gi", "disks": [{"name": "root"}]}, "spec.disks[0]", "found none"),
    ({"memory": "1Gi", "disks": [_disk(image={"path": "/a"}), _disk(emptyDisk={"size": "1Gi"})]}, "spec.disks[1].name", "unique"),
    ({"memory": "1Gi", "interfaces": [{"name": "n", "user": {}}, {"name": "n", "user": {}}]}, "spec.interfaces[1].name", "unique"),
    ({"memory": "8Mi"}, "spec.memory", "16Mi"),
    ({}, "spec.memory", "required"),
    ({"memory": "1Gi", "cpu": {"cores": 0}}, "spec.cpu.cores", "at least 1"),
    ({"memory": "1Gi", "cpu": {"sockets": -1}}, "spec.cpu.sockets", "at least 1"),
    ({"memory": "1Gi", "cpu": {"threads": 0}}, "spec.cpu.threads", "at least 1"),
    ({"memory": "1Gi", "cpu": {"mode": "host-model", "model": "EPYC"}}, "spec.cpu.model", "custom"),
    ({"memory": "1Gi", "cpu": {"mode": "custom"}}, "spec.cpu.model", "custom"),
    ({"memory": "1Gi", "cpu": {"mode": "turbo"}}, "spec.cpu.mode", "host-model, host-passthrough, custom"),
    ({"memory": "1Gi", "firmware": "efi"}, "spec.firmware", "bios, uefi"),
    ({"memory": "1Gi", "domainType": "xen"}, "spec.domainType", "kvm, qemu"),
    ({"memory": "1Gi", "runStrategy": "Sometimes"}, "spec.runStrategy", "RerunOnFailure"),
    ({"memory": "1Gi", "updateStrategy": "Never"}, "spec.updateStrategy", "OnRestart"),
    ({"memory": "1Gi", "disks": [_disk(bus="ide", emptyDisk={"size": "1Gi"})]}, "spec.disks[0].bus", "virtio, sata, scsi"),
    ({"memory": "1Gi", "interfaces": [{"name": "n", "user": {}, "model": "ne2k"}]}, "spec.interfaces[0].model", "virtio"),
    ({"memory": "1Gi", "interfaces": [{"name": "n", "user": {}, "macAddress": "52:54:00:12:34"}]}, "spec.interfaces[0].macAddress", "six hex pairs"),
    ({"memory": "1Gi", "interfaces": [{"name": "n", "user": {}, "macAddress": "01:00:5e:00:00:01"}]}, "spec.interfaces[0].macAddress", "multicast"),
    ({"memory": "1Gi", "interfaces": [{"name": "n", "network": "a", "bridge": "b"}]}, "spec.interfaces[0]", "exactly one"),
    ({"memory": "1Gi", "interfaces": [{"name": "n", "bridge": "../../etc"}]}, "spec.interfaces[0].bridge", "interface name"),
    ({"memory": "1Gi", "disks": [_disk(bootOrder=1, emptyDisk={"size": "1Gi"}), {"name": "b", "bootOrder": 1, "emptyDisk": {"size": "1Gi"}}]}, "spec.disks[1].bootOrder", "unique"),
    ({"memory": "1Gi", "disks": [_disk(bootOrder=0, emptyDisk={"size": "1Gi"})]}, "spec.disks[0].bootOrder", "at least 1"),
    ({"memory": "1Gi", "disks": [_disk(emptyDisk={"size": 0})]}, "spec.disks[0].emptyDisk.size", "positive"),
    ({"memory": "1Gi", "kernelBoot": {"kernel": "boot/vmlinuz"}}, "spec.kernelBoot.kernel", "absolute path"),
    ({"memory": "1Gi", "kernelBoot": {"kernel": "/k", "initrd": "/boot/a\nb"}}, "spec.kernelBoot.initrd", "newlines"),
    ({"memory": "1Gi", "disks": [_disk(image={"path": "/var/lib/libvirt/images/a\tb"})]}, "spec.disks[0].image.path", "tabs"),
    ({"memory": "1Gi", "disks": [_disk(volume={"pool": "default", "name": "a/b"})]}, "spec.disks[0].volume.name", "no '/'"),
    ({"memory": "1Gi", "disks": [_disk(volume={"pool": "..", "name": "a"})]}, "spec.disks[0].volume.pool", "not . or .."),
    ({"memory": "1Gi", "disks": [_disk(cloudInit={})]}, "spec.disks[0].cloudInit", "userData"),
    ({"memory": "1Gi", "disks": [_disk(cloudInit={"userData": "x", "userDataSecretRef": {"name": "s"}})]}, "spec.disks[0].cloudInit", "exactly one"),
    ({"memory": "1Gi", "disks": [_disk(http={"url": "ftp://x", "sha256": "a" * 64})]}, "spec.disks[0].http.url", "http://"),
    ({"memory": "1Gi", "disks": [_disk(http={"url": "http://x", "sha256": "abc"})]}, "spec.disks[0].http.sha256", "64 hexadecimal"),
    ({"memory": "1Gi", "disks": [_disk(volume={"pool": "default"})]}, "spec.disks[0].volume.name", "required"),
    ({"memory": "1Gi", "disks": [_disk(bus="sata", readOnly=True, emptyDisk={"size": "1Gi"})]}, "spec.disks[0].readOnly", "virtio or scsi"),
    ({"memory": "1Gi", "disks": [{"name": "Root_1", "emptyDisk": {"size": "1Gi"}}]}, "spec.disks[0].name", "DNS label"),
    ({"memory": "1Gi", "disks": [_disk(imag={"path": "/a"})]}, "spec.disks[0].imag", "allowed here"),
    ({"memory": "1Gi", "kernelBoot": {"kernel": "/k", "cmdline": "a\x00b"}}, "spec.kernelBoot.cmdline", "control characters"),
    ({"memory": "1Gi", "paused": "yes"}, "spec.paused", "true or false"),
    ({"memory": "1Gi", "disks": {"name": "root"}}, "spec.disks", "list"),
]


def test_a_tiny_empty_disk_is_rounded_up_to_one_mebibyte() -> None:
    spec = parse_spec({"memory": "1Gi", "disks": [_disk(emptyDisk={"size": "1k"})]})
    assert spec.disks[0].source.size == 1024**2


@pytest.mark.parametrize(("data", "field", "hint"), BAD_SPECS, ids=[f"{f}:{h}" for _, f, h in BAD_SPECS])
def test_each_bad_spec_is_refused_naming_its_field(data: dict[str, Any], field: str, hint: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec(data)
    assert error.value.field == field
    assert hint in error.value.message
    assert str(error.value) == f"{field}: {error.value.message}"


def test_spec_hash_ignores_fields_that_do_not_shape_the_domain() -> None:
    base = {"memory": "1Gi", "cpu": {"cores": 2, "sockets": 1}}
    runtime = {**base, "runStrategy": "Halted", "paused": True, "updateStrategy": "Restart",
               "terminationGracePeriodSeconds": 5, "nodeName": "b"}
    reordered = {"cpu": {"sockets": 1, "cores": 2}, "memory": "1Gi"}
    assert spec_hash(base) == spec_hash(runtime) == spec_hash(reordered)
    assert spec_hash(base) != spec_hash({**base, "memory": "2Gi"})
    assert len(spec_hash(base)) == 64


def test_a_cdrom_is_read_only_on_sata_by_default_and_never_on_virtio() -> None:
    spec = parse_spec({"memory": "1Gi", "disks": [
        {"name": "iso", "cdrom": {"image": {"path": "/var/lib/libvirt/images/x.iso"}}},
        {"name": "web", "bus": "scsi", "cdrom": {"http": {"url": "https://example.org/x.iso", "sha256": "a" * 64}}}]})
    iso, web = spec.disks
    assert (iso.cdrom, iso.read_only, iso.bus, iso.source_key, iso.field_path(0)) == (
        True, True, "sata", "cdrom", "spec.disks[0].cdrom")
    assert (web.cdrom, web.bus, type(web.source).__name__) == (True, "scsi", "HttpSource")
    for bad, field in (({"name": "c", "bus": "virtio", "cdrom": {"image": {"path": "/x.iso"}}}, "spec.disks[0].bus"),
                       ({"name": "c", "cdrom": {"image": {"path": "/x.iso", "clone": True}}},
                        "spec.disks[0].cdrom.image.clone"),
                       ({"name": "c", "cdrom": {}}, "spec.disks[0].cdrom")):
        with pytest.raises(SpecError) as error:
            parse_spec({"memory": "1Gi", "disks": [bad]})
        assert error.value.field == field, error.value


def test_the_size_pattern_is_the_crds() -> None:
    crd = yaml.safe_load((Path(__file__).parent.parent / "crds" / "virtualmachine.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    disk_size = spec["disks"]["items"]["properties"]["emptyDisk"]["properties"]["size"]
    assert spec["memory"]["pattern"] == disk_size["pattern"] == POSITIVE_QUANTITY.pattern
    assert f"self.matches('{POSITIVE_QUANTITY.pattern}') && isQuantity(self)" in spec["memory"]["x-kubernetes-validations"][0]["rule"]
