"""The agent as a real process (`libvirt-operator run`), for end-to-end tests, benchmarks and the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from lvo_testing.controlplane import free_port


TRACEBACK = "Traceback (most recent call last)"


class AgentProcess:
    """One `libvirt-operator run` with its log in `workdir`; a context manager that fails, when it closes,
    if the agent logged a traceback (`allow_tracebacks` for a test that provokes one on purpose)."""

    def __init__(self, workdir: Path, kubeconfig: Path, *, libvirt_uri: str, node_name: str,
                 extra_args: tuple[str, ...] = (), allow_tracebacks: bool = False,
                 command_prefix: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.libvirt_uri = libvirt_uri
        self.node_name = node_name
        self.extra_args = extra_args
        self.allow_tracebacks = allow_tracebacks
        self.command_prefix = command_prefix
        """Runs the agent through it (e.g. `nsenter` into a test host's mount namespace)."""
        self.liveness_port = free_port()
        self.metrics_port = free_port()
        self.log_path = workdir / f"agent-{node_name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AgentProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop()
        if exc_type is None and not self.allow_tracebacks:
            tracebacks = self.tracebacks()
            assert not tracebacks, f"the agent logged {len(tracebacks)} traceback(s); the first:\n{tracebacks[0]}"

    def tracebacks(self, context: int = 40) -> list[str]:
        """Each traceback in the agent's log, with the lines before it that say what failed."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        return ["\n".join(lines[max(0, i - 2):i + context]) for i, line in enumerate(lines) if TRACEBACK in line]

    @property
    def command(self) -> list[str]:
        return [*self.command_prefix, sys.executable, "-m", "libvirt_operator.cli", "run", "--libvirt-uri", self.libvirt_uri,
                "--node-name", self.node_name, "--kubeconfig", str(self.kubeconfig),
                "--liveness-port", str(self.liveness_port), "--metrics-port", str(self.metrics_port),
                *self.extra_args]

    def start(self, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"agent not healthy after {timeout}s:\n{self.log_tail()}")

    def probe(self) -> dict[str, Any] | None:
        """The liveness endpoint's answer (kopf's probes by id: `{"agent": {...}}`); None if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as reply:
                return json.loads(reply.read()) if reply.status == 200 else None
        except OSError:
            return None

    def healthy(self) -> bool:
        return self.probe() is not None

    def metrics(self) -> str:
        """The agent's Prometheus metrics, as text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; SIGKILL if it hangs."""
        self._signal(signal.SIGTERM, wait=20)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        self._signal(signal.SIGKILL, wait=10)

    def _signal(self, signum: int, wait: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signum)
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
