"""Disk files a spec names reach QEMU only inspected, with their format pinned (real libvirtd and qemu-img).

A qcow2 header can make QEMU open any host file (a backing file, an external data file). Each image
here is built with qemu-img the way an attacker would, inside the allowed root, and must be refused
naming the field, leaving no domain and no volume; a legitimate clone runs with its chain pinned.
"""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from libvirt_operator import guest
from libvirt_operator.disk_plan import owned_volume_name
from libvirt_operator.metadata import parse
from libvirt_operator.storage import seed_iso
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.spec import SpecError, parse_spec, spec_hash
from lvo_testing.libvirt_env import DEFAULT_POOL, DEFAULT_POOL_PATH
from test_guest_libvirt import ServedImage, _pool_volumes, conn, served_image, settings, vm  # noqa: F401 - fixtures

pytestmark = pytest.mark.libvirt


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A host file outside every allowed root that no VM may read."""
    path = Path("/root") / f"lvo-secret-{uuid.uuid4().hex[:8]}"
    path.write_bytes(b"TOP-SECRET" * 1000)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def made() -> Iterator[Callable[[str], Path]]:
    """Paths for test images inside the pool directory (an allowed root), removed afterwards."""
    paths: list[Path] = []

    def path(suffix: str) -> Path:
        paths.append(DEFAULT_POOL_PATH / f"lvo-test-{uuid.uuid4().hex[:8]}{suffix}")
        return paths[-1]

    yield path
    for p in paths:
        p.unlink(missing_ok=True)


def define(conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, disks: list[dict[str, Any]],
           *, domain_active: bool = False) -> guest.Definition:
    spec = {"memory": "64Mi", "domainType": "qemu", "disks": disks}
    return guest.provision_and_define(conn, parse_spec(spec), vm, settings, generation=1, spec_hash=spec_hash(spec),
                                      user_data_lookup={}.get, existing_xml=None, domain_active=domain_active)


def evil_images(made: Callable[[str], Path], secret: Path) -> dict[str, tuple[Path, dict[str, Any], str]]:
    """name -> (file, extra image fields, what the refusal says)."""
    backing = made(".qcow2")
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(backing))
    data_file = made(".qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={made('.data')}", str(data_file), "1M")
    header_in_raw = made(".img")
    header_in_raw.write_bytes(backing.read_bytes())
    vmdk = made(".vmdk")
    qemu_img("create", "-f", "vmdk", str(vmdk), "1M")
    return {
        "backing file": (backing, {}, "has a backing file"),
        "backing file, said qcow2": (backing, {"format": "qcow2"}, "has a backing file"),
        "data file": (data_file, {}, "external file"),
        "qcow2 header in a raw file": (header_in_raw, {"format": "raw"}, "not raw"),
        "another format": (vmdk, {}, "vmdk"),
    }


CASES = ["backing file", "backing file, said qcow2", "data file", "qcow2 header in a raw file", "another format"]


@pytest.mark.parametrize("clone", [True, False], ids=["clone", "direct"])
@pytest.mark.parametrize("case", CASES)
def test_an_image_that_would_open_another_file_is_refused_naming_the_field(
        conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, made: Callable[[str], Path], secret: Path,
        case: str, clone: bool) -> None:
    path, extra, said = evil_images(made, secret)[case]
    with pytest.raises(SpecError) as error:
        define(conn, vm, settings, [{"name": "root", "image": {"path": str(path), "clone": clone, **extra}}])
    assert error.value.field == "spec.disks[0].image.path"
    assert said in error.value.message, error.value.message
    assert vm.uid not in {dom.UUIDString() for dom in conn.listAllDomains()}
    assert _pool_volumes(conn, f"{vm.uid}-") == []


def test_a_volume_with_a_backing_file_is_refused(conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings,
                                                 made: Callable[[str], Path], secret: Path) -> None:
    path = made(".qcow2")
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(path))
    conn.storagePoolLookupByName(DEFAULT_POOL).refresh(0)
    with pytest.raises(SpecError) as error:
        define(conn, vm, settings, [{"name": "v", "volume": {"pool": DEFAULT_POOL, "name": path.name}}])
    assert error.value.field == "spec.disks[0].volume.name" and "backing file" in error.value.message


def test_a_clone_runs_with_its_chain_pinned_and_a_raw_image_stays_raw(
        conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, made: Callable[[str], Path]) -> None:
    base = made(".qcow2")
    qemu_img("create", "-f", "qcow2", str(base), "8M")
    raw = made(".img")
    raw.write_bytes(b"\0" * 1024 * 1024)
    definition = define(conn, vm, settings, [{"name": "root", "image": {"path": str(base), "clone": True}},
                                             {"name": "plain", "image": {"path": str(raw)}}])
    definition.guest.domain.create()
    try:
        live = parse(definition.guest.domain.XMLDesc(0))
        root, plain = live.findall("devices/disk")
        assert root.find("driver").get("type") == "qcow2"
        chain = root.find("backingStore")
        assert chain.find("source").get("file") == str(base) and chain.find("format").get("type") == "qcow2"
        assert chain.find("backingStore") is not None and len(chain.find("backingStore")) == 0, "chain not closed"
        assert plain.find("driver").get("type") == "raw" and not len(plain.find("backingStore"))
    finally:
        definition.guest.domain.destroy()


def virtual_size(path: str) -> int:
    import json
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)["virtual-size"]


def backing_of(path: str) -> str | None:
    import json
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)
    return info.get("backing-filename")


def test_owned_disks_follow_the_spec_at_the_next_boot_and_never_shrink(
        conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, made: Callable[[str], Path]) -> None:
    first, second = made(".qcow2"), made(".qcow2")
    for base in (first, second):
        qemu_img("create", "-f", "qcow2", str(base), "8M")
    data = str(DEFAULT_POOL_PATH / owned_volume_name(vm.uid, "data"))
    root = str(DEFAULT_POOL_PATH / owned_volume_name(vm.uid, "root"))

    def disks(base: Path, size: str) -> list[dict[str, Any]]:
        return [{"name": "root", "image": {"path": str(base), "clone": True}}, {"name": "data", "emptyDisk": {"size": size}}]

    define(conn, vm, settings, disks(first, "16Mi"))
    assert virtual_size(data) == 16 << 20 and backing_of(root) == str(first)
    # While a guest runs its disks stay (a restart applies the change: RestartRequired until then) ...
    define(conn, vm, settings, disks(second, "32Mi"), domain_active=True)
    assert virtual_size(data) == 16 << 20 and backing_of(root) == str(first)
    # ... and at its next boot the overlay is new over the new base, the empty disk grown.
    define(conn, vm, settings, disks(second, "32Mi"))
    assert virtual_size(data) == 32 << 20 and backing_of(root) == str(second)
    with pytest.raises(SpecError) as error:
        define(conn, vm, settings, disks(second, "16Mi"))
    assert error.value.field == "spec.disks[1].emptyDisk.size" and "never shrinks" in error.value.message
    assert virtual_size(data) == 32 << 20


def test_cdroms_hold_an_iso_or_a_download_read_only_and_refuse_a_trick_image(
        conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, made: Callable[[str], Path], secret: Path,
        served_image: ServedImage) -> None:
    iso = made(".iso")
    iso.write_bytes(seed_iso("#cloud-config\n", "instance-id: x\n", None))
    settings = dataclasses.replace(settings, download_policy=dataclasses.replace(
        settings.download_policy, allowed_networks=("127.0.0.0/8",)))
    definition = define(conn, vm, settings, [
        {"name": "installer", "cdrom": {"image": {"path": str(iso), "format": "raw"}}},
        {"name": "drivers", "bus": "scsi", "cdrom": {"http": {"url": served_image.url, "sha256": served_image.sha256}}}])
    definition.guest.domain.create()
    try:
        installer, drivers = parse(definition.guest.domain.XMLDesc(0)).findall("devices/disk")
        for disk, bus, fmt in ((installer, "sata", "raw"), (drivers, "scsi", "qcow2")):
            assert (disk.get("device"), disk.find("target").get("bus"), disk.find("driver").get("type")) == (
                "cdrom", bus, fmt)
            assert disk.find("readonly") is not None
        assert installer.find("source").get("file") == str(iso)
        assert drivers.find("backingStore/source").get("file").endswith(served_image.cache_volume)
    finally:
        definition.guest.domain.destroy()
        guest.undefine_and_delete(conn, vm.uid, settings)
    trick = made(".iso")
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(trick))
    with pytest.raises(SpecError) as error:
        define(conn, vm, settings, [{"name": "cd", "cdrom": {"image": {"path": str(trick)}}}])
    assert error.value.field == "spec.disks[0].cdrom.image.path" and "backing file" in error.value.message
