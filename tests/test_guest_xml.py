"""Guest rendering without libvirt: every spec field in the XML, libvirt's RelaxNG schema, determinism,
hostile strings, reading XML back, merging into a live definition, path confinement, the NoCloud seed."""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml
from lxml import etree

from libvirt_operator.disk_plan import plan_disks
from libvirt_operator.domain_xml import DomainDefinition, merge, render, stable_mac
from libvirt_operator.storage import seed_iso
from libvirt_operator.metadata import OWNER_TAG, owner_from_domain
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.paths import confine, confine_spec
from libvirt_operator.spec import SpecError, parse_spec, spec_hash

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
SETTINGS = AgentSettings()
UID = "6f1c2a9e-51d4-4c57-9f0e-0c1d2e3f4a5b"


def load_samples() -> dict[str, dict[str, Any]]:
    """The VirtualMachine manifests of tests/data/vms.yaml, by name."""
    with (DATA / "vms.yaml").open() as stream:
        return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(stream)}


SAMPLES = load_samples()


def render_manifest(manifest: dict[str, Any], uid: str = UID, settings: AgentSettings = SETTINGS,
                    namespace: str | None = None) -> str:
    """The XML `manifest` renders to, with its disks planned as `libvirt-operator render` plans them."""
    vm = VMRef(uid=uid, namespace=namespace or manifest["metadata"]["namespace"], name=manifest["metadata"]["name"])
    spec = parse_spec(manifest["spec"])
    return render(spec, vm, settings, generation=3, spec_hash=spec_hash(manifest["spec"]),
                  disks=plan_disks(spec, vm, settings))


@functools.cache
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def assert_valid(xml: str) -> etree._Element:
    root = etree.fromstring(xml.encode())
    assert schema().validate(root), schema().error_log
    return root


def structure(root: etree._Element) -> list[tuple[str, tuple[str, ...]]]:
    return [(element.tag, tuple(element.attrib)) for element in root.iter()]


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_validates_against_libvirts_schema(name: str) -> None:
    assert_valid(render_manifest(SAMPLES[name]))


@pytest.mark.parametrize("name", SAMPLES)
def test_rendering_is_byte_identical_for_the_same_spec_and_uid(name: str) -> None:
    first = render_manifest(SAMPLES[name])
    again = render_manifest(yaml.safe_load(yaml.safe_dump(SAMPLES[name])))
    assert first.encode() == again.encode()
    assert render_manifest(SAMPLES[name], uid="00000000-0000-4000-8000-000000000000") != first


def _one(root: etree._Element, path: str) -> etree._Element:
    found = root.xpath(path)
    assert len(found) == 1, f"{path}: {found}"
    return found[0]


def test_every_spec_field_reaches_the_xml() -> None:
    root = assert_valid(render_manifest(SAMPLES["every-field"]))
    assert root.get("type") == "kvm"
    assert _one(root, "name").text == "team-a_every-field"
    assert _one(root, "uuid").text == UID
    owner = owner_from_domain(root)
    assert (owner.uid, owner.namespace, owner.name, owner.generation) == (UID, "team-a", "every-field", 3)
    assert owner.spec_hash == spec_hash(SAMPLES["every-field"]["spec"])
    assert _one(root, "memory[@unit='KiB']").text == str(3 * 2**19)
    assert _one(root, "vcpu").text == "8"
    assert _one(root, "cpu").attrib == {"mode": "custom", "match": "exact"}
    assert _one(root, "cpu/model").text == "qemu64"
    assert dict(_one(root, "cpu/topology").attrib) == {"sockets": "2", "dies": "1", "cores": "2", "threads": "2"}
    assert _one(root, "os").get("firmware") == "efi" and root.find("os/loader") is None  # libvirt picks OVMF
    assert {f.get("name"): f.get("enabled") for f in root.iterfind("os/firmware/feature")} == {
        "secure-boot": "no", "enrolled-keys": "no"}
    assert _one(root, "os/nvram").text == f"{SETTINGS.state_dir}/nvram/{UID}_VARS.fd"
    assert [_one(root, f"os/{tag}").text for tag in ("kernel", "initrd", "cmdline")] == [
        "/var/lib/libvirt/boot/vmlinuz", "/var/lib/libvirt/boot/initrd.img", "console=ttyS0 root=/dev/vda"]
    assert _one(root, "features/acpi") is not None and _one(root, "features/apic") is not None
    assert [_one(root, tag).text for tag in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy", "restart", "destroy"]

    disks = {d.find("alias").get("name"): d for d in root.iterfind("devices/disk")}
    pool = SETTINGS.storage_pool_path
    expected = {  # alias: (type, device, target, bus, driver type, source, boot order, readonly)
        "ua-disk-root": ("file", "disk", "vda", "virtio", "qcow2", f"{pool}/{UID}-root.qcow2", "1", False),
        "ua-disk-base": ("file", "disk", "vdb", "virtio", "raw", "/var/lib/libvirt/images/base.raw", None, True),
        "ua-disk-data": ("file", "disk", "sda", "scsi", "qcow2", f"{pool}/{UID}-data.qcow2", "2", False),
        "ua-disk-sata-data": ("file", "disk", "sdb", "sata", "qcow2", f"{pool}/{UID}-sata-data.qcow2", None, False),
        "ua-disk-seed": ("file", "cdrom", "sdc", "sata", "raw", f"{pool}/{UID}-seed-cidata.iso", None, True),
        "ua-disk-seed-secret": ("file", "disk", "vdc", "virtio", "raw", f"{pool}/{UID}-seed-secret-cidata.iso", None, True),
        "ua-disk-shared": ("volume", "disk", "sdd", "scsi", None, "default/shared-data", None, True),
        "ua-disk-os": ("file", "disk", "vdd", "virtio", "qcow2", f"{pool}/{UID}-os.qcow2", None, False),
        "ua-disk-installer": ("file", "cdrom", "sde", "sata", "raw", "/var/lib/libvirt/images/installer.iso", None, True),
        "ua-disk-drivers": ("file", "cdrom", "sdf", "scsi", "qcow2", f"{pool}/{UID}-drivers.qcow2", None, True),
    }
    for alias, disk in disks.items():
        source = disk.find("source")
        boot = disk.find("boot")
        assert (
            disk.get("type"), disk.get("device"), disk.find("target").get("dev"), disk.find("target").get("bus"),
            disk.find("driver").get("type"), source.get("file") or f"{source.get('pool')}/{source.get('volume')}",
            boot.get("order") if boot is not None else None, disk.find("readonly") is not None,
        ) == expected[alias], alias
    assert list(disks) == list(expected)
    assert _one(root, "devices/controller[@type='scsi']").get("model") == "virtio-scsi"

    nics = root.findall("devices/interface")
    assert [(n.get("type"), n.find("alias").get("name"), n.find("model").get("type")) for n in nics] == [
        ("network", "ua-nic-default", "virtio"), ("bridge", "ua-nic-lan", "e1000"), ("user", "ua-nic-slirp", "rtl8139")]
    assert nics[0].find("source").get("network") == "default" and nics[1].find("source").get("bridge") == "br0"
    assert [n.find("mac").get("address") for n in nics] == [
        "52:54:00:12:34:56", stable_mac(UID, "lan"), stable_mac(UID, "slirp")]
    log = _one(root, "devices/serial[@type='pty']/log")
    assert (log.get("file"), log.get("append")) == (f"{SETTINGS.console_log_dir}/team-a_every-field.log", "on")
    assert _one(root, "devices/console/target").attrib == {"type": "serial", "port": "0"}
    assert _one(root, "devices/rng[@model='virtio']/backend[@model='random']").text == "/dev/urandom"
    assert _one(root, "devices/memballoon").get("model") == "virtio"
    assert root.find("devices/graphics") is None


def test_a_minimal_spec_gives_a_usable_vm_with_the_agents_domain_type() -> None:
    settings = dataclasses.replace(SETTINGS, domain_type="qemu")
    root = assert_valid(render_manifest(SAMPLES["minimal"], settings=settings))
    assert root.get("type") == "qemu"
    assert _one(root, "memory").text == str(64 * 1024) and _one(root, "vcpu").text == "1"
    assert _one(root, "cpu").get("mode") is None, "TCG cannot do host-model or host-passthrough"
    assert _one(root, "os/type").attrib == {"arch": "x86_64", "machine": "q35"}
    assert root.find("os/loader") is None and root.find("os/kernel") is None
    assert _one(root, "devices/serial[@type='pty']").find("log") is None
    assert root.find("devices/disk") is None and root.find("devices/interface") is None
    assert root.find("devices/rng") is not None


@pytest.mark.parametrize(("sample", "mode"), [("kvm-host-model", "host-model"), ("passthrough", "host-passthrough"),
                                               ("bios-qemu", None)])
def test_cpu_mode_follows_the_spec_and_the_domain_type(sample: str, mode: str | None) -> None:
    assert _one(etree.fromstring(render_manifest(SAMPLES[sample]).encode()), "cpu").get("mode") == mode


def test_stable_mac_is_per_vm_and_interface() -> None:
    mac = stable_mac(UID, "default")
    assert mac == stable_mac(UID, "default")
    assert mac.startswith("52:54:00:") and len(mac) == 17
    assert mac != stable_mac(UID, "other") and mac != stable_mac("11111111-2222-4333-8444-555555555555", "default")


HOSTILE = "x\" onload='y' <devices>&amp;</cmdline>\n<disk/>]]>"


def test_hostile_strings_never_change_the_xml_structure() -> None:
    benign = SAMPLES["every-field"]
    hostile = yaml.safe_load(yaml.safe_dump(benign))
    hostile["spec"]["kernelBoot"]["cmdline"] = HOSTILE
    hostile["spec"]["disks"][4]["cloudInit"]["userData"] = HOSTILE
    hostile["metadata"]["name"] = HOSTILE
    plain, evil = (etree.fromstring(render_manifest(m, namespace='n"s<&').encode()) for m in (benign, hostile))
    assert structure(plain) == structure(evil)
    assert _one(evil, "os/cmdline").text == HOSTILE
    assert _one(evil, "name").text == f'n"s<&_{HOSTILE}'
    assert owner_from_domain(evil).name == HOSTILE


def test_a_definition_reads_back_disks_macs_and_owner() -> None:
    facts = DomainDefinition.from_xml(render_manifest(SAMPLES["every-field"]))
    assert (facts.name, facts.uuid, facts.domain_type, facts.memory_kib, facts.vcpus) == (
        "team-a_every-field", UID, "kvm", 3 * 2**19, 8)
    assert facts.owner.uid == UID and facts.owner.generation == 3
    by_name = {disk.name: disk for disk in facts.disks}
    assert by_name["root"].path == f"{SETTINGS.storage_pool_path}/{UID}-root.qcow2" and by_name["root"].target == "vda"
    assert (by_name["shared"].pool, by_name["shared"].volume, by_name["shared"].read_only) == ("default", "shared-data", True)
    assert by_name["seed"].device == "cdrom"
    assert [i.name for i in facts.interfaces] == ["default", "lan", "slirp"]
    assert facts.interfaces[0].mac_address == "52:54:00:12:34:56"


def _live_definition(rendered: str) -> str:
    """`rendered` as libvirt would hand it back: addresses, a seclabel, a USB controller, another tool's metadata,
    fewer vCPUs online (`virsh setvcpus --config`)."""
    root = etree.fromstring(rendered.encode())
    root.find("vcpu").set("current", "1")
    etree.SubElement(root.find("metadata"), "{urn:other-tool}note", nsmap={"o": "urn:other-tool"}).text = "keep me"
    etree.SubElement(etree.SubElement(root, "resource"), "partition").text = "/machine"
    etree.SubElement(root, "seclabel", type="dynamic", model="dac", relabel="yes")
    devices = root.find("devices")
    etree.SubElement(devices, "controller", type="usb", index="0", model="qemu-xhci")
    for slot, disk in enumerate(devices.xpath("disk[target/@bus='virtio']"), start=4):
        etree.SubElement(disk, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{slot:02x}", function="0x0")
    return etree.tostring(root, encoding="unicode")


def test_merge_replaces_what_the_operator_models_and_keeps_the_rest() -> None:
    old = SAMPLES["every-field"]
    new = yaml.safe_load(yaml.safe_dump(old))
    new["spec"]["memory"] = "2Gi"
    new["spec"]["disks"] = [d for d in new["spec"]["disks"] if d["name"] != "data"]
    new["spec"]["disks"].append({"name": "extra", "emptyDisk": {"size": "1Gi"}})
    new["spec"]["disks"][1]["bus"] = "scsi"
    live = _live_definition(render_manifest(old))

    merged = assert_valid(merge(live, render_manifest(new)))

    assert _one(merged, "memory").text == str(2 * 2**20)
    assert _one(merged, "vcpu").get("current") is None, "every vCPU of the spec online"
    assert _one(merged, "seclabel").get("model") == "dac" and _one(merged, "resource/partition").text == "/machine"
    assert _one(merged, "metadata/*[local-name()='note']").text == "keep me"
    assert len(merged.findall(f"metadata/{OWNER_TAG}")) == 1
    assert _one(merged, "devices/controller[@type='usb']") is not None
    aliases = [d.find("alias").get("name") for d in merged.iterfind("devices/disk")]
    assert "ua-disk-data" not in aliases and "ua-disk-extra" in aliases
    assert _one(merged, "devices/disk[alias/@name='ua-disk-root']/address").get("slot") == "0x04"
    base = _one(merged, "devices/disk[alias/@name='ua-disk-base']")
    assert base.find("target").get("bus") == "scsi" and base.find("address") is None, "a bus change drops the PCI address"
    assert len(merged.findall("devices/serial")) == 1 and len(merged.findall("devices/interface")) == 3


OUTSIDE_EDITS = [  # (parent, what someone added there): nothing the operator models
    ("features", "<pmu state='off'/>"), ("features", "<hyperv mode='custom'><relaxed state='on'/></hyperv>"),
    ("os", "<bootmenu enable='yes'/>"), ("cpu", "<feature policy='require' name='x2apic'/>"),
    ("clock", "<timer name='kvmclock' present='yes'/>"), ("devices", "<watchdog model='i6300esb' action='poweroff'/>"),
    ("devices", "<channel type='pty'><target type='virtio' name='org.example.0'/></channel>"),
    ("devices/interface", "<link state='down'/>"), ("devices/disk", "<serial>lvo-keep</serial>"),
]


@pytest.mark.parametrize(("parent", "edit"), OUTSIDE_EDITS, ids=[edit.split()[0][1:] for _, edit in OUTSIDE_EDITS])
def test_an_edit_outside_the_modelled_fields_survives_a_merge_of_a_changed_spec(parent: str, edit: str) -> None:
    live = etree.fromstring(render_manifest(SAMPLES["every-field"]).encode())
    live.find(parent).append(etree.fromstring(edit))
    changed = yaml.safe_load(yaml.safe_dump(SAMPLES["every-field"]))
    changed["spec"]["memory"] = "2Gi"
    changed["spec"]["cpu"] = {"cores": 3}
    changed["spec"].pop("kernelBoot")

    merged = assert_valid(merge(etree.tostring(live, encoding="unicode"), render_manifest(changed)))

    added = etree.fromstring(edit)
    kept = [e for e in merged.find(parent) if e.tag == added.tag and e.attrib == added.attrib]
    assert len(kept) == 1, etree.tostring(merged.find(parent), encoding="unicode")
    assert (_one(merged, "memory").text, _one(merged, "vcpu").text) == (str(2 * 2**20), "3")
    assert merged.find("os/kernel") is None and merged.find("cpu/model") is None, "what the spec dropped goes"


def test_a_definition_with_the_older_ua_name_aliases_reads_back_and_merges_by_name() -> None:
    rendered = render_manifest(SAMPLES["every-field"])
    legacy = re.sub(r'<alias name="ua-(?:disk|nic)-', '<alias name="ua-', _live_definition(rendered))
    facts = DomainDefinition.from_xml(legacy)
    assert [d.name for d in facts.disks] == [d.name for d in DomainDefinition.from_xml(rendered).disks]
    assert [i.name for i in DomainDefinition.from_xml(legacy).interfaces] == ["default", "lan", "slirp"]
    merged = assert_valid(merge(legacy, rendered))
    assert _one(merged, "devices/disk[alias/@name='ua-disk-root']/address").get("slot") == "0x04", \
        "the same disk, renamed to the new alias, keeps its PCI address"


def test_merge_into_a_definition_without_devices_or_metadata() -> None:
    rendered = render_manifest(SAMPLES["minimal"])
    merged = assert_valid(merge("<domain type='qemu'><name>old</name><memory>1</memory><seclabel type='dynamic' model='dac' relabel='yes'/></domain>", rendered))
    assert _one(merged, "name").text == "default_minimal"
    assert owner_from_domain(merged).uid == UID and merged.find("seclabel") is not None


def test_confine_accepts_paths_under_a_root_and_resolves_them(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    assert confine(f"{tmp_path}/images/../images/a.qcow2", [tmp_path], "spec.disks[0].image.path") == tmp_path / "images/a.qcow2"
    (tmp_path / "images/link.qcow2").symlink_to(tmp_path / "images/a.qcow2")
    assert confine(str(tmp_path / "images/link.qcow2"), [Path("/nonexistent"), tmp_path], "f") == tmp_path / "images/a.qcow2"


@pytest.mark.parametrize("path", ["/etc/passwd", "{root}/../etc/passwd", "{root}/images/escape/passwd", "images/a.qcow2",
                                  "{root}/images/../../etc"])
def test_confine_refuses_paths_that_leave_the_roots(tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images/escape").symlink_to("/etc")
    with pytest.raises(SpecError) as error:
        confine(path.format(root=root), [root], "spec.disks[1].image.path")
    assert error.value.field == "spec.disks[1].image.path"
    assert str(root) in error.value.message


def test_confine_message_says_what_to_do() -> None:
    with pytest.raises(SpecError) as error:
        confine("/etc/passwd", [Path("/var/lib/libvirt")], "spec.disks[0].image.path")
    assert str(error.value) == ("spec.disks[0].image.path: /etc/passwd is outside the allowed roots /var/lib/libvirt; "
                                "put images under one of them")


def test_confine_spec_checks_images_kernel_and_initrd(tmp_path: Path) -> None:
    (tmp_path / "escape").symlink_to("/")
    spec = parse_spec({"memory": "1Gi", "kernelBoot": {"kernel": f"{tmp_path}/k", "initrd": f"{tmp_path}/escape/initrd"},
                       "disks": [{"name": "a", "image": {"path": f"{tmp_path}/./a.qcow2"}}]})
    with pytest.raises(SpecError) as error:
        confine_spec(spec, [tmp_path])
    assert error.value.field == "spec.kernelBoot.initrd"
    ok = confine_spec(dataclasses.replace(spec, kernel_boot=dataclasses.replace(spec.kernel_boot, initrd=None)), [tmp_path])
    assert ok.disks[0].source.path == f"{tmp_path}/a.qcow2"
    with pytest.raises(SpecError) as error:
        confine_spec(spec, [Path("/var/lib/libvirt")])
    assert error.value.field == "spec.disks[0].image.path"


def test_seed_iso_is_a_nocloud_volume() -> None:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(seed_iso("#cloud-config\nx: 1\n", "instance-id: u\n", "version: 2\n")))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        contents = {}
        for name in ("user-data", "meta-data", "network-config"):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            contents[name] = out.getvalue().decode()
    finally:
        iso.close()
    assert contents == {"user-data": "#cloud-config\nx: 1\n", "meta-data": "instance-id: u\n", "network-config": "version: 2\n"}


THEIRS = "22222222-2222-4222-8222-222222222222"
AGENT_FILES = {
    "another VM's disk": ({"volume": {"pool": "default", "name": f"{THEIRS}-data.qcow2"}}, "volume.name", THEIRS),
    "another VM's disk by path": ({"image": {"path": f"/var/lib/libvirt/images/{THEIRS}-root.qcow2"}}, "image.path",
                                  THEIRS),
    "another VM's seed": ({"image": {"path": f"/var/lib/libvirt/images/{THEIRS}-seed-cidata.iso"}}, "image.path",
                          "owns"),
    "a VM's NVRAM": ({"image": {"path": f"/var/lib/libvirt/libvirt-operator/nvram/{THEIRS}_VARS.fd"}}, "image.path",
                     "NVRAM"),
    "a console log": ({"image": {"path": "/var/log/libvirt/libvirt-operator/default_web.log"}}, "image.path",
                      "console logs"),
    "an http base, writable": ({"image": {"path": "/var/lib/libvirt/images/http-" + "a" * 64}}, "image.path",
                               "downloaded"),
    "an http base as a volume": ({"volume": {"pool": "default", "name": "http-" + "a" * 64}}, "volume.name",
                                 "downloaded"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", AGENT_FILES)
def test_the_agents_files_are_refused_as_disks_naming_the_field(case: str) -> None:
    from libvirt_operator.paths import refuse_agent_files
    source, field, said = AGENT_FILES[case]
    spec = parse_spec({"memory": "64Mi", "disks": [{"name": "x", **source}]})
    with pytest.raises(SpecError) as error:
        refuse_agent_files(spec, SETTINGS)
    assert error.value.field == f"spec.disks[0].{field}" and said in error.value.message


@pytest.mark.unit
def test_images_of_ones_own_and_an_http_base_under_a_clone_are_allowed_and_a_kernel_must_not_be_a_log() -> None:
    from libvirt_operator.paths import refuse_agent_files
    refuse_agent_files(parse_spec({"memory": "64Mi", "disks": [
        {"name": "base", "image": {"path": "/var/lib/libvirt/images/debian.qcow2"}},
        {"name": "cached", "image": {"path": "/var/lib/libvirt/images/http-" + "a" * 64, "clone": True}}]}), SETTINGS)
    with pytest.raises(SpecError) as error:
        refuse_agent_files(parse_spec({"memory": "64Mi", "kernelBoot": {
            "kernel": "/var/lib/libvirt/boot/vmlinuz",
            "initrd": "/var/log/libvirt/libvirt-operator/default_other.log"}}), SETTINGS)
    assert error.value.field == "spec.kernelBoot.initrd"


@pytest.mark.parametrize(("scheduler", "cores", "vcpus"), [("idle", 1, "0"), ("idle", 3, "0-2"), ("batch", 2, "0-1")])
def test_the_agents_vcpu_scheduler_covers_every_vcpu(scheduler: str, cores: int, vcpus: str) -> None:
    manifest = yaml.safe_load(yaml.safe_dump(SAMPLES["every-field"]))
    manifest["spec"]["cpu"] = {"cores": cores}
    root = assert_valid(render_manifest(manifest, settings=dataclasses.replace(SETTINGS, guest_vcpu_scheduler=scheduler)))

    assert [(e.get("vcpus"), e.get("scheduler")) for e in root.iterfind("cputune/vcpusched")] == [(vcpus, scheduler)]


def test_the_default_vcpu_scheduler_leaves_libvirts_own() -> None:
    assert assert_valid(render_manifest(SAMPLES["every-field"])).find("cputune") is None


def test_merge_writes_the_agents_vcpu_scheduler_into_the_live_cputune_and_keeps_the_rest_of_it() -> None:
    idle = dataclasses.replace(SETTINGS, guest_vcpu_scheduler="idle")
    live = etree.fromstring(_live_definition(render_manifest(SAMPLES["every-field"])).encode())
    etree.SubElement(etree.SubElement(live, "cputune"), "shares").text = "512"
    live_xml = etree.tostring(live, encoding="unicode")

    scheduled = assert_valid(merge(live_xml, render_manifest(SAMPLES["every-field"], settings=idle)))
    unscheduled = assert_valid(merge(etree.tostring(scheduled, encoding="unicode"), render_manifest(SAMPLES["every-field"])))

    assert len(scheduled.findall("cputune")) == 1 and len(unscheduled.findall("cputune")) == 1
    assert [(e.get("vcpus"), e.get("scheduler")) for e in scheduled.iterfind("cputune/vcpusched")] == [("0-7", "idle")]
    assert unscheduled.find("cputune/vcpusched") is None, "the agent's scheduler setting is modelled: it follows"
    assert scheduled.findtext("cputune/shares") == unscheduled.findtext("cputune/shares") == "512", \
        "a cputune setting the operator does not model is someone else's: kept"


def test_sizing_reads_memory_in_kib_and_the_online_vcpus_as_libvirt_statistics_name_them() -> None:
    definition = DomainDefinition.from_xml(render_manifest(SAMPLES["every-field"]))
    definition.vcpus_online = 1
    definition.current_memory, definition.current_memory_unit = 1, "GiB"
    sizing = definition.sizing
    assert sizing["balloon.maximum"] == definition.memory_kib > 0
    assert sizing["balloon.current"] == 1024**2
    assert (sizing["vcpu.maximum"], sizing["vcpu.current"]) == (definition.vcpus, 1)


def test_another_drivers_seclabel_on_a_disk_stays_beside_the_operators_dac_label() -> None:
    rendered = render_manifest(SAMPLES["every-field"])
    live = etree.fromstring(rendered.encode())
    for source in live.iterfind("devices/disk/source"):
        source.insert(0, etree.fromstring("<seclabel model='selinux' relabel='no'/>"))

    merged = assert_valid(merge(etree.tostring(live, encoding="unicode"), rendered))

    sources = merged.findall("devices/disk/source")
    assert [s.find("seclabel[@model='selinux']") is not None for s in sources] == [True] * len(sources)
    wanted = [s.find("seclabel[@model='dac']") is not None for s in etree.fromstring(rendered.encode()).iterfind(
        "devices/disk/source")]
    assert [s.find("seclabel[@model='dac'][@relabel='no']") is not None for s in sources] == wanted
    assert any(wanted), "the sample shares a file read-only"
