"""`make demo` as a new user runs it: every example VM Ready; `make demo-down` leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent


def demo(command: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "hack" / "demo.py"), command], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DEMO_DIR": str(state)}, cwd=ROOT)


def processes_mentioning(text: str) -> list[str]:
    listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if text in line]


def test_demo_up_then_down(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    try:
        up = demo("up", state)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Every example VM is Ready" in up.stdout
        table = up.stdout.split("Every example VM is Ready")[1]
        for example in ("minimal", "cloud-init", "data-disks", "halted", "rerun-on-failure"):
            row = next(line for line in table.splitlines() if line.split()[1:2] == [example])
            assert row.split()[3] == "true", row
        assert "halted             Stopped" in table
        assert processes_mentioning(str(state))
    finally:
        down = demo("down", state)
    assert down.returncode == 0, down.stderr
    assert processes_mentioning(str(state)) == []
