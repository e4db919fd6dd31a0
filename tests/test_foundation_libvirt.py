"""libvirt is real: a QEMU guest defined through qemu:///system boots and prints its marker."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from lxml import etree
from lxml.builder import E

from lvo_testing.libvirt_env import BOOT_MARKER, GuestImage

pytestmark = pytest.mark.libvirt


def _minimal_domain(name: str, image: GuestImage, log: Path, marker: str) -> str:
    domain = E.domain(
        E.name(name),
        E.memory("128", unit="MiB"),
        E.vcpu("1"),
        E.os(
            E.type("hvm", arch="x86_64", machine="pc"),
            E.kernel(str(image.kernel)),
            E.initrd(str(image.initrd)),
            E.cmdline(image.cmdline(marker=marker)),
        ),
        E.devices(E.serial(E.target(port="0"), E.log(file=str(log)), type="pty")),
        type="qemu",
    )
    return etree.tostring(domain, encoding="unicode")


def wait_for_line(log: Path, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in (content := log.read_text(errors="replace")):
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log} after {timeout} s: {log.read_text(errors='replace') if log.exists() else 'no log'}")


def test_qemu_guest_boots_and_virsh_sees_it(system_uri: str, guest_image: GuestImage, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex[:8]
    name = f"lvo-foundation-{marker}"
    log = Path("/var/log/libvirt/qemu") / f"{name}.serial.log"
    conn = libvirt.open(system_uri)
    dom = conn.defineXMLFlags(_minimal_domain(name, guest_image, log, marker), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        dom.create()
        content = wait_for_line(log, f"{BOOT_MARKER} {marker}")
        assert f"LVO-GUEST-READY {marker}" in wait_for_line(log, "LVO-GUEST-READY")
        listed = subprocess.run(["virsh", "-c", system_uri, "list", "--name"], capture_output=True, text=True, check=True)
        assert name in listed.stdout.split()
        assert content
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()
        log.unlink(missing_ok=True)
