"""libvirt's DAC security driver as hosts run it (real libvirtd): QEMU runs as libvirt-qemu, opens only
what its domain names, and a base several VMs share is never handed over to one of them.

libvirt chowns the files a domain names to QEMU's user and gives the ones it remembers back when the
domain stops; bases VMs share are told not to be relabelled (qemu_access), so one VM's stop or
deletion cannot cut another off, and no QEMU ever owns (and could write) a base another VM reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from libvirt_operator import domain_xml, guest
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.spec import SpecError, parse_spec, spec_hash
from lvo_testing.libvirt_env import DEFAULT_POOL_PATH, GuestImage
from test_foundation_libvirt import wait_for_line
from test_guest_libvirt import conn, serving, settings  # noqa: F401 - fixtures
from test_images_libvirt import made  # noqa: F401 - fixture

pytestmark = pytest.mark.libvirt

QEMU_USER = pwd.getpwnam("libvirt-qemu")


@pytest.fixture
def make_vm(conn: libvirt.virConnect, settings: AgentSettings) -> Iterator[Callable[[], VMRef]]:
    """Fresh VirtualMachine identities; their domains and owned volumes are removed afterwards."""
    refs: list[VMRef] = []

    def make() -> VMRef:
        refs.append(VMRef(uid=str(uuid.uuid4()), namespace="lvo-test", name=f"vm-{uuid.uuid4().hex[:8]}"))
        return refs[-1]

    yield make
    for vm in refs:
        guest.undefine_and_delete(conn, vm.uid, settings)


def boot(conn: libvirt.virConnect, vm: VMRef, settings: AgentSettings, guest_image: GuestImage,
         extra: dict[str, Any], disks: list[dict[str, Any]]) -> None:
    """Defines the VM as the agent does (a kernel boot of the test guest) and starts it."""
    raw = {"domainType": "qemu", "memory": "128Mi", "console": {"log": True}, "disks": disks,
           "kernelBoot": {"kernel": str(guest_image.kernel), "initrd": str(guest_image.initrd),
                          "cmdline": guest_image.cmdline(marker=vm.name)}, **extra}
    guest.provision_and_define(conn, parse_spec(raw), vm, settings, generation=1, spec_hash=spec_hash(raw),
                               user_data_lookup={}.get, existing_xml=None)
    guest.start(conn, vm.uid)


def wait_reads_base(vm: VMRef, settings: AgentSettings, guest_image: GuestImage) -> None:
    """The guest booted and read the base's marker through its disk."""
    content = wait_for_line(domain_xml.console_log_path(vm, settings), f"LVO-GUEST-READY {vm.name}", timeout=120)
    assert f"LVO-DISK vda {guest_image.disk_marker}" in content, content


def qemu_ids(vm: VMRef) -> tuple[set[int], set[int]]:
    """The uids and gids (real, effective, saved, filesystem) of the VM's QEMU process."""
    pid = int(Path(f"/run/libvirt/qemu/{vm.domain_name}.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    ids = {key: {int(n) for n in re.search(rf"^{key}:\s+(.*)$", status, re.M).group(1).split()} for key in ("Uid", "Gid")}
    return ids["Uid"], ids["Gid"]


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_uid, stat.st_gid, stat.st_mode & 0o7777


def qemu_opens(dom: libvirt.virDomain, path: Path) -> str | None:
    """Asks the running QEMU to open `path` read-only (QMP blockdev-add): None if it could, else its error."""
    node = f"lvo-probe-{uuid.uuid4().hex[:8]}"
    command = {"execute": "blockdev-add",
               "arguments": {"driver": "file", "node-name": node, "filename": str(path), "read-only": True}}
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))
    if "error" in reply:
        return reply["error"]["desc"]
    libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": "blockdev-del", "arguments": {"node-name": node}}), 0)
    return None


def test_qemu_runs_as_libvirt_qemu_and_opens_only_what_its_domain_names(
        conn: libvirt.virConnect, settings: AgentSettings, guest_image: GuestImage, make_vm: Callable[[], VMRef],
        made: Callable[[str], Path]) -> None:
    secret, public, shared, shared_volume = made(".img"), made(".img"), made(".img"), made(".img")
    volume = conn.storagePoolLookupByName("default").createXML(  # a volume libvirt knows without a pool refresh
        f"<volume><name>{shared_volume.name}</name><capacity>{1 << 20}</capacity>"
        "<target><format type='raw'/></target></volume>", 0)
    for path, mode in ((secret, 0o600), (public, 0o644), (shared, 0o644), (shared_volume, 0o644)):
        path.write_bytes(b"LVO-NOT-FOR-THE-GUEST".ljust(1 << 20))
        os.chown(path, 0, 0)
        path.chmod(mode)
    vm = make_vm()
    boot(conn, vm, settings, guest_image, {}, [
        {"name": "root", "image": {"path": str(guest_image.disk), "clone": True}},
        {"name": "ro", "readOnly": True, "image": {"path": str(shared)}},
        {"name": "vol", "readOnly": True, "volume": {"pool": "default", "name": shared_volume.name}},
    ])
    wait_reads_base(vm, settings, guest_image)
    assert owner_and_mode(shared) == (0, 0, 0o644), "a read-only image VMs may share is not handed to QEMU's user"
    assert owner_and_mode(shared_volume) == (0, 0, 0o644), "a read-only volume VMs may share is not handed to QEMU's user"

    uids, gids = qemu_ids(vm)
    assert uids == {QEMU_USER.pw_uid} and gids == {QEMU_USER.pw_gid}, f"QEMU runs as uids {uids}, gids {gids}"
    dom = conn.lookupByUUIDString(vm.uid)
    refused = qemu_opens(dom, secret)
    assert refused is not None and "Permission denied" in refused, f"QEMU opened a root-only file it was not given: {refused}"
    assert qemu_opens(dom, public) is None, "the probe itself works: QEMU opens a file anyone may read"
    assert owner_and_mode(secret) == (0, 0, 0o600)
    volume.delete(0)


@contextlib.contextmanager
def shared_base(conn: libvirt.virConnect, guest_image: GuestImage, kind: str, made: Callable[[str], Path],
                tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path]]:
    """A copy of the test guest's base disk, root-owned, as an `image` to clone or an `http` download:
    the disk source for the spec, and the base file QEMU reads under each VM's overlay."""
    if kind == "image":
        base = made(".qcow2")
        shutil.copyfile(guest_image.disk, base)
        os.chown(base, 0, 0)
        base.chmod(0o644)
        yield {"image": {"path": str(base), "clone": True}}, base
        return
    www = tmp_path / "www"
    www.mkdir()
    shutil.copyfile(guest_image.disk, www / "base.qcow2")
    with serving(conn, www / "base.qcow2") as served:
        yield {"http": {"url": served.url, "sha256": served.sha256}}, DEFAULT_POOL_PATH / served.cache_volume


@pytest.mark.parametrize("kind", ["image", "http"])
def test_a_shared_base_serves_each_vm_whatever_the_other_does_and_keeps_its_owner(
        conn: libvirt.virConnect, settings: AgentSettings, guest_image: GuestImage, make_vm: Callable[[], VMRef],
        made: Callable[[str], Path], tmp_path: Path, kind: str) -> None:
    with shared_base(conn, guest_image, kind, made, tmp_path) as (source, base):
        first, second = make_vm(), make_vm()
        for vm in (first, second):
            boot(conn, vm, settings, guest_image, {}, [{"name": "root", **source}])
        for vm in (first, second):
            wait_reads_base(vm, settings, guest_image)
        assert owner_and_mode(base) == (0, 0, 0o644), "no QEMU owns (and could write) a base other VMs read"

        guest.destroy(conn, first.uid)
        guest.undefine_and_delete(conn, first.uid, settings)
        assert conn.lookupByUUIDString(second.uid).isActive()
        # A new QEMU process opens the whole chain again: the base must still be readable to it.
        guest.destroy(conn, second.uid)
        domain_xml.console_log_path(second, settings).unlink()
        guest.start(conn, second.uid)
        wait_reads_base(second, settings, guest_image)

        guest.destroy(conn, second.uid)
        guest.undefine_and_delete(conn, second.uid, settings)
        assert owner_and_mode(base) == (0, 0, 0o644), "the base keeps its owner and mode once both VMs are gone"


def test_a_uefi_guest_starts_with_its_nvram_in_a_state_dir_made_under_a_strict_umask(
        conn: libvirt.virConnect, settings: AgentSettings, make_vm: Callable[[], VMRef]) -> None:
    """QEMU opens the NVRAM file itself, as libvirt-qemu: the agent's directories must let it through."""
    root = Path("/var/lib/libvirt") / f"lvo-test-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(settings, state_dir=root / "state")
    vm = make_vm()
    raw = {"domainType": "qemu", "memory": "128Mi", "firmware": "uefi"}
    umask = os.umask(0o077)
    try:
        guest.provision_and_define(conn, parse_spec(raw), vm, settings, generation=1, spec_hash=spec_hash(raw),
                                   user_data_lookup={}.get, existing_xml=None)
        guest.start(conn, vm.uid)
        assert conn.lookupByUUIDString(vm.uid).isActive()
        assert domain_xml.nvram_path(vm.uid, settings).exists()
    finally:
        os.umask(umask)
        guest.undefine_and_delete(conn, vm.uid, settings)
        shutil.rmtree(root, ignore_errors=True)


def test_a_shared_image_qemu_cannot_read_is_refused_naming_the_field(
        conn: libvirt.virConnect, settings: AgentSettings, guest_image: GuestImage, make_vm: Callable[[], VMRef],
        made: Callable[[str], Path]) -> None:
    """libvirt is told not to relabel a base VMs share, so one only root may read is refused before QEMU starts."""
    base = made(".qcow2")
    shutil.copyfile(guest_image.disk, base)
    base.chmod(0o600)
    vm = make_vm()
    with pytest.raises(SpecError) as error:
        boot(conn, vm, settings, guest_image, {}, [{"name": "root", "image": {"path": str(base), "clone": True}}])
    assert error.value.field == "spec.disks[0].image.path"
    assert f"uid {QEMU_USER.pw_uid}" in error.value.message and "cannot read" in error.value.message
    assert owner_and_mode(base) == (0, 0, 0o600)
