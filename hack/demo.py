"""`make demo` / `make demo-down`: a local control plane, the CRDs, one agent and the examples.

    demo.py up [--libvirt-uri URI]   start everything, apply examples/, wait until every VM is Ready
    demo.py down                     delete the demo's VMs (their domains and disks go with them), then
                                     stop the agent and the control plane and remove the demo's state

State lives in DEMO_DIR so `down` works from any shell.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "testing"))

from lvo_testing import libvirt_env  # noqa: E402
from lvo_testing.agent_process import AgentProcess  # noqa: E402
from lvo_testing.controlplane import ControlPlane  # noqa: E402

DEMO_DIR = Path(os.environ.get("DEMO_DIR", "/var/tmp/libvirt-operator-demo"))
NODE = "demo-node"
TEST_DRIVER = "test:///default"


def up(libvirt_uri: str) -> int:
    if (DEMO_DIR / "agent.json").exists():
        print(f"a demo is already running (state in {DEMO_DIR}); run `make demo-down` first", file=sys.stderr)
        return 1
    plane = ControlPlane(DEMO_DIR / "control-plane")
    plane.start()
    kubectl = plane.kubectl
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/virtualmachines.libvirt-operator.io", "--timeout=60s")
    extra: tuple[str, ...] = ("--storage-pool", "default-pool") if libvirt_uri == TEST_DRIVER else ()
    if libvirt_uri != TEST_DRIVER:
        libvirt_env.start_daemons()
    agent = AgentProcess(DEMO_DIR, plane.admin_kubeconfig, libvirt_uri=libvirt_uri, node_name=NODE, extra_args=extra)
    agent.start()
    (DEMO_DIR / "agent.json").write_text(json.dumps({"pid": agent.process.pid, "log": str(agent.log_path),
                                                     "libvirtUri": libvirt_uri}))
    kubectl("apply", "-f", str(ROOT / "examples"))
    began = time.monotonic()
    kubectl("wait", "--for=condition=Ready", "vm", "--all", "-A", "--timeout=120s", timeout=150)
    print(f"\nEvery example VM is Ready ({time.monotonic() - began:.1f}s after apply):\n")
    print(kubectl("get", "vm", "-A", "-o", "wide").stdout)
    print(kubectl("get", "libvirtnodes").stdout)
    print(f"The control plane and the agent keep running (agent log: {agent.log_path}).")
    print(f"Try:  export KUBECONFIG={plane.admin_kubeconfig}")
    print(f"      {plane.kubectl_path()} get vm -A")
    print("Stop everything with: make demo-down")
    return 0


def down() -> int:
    """Removes what the demo made, and only that: its VMs' domains and disks, the agent, the control plane."""
    state = DEMO_DIR / "agent.json"
    agent = json.loads(state.read_text()) if state.exists() else None
    plane = ControlPlane.attach(DEMO_DIR / "control-plane") if (DEMO_DIR / "control-plane" / "state.json").exists() \
        else None
    uids = _delete_vms(plane) if plane is not None else []
    if agent is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent["pid"], signal.SIGTERM)
            _wait_gone(agent["pid"], 20)
            os.killpg(agent["pid"], signal.SIGKILL)
        _remove_left_domains(agent.get("libvirtUri", TEST_DRIVER), uids)
        state.unlink()
    if plane is not None:
        plane.stop()
    print("demo stopped")
    return 0


def _delete_vms(plane: ControlPlane) -> list[str]:
    """Deletes every VM through the API, so the agent's finalizer removes its domain and disks; returns
    the VMs' uids (for what an agent that is gone could not remove)."""
    try:
        listed = plane.kubectl("get", "vm", "-A", "-o", "jsonpath={.items[*].metadata.uid}", timeout=30)
        plane.kubectl("delete", "vm", "--all", "-A", "--timeout=120s", timeout=150, check=False)
    except Exception as error:  # the API server may be gone already: the uids are then unknown
        print(f"could not delete the demo's VMs through the API: {error}", file=sys.stderr)
        return []
    return listed.stdout.split()


def _remove_left_domains(libvirt_uri: str, uids: list[str]) -> None:
    """The domains and owned disks of the demo's VMs that are still there (an agent that died first)."""
    if libvirt_uri == TEST_DRIVER or not uids:
        return  # the test driver's domains lived in the agent process
    import libvirt  # noqa: PLC0415 - only `down` on a real libvirtd needs it

    from libvirt_operator import guest  # noqa: PLC0415
    from libvirt_operator.model import AgentSettings  # noqa: PLC0415

    conn = libvirt.open(libvirt_uri)
    try:
        for uid in uids:
            removed = guest.undefine_and_delete(conn, uid, AgentSettings(libvirt_uri=libvirt_uri))
            if removed:
                print(f"removed the domain and disks {removed} of VM {uid} the agent left")
    finally:
        conn.close()


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="demo")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up")
    start.add_argument("--libvirt-uri", default=os.environ.get("LIBVIRT_URI", TEST_DRIVER))
    commands.add_parser("down")
    args = parser.parse_args()
    return up(args.libvirt_uri) if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
