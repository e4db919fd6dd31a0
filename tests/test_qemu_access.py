"""What QEMU's user may read, worked out from the DAC driver's identity in libvirt's capabilities and mode bits."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_operator import qemu_access
from libvirt_operator.qemu_access import QemuIdentity, can_read, identity_from_capabilities, make_reachable_dir
from libvirt_operator.spec import SpecError

pytestmark = pytest.mark.unit

CAPABILITIES = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+999:+995</baselabel><baselabel type='qemu'>+998:+994</baselabel></secmodel>
</host></capabilities>"""
NOBODY_KNOWN = QemuIdentity(uid=54321, gid=54321)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory every user may pass through (pytest's tmp_path sits under a 0700 one)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as name:
        Path(name).chmod(0o711)
        yield Path(name)


def test_the_identity_is_the_dac_base_label_of_the_domain_type() -> None:
    assert identity_from_capabilities(CAPABILITIES, "kvm") == QemuIdentity(999, 995)
    assert identity_from_capabilities(CAPABILITIES, "qemu") == QemuIdentity(998, 994)
    assert identity_from_capabilities("<capabilities><host/></capabilities>", "qemu") is None


@pytest.mark.parametrize(("owner", "mode", "readable"), [
    ((0, 0), 0o644, True), ((0, 0), 0o600, False), ((0, 54321), 0o640, True), ((54321, 0), 0o400, True),
    ((54321, 0), 0o044, False),  # the owner's bits alone count for the owner
])
def test_a_file_is_readable_by_its_mode_bits(reachable_dir: Path, owner: tuple[int, int], mode: int,
                                             readable: bool) -> None:
    path = reachable_dir / "image"
    path.write_bytes(b"x")
    os.chown(path, *owner)
    path.chmod(mode)
    assert can_read(NOBODY_KNOWN, str(path)) is readable
    reachable_dir.chmod(0o700)
    assert not can_read(NOBODY_KNOWN, str(path)), "a directory it cannot pass hides the file"
    assert can_read(QemuIdentity(0, 0), str(path))


def test_an_unreadable_file_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as error:
        qemu_access.require_readable(NOBODY_KNOWN, str(tmp_path / "missing"), "spec.disks[0].image.path")
    assert error.value.field == "spec.disks[0].image.path" and "uid 54321" in error.value.message
    qemu_access.require_readable(None, str(tmp_path / "missing"), "spec.disks[0].image.path")  # no DAC driver


def test_directories_made_for_qemu_can_be_passed_whatever_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0o077)
    try:
        make_reachable_dir(tmp_path / "state" / "nvram")
    finally:
        os.umask(umask)
    assert [(tmp_path / d).stat().st_mode & 0o777 for d in ("state", "state/nvram")] == [0o711, 0o711]


SEAL = ("import sys; from libvirt_operator.qemu_access import QemuIdentity, seal_shared_base; "
        "seal_shared_base(sys.argv[1], QemuIdentity(54321, 54321), 'spec.disks[0].http.url')")


def seal_in_agent(base: Path, *without_capabilities: str) -> subprocess.CompletedProcess[str]:
    """`seal_shared_base` in a root process without `without_capabilities`, as the DaemonSet's agent runs."""
    drop = ["setpriv", f"--bounding-set=-{',-'.join(without_capabilities)}"] if without_capabilities else []
    return subprocess.run([*drop, sys.executable, "-c", SEAL, str(base)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_an_http_base_a_relabel_left_to_qemu_is_taken_back_or_refused(reachable_dir: Path) -> None:
    base = reachable_dir / "http-base"
    base.write_bytes(b"base")
    os.chown(base, NOBODY_KNOWN.uid, NOBODY_KNOWN.gid)
    base.chmod(0o644)
    refused = seal_in_agent(base, "chown", "fowner")
    assert refused.returncode != 0 and "spec.disks[0].http.url" in refused.stderr and "vol-delete" in refused.stderr
    assert os.stat(base).st_uid == NOBODY_KNOWN.uid, "the base stays QEMU's: the agent could not take it back"
    taken_back = seal_in_agent(base)
    assert taken_back.returncode == 0, taken_back.stderr
    stat = os.stat(base)
    assert (stat.st_uid, stat.st_mode & 0o7777) == (os.geteuid(), 0o644)
