"""Specs nobody wrote by hand: hypothesis draws VirtualMachine specs the CRD admits (its schema and
its CEL rules: one source per disk, one backend per interface, unique names and boot orders, cpu.model
only with mode custom), with hostile strings wherever the schema allows free text. Every one must
render to XML that libvirt's own RelaxNG schema accepts, read back to the disks and MACs it was made
from, render byte-identically twice, merge into the definition of any other spec with exactly its own
modelled fields, and define on libvirt's test driver with the validate flag."""

from __future__ import annotations

import string
from typing import Any

import libvirt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from libvirt_operator.domain_xml import DomainDefinition, merge
from libvirt_operator.xmlbuilder import Field, XMLChildren, XMLObject
from test_guest_xml import SAMPLES, assert_valid, render_manifest

UID = "0b7e4f2c-3d5a-4e6f-8a9b-1c2d3e4f5a6b"
DNS_LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
HOSTILE = st.text(
    alphabet=st.sampled_from(string.ascii_letters + string.digits + " <>&'\"\n\t=;/\\${}é✓-_."),
    min_size=1, max_size=40,
)
"""Free text: XML specials, quotes, newlines, shell and non-ASCII characters."""
ONE_LINE = HOSTILE.map(lambda text: text.replace("\n", " ").replace("\t", " "))
"""What the CRD allows in paths and libvirt object names: no control characters."""
PATH_UNDER_ROOT = ONE_LINE.map(lambda tail: "/var/lib/libvirt/images/" + tail)
OBJECT_NAME = ONE_LINE.map(lambda text: text.replace("/", "_")).filter(lambda name: name not in (".", ".."))


def _quantity(min_mib: int, max_mib: int) -> st.SearchStrategy[Any]:
    mib = st.integers(min_mib, max_mib)
    return st.one_of(mib.map(lambda n: f"{n}Mi"), mib.map(lambda n: n * 1024 * 1024),
                     st.integers(max(1, min_mib // 1024 + 1), max(2, max_mib // 1024)).map(lambda n: f"{n}Gi"))


SOURCES = {
    "image": st.fixed_dictionaries({"path": PATH_UNDER_ROOT}, optional={"clone": st.booleans()}),
    "emptyDisk": st.fixed_dictionaries({"size": st.one_of(_quantity(1, 512 * 1024), st.integers(1, 4096), st.just("1k"))}),
    "cloudInit": st.one_of(
        st.fixed_dictionaries({"userData": HOSTILE}, optional={"networkData": HOSTILE}),
        st.fixed_dictionaries({"userDataSecretRef": st.fixed_dictionaries({"name": DNS_LABEL})},
                              optional={"networkData": HOSTILE}),
    ),
    "volume": st.fixed_dictionaries({"pool": OBJECT_NAME, "name": OBJECT_NAME}),
    "http": st.fixed_dictionaries({
        "url": HOSTILE.map(lambda tail: "https://images.example/" + tail),
        "sha256": st.from_regex(r"\A[a-f0-9]{64}\Z"),
    }),
}
BACKENDS = {
    "network": HOSTILE,
    "bridge": st.from_regex(r"\A[A-Za-z0-9_.:-]{1,15}\Z"),
    "user": st.just({}),
}


@st.composite
def disks(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(DNS_LABEL, max_size=8, unique=True))
    orders = draw(st.lists(st.integers(1, 64), min_size=len(names), max_size=len(names), unique=True))
    result = []
    for name, order in zip(names, orders):
        kind = draw(st.sampled_from(sorted(SOURCES)))
        disk: dict[str, Any] = {"name": name, kind: draw(SOURCES[kind])}
        disk.update(draw(st.fixed_dictionaries({}, optional={
            "bus": st.sampled_from(["virtio", "sata", "scsi"]), "readOnly": st.booleans(),
            "bootOrder": st.just(order)})))
        if disk.get("bus") == "sata" and kind != "cloudInit":
            disk.pop("readOnly", None)  # the CRD refuses a read-only SATA disk: QEMU cannot attach one
        result.append(disk)
    return result


@st.composite
def interfaces(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(DNS_LABEL, max_size=4, unique=True))
    macs = draw(st.lists(st.from_regex(r"\A52:54:00(:[0-9a-f]{2}){3}\Z"), min_size=len(names), max_size=len(names),
                         unique_by=str.lower))
    result = []
    for name, mac in zip(names, macs):
        kind = draw(st.sampled_from(sorted(BACKENDS)))
        interface: dict[str, Any] = {"name": name, kind: draw(BACKENDS[kind])}
        interface.update(draw(st.fixed_dictionaries({}, optional={
            "model": st.sampled_from(["virtio", "e1000", "e1000e", "rtl8139"]), "macAddress": st.just(mac)})))
        result.append(interface)
    return result


CPU = st.one_of(
    st.fixed_dictionaries({}, optional={"cores": st.integers(1, 256), "sockets": st.integers(1, 16),
                                        "threads": st.integers(1, 8),
                                        "mode": st.sampled_from(["host-model", "host-passthrough"])}),
    st.fixed_dictionaries({"mode": st.just("custom"), "model": HOSTILE}, optional={"cores": st.integers(1, 4)}),
)
SPECS = st.fixed_dictionaries({"memory": _quantity(16, 1024 * 1024)}, optional={
    "runStrategy": st.sampled_from(["Always", "Halted", "Manual", "RerunOnFailure", "Once"]),
    "paused": st.booleans(),
    "updateStrategy": st.sampled_from(["OnRestart", "Restart"]),
    "nodeName": DNS_LABEL,
    "domainType": st.sampled_from(["kvm", "qemu"]),
    "cpu": CPU,
    "firmware": st.sampled_from(["bios", "uefi"]),
    "kernelBoot": st.fixed_dictionaries({"kernel": PATH_UNDER_ROOT},
                                        optional={"initrd": PATH_UNDER_ROOT, "cmdline": HOSTILE}),
    "terminationGracePeriodSeconds": st.integers(0, 3600),
    "disks": disks(),
    "interfaces": interfaces(),
    "console": st.fixed_dictionaries({}, optional={"log": st.booleans()}),
})
MANIFESTS = st.builds(
    lambda name, namespace, spec: {"metadata": {"name": name, "namespace": namespace}, "spec": spec},
    DNS_LABEL, DNS_LABEL, SPECS,
)


@pytest.mark.unit
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MANIFESTS)
def test_every_admitted_spec_renders_schema_valid_xml_that_reads_back(manifest: dict[str, Any]) -> None:
    xml = render_manifest(manifest, uid=UID)
    assert_valid(xml)
    assert render_manifest(manifest, uid=UID) == xml
    facts = DomainDefinition.from_xml(xml)
    assert [disk.name for disk in facts.disks] == [disk["name"] for disk in manifest["spec"].get("disks", [])]
    given_macs = [i["macAddress"].lower() for i in manifest["spec"].get("interfaces", []) if "macAddress" in i]
    assert set(given_macs) <= {nic.mac_address for nic in facts.interfaces}
    assert len(facts.interfaces) == len(manifest["spec"].get("interfaces", []))


def modelled(obj: XMLObject, *, kept_lists: bool = False) -> dict[str, Any]:
    """Every field the operator models in `obj`, its child lists as lists of the same; the lists whose
    unmatched children a merge keeps (controllers, clock timers: libvirt and users add them) only with
    `kept_lists`."""
    fields: dict[str, Any] = {}
    for name, declared in vars(type(obj)).items():
        if isinstance(declared, Field) and not kept_lists:
            fields[name] = getattr(obj, name)
        elif isinstance(declared, XMLChildren) and declared.drop_unmatched != kept_lists:
            fields[name] = sorted((modelled(child) for child in getattr(obj, name)), key=repr)
    return fields


@pytest.mark.unit
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MANIFESTS, MANIFESTS)
@example(SAMPLES["every-field"], SAMPLES["minimal"])
@example(SAMPLES["minimal"], SAMPLES["every-field"])
def test_a_merge_into_any_earlier_definition_gives_exactly_the_modelled_fields_of_the_new_spec(
    earlier: dict[str, Any], manifest: dict[str, Any],
) -> None:
    rendered = render_manifest(manifest, uid=UID)
    merged = merge(render_manifest(earlier, uid=UID), rendered)
    assert_valid(merged)
    merged_definition, wanted = DomainDefinition.from_xml(merged), DomainDefinition.from_xml(rendered)
    assert modelled(merged_definition) == modelled(wanted)
    for name, children in modelled(wanted, kept_lists=True).items():
        assert all(child in modelled(merged_definition, kept_lists=True)[name] for child in children), name


@pytest.mark.libvirt
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(MANIFESTS)
def test_every_admitted_spec_defines_with_libvirts_validate_flag(test_uri: str, manifest: dict[str, Any]) -> None:
    xml = render_manifest(manifest, uid=UID)
    conn = libvirt.open(test_uri)
    try:
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            assert dom.UUIDString() == UID
        finally:
            dom.undefine()
    finally:
        conn.close()
