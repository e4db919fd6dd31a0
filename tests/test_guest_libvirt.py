"""Guest against real libvirt: every sample defines (test driver and qemu:///system, validate flag),
provisioning through the storage API with rollback, deletion of owned volumes only, lifecycle
helpers, and a real QEMU guest booting from a cloned disk with a cloud-init seed."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import http.server
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

from libvirt_operator import guest
from libvirt_operator.counted_calls import Counted
from libvirt_operator.disk_plan import ResolvedDisk, http_cache_name, owned_volume_name, seed_volume_name
from libvirt_operator.domain_xml import DomainDefinition, console_log_path, merge
from libvirt_operator.guest import Guest
from libvirt_operator.storage import delete_owned_volumes, provision_disks
from libvirt_operator.model import AgentSettings, OwnerMetadata, VMRef
from libvirt_operator.spec import SpecError, parse_spec, spec_hash
from lvo_testing.libvirt_env import DEFAULT_POOL, DEFAULT_POOL_PATH, GuestImage
from test_foundation_libvirt import wait_for_line
from test_guest_xml import SAMPLES, render_manifest

pytestmark = pytest.mark.libvirt

libvirt.registerErrorHandler(lambda _ctx, _error: None, None)


@pytest.fixture
def test_conn(test_uri: str) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(test_uri)
    yield conn
    conn.close()


@pytest.fixture
def conn(system_uri: str) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(system_uri)
    yield conn
    conn.close()


@pytest.fixture
def settings(tmp_path: Path) -> AgentSettings:
    return AgentSettings(
        storage_pool=DEFAULT_POOL, storage_pool_path=DEFAULT_POOL_PATH, state_dir=tmp_path / "state",
        console_log_dir=tmp_path / "console", allowed_roots=(Path("/var/lib/libvirt"), tmp_path),
        download_policy=dataclasses.replace(AgentSettings().download_policy,
                                            allowed_networks=("127.0.0.0/8",)),  # the tests' own image server
        allowed_networks=("*",), allowed_bridges=("*",), allowed_pools=("*",), allow_user_networking=True,
    )


def _pool_volumes(conn: libvirt.virConnect, prefix: str) -> list[str]:
    pool = conn.storagePoolLookupByName(DEFAULT_POOL)
    pool.refresh(0)
    return sorted(name for name in pool.listVolumes() if name.startswith(prefix))


@pytest.fixture
def vm(conn: libvirt.virConnect, settings: AgentSettings) -> Iterator[VMRef]:
    """A fresh VirtualMachine identity; its domain and owned volumes are removed afterwards."""
    ref = VMRef(uid=str(uuid.uuid4()), namespace="lvo-test", name=f"vm-{uuid.uuid4().hex[:8]}")
    yield ref
    for dom in conn.listAllDomains():
        if dom.UUIDString() == ref.uid:
            Guest(dom).destroy()
            Guest(dom).undefine()
    delete_owned_volumes(conn, ref.uid, settings)


@pytest.fixture
def isolated_network(conn: libvirt.virConnect) -> Iterator[str]:
    """A temporary, defined (not started: no iptables here) libvirt network; qemu:///system may have no `default`."""
    name = f"lvo{uuid.uuid4().hex[:8]}"
    network = conn.networkDefineXML(etree.tostring(
        etree.fromstring(f"<network><name>{name}</name><bridge name='{name}'/></network>"), encoding="unicode"))
    yield name
    network.undefine()


@pytest.fixture
def shared_volume(conn: libvirt.virConnect) -> Iterator[str]:
    """A volume nobody owns, for `volume:` disks; it must survive VM deletion."""
    name = f"lvo-test-shared-{uuid.uuid4().hex[:8]}.qcow2"
    volume = conn.storagePoolLookupByName(DEFAULT_POOL).createXML(
        f"<volume><name>{name}</name><capacity>1048576</capacity><target><format type='qcow2'/></target></volume>", 0)
    yield name
    volume.delete(0)


@dataclasses.dataclass
class ServedImage:
    url: str
    sha256: str

    @property
    def cache_volume(self) -> str:
        return http_cache_name(self.sha256)


@pytest.fixture
def served_image(conn: libvirt.virConnect, tmp_path: Path) -> Iterator[ServedImage]:
    """A small qcow2 served by a local HTTP server; its per-node cache volume is removed afterwards."""
    root = tmp_path / "www"
    root.mkdir()
    image = root / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    with serving(conn, image) as served:
        yield served


@contextlib.contextmanager
def serving(conn: libvirt.virConnect, image: Path) -> Iterator[ServedImage]:
    """`image` served over HTTP on loopback; the per-node cache volume made of it is removed afterwards."""
    root = image.parent
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served = ServedImage(f"http://127.0.0.1:{server.server_address[1]}/{image.name}",
                         hashlib.sha256(image.read_bytes()).hexdigest())
    try:
        yield served
    finally:
        server.shutdown()
    for name in _pool_volumes(conn, served.cache_volume):
        conn.storagePoolLookupByName(DEFAULT_POOL).storageVolLookupByName(name).delete(0)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _on_system_network(manifest: dict[str, Any], network: str) -> dict[str, Any]:
    spec = dict(manifest["spec"])
    spec["interfaces"] = [
        {**nic, "network": network} if "network" in nic else nic for nic in spec.get("interfaces", [])
    ]
    return {**manifest, "spec": spec}


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_defines_on_the_test_driver(test_conn: libvirt.virConnect, name: str) -> None:
    uid = str(uuid.uuid4())
    defined = Guest.define(test_conn, render_manifest(SAMPLES[name], uid=uid))
    facts = DomainDefinition.from_xml(defined.domain.XMLDesc(0))
    assert facts.uuid == uid and facts.owner.uid == uid
    assert sorted(d.name for d in facts.disks) == sorted(d["name"] for d in SAMPLES[name]["spec"].get("disks", []))


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_defines_on_qemu_system(conn: libvirt.virConnect, isolated_network: str, name: str) -> None:
    uid = str(uuid.uuid4())
    manifest = _on_system_network(SAMPLES[name], isolated_network)
    defined = Guest.define(conn, render_manifest(manifest, uid=uid, namespace=f"lvo-test-{uid[:8]}"))
    try:
        live = defined.persistent_xml()
        assert DomainDefinition.from_xml(live).owner.uid == uid
        again = merge(live, render_manifest(manifest, uid=uid, namespace=f"lvo-test-{uid[:8]}"))
        assert Guest.define(conn, again).uuid == uid, "a merged rewrite defines too"
    finally:
        defined.undefine()


def _provision(conn: libvirt.virConnect, spec: dict[str, Any], vm: VMRef, settings: AgentSettings,
               secrets: dict[str, str] | None = None) -> list[ResolvedDisk]:
    return provision_disks(conn, parse_spec(spec), vm, settings, user_data_lookup=(secrets or {}).get)


def _volume_xml(conn: libvirt.virConnect, path: str) -> etree._Element:
    return etree.fromstring(conn.storageVolLookupByPath(path).XMLDesc(0).encode())


def test_provisioning_creates_owned_volumes_reuses_them_and_deletion_spares_shared_ones(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, guest_image: GuestImage, shared_volume: str,
    served_image: ServedImage,
) -> None:
    spec = {"memory": "64Mi", "disks": [
        {"name": "root", "image": {"path": str(guest_image.disk), "clone": True}},
        {"name": "data", "bus": "scsi", "emptyDisk": {"size": "5Mi"}},
        {"name": "seed", "cloudInit": {"userData": "#cloud-config\nhostname: a\n", "networkData": "version: 2\n"}},
        {"name": "seed2", "cloudInit": {"userDataSecretRef": {"name": "ud"}}},
        {"name": "shared", "volume": {"pool": DEFAULT_POOL, "name": shared_volume}},
        {"name": "os", "http": {"url": served_image.url, "sha256": served_image.sha256}},
        {"name": "base", "readOnly": True, "image": {"path": str(guest_image.disk)}},
    ]}
    disks = _provision(conn, spec, vm, settings, {"ud": "#cloud-config\nfrom: secret\n"})

    by_name = {disk.name: disk for disk in disks}
    root = _volume_xml(conn, by_name["root"].path)
    assert root.findtext("backingStore/path") == str(guest_image.disk)
    assert root.find("target/format").get("type") == "qcow2"
    assert int(_volume_xml(conn, by_name["data"].path).findtext("capacity")) == 5 * 2**20
    assert (by_name["shared"].kind, by_name["shared"].volume, by_name["shared"].format) == ("volume", shared_volume, "qcow2")
    assert _volume_xml(conn, by_name["os"].path).findtext("backingStore/path").endswith(served_image.cache_volume)
    assert (by_name["base"].path, by_name["base"].format, by_name["base"].owned) == (str(guest_image.disk), "qcow2", False)
    assert by_name["seed"].device == "cdrom" and Path(by_name["seed2"].path).read_bytes().find(b"from: secret") >= 0
    owned = _pool_volumes(conn, f"{vm.uid}-")
    assert owned == sorted(owned_volume_name(vm.uid, n) for n in ("root", "data", "os")) + sorted(
        seed_volume_name(vm.uid, n) for n in ("seed", "seed2"))

    assert _provision(conn, spec, vm, settings, {"ud": "x"}) == disks, "a second run reuses what exists"
    assert _pool_volumes(conn, f"{vm.uid}-") == owned

    assert sorted(delete_owned_volumes(conn, vm.uid, settings)) == owned
    assert _pool_volumes(conn, f"{vm.uid}-") == []
    assert guest_image.disk.exists()
    assert _pool_volumes(conn, shared_volume) == [shared_volume]
    assert _pool_volumes(conn, served_image.cache_volume) == [served_image.cache_volume]


def test_a_checksum_mismatch_fails_before_use_and_leaves_nothing(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, served_image: ServedImage,
) -> None:
    spec = {"memory": "64Mi", "disks": [
        {"name": "data", "emptyDisk": {"size": "1Mi"}},
        {"name": "os", "http": {"url": served_image.url, "sha256": "0" * 64}},
    ]}
    with pytest.raises(SpecError) as error:
        _provision(conn, spec, vm, settings)
    assert error.value.field == "spec.disks[1].http.sha256"
    assert served_image.sha256 in error.value.message
    assert _pool_volumes(conn, f"{vm.uid}-") == []
    assert _pool_volumes(conn, http_cache_name("0" * 64)) == []
    assert list((settings.state_dir / "downloads").iterdir()) == []


FAILURES = [
    ("pool", {"disks": [{"name": "a", "emptyDisk": {"size": "1Mi"}}]}, "spec.disks[0]"),
    ("network", {"interfaces": [{"name": "n", "network": "lvo-no-such-network"}]}, "spec.interfaces[0].network"),
    ("bridge", {"interfaces": [{"name": "n", "bridge": "lvonobr0"}]}, "spec.interfaces[0].bridge"),
    ("volume-pool", {"disks": [{"name": "v", "volume": {"pool": "lvo-no-such-pool", "name": "x"}}]}, "spec.disks[1].volume.pool"),
    ("volume-name", {"disks": [{"name": "v", "volume": {"pool": DEFAULT_POOL, "name": "lvo-no-such"}}]}, "spec.disks[1].volume.name"),
    ("secret", {"disks": [{"name": "s", "cloudInit": {"userDataSecretRef": {"name": "gone"}}}]}, "spec.disks[1].cloudInit.userDataSecretRef.name"),
    ("image", {"disks": [{"name": "i", "image": {"path": "/var/lib/libvirt/images/lvo-no-such.qcow2", "clone": True}}]}, "spec.disks[1].image.path"),
    ("outside", {"disks": [{"name": "i", "image": {"path": "/etc/passwd"}}]}, "spec.disks[1].image.path"),
]


@pytest.mark.parametrize(("case", "extra", "field"), FAILURES, ids=[case for case, _, _ in FAILURES])
def test_missing_things_fail_naming_the_field_and_leave_no_volumes(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, case: str, extra: dict[str, Any], field: str,
) -> None:
    first = [] if case == "pool" else [{"name": "made-first", "emptyDisk": {"size": "1Mi"}}]
    spec = {"memory": "64Mi", "disks": first + extra.get("disks", []), "interfaces": extra.get("interfaces", [])}
    if case == "pool":
        settings = dataclasses.replace(settings, storage_pool="lvo-no-such-pool")
    with pytest.raises(SpecError) as error:
        guest.provision_and_define(conn, parse_spec(spec), vm, settings, generation=1, spec_hash=spec_hash(spec),
                                   user_data_lookup={}.get, existing_xml=None)
    assert error.value.field == field
    assert _pool_volumes(conn, f"{vm.uid}-") == []
    assert vm.uid not in {dom.UUIDString() for dom in conn.listAllDomains()}


def test_a_refused_definition_deletes_the_volumes_it_made(conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings) -> None:
    squatter = conn.defineXML(f"<domain type='qemu'><name>{vm.domain_name}</name><memory>65536</memory>"
                              "<os><type arch='x86_64'>hvm</type></os></domain>")
    spec = {"memory": "64Mi", "disks": [{"name": "data", "emptyDisk": {"size": "1Mi"}}]}
    try:
        with pytest.raises(libvirt.libvirtError):
            guest.provision_and_define(conn, parse_spec(spec), vm, settings, generation=1, spec_hash="h",
                                       user_data_lookup={}.get, existing_xml=None)
        assert _pool_volumes(conn, f"{vm.uid}-") == []
    finally:
        squatter.undefine()


def test_lifecycle_calls_tolerate_the_state_they_ask_for(test_conn: libvirt.virConnect) -> None:
    uid = str(uuid.uuid4())
    defined = Guest.define(test_conn, render_manifest(SAMPLES["minimal"], uid=uid))
    states: list[int] = []
    for step in (defined.start, defined.start, defined.suspend, defined.resume, defined.resume, defined.reset,
                 defined.shutdown, defined.destroy, defined.destroy):
        step()
        states.append(defined.domain.state()[0])
    assert states == [libvirt.VIR_DOMAIN_RUNNING] * 2 + [libvirt.VIR_DOMAIN_PAUSED] + [libvirt.VIR_DOMAIN_RUNNING] * 3 + [
        libvirt.VIR_DOMAIN_SHUTOFF] * 3
    for step in (guest.start, guest.suspend, guest.resume, guest.shutdown, guest.destroy):  # the agent's calls
        step(test_conn, uid)
    assert not defined.is_active()
    defined.undefine()
    assert uid not in {d.UUIDString() for d in test_conn.listAllDomains()}


def test_a_new_domain_is_defined_and_started_in_four_calls_and_a_start_by_someone_else_counts(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings,
) -> None:
    """The agent's job for a new VM: two lookups that find no domain (its own, a namesake), the
    define, the create; no lookup or state query of the domain it just defined. When someone else
    started the domain in between, libvirt's "already running" counts as started."""
    calls: list[str] = []
    counted = Counted(conn, lambda name, uuids=(), seconds=0.0: calls.append(name))
    raw = {"domainType": "qemu", "memory": "64Mi"}  # no OS: SeaBIOS finds nothing to boot and idles
    owner = OwnerMetadata(uid=vm.uid, namespace=vm.namespace, name=vm.name, generation=1, spec_hash=spec_hash(raw))
    guest.apply_definition_and_start(counted, parse_spec(raw), vm, settings, owner, {}.get, False)
    assert calls == ["lookupByUUIDString", "lookupByName", "defineXMLFlags", "create"]
    assert conn.lookupByUUIDString(vm.uid).isActive()

    assert guest.apply_definition_and_start(counted, parse_spec(raw), vm, settings, owner, {}.get, False) is None
    assert conn.lookupByUUIDString(vm.uid).isActive()


def test_a_start_that_fails_after_its_define_is_returned_and_the_definition_stands(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, tmp_path: Path,
) -> None:
    """QEMU refuses a kernel that is not one: the define succeeded, so the caller must learn both."""
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"not a kernel\n" * 64)
    raw = {"domainType": "qemu", "memory": "64Mi", "kernelBoot": {"kernel": str(not_a_kernel)}}
    owner = OwnerMetadata(uid=vm.uid, namespace=vm.namespace, name=vm.name, generation=1, spec_hash=spec_hash(raw))
    error = guest.apply_definition_and_start(conn, parse_spec(raw), vm, settings, owner, {}.get, False)
    assert isinstance(error, libvirt.libvirtError)
    dom = conn.lookupByUUIDString(vm.uid)
    assert dom.isPersistent() and not dom.isActive()


def test_a_qemu_guest_boots_from_a_cloned_disk_with_a_cloud_init_seed(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, guest_image: GuestImage,
) -> None:
    marker = uuid.uuid4().hex[:8]
    raw = {
        "domainType": "qemu", "memory": "256Mi", "console": {"log": True},
        "kernelBoot": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                       "cmdline": guest_image.cmdline(marker=marker)},
        "disks": [
            {"name": "root", "bus": "virtio", "bootOrder": 1, "image": {"path": str(guest_image.disk), "clone": True}},
            # virtio: the test initramfs looks for disks one second after loading drivers, too soon for SATA under TCG
            {"name": "seed", "bus": "virtio", "cloudInit": {"userDataSecretRef": {"name": "ud"}}},
        ],
        "interfaces": [{"name": "nic", "user": {}}],
    }
    xml = guest.provision_and_define(conn, parse_spec(raw), vm, settings, generation=1, spec_hash=spec_hash(raw),
                                     user_data_lookup={"ud": f"#cloud-config lvo-{marker}\nusers: []\n"}.get,
                                     existing_xml=None).xml
    assert DomainDefinition.from_xml(xml).owner.uid == vm.uid
    guest.start(conn, vm.uid)
    log = console_log_path(vm, settings)
    content = wait_for_line(log, f"LVO-GUEST-READY {marker}", timeout=90)
    assert f"LVO-GUEST-BOOTED {marker}" in content
    assert f"LVO-DISK vda {guest_image.disk_marker}" in content, content
    assert f"LVO-CIDATA #cloud-config lvo-{marker}" in content, content

    guest.shutdown(conn, vm.uid)
    wait_for_line(log, "reboot: Power down", timeout=60)
    Guest.lookup(conn, vm.uid).destroy()
    Guest.lookup(conn, vm.uid).undefine()
    assert sorted(delete_owned_volumes(conn, vm.uid, settings)) == sorted(
        [owned_volume_name(vm.uid, "root"), seed_volume_name(vm.uid, "seed")])
    assert guest_image.disk.exists()


def _thread_policies(pid: int) -> dict[str, int]:
    """QEMU's threads (named: the domain runs with debug-threads=on) -> their scheduling policy."""
    policies = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        policies[(task / "comm").read_text().strip()] = os.sched_getscheduler(int(task.name))
    return policies


@pytest.mark.parametrize(("scheduler", "policy"), [("idle", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)])
def test_the_agents_vcpu_scheduler_reaches_the_guests_vcpu_threads_only(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, guest_image: GuestImage, scheduler: str, policy: int,
) -> None:
    raw = {"domainType": "qemu", "memory": "128Mi", "cpu": {"cores": 2},
           "kernelBoot": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                          "cmdline": guest_image.cmdline(marker="sched")}}
    settings = dataclasses.replace(settings, guest_vcpu_scheduler=scheduler)
    guest.provision_and_define(conn, parse_spec(raw), vm, settings, generation=1, spec_hash=spec_hash(raw),
                               user_data_lookup={}.get, existing_xml=None)
    guest.start(conn, vm.uid)
    pid = int(Path(f"/run/libvirt/qemu/{vm.domain_name}.pid").read_text())

    policies = _thread_policies(pid)

    vcpus = {name: value for name, value in policies.items() if name.startswith("CPU ")}
    assert sorted(vcpus) == ["CPU 0/TCG", "CPU 1/TCG"] and set(vcpus.values()) == {policy}, policies
    assert {value for name, value in policies.items() if name not in vcpus} == {os.SCHED_OTHER}, \
        "QEMU's own threads (main loop, monitor) keep the normal policy"


OUTSIDE_EDITS = {  # parent in the domain XML: an element no field of the operator models
    "features": "<pmu state='off'/>",
    "features/": "<hyperv mode='custom'><relaxed state='on'/></hyperv>",
    "os": "<bootmenu enable='yes' timeout='3000'/>",
    "devices": "<watchdog model='i6300esb' action='poweroff'/>",
    "devices/": "<channel type='unix'><target type='virtio' name='org.example.agent.0'/></channel>",
}


def _edited_outside(xml: str) -> str:
    """`xml` as someone left it with `virsh edit`: a `<features>` flag, an `<os>` child, devices the operator
    does not make, and an attribute the operator does not model on a disk it does."""
    root = etree.fromstring(xml.encode())
    for parent, element in OUTSIDE_EDITS.items():
        root.find(parent.rstrip("/")).append(etree.fromstring(element))
    root.xpath("devices/disk[alias/@name='ua-disk-root']/driver")[0].set("cache", "none")
    return etree.tostring(root, encoding="unicode")


def _outside_edits(xml: str) -> dict[str, bool]:
    root = etree.fromstring(xml.encode())
    return {path: len(root.xpath(path)) == 1 for path in (
        "features/pmu[@state='off']", "features/hyperv/relaxed[@state='on']", "os/bootmenu[@enable='yes']",
        "devices/watchdog[@model='i6300esb']", "devices/channel/target[@name='org.example.agent.0']",
        "devices/disk[alias/@name='ua-disk-root']/driver[@cache='none']")}


def test_a_domain_edited_outside_the_modelled_fields_keeps_the_edits_across_a_spec_change_and_a_redefine(
    conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings,
) -> None:
    """Edits nobody asked the operator for survive its redefine; what the spec says (memory, vCPUs, disks,
    interfaces, boot order, firmware) follows the spec, whatever libvirt filled in for the old one (a
    `<boot dev='hd'/>` it refuses beside a disk's boot order, the UEFI loader it picked)."""
    before = {"domainType": "qemu", "memory": "64Mi", "cpu": {"cores": 1}, "firmware": "uefi",
              "disks": [{"name": "root", "emptyDisk": {"size": "1Mi"}}, {"name": "old", "emptyDisk": {"size": "1Mi"}}],
              "interfaces": [{"name": "nic", "user": {}, "model": "e1000"}]}
    after = {**before, "memory": "128Mi", "cpu": {"cores": 2}, "firmware": "bios",
             "disks": [{"name": "root", "bootOrder": 1, "emptyDisk": {"size": "1Mi"}}, {"name": "new", "bus": "scsi",
                                                                        "emptyDisk": {"size": "2Mi"}}],
             "interfaces": [{"name": "nic", "user": {}, "model": "virtio"}, {"name": "second", "user": {}}]}

    def apply(raw: dict[str, Any], generation: int) -> DomainDefinition:
        owner = OwnerMetadata(uid=vm.uid, namespace=vm.namespace, name=vm.name, generation=generation,
                              spec_hash=spec_hash(raw))
        guest.apply_definition(conn, parse_spec(raw), vm, settings, owner, {}.get)
        return DomainDefinition.from_xml(Guest.lookup(conn, vm.uid).persistent_xml())

    assert apply(before, 1).boot_devices, "libvirt adds <boot dev='hd'/> where no disk has a boot order"
    conn.defineXML(_edited_outside(Guest.lookup(conn, vm.uid).persistent_xml()))
    defined = apply(after, 2)

    assert all(_outside_edits(defined.to_xml()).values()), _outside_edits(defined.to_xml())
    assert (defined.memory_kib, defined.vcpus, defined.owner.generation) == (128 * 1024, 2, 2)
    assert [(disk.name, disk.bus) for disk in defined.disks] == [("root", "virtio"), ("new", "scsi")]
    assert [(nic.name, nic.model) for nic in defined.network_interfaces] == [("nic", "virtio"), ("second", "virtio")]
    assert (defined.disks[0].boot_order, defined.boot_devices, defined.firmware, defined.loader, defined.nvram) == (
        1, False, None, False, None)

    again = apply(before, 3)
    assert all(_outside_edits(again.to_xml()).values()), _outside_edits(again.to_xml())
    assert (again.memory_kib, again.vcpus, [disk.name for disk in again.disks]) == (64 * 1024, 1, ["root", "old"])
    assert (again.firmware, again.nvram) == ("efi", str(settings.state_dir / "nvram" / f"{vm.uid}_VARS.fd"))
