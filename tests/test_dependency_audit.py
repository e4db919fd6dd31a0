"""Known vulnerabilities in the locked dependencies, with pip-audit against PyPI's advisory data.

pip-audit asks PyPI's per-release JSON API (`/pypi/NAME/VERSION/json`) or OSV. Where neither is
reachable (this build machine reaches PyPI's package index but answers 404 on the per-release
API and cannot reach OSV), the test is skipped and says why: nothing is audited then, and the
skip is the honest report of it."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
LOCK = ROOT / "requirements.lock"


def _reachable(url: str) -> str | None:
    """None when `url` answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError as error:
        return str(error)


def test_locked_dependencies_have_no_known_vulnerabilities() -> None:
    name, version = next(line.split("==") for line in LOCK.read_text().splitlines() if line.startswith("kopf=="))
    probe = f"https://pypi.org/pypi/{name}/{version}/json"
    problem = _reachable(probe)
    if problem is not None:
        pytest.skip(f"pip-audit's vulnerability source is not reachable from here ({probe}: {problem}); "
                    "run `make audit` where it is")
    result = subprocess.run([str(Path(sys.executable).parent / "pip-audit"), "--strict", "--progress-spinner", "off",
                             "--vulnerability-service", "pypi", "--disable-pip", "--no-deps", "-r", str(LOCK)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
