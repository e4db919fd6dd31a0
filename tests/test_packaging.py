"""The image recipe lints clean, the kustomize base carries the CRDs unchanged, every example renders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_image_has_no_compiler() -> None:
    final_stage = (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1]
    assert "gcc" not in final_stage and "-dev" not in final_stage


@pytest.mark.parametrize("crd", ["virtualmachine.yaml", "libvirtnode.yaml"])
def test_manifests_carry_the_crds_unchanged(crd: str) -> None:
    assert (ROOT / "manifests" / "crds" / crd).read_bytes() == (ROOT / "crds" / crd).read_bytes(), \
        "run: cp crds/*.yaml manifests/crds/"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_renders(example: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "libvirt_operator.cli", "render", str(example)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<domain")


def test_there_are_five_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["cloud-init", "data-disks", "halted", "minimal", "rerun-on-failure"]
