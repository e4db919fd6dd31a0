"""`make bench` stopped with SIGTERM (a `timeout`, a closed terminal) leaves no process behind, and a run
killed with SIGKILL, which nothing can clean up after, has its processes stopped by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import OWNER_FILE, WORKDIR_PREFIX, reap_stale_runs  # noqa: E402


def processes_mentioning(text: str) -> list[str]:
    listing = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if text in line and "pytest" not in line]


def start_bench() -> tuple[subprocess.Popen[bytes], str]:
    """A quick test-driver bench, once its agents run; returns it and its workdir."""
    before = {path.name for path in Path("/tmp").glob(f"{WORKDIR_PREFIX}*")}
    bench = subprocess.Popen([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "test"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        new = [path for path in Path("/tmp").glob(f"{WORKDIR_PREFIX}*") if path.name not in before]
        if new and any("libvirt_operator.cli run" in line for line in processes_mentioning(str(new[0]))):
            return bench, str(new[0])
        assert bench.poll() is None, "the bench ended before its agents ran"
        time.sleep(0.5)
    bench.kill()
    raise TimeoutError("no agent of the bench ran within 240 s")


def wait_gone(workdir: str, seconds: float = 120) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := processes_mentioning(workdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_a_bench_stopped_with_sigterm_stops_its_control_plane_and_agents() -> None:
    bench, workdir = start_bench()
    assert len(processes_mentioning(workdir)) >= 3  # etcd, kube-apiserver, an agent at least
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=180) == 128 + signal.SIGTERM
    assert wait_gone(workdir) == []
    assert not Path(workdir).exists()


def sleeper(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(workdir)], start_new_session=True)


def test_processes_of_a_killed_run_are_stopped_by_the_next(tmp_path: Path) -> None:
    """What SIGKILL leaves: a workdir whose owner is dead and a process naming it."""
    workdir = tmp_path / f"{WORKDIR_PREFIX}killed"
    workdir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (workdir / OWNER_FILE).write_text(str(dead.pid))
    left = sleeper(workdir)
    live = tmp_path / f"{WORKDIR_PREFIX}running"
    live.mkdir()
    (live / OWNER_FILE).write_text(str(os.getpid()))
    neighbour = sleeper(live)
    try:
        reaped = reap_stale_runs(tmp_path)
        assert left.wait(timeout=10) == -signal.SIGKILL
        assert len(reaped) == 1 and not workdir.exists()
        assert neighbour.poll() is None and live.exists()  # a run still going is left alone
    finally:
        for proc in (left, neighbour):
            proc.kill()
