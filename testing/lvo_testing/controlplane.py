"""A real local Kubernetes control plane: etcd plus kube-apiserver on loopback, TLS and RBAC on.

The binaries come from `hack/build-binaries.sh` (built once per machine from the Go module
proxy, cached outside the repository). `ControlPlane` writes its certificates, data and
kubeconfigs into one directory, records its process ids there, and stops everything it
started, so a test session or `make demo-down` leaves no process and no port behind.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
ADMIN_GROUP = "system:masters"


def run_build_script(script: str) -> list[str]:
    """Runs hack/`script` (it builds what is not cached) and returns the lines it printed: paths."""
    out = subprocess.run([str(REPO / "hack" / script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"hack/{script} failed:\n{out.stderr[-4000:]}")
    return out.stdout.split()


def binaries_dir() -> Path:
    """The cache directory with kube-apiserver, kubectl and etcd, building them if needed."""
    return Path(run_build_script("build-binaries.sh")[-1])


def spawn(command: list[str], log: Path, *, netns: str | None = None) -> int:
    """Starts `command` in a session of its own (in network namespace `netns`), output appended to `log`."""
    inside = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    with log.open("ab") as output:
        proc = subprocess.Popen([*inside, *command], stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _KeyPair:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption(),
        ))
        key_path.chmod(0o600)
        return cert_path, key_path


def _issue(common_name: str, issuer: _KeyPair | None, *, organisation: str | None = None,
           server_names: list[x509.GeneralName] | None = None) -> _KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    subject = x509.Name(attrs)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(server_names), critical=False)
    return _KeyPair(key, builder.sign(issuer.key if issuer else key, hashes.SHA256()))


# The first address of --service-cluster-ip-range: the `kubernetes` Service that pods dial.
SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_ADDRESS = "10.0.0.1"


class ControlPlane:
    """etcd + kube-apiserver in `workdir`; `start()` then `stop()`, or use it as a context manager.

    By default it serves loopback only, for an agent run as a process. `netns` runs it inside that
    network namespace at `address`, set up to serve real nodes (see `testing/node.py`): Node and
    RBAC authorization, ServiceAccount admission, the `kubernetes` Service's endpoints, and a
    client certificate for kubelets.
    """

    def __init__(self, workdir: Path, *, address: str = "127.0.0.1", netns: str | None = None) -> None:
        self.workdir = workdir
        self.address = address
        self.netns = netns
        self.bin = binaries_dir()
        self.state_file = workdir / "state.json"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self._state: dict[str, int] = {}

    @property
    def serves_nodes(self) -> bool:
        return self.netns is not None

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self._state['apiserver_port']}"

    def kubectl_path(self) -> Path:
        return self.bin / "kubectl"

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_certificates()
        if self.serves_nodes:   # a namespace of its own: the well-known ports are free
            self._state = {"etcd_port": 2379, "etcd_peer_port": 2380, "apiserver_port": 6443}
        else:
            self._state = {"etcd_port": free_port(), "etcd_peer_port": free_port(), "apiserver_port": free_port()}
        self._state["etcd_pid"] = self._spawn("etcd", self._etcd_args())
        self._wait_for(f"http://{self.address}:{self._state['etcd_port']}/health", "etcd", tls=False)
        self.start_apiserver()

    def start_apiserver(self) -> None:
        self._state["apiserver_pid"] = self._spawn("kube-apiserver", self._apiserver_args())
        self._save_state()
        self._wait_for(f"{self.url}/readyz", "kube-apiserver", tls=True)
        self._write_kubeconfig(self.admin_kubeconfig, user={
            "client-certificate": str(self.workdir / "admin.crt"), "client-key": str(self.workdir / "admin.key"),
        })

    def stop_apiserver(self) -> None:
        self._terminate(self._state.pop("apiserver_pid", 0))
        self._save_state()

    def stop(self) -> None:
        self._state = self._load_state() or self._state
        for name in ("apiserver_pid", "etcd_pid"):
            self._terminate(self._state.pop(name, 0))
        shutil.rmtree(self.workdir, ignore_errors=True)

    @classmethod
    def attach(cls, workdir: Path) -> ControlPlane:
        """The control plane already running in `workdir` (started by another process)."""
        plane = cls.__new__(cls)
        plane.workdir, plane.state_file = workdir, workdir / "state.json"
        plane.address, plane.netns = "127.0.0.1", None
        plane.admin_kubeconfig = workdir / "admin.kubeconfig"
        plane._state = plane._load_state()
        plane.bin = binaries_dir()
        return plane

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.kubectl_path()), f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name (created if missing)."""
        self.kubectl("create", "namespace", namespace, check=False)
        self.kubectl("-n", namespace, "create", "serviceaccount", name, check=False)
        token = self.kubectl("-n", namespace, "create", "token", name, "--duration=24h").stdout.strip()
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        self._write_kubeconfig(path, user={"token": token})
        return path

    def component_kubeconfig(self, common_name: str, organisation: str | None = None) -> Path:
        """A kubeconfig that authenticates with a client certificate (a kubelet, a controller)."""
        stem = common_name.replace(":", "-")
        path = self.workdir / f"{stem}.kubeconfig"
        if not path.exists():
            ca = _KeyPair(
                serialization.load_pem_private_key((self.workdir / "ca.key").read_bytes(), None),  # type: ignore[arg-type]
                x509.load_pem_x509_certificate((self.workdir / "ca.crt").read_bytes()),
            )
            cert, key = _issue(common_name, ca, organisation=organisation).write(self.workdir, stem)
            self._write_kubeconfig(path, user={"client-certificate": str(cert), "client-key": str(key)})
        return path

    def metrics(self) -> str:
        return self.kubectl("get", "--raw", "/metrics").stdout

    def _spawn(self, binary: str, args: list[str]) -> int:
        return spawn([str(self.bin / binary), *args], self.workdir / f"{binary}.log", netns=self.netns)

    @staticmethod
    def _terminate(pid: int) -> None:
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                finished = 0 if pid_alive(pid) else pid
            if finished:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(self._state))

    def _load_state(self) -> dict[str, int]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _wait_for(self, url: str, what: str, *, tls: bool, timeout: float = 60) -> None:
        context = None
        if tls:
            context = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
            context.load_cert_chain(str(self.workdir / "admin.crt"), str(self.workdir / "admin.key"))
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except Exception as error:  # noqa: BLE001 - any failure means "not up yet"
                last = error
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready at {url} after {timeout} s ({last}); see {self.workdir}/*.log")

    def _etcd_args(self) -> list[str]:
        client = f"http://{self.address}:{self._state['etcd_port']}"
        peer = f"http://{self.address}:{self._state['etcd_peer_port']}"
        return [
            f"--data-dir={self.workdir / 'etcd'}", f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync", "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        d = self.workdir
        common = [
            f"--etcd-servers=http://{self.address}:{self._state['etcd_port']}",
            f"--bind-address={self.address}", f"--advertise-address={self.address}",
            f"--secure-port={self._state['apiserver_port']}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--cert-dir={d / 'certs'}",
        ]
        if self.serves_nodes:
            return [*common, "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                    f"--kubelet-client-certificate={d / 'admin.crt'}", f"--kubelet-client-key={d / 'admin.key'}",
                    "--kubelet-preferred-address-types=InternalIP,Hostname"]
        # Loopback only: no endpoints for the `kubernetes` Service (they may not be loopback
        # addresses) and no ServiceAccount admission (no controller-manager makes the tokens).
        return [*common, "--authorization-mode=RBAC", "--endpoint-reconciler-type=none",
                "--disable-admission-plugins=ServiceAccount"]

    def _write_certificates(self) -> None:
        d = self.workdir
        if (d / "ca.crt").exists():
            return
        ca = _issue("libvirt-operator-test-ca", None)
        ca.write(d, "ca")
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address(self.address)),
            x509.IPAddress(ipaddress.ip_address(KUBERNETES_SERVICE_ADDRESS)),
            *(x509.DNSName(name) for name in ("kubernetes", "kubernetes.default", "kubernetes.default.svc")),
        ]
        _issue("kube-apiserver", ca, server_names=list(dict.fromkeys(names))).write(d, "apiserver")
        _issue("admin", ca, organisation=ADMIN_GROUP).write(d, "admin")
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (d / "sa.key").write_bytes(sa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption(),
        ))
        (d / "sa.pub").write_bytes(sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
        ))

    def _write_kubeconfig(self, path: Path, user: dict[str, str]) -> None:
        ca = base64.b64encode((self.workdir / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "local", "user": user}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local", "namespace": "default"}}],
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


def pid_alive(pid: int) -> bool:
    """Running: a zombie (a killed run's orphan that init has not reaped yet) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
