"""A real Kubernetes node on this machine, to run the DaemonSet as a cluster runs it.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet and kube-proxy,
all inside one network namespace the node creates (`lvo-node`): the node's address, its pod
network (a CNI bridge) and the `kubernetes` Service (kube-proxy's iptables rules) exist only
there. A veth pair lets the tests reach the API server at the node's address; nothing routes
out of the namespace. The node is a libvirt host of its own (`node_host.py`): containerd, kubelet
and kube-proxy run in its mount namespace, where a libvirtd of its own runs, so pods reach that
libvirtd through the socket their hostPath mounts, as on a separate machine.

The binaries come from `hack/build-binaries.sh` and `hack/build-node-binaries.sh`, the images
(the agent's and the pause image) from `hack/build-image.sh`; all are cached per machine.
`stop()`, and `node_cleanup.clean()` after a killed run, remove everything the node made.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from lvo_testing import node_cleanup
from lvo_testing.controlplane import SERVICE_CIDR, ControlPlane, KubectlError, run_build_script, spawn
from lvo_testing.node_cleanup import CGROUP_ROOT, HOST_VETH, NETNS, STATE
from lvo_testing.node_host import NodeHost

NODE_VETH = "lvo-node-ns"
HOST_ADDRESS, NODE_ADDRESS = "10.213.0.1", "10.213.0.2"
POD_CIDR = "10.214.0.0/24"
NODE_NAME = "lvo-node"
PAUSE_IMAGE = "localhost/libvirt-operator-pause:1"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Node:
    """A one-node cluster; `start()` then `stop()`, or use it as a context manager."""

    def __init__(self) -> None:
        self.bin = Path(run_build_script("build-node-binaries.sh")[-1])
        self.agent_image_archive, self.pause_image_archive = map(Path, run_build_script("build-image.sh")[-2:])
        self.plane = ControlPlane(STATE / "control-plane", address=NODE_ADDRESS, netns=NETNS)
        self.kubectl = self.plane.kubectl
        self.containerd_socket = STATE / "containerd" / "containerd.sock"
        self._logs = STATE / "logs"
        self.host = NodeHost(STATE / "libvirt", self._logs, NETNS)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        node_cleanup.clean()
        self._logs.mkdir(parents=True, exist_ok=True)
        self._make_network()
        self.host.start()
        self.plane.start()
        self._start_containerd()
        self._spawn("kube-controller-manager", self._controller_manager_args())
        scheduler = self.plane.component_kubeconfig("system:kube-scheduler")
        self._spawn("kube-scheduler", [
            f"--kubeconfig={scheduler}", f"--authentication-kubeconfig={scheduler}",
            f"--authorization-kubeconfig={scheduler}", "--bind-address=127.0.0.1", "--leader-elect=false",
        ])
        self._start_kubelet()
        self._spawn_on_host("kube-proxy", [f"--config={self._kube_proxy_config()}"])
        self._wait_node_ready()

    def stop(self) -> None:
        node_cleanup.clean()

    def _start_kubelet(self) -> None:
        node_cleanup.save_sysctls()
        for hierarchy in node_cleanup.CGROUPS.iterdir():   # kubelet wants its cgroupRoot made
            if hierarchy.name != "unified":
                (hierarchy / CGROUP_ROOT).mkdir(exist_ok=True)
        self._spawn_on_host("kubelet", [
            f"--config={self._kubelet_config()}",
            f"--kubeconfig={self.plane.component_kubeconfig(f'system:node:{NODE_NAME}', 'system:nodes')}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_ADDRESS}",
            f"--root-dir={STATE / 'kubelet'}", f"--cert-dir={STATE / 'kubelet-pki'}",
        ])

    # The network namespace, its veth pair and the pod bridge's configuration.

    def _make_network(self) -> None:
        _run("ip", "netns", "add", NETNS)
        inside = ("ip", "-n", NETNS)
        _run(*inside, "link", "set", "lo", "up")
        _run("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NODE_VETH, "netns", NETNS)
        _run("ip", "addr", "add", f"{HOST_ADDRESS}/30", "dev", HOST_VETH)
        _run("ip", "link", "set", HOST_VETH, "up")
        _run(*inside, "addr", "add", f"{NODE_ADDRESS}/30", "dev", NODE_VETH)
        _run(*inside, "link", "set", NODE_VETH, "up")
        cni = STATE / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-pods.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(STATE / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }))

    def _spawn(self, binary: str, args: list[str]) -> None:
        spawn([str(self.bin / binary), *args], self._logs / f"{binary}.log", netns=NETNS)

    def _spawn_on_host(self, binary: str, args: list[str]) -> None:
        """In the node's mount namespace too: what mounts hostPaths sees the node's libvirt directories."""
        path = self.bin / binary if (self.bin / binary).exists() else Path("/usr/bin") / binary   # containerd
        spawn([*self.host.enter(), str(path), *args], self._logs / f"{binary}.log")

    # containerd, with the locally built images imported.

    def _start_containerd(self) -> None:
        root = STATE / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "config.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text("\n".join([
            "version = 2",
            f'root = "{root / "root"}"', f'state = "{root / "state"}"',
            "[grpc]", f'  address = "{self.containerd_socket}"',
            "[ttrpc]", f'  address = "{self.containerd_socket}.ttrpc"',
            '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{root / "opt"}"',
            f"[{cri}]", f'  sandbox_image = "{PAUSE_IMAGE}"',
            # This machine lacks CAP_SYS_RESOURCE and AppArmor (see ../shared/notes/real-node.md).
            "  restrict_oom_score_adj = true", "  disable_apparmor = true",
            # Pods' network namespaces under the node's state, so its cleanup finds them.
            "  netns_mounts_under_state_dir = true",
            f"[{cri}.cni]", '  bin_dir = "/usr/lib/cni"', f'  conf_dir = "{STATE / "cni"}"',
            f"[{cri}.containerd]", '  snapshotter = "overlayfs"', '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]", '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]", "  SystemdCgroup = false",
            "",
        ]))
        self._spawn_on_host("containerd", [f"--config={config}"])
        self._wait(lambda: self._ctr("version").returncode == 0, "containerd", 30)
        for archive in (self.pause_image_archive, self.agent_image_archive):
            result = self._ctr("images", "import", "--no-unpack", str(archive))
            if result.returncode != 0:
                raise RuntimeError(f"ctr images import {archive}: {result.stderr}")

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
                              capture_output=True, text=True)

    # Configuration of the Kubernetes components.

    def _controller_manager_args(self) -> list[str]:
        kubeconfig = self.plane.component_kubeconfig("system:kube-controller-manager")
        d = self.plane.workdir
        return [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--leader-elect=false",
            f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={d / 'ca.crt'}",
            "--use-service-account-credentials=true", "--controllers=*,-nodeipam",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ]

    def _kubelet_config(self) -> Path:
        path = STATE / "kubelet-config.json"
        path.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # cgroup v1 without systemd here (see ../shared/notes/real-node.md).
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "cgroupRoot": f"/{CGROUP_ROOT}",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": NODE_ADDRESS, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.plane.workdir / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False, "serializeImagePulls": False,
            # A shared test machine: no eviction or image collection because its disk is busy.
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        }))
        return path

    def _kube_proxy_config(self) -> Path:
        path = STATE / "kube-proxy-config.json"
        path.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.plane.component_kubeconfig("system:kube-proxy"))},
            "mode": "iptables", "hostnameOverride": NODE_NAME, "bindAddress": NODE_ADDRESS,
            "clusterCIDR": POD_CIDR, "conntrack": {"maxPerCore": 0},
            "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
        }))
        return path

    def _wait_node_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                status = self.kubectl("get", "node", NODE_NAME, "-o",
                                      "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=True)
            except KubectlError:
                return False
            return status.stdout == "True"
        self._wait(ready, f"node {NODE_NAME} Ready", timeout)

    def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what}: not after {timeout} s; logs in {self._logs}")
