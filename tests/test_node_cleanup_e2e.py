"""A run killed while its real node runs (the agent's pod up, a guest on the node's libvirtd) leaves
nothing once the cleanup that `hack/clean-stale.sh` calls has run: no process, mount, namespace, veth,
cgroup, iptables rule, changed sysctl or state directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import wait_until
from lvo_testing import node_cleanup
from lvo_testing.controlplane import pid_alive
from lvo_testing.node import Node
from lvo_testing.node_cleanup import (
    CGROUP_ROOT, CGROUPS, HOST_VETH, KUBELET_SYSCTLS, NETNS, STATE, node_pids,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent
OVERLAY = Path(__file__).parent / "data" / "node-overlay"
OWNER = "from lvo_testing.node import Node; Node().start(); print('started', flush=True); input()"
GUEST = """<domain type='qemu'><name>lvo-killed-run</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64'>hvm</type></os><devices><serial type='pty'/></devices></domain>"""
HOST_SYSCTLS = (*KUBELET_SYSCTLS, "net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet")


def sysctls() -> dict[str, str]:
    return {name: (Path("/proc/sys") / name).read_text() for name in HOST_SYSCTLS}


def mounts_of_the_node() -> list[str]:
    """Mounts naming the node's state directory, in any process's mount namespace."""
    found = []
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            found += [line for line in mountinfo.read_text().splitlines() if str(STATE) in line]
        except OSError:
            continue
    return found


@pytest.fixture
def sysctls_before() -> dict[str, str]:
    return sysctls()


@pytest.fixture
def killed_run(sysctls_before: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A process that started the node (and is to be killed), with the sysctls from before it."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'testing'}"}, cwd=ROOT)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "started"
        yield owner
    finally:
        owner.kill()
        owner.wait()
        node_cleanup.clean()


def test_a_killed_run_leaves_nothing_after_the_cleanup(killed_run: subprocess.Popen[str],
                                                       sysctls_before: dict[str, str]) -> None:
    observer = Node()   # the killed owner's node, seen through its files
    observer.kubectl("apply", "-k", str(OVERLAY))
    wait_until(lambda: observer.kubectl("-n", "kube-system", "get", "pods", "-o", "jsonpath={.items[*].status.phase}",
                                        ).stdout == "Running", timeout=120, what="the agent's pod runs")
    subprocess.run(["virsh", "-c", observer.host.uri, "create", "/dev/stdin"], input=GUEST, text=True, check=True,
                   capture_output=True)
    guest = observer.host.qemu_pid("lvo-killed-run")
    pids = node_pids()
    assert guest in pids and len(pids) > 10 and mounts_of_the_node()

    killed_run.send_signal(signal.SIGKILL)
    killed_run.wait()
    assert pid_alive(guest), "the node outlives its owner, as after a killed run"
    subprocess.run(["python3", str(ROOT / "testing" / "lvo_testing" / "node_cleanup.py")],
                   check=True)

    assert [pid for pid in pids if pid_alive(pid)] == []
    assert mounts_of_the_node() == []
    assert NETNS not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", HOST_VETH], capture_output=True).returncode != 0
    assert [hierarchy for hierarchy in CGROUPS.iterdir() if (hierarchy / CGROUP_ROOT).exists()] == []
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert [line for line in rules.splitlines() if "KUBE-" in line or "10.214." in line or "CNI-" in line] == []
    assert sysctls() == sysctls_before
    assert not STATE.exists()
