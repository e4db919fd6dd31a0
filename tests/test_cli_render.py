"""`libvirt-operator render`: the installed command prints valid domain XML, or exits 2 naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from test_guest_xml import DATA, assert_valid

pytestmark = pytest.mark.unit

COMMAND = Path(sys.executable).with_name("libvirt-operator")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMMAND), *args], capture_output=True, text=True, timeout=60)


def test_render_prints_valid_deterministic_xml_without_libvirt() -> None:
    result = run("render", str(DATA / "vm-web.yaml"))
    assert result.returncode == 0, result.stderr
    root = assert_valid(result.stdout)
    assert root.findtext("name") == "default_web-1"
    assert root.find("devices/disk/source").get("file").startswith("/var/lib/libvirt/images/")
    assert run("render", str(DATA / "vm-web.yaml")).stdout == result.stdout


def test_render_uses_the_given_uid() -> None:
    uid = "0b7e2a3c-8c1d-4f6e-9a5b-1c2d3e4f5a6b"
    root = etree.fromstring(run("render", str(DATA / "vm-web.yaml"), "--uid", uid).stdout.encode())
    assert root.findtext("uuid") == uid
    assert root.find("devices/disk/source").get("file") == f"/var/lib/libvirt/images/{uid}-root.qcow2"


@pytest.mark.parametrize(("manifest", "args", "field"), [
    ("vm-two-sources.yaml", (), "spec.disks[1]: needs exactly one of"),
    ("vm-outside-roots.yaml", (), "spec.disks[0].image.path: "),
    ("vm-web.yaml", ("--uid", "not-a-uuid"), "metadata.uid: "),
])
def test_invalid_input_exits_2_with_the_field_on_stderr(manifest: str, args: tuple[str, ...], field: str) -> None:
    result = run("render", str(DATA / manifest), *args)
    assert result.returncode == 2
    assert field in result.stderr
    assert result.stdout == ""
