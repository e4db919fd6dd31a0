"""Helpers shared by the benchmark scenarios: the control plane, agents, a VM watch, write counts, figures.

Every scenario gets a `Bench` (a running control plane with the CRDs applied, a Python client,
one cluster-wide watch of VirtualMachines and Events) and returns `Figure`s; `run_all.py`
prints them as a table and as one JSON object per line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
import contextlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "testing"))

import kubernetes  # noqa: E402
from kubernetes import watch as kwatch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from e2e import VM_RESOURCES, write_counts  # noqa: E402
from lvo_testing.agent_process import AgentProcess  # noqa: E402
from lvo_testing.controlplane import ControlPlane, pid_alive  # noqa: E402

GROUP, VERSION, PLURAL = "libvirt-operator.io", "v1alpha1", "virtualmachines"
TEST_DRIVER_URI = "test:///default"
TEST_DRIVER_ARGS = ("--storage-pool", "default-pool")
# What the agent writes; the API server's own writes (leases, ...) and the bench's creations are not counted.
AGENT_RESOURCES = ("virtualmachines", "virtualmachines/status", "events", "libvirtnodes", "libvirtnodes/status")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Figure:
    scenario: str
    figure: str
    value: Any
    unit: str
    note: str = ""

    def json(self) -> str:
        data = asdict(self)
        if not data["note"]:
            data.pop("note")
        return json.dumps(data)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


# --- the agent's process and metrics ------------------------------------------------------

def proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS MiB from VmHWM, CPU seconds utime+stime) of one process."""
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return hwm, (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


def cpu_by_command() -> Counter[str]:
    """CPU seconds (utime+stime) of every live process, summed by command name (`comm`)."""
    totals: Counter[str] = Counter()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, rest = stat.read_text().rpartition(")")
        except OSError:  # the process exited meanwhile
            continue
        fields = rest.split()
        totals[head.partition("(")[2]] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return totals


def add_cpu_split(bench: Bench, scenario: str, before: Counter[str], seconds: float) -> None:
    """Where the machine's CPU went since `before` (a `cpu_by_command()`), as one figure."""
    used = diff(cpu_by_command(), before)
    bench.add(scenario, "cpu_seconds_by_process", round(sum(used.values()), 1), "s",
              ", ".join(f"{name}={value:.1f}" for name, value in used.most_common(6))
              + f"; {seconds:.0f} s x {os.cpu_count()} cores = {seconds * (os.cpu_count() or 1):.0f} CPU-s available")


def guest_cpu_cgroups(domain_prefix: str) -> Counter[str]:
    """The top-level cpu cgroup (`/machine` when libvirt placed the guest, `/` when not) of every QEMU
    process whose domain name starts with `domain_prefix`, counted."""
    found: Counter[str] = Counter()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"guest={domain_prefix}".encode() not in cmdline.read_bytes():
                continue
            lines = (cmdline.parent / "cgroup").read_text().splitlines()
        except OSError:  # the process exited meanwhile
            continue
        cpu = next((line.split(":", 2)[2] for line in lines if "cpu" in line.split(":")[1].split(",")), "/")
        found["/" + cpu.strip("/").split("/")[0]] += 1
    return found


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def parse_prometheus(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted label pairs: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match["labels"] or "")))
        out.setdefault(match["name"], {})[labels] = float(match["value"])
    return out


@dataclass
class AgentMetrics:
    """A snapshot of the agent's own counters (None when it has no /metrics)."""
    libvirt_calls: Counter[str] = field(default_factory=Counter)
    libvirt_seconds: Counter[str] = field(default_factory=Counter)
    kube_writes: Counter[tuple[str, str]] = field(default_factory=Counter)
    reconciles: float = 0
    queue_depth: float = 0
    connections_opened: float = 0
    available: bool = False

    @property
    def libvirt_total(self) -> float:
        return sum(self.libvirt_calls.values())


def agent_metrics(agent: AgentProcess) -> AgentMetrics:
    try:
        parsed = parse_prometheus(agent.metrics())
    except OSError:
        return AgentMetrics()
    metrics = AgentMetrics(available=True)
    for labels, value in parsed.get("libvirt_operator_libvirt_calls_total", {}).items():
        metrics.libvirt_calls[dict(labels)["api"]] += value
    for labels, value in parsed.get("libvirt_operator_libvirt_call_seconds_total", {}).items():
        metrics.libvirt_seconds[dict(labels)["api"]] += value
    for labels, value in parsed.get("libvirt_operator_kubernetes_writes_total", {}).items():
        d = dict(labels)
        metrics.kube_writes[(d["verb"], d["resource"])] += value
    metrics.reconciles = sum(parsed.get("libvirt_operator_reconciles_total", {}).values())
    metrics.queue_depth = sum(parsed.get("libvirt_operator_queue_depth", {}).values())
    metrics.connections_opened = sum(parsed.get("libvirt_operator_libvirt_connections_opened_total", {}).values())
    return metrics


def diff(after: Counter, before: Counter) -> Counter:
    return Counter({key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)})


class ProfiledAgent(AgentProcess):
    """The agent under pyinstrument (a .pyisession: `pyinstrument --load FILE -r text --show-all`), its session written on SIGTERM to `profile`."""

    profile: Path

    @property
    def command(self) -> list[str]:
        command = super().command
        return [command[0], "-m", "pyinstrument", "-r", "pyisession", "-o", str(self.profile),
                "-m", *command[2:]]


# --- the bench environment ----------------------------------------------------------------

class Bench:
    """A control plane with the CRDs, a Python client, a VM/Event watch, and the agents started on it."""

    def __init__(self, workdir: Path, quick: bool) -> None:
        self.workdir = workdir
        self.quick = quick
        self.plane = ControlPlane(workdir / "control-plane")
        self.agents: list[AgentProcess] = []
        self.figures: list[Figure] = []
        self.watch: VMWatch | None = None

    def start(self) -> None:
        self.plane.start()
        for crd in ("virtualmachine", "libvirtnode", "virtualmachinemigration"):
            self.plane.kubectl("apply", "-f", str(REPO / "crds" / f"{crd}.yaml"))
        self.plane.kubectl("wait", "--for=condition=Established", "crd/virtualmachines.libvirt-operator.io",
                           "crd/libvirtnodes.libvirt-operator.io", "crd/virtualmachinemigrations.libvirt-operator.io",
                           "--timeout=30s")
        self.api_client = kubernetes.config.new_client_from_config(config_file=str(self.plane.admin_kubeconfig))
        self.api_client.configuration.connection_pool_maxsize = 8
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        ca = self.plane.workdir
        self._ssl = ssl.create_default_context(cafile=str(ca / "ca.crt"))
        self._ssl.load_cert_chain(str(ca / "admin.crt"), str(ca / "admin.key"))
        self.watch = VMWatch(self)
        self.watch.start()

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.watch:
            self.watch.stop()
        self.plane.stop()

    def add(self, scenario: str, figure: str, value: Any, unit: str, note: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 3)
        self.figures.append(Figure(scenario, figure, value, unit, note))
        log(f"{scenario}: {figure} = {value} {unit} {note}")

    def namespace(self, name: str) -> str:
        self.core.create_namespace({"metadata": {"name": name}}) if name not in self._namespaces() else None
        return name

    def _namespaces(self) -> set[str]:
        return {ns.metadata.name for ns in self.core.list_namespace().items}

    def start_agent(self, node: str, uri: str, extra: Iterable[str] = (), profile: Path | None = None) -> AgentProcess:
        kind = AgentProcess if profile is None else ProfiledAgent
        agent = kind(self.workdir / "agents", self.plane.admin_kubeconfig, libvirt_uri=uri, node_name=node,
                     extra_args=tuple(extra))
        if profile is not None:
            agent.profile = profile  # type: ignore[attr-defined]
        if agent not in self.agents:  # before it starts: a SIGTERM meanwhile must stop it too
            self.agents.append(agent)
        agent.start(timeout=120)
        return agent

    def api_writes(self) -> Counter[tuple[str, str]]:
        """The API server's write counters, by (verb, resource[/subresource])."""
        with urllib.request.urlopen(f"{self.plane.url}/metrics", context=self._ssl, timeout=10) as reply:
            return write_counts(reply.read().decode())

    def create_vm(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def create_paced(self, namespace: str, names: list[str], spec: Callable[[str], dict[str, Any]],
                     interval: float = 0.1, after_each: Callable[[str], None] | None = None) -> dict[str, float]:
        """Creates one VM every `interval` seconds (on a fixed schedule); name -> wall time just before its POST."""
        created: dict[str, float] = {}
        began = time.monotonic()
        for index, name in enumerate(names):
            delay = began + index * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            created[name] = time.time()
            self.create_vm(namespace, name, spec(name))
            if after_each is not None:
                after_each(name)
        return created

    def list_vms(self, namespace: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]

    def delete_all(self, namespace: str, timeout: float = 600) -> float:
        """Deletes every VM of `namespace` and waits until they are gone (finalizers ran); seconds taken."""
        began = time.monotonic()
        while True:
            try:
                self.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
                break
            except ApiException as error:
                if error.status == 404:
                    break
                if error.status != 504:
                    raise
                # thousands of objects: the API server stops at its own request timeout; each call deletes more
                log(f"delete of {namespace}'s VMs: {error.reason}; asking again")
        while self.list_vms(namespace):
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"VMs of {namespace} not gone after {timeout}s")
            time.sleep(0.5)
        return time.monotonic() - began

    def wait_quiet(self, quiet: float = 5.0, timeout: float = 300, resources: tuple[str, ...] = VM_RESOURCES,
                   every: float = 0.25) -> float:
        """Waits until no agent write to `resources` happened for `quiet` seconds; the wall time of the last write."""
        last_counts = self._agent_counts(resources)
        last_change = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(every)
            counts = self._agent_counts(resources)
            if counts != last_counts:
                last_counts, last_change = counts, time.time()
            elif time.time() - last_change >= quiet:
                return last_change
        raise TimeoutError(f"writes did not stop within {timeout}s")

    def _agent_counts(self, resources: tuple[str, ...]) -> int:
        return sum(agent_writes(self.api_writes(), resources).values())


def agent_writes(counts: Counter[tuple[str, str]], resources: tuple[str, ...] = AGENT_RESOURCES) -> Counter:
    """The writes the agent makes: every write to its resources except creating VirtualMachines (the bench's)."""
    return Counter({key: value for key, value in counts.items()
                    if key[1] in resources and key != ("POST", "virtualmachines") and key[0] != "DELETE"})


WORKDIR_PREFIX = "lvo-bench-"
OWNER_FILE = "owner.pid"


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the run like Ctrl-C does, through every `finally` (the agents, the control
    plane and the guests are stopped); without this a `timeout` or a closed terminal left them running."""
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, leave)


def reap_stale_runs(tmp: Path = Path(tempfile.gettempdir())) -> list[str]:
    """Stops the processes of earlier runs that could not clean up (SIGKILL), and removes their workdirs."""
    reaped = []
    for workdir in tmp.glob(f"{WORKDIR_PREFIX}*"):
        owner = workdir / OWNER_FILE
        if owner.exists() and pid_alive(int(owner.read_text() or 0)):
            continue
        for line in subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if str(workdir) in args and int(pid) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                    reaped.append(args[:120])
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return reaped


@contextmanager
def bench_environment(quick: bool) -> Iterator[Bench]:
    for stale in reap_stale_runs():
        log(f"stopped a process an earlier run left: {stale}")
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    bench = Bench(workdir, quick)
    try:
        bench.start()
        yield bench
    finally:
        bench.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


# --- one watch for every VM and Event -------------------------------------------------------

class VMWatch:
    """Cluster-wide watches of VirtualMachines and Events in threads; listeners see (arrival time, type, object)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.ready_at: dict[tuple[str, str], float] = {}
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.listeners: list[Callable[[float, str, dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watches: list[kwatch.Watch] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in ("vms", "events"):
            thread = threading.Thread(target=self._run, args=(kind,), daemon=True, name=f"watch-{kind}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for w in self._watches:
            w.stop()

    def reset_ready(self, namespace: str) -> None:
        with self._lock:
            for key in [k for k in self.ready_at if k[0] == namespace]:
                del self.ready_at[key]

    def _list(self, kind: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if kind == "vms":
            return self.bench.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        return self.bench.core.list_event_for_all_namespaces, ()

    def _run(self, kind: str) -> None:
        lister, args = self._list(kind)
        resource_version = ""
        while not self._stopping.is_set():
            try:
                if not resource_version:
                    listed = lister(*args)
                    meta = listed["metadata"] if isinstance(listed, dict) else listed.metadata.to_dict()
                    resource_version = meta.get("resourceVersion") or meta.get("resource_version")
                    if kind == "vms":
                        for item in listed["items"]:
                            self._seen(time.time(), "ADDED", item)
                w = kwatch.Watch()
                self._watches.append(w)
                kwargs: dict[str, Any] = {"resource_version": resource_version, "timeout_seconds": 300,
                                          "allow_watch_bookmarks": True}
                if kind == "events":
                    kwargs["_preload_content"] = True
                for event in w.stream(lister, *args, **kwargs):
                    arrived = time.time()
                    obj = event["object"]
                    if kind == "events" and not isinstance(obj, dict):
                        obj = self.bench.api_client.sanitize_for_serialization(obj)
                    if event["type"] == "ERROR":
                        resource_version = ""
                        break
                    resource_version = obj["metadata"].get("resourceVersion", resource_version)
                    if event["type"] == "BOOKMARK":
                        continue
                    if kind == "vms":
                        self._seen(arrived, event["type"], obj)
                    for listener in list(self.listeners):
                        listener(arrived, event["type"], obj)
            except ApiException as error:
                if error.status == 410:
                    resource_version = ""
                elif not self._stopping.is_set():
                    time.sleep(0.5)
            except Exception:  # noqa: BLE001 - connection dropped: watch again from where we were
                if self._stopping.is_set():
                    return
                time.sleep(0.5)

    def _seen(self, arrived: float, event_type: str, vm: dict[str, Any]) -> None:
        key = (vm["metadata"]["namespace"], vm["metadata"]["name"])
        with self._lock:
            if event_type == "DELETED":
                self.latest.pop(key, None)
                return
            self.latest[key] = vm
            if (vm.get("status") or {}).get("ready") is True and key not in self.ready_at:
                self.ready_at[key] = arrived

    def wait_ready(self, namespace: str, names: Iterable[str], timeout: float) -> dict[str, float]:
        """Waits until every named VM has been seen Ready; name -> wall time it was first seen so."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                done = {name: self.ready_at[(namespace, name)] for name in wanted if (namespace, name) in self.ready_at}
            if len(done) == len(wanted):
                return done
            if time.monotonic() > deadline:
                late = sorted(wanted - set(done))
                status = (self.latest.get((namespace, late[0])) or {}).get("status") or {}
                why = [c.get("message") for c in status.get("conditions", []) if c.get("type") == "Ready"]
                raise TimeoutError(f"{len(late)} of {len(wanted)} VMs in {namespace} not Ready after {timeout}s; "
                                   f"{late[0]}: {status.get('printableStatus')} {why}")
            time.sleep(0.05)


def virsh(*args: str, uri: str = "qemu:///system", check: bool = True) -> str:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=check, timeout=60).stdout


def domain_ids(prefix: str, uri: str = "qemu:///system") -> dict[str, str]:
    """name -> id ('-' when shut off) of the domains whose name starts with `prefix`, from one `virsh list`."""
    out: dict[str, str] = {}
    for line in virsh("list", "--all", uri=uri).splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith(prefix):
            out[parts[1]] = parts[0]
    return out


def remove_domains(prefix: str, uri: str = "qemu:///system") -> int:
    """Safety net after a failed run: destroys and undefines leftover domains named `prefix`*."""
    left = domain_ids(prefix, uri)
    for name in left:
        virsh("destroy", name, uri=uri, check=False)
        virsh("undefine", name, "--nvram", uri=uri, check=False)
    return len(left)
