"""`make demo` / `make demo-down`: a local control plane, the CRDs, one agent and the examples.

    demo.py up [--libvirt-uri URI]   start everything, apply examples/, wait until every VM is Ready
    demo.py down                     stop the agent and the control plane, remove the demo's state

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

from libvirt_operator.testing import libvirt_env
from libvirt_operator.testing.agent_process import AgentProcess
from libvirt_operator.testing.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parent.parent
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
    (DEMO_DIR / "agent.json").write_text(json.dumps({"pid": agent.process.pid, "log": str(agent.log_path)}))
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
    state = DEMO_DIR / "agent.json"
    if state.exists():
        pid = json.loads(state.read_text())["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            _wait_gone(pid, 20)
            os.killpg(pid, signal.SIGKILL)
        state.unlink()
    if (DEMO_DIR / "control-plane" / "state.json").exists():
        ControlPlane.attach(DEMO_DIR / "control-plane").stop()
    print("demo stopped")
    return 0


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
