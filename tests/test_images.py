"""images.py's rules on files made here with qemu-img, and what happens without qemu-img at all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from libvirt_operator import images
from libvirt_operator.spec import SpecError

pytestmark = pytest.mark.unit


def test_an_overlay_matches_only_its_own_base_and_format(tmp_path: Path) -> None:
    base, other, overlay = tmp_path / "base.qcow2", tmp_path / "other.qcow2", tmp_path / "overlay.qcow2"
    for path in (base, other):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True)
    info = images.inspect(str(overlay), "qcow2", "spec.disks[0]")
    assert images.overlay_matches(info, str(base), "qcow2")
    assert not images.overlay_matches(info, str(other), "qcow2")
    assert not images.overlay_matches(info, str(base), "raw")


def test_without_qemu_img_an_image_is_refused_saying_what_to_install(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("PATH", str(tmp_path))  # a node where qemu-utils is missing
    with pytest.raises(SpecError) as error:
        images.checked_image(str(image), "raw", "spec.disks[0].image.path")
    assert error.value.field == "spec.disks[0].image.path" and "install qemu-utils" in error.value.message
