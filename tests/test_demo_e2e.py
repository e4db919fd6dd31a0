"""`make demo` as a new user runs it: every example VM Ready; `make demo-down` leaves no process, domain or
disk of the demo's behind, on the test driver and on a real libvirtd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from lvo_testing import libvirt_env
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent


def demo(command: str, state: Path, libvirt_uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "hack" / "demo.py"), command], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DEMO_DIR": str(state), "LIBVIRT_URI": libvirt_uri},
                          cwd=ROOT)


def processes_mentioning(text: str) -> list[str]:
    listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if text in line]


def demo_vm_uids(state: Path) -> list[str]:
    plane = ControlPlane.attach(state / "control-plane")
    return plane.kubectl("get", "vm", "-A", "-o", "jsonpath={.items[*].metadata.uid}").stdout.split()


def left_on_libvirtd(uri: str, uids: list[str]) -> list[str]:
    """Domains and pool volumes of these VMs still on the libvirtd at `uri`."""
    conn = libvirt.open(uri)
    try:
        domains = [dom.name() for dom in conn.listAllDomains(0) if dom.UUIDString() in uids]
        pool = conn.storagePoolLookupByName(libvirt_env.DEFAULT_POOL)
        pool.refresh(0)
        volumes = [vol.name() for vol in pool.listAllVolumes(0) if vol.name()[:36] in uids]
    finally:
        conn.close()
    return domains + volumes


@pytest.mark.parametrize("libvirt_uri", ["test:///default", "qemu:///system"])
def test_demo_up_then_down(tmp_path: Path, libvirt_uri: str, request: pytest.FixtureRequest) -> None:
    if libvirt_uri != "test:///default":
        request.getfixturevalue("system_uri")
    state = tmp_path / "demo"
    uids: list[str] = []
    try:
        up = demo("up", state, libvirt_uri)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Every example VM is Ready" in up.stdout
        table = up.stdout.split("Every example VM is Ready")[1]
        for example in ("minimal", "cloud-init", "data-disks", "halted", "rerun-on-failure"):
            row = next(line for line in table.splitlines() if line.split()[1:2] == [example])
            assert row.split()[3] == "true", row
        assert "halted             Stopped" in table
        assert processes_mentioning(str(state))
        uids = demo_vm_uids(state)
        assert len(uids) == 5
    finally:
        down = demo("down", state, libvirt_uri)
    assert down.returncode == 0, down.stderr
    assert processes_mentioning(str(state)) == []
    if libvirt_uri != "test:///default":
        assert left_on_libvirtd(libvirt_uri, uids) == []
