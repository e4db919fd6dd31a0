"""The operator end to end: real kube-apiserver, real kubectl, real libvirtd, real QEMU guests.

One agent process (`libvirt-operator run`) owns node `node-qemu` against qemu:///system for
the module. A foreign domain defined beside the VMs must come through untouched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvo_testing.agent_process import AgentProcess
from lvo_testing.controlplane import ControlPlane
from lvo_testing.libvirt_env import GuestImage
from e2e import (
    VM_RESOURCES, Kubectl, install_crds, event_reasons, get_vm, guest_spec, virsh, vm_manifest, wait_until, wait_vm,
    write_counts,
)

pytestmark = pytest.mark.e2e

NAMESPACE = "e2e"
NODE = "node-qemu"
FOREIGN = "lvo-e2e-foreign"
FOREIGN_XML = f"""<domain type='qemu'><name>{FOREIGN}</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64'>hvm</type></os></domain>"""


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> Kubectl:
    kubectl = control_plane.kubectl
    install_crds(kubectl, NAMESPACE)
    return kubectl


@pytest.fixture(scope="module")
def foreign_domain(system_uri: str) -> Iterator[str]:
    virsh("undefine", FOREIGN, check=False)
    path = Path("/tmp/lvo-e2e-foreign.xml")
    path.write_text(FOREIGN_XML)
    virsh("define", str(path))
    before = virsh("dumpxml", FOREIGN)
    yield before
    assert virsh("dumpxml", FOREIGN) == before, "the foreign domain was changed"
    virsh("undefine", FOREIGN)


@pytest.fixture(scope="module")
def agent(cluster: Kubectl, control_plane: ControlPlane, system_uri: str, foreign_domain: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path_factory.mktemp("agent"), control_plane.admin_kubeconfig,
                      libvirt_uri=system_uri, node_name=NODE) as process:
        yield process
        cluster("delete", "vm", "--all", "-n", NAMESPACE, "--timeout=120s", timeout=150, check=False)
        print(process.log_tail(200))


def apply_vm(kubectl: Kubectl, name: str, **spec: object) -> dict:
    kubectl("apply", "-f", "-", input=vm_manifest(name, NAMESPACE, **spec))
    return get_vm(kubectl, name, NAMESPACE)


def delete_vm(kubectl: Kubectl, name: str) -> None:
    kubectl("delete", "vm", name, "-n", NAMESPACE, "--timeout=90s", timeout=120)


def domain_name(name: str) -> str:
    return f"{NAMESPACE}_{name}"


def domain_state(name: str) -> str:
    return virsh("domstate", domain_name(name), check=False).strip()


def status(kubectl: Kubectl, name: str) -> dict:
    return get_vm(kubectl, name, NAMESPACE).get("status") or {}


def test_apply_then_ready_with_columns_and_few_writes(agent: AgentProcess, control_plane: ControlPlane,
                                                      guest_image: GuestImage) -> None:
    before = write_counts(control_plane.metrics())
    vm = apply_vm(control_plane.kubectl, "web", **guest_spec(guest_image, NODE, cpu={"cores": 2}))
    seconds = wait_vm(control_plane.kubectl, "web", NAMESPACE, "condition=Ready")
    after = write_counts(control_plane.metrics())
    # Counted: the operator's writes about the VM (kubectl's POST of it is not one). Not counted: the
    # API server's own lease (renewed every 10 s) and the agent's LibvirtNode heartbeat (per node,
    # every 20 s and at its start, whatever the VMs).
    ours = {key: after[key] - before[key] for key in after if after[key] != before[key]
            and key[1] in VM_RESOURCES
            and key != ("POST", "virtualmachines")}
    print(f"apply -> Ready in {seconds:.1f}s; operator writes: {ours}")
    assert sum(ours.values()) <= 2, ours  # the finalizer and one status patch
    columns = control_plane.kubectl("get", "vm", "web", "-n", NAMESPACE, "-o", "wide", "--no-headers").stdout.split()
    assert columns[:5] == ["web", "Running", "true", NODE, "2"], columns
    assert columns[5] == "128Mi" and columns[7] == "running"
    uuid = virsh("domuuid", domain_name("web")).strip()
    assert uuid == vm["metadata"]["uid"]
    current = status(control_plane.kubectl, "web")
    assert current["domain"]["uuid"] == uuid and current["observedGeneration"] == 1
    assert current["lifecycle"]["startTime"]
    assert "Started" not in event_reasons(control_plane.kubectl, "web", NAMESPACE)  # apply -> Ready: the status says it


def test_halted_stops_and_is_ready_then_always_starts(agent: AgentProcess, control_plane: ControlPlane,
                                                      guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "flip", **guest_spec(guest_image, NODE))
    wait_vm(kubectl, "flip", NAMESPACE, "condition=Ready")
    kubectl("patch", "vm", "flip", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"runStrategy":"Halted"}}')
    wait_vm(kubectl, "flip", NAMESPACE, "jsonpath={.status.printableStatus}=Stopped")
    halted = status(kubectl, "flip")
    assert halted["ready"] is True and domain_state("flip") == "shut off"
    assert halted["observedGeneration"] == 2
    kubectl("patch", "vm", "flip", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"runStrategy":"Always"}}')
    wait_vm(kubectl, "flip", NAMESPACE, "jsonpath={.status.printableStatus}=Running")
    assert domain_state("flip") == "running"
    assert status(kubectl, "flip")["restartCount"] == 0
    delete_vm(kubectl, "flip")


def test_guest_poweroff_rerun_on_failure_stays_stopped_always_restarts(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "once-off", runStrategy="RerunOnFailure", **guest_spec(guest_image, NODE, poweroff_after=2))
    apply_vm(kubectl, "keeps-on", runStrategy="Always", **guest_spec(guest_image, NODE, poweroff_after=2))
    wait_vm(kubectl, "once-off", NAMESPACE, "jsonpath={.status.domain.reason}=shutdown", timeout=120)
    stopped = status(kubectl, "once-off")
    assert stopped["printableStatus"] == "Stopped" and stopped["ready"] is True
    assert stopped["restartCount"] == 0
    wait_until(lambda: status(kubectl, "keeps-on").get("restartCount", 0) >= 1, timeout=120,
               what="Always restarted the guest that powered itself off")
    # The status says "restarting" before the start runs; the Event follows once it has.
    wait_until(lambda: "Restarted" in event_reasons(kubectl, "keeps-on", NAMESPACE), timeout=30,
               what="a Restarted event for the guest that powered itself off")
    delete_vm(kubectl, "once-off")
    delete_vm(kubectl, "keeps-on")


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain_name(name)}.pid").read_text())


def test_killed_qemu_is_a_failure_and_rerun_on_failure_restarts(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "crashy", runStrategy="RerunOnFailure", **guest_spec(guest_image, NODE))
    wait_vm(kubectl, "crashy", NAMESPACE, "condition=Ready")
    first_id = status(kubectl, "crashy")["domain"]["id"]
    os.kill(qemu_pid("crashy"), signal.SIGKILL)
    wait_until(lambda: status(kubectl, "crashy").get("restartCount", 0) == 1, what="restart after the kill")
    wait_vm(kubectl, "crashy", NAMESPACE, "condition=Ready")
    restarted = status(kubectl, "crashy")
    assert restarted["domain"]["id"] != first_id and restarted["domain"]["state"] == "running"
    messages = [e["message"] for e in json.loads(kubectl("get", "events", "-n", NAMESPACE, "-o", "json",
                "--field-selector=involvedObject.name=crashy,reason=Restarted").stdout)["items"]]
    assert any("shutoff: crashed" in message or "shutoff: failed" in message for message in messages), messages
    delete_vm(kubectl, "crashy")


def seconds_until(predicate: object, timeout: float = 30) -> float:
    began = time.monotonic()
    wait_until(predicate, timeout=timeout, every=0.05)  # type: ignore[arg-type]
    return time.monotonic() - began


def test_out_of_band_destroy_suspend_undefine_are_seen_and_undone(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "oob", **guest_spec(guest_image, NODE))
    wait_vm(kubectl, "oob", NAMESPACE, "condition=Ready")
    first_id = status(kubectl, "oob")["domain"]["id"]

    virsh("destroy", domain_name("oob"))
    destroyed = seconds_until(lambda: status(kubectl, "oob")["domain"].get("id") not in (None, first_id)
                              and status(kubectl, "oob")["restartCount"] == 1)
    assert domain_state("oob") == "running"

    virsh("suspend", domain_name("oob"))
    suspended = seconds_until(lambda: event_reasons(kubectl, "oob", NAMESPACE)["Resumed"] >= 1)
    wait_until(lambda: domain_state("oob") == "running", what="resumed")

    virsh("undefine", domain_name("oob"))
    undefined = seconds_until(lambda: event_reasons(kubectl, "oob", NAMESPACE)["Redefined"] >= 1)
    assert "Persistent:     yes" in virsh("dominfo", domain_name("oob"))
    edited = virsh("dumpxml", "--inactive", domain_name("oob")).replace(
        "<memory unit='KiB'>131072</memory>", "<memory unit='KiB'>262144</memory>")
    assert "262144" in edited
    path = Path("/tmp/lvo-e2e-edited.xml")
    path.write_text(edited)
    virsh("define", str(path))  # what `virsh edit` does
    edit = seconds_until(lambda: event_reasons(kubectl, "oob", NAMESPACE)["Redefined"] >= 2)
    wait_until(lambda: "131072" in virsh("dumpxml", "--inactive", domain_name("oob")), what="memory restored")
    print(f"out-of-band to status: destroy {destroyed:.2f}s, suspend {suspended:.2f}s, undefine {undefined:.2f}s, "
          f"edit {edit:.2f}s")
    delete_vm(kubectl, "oob")


def owned_volumes(uid: str) -> list[str]:
    listed = virsh("vol-list", "default")
    return [word for word in listed.split() if word.startswith(uid)]


def test_delete_leaves_no_domain_volume_or_finalizer(agent: AgentProcess, control_plane: ControlPlane,
                                                     guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    vm = apply_vm(kubectl, "gone", **guest_spec(guest_image, NODE, disks=[
        {"name": "root", "image": {"path": str(guest_image.disk), "clone": True}},
        {"name": "data", "emptyDisk": {"size": "64Mi"}},
        {"name": "seed", "cloudInit": {"userData": "#cloud-config\nhostname: gone\n"}}]))
    wait_vm(kubectl, "gone", NAMESPACE, "condition=Ready")
    uid = vm["metadata"]["uid"]
    assert len(owned_volumes(uid)) == 3
    before = write_counts(control_plane.metrics())
    delete_vm(kubectl, "gone")
    patches = write_counts(control_plane.metrics())[("PATCH", "virtualmachines")] - before[("PATCH", "virtualmachines")]
    assert patches == 1, f"{patches} finalizer patches (one refused as a conflict?)"
    assert kubectl("get", "vm", "gone", "-n", NAMESPACE, check=False).returncode != 0
    assert domain_name("gone") not in virsh("list", "--all", "--name").split()
    assert owned_volumes(uid) == []
    assert guest_image.disk.exists()


def test_deletion_while_the_agent_is_down_finishes_when_it_returns(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "later", **guest_spec(guest_image, NODE))
    wait_vm(kubectl, "later", NAMESPACE, "condition=Ready")
    agent.stop()
    kubectl("delete", "vm", "later", "-n", NAMESPACE, "--wait=false")
    time.sleep(1)
    held = get_vm(kubectl, "later", NAMESPACE)
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["finalizers"] == ["libvirt-operator.io/domain"]
    assert domain_state("later") == "running"
    agent.start()
    kubectl("wait", "--for=delete", "vm/later", "-n", NAMESPACE, "--timeout=90s", timeout=120)
    assert domain_name("later") not in virsh("list", "--all", "--name").split()
    assert domain_state("web") == "running", "the restart must not have restarted other VMs"


def test_a_vm_deleted_past_its_finalizer_while_the_agent_is_down_loses_its_domain_when_it_returns(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    vm = apply_vm(kubectl, "forced", **guest_spec(guest_image, NODE, disks=[
        {"name": "data", "emptyDisk": {"size": "16Mi"}}]))
    wait_vm(kubectl, "forced", NAMESPACE, "condition=Ready")
    uid = vm["metadata"]["uid"]
    agent.stop()
    kubectl("patch", "vm", "forced", "-n", NAMESPACE, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    kubectl("delete", "vm", "forced", "-n", NAMESPACE, "--timeout=30s")
    assert domain_state("forced") == "running" and len(owned_volumes(uid)) == 1
    agent.start()

    def listed() -> dict | None:
        probe = agent.probe()
        return probe if probe and probe["agent"]["domainsListed"] else None

    probe = wait_until(listed, timeout=60, what="the liveness probe says the domains are listed")
    assert probe["agent"]["libvirtConnected"] is True, probe
    # Orphans go before any VM is reconciled, so before the probe says the listing is done.
    assert domain_name("forced") not in virsh("list", "--all", "--name").split()
    assert owned_volumes(uid) == []
    assert domain_state("web") == "running", "VMs that still exist keep their domains"


def test_a_vm_deleted_past_its_finalizer_while_the_agent_runs_loses_its_domain_and_disks(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    """The DELETED event alone must remove them: the watch handler runs on the event loop (as a plain
    `def` kopf ran it in a thread, where starting the removal failed with 'no running event loop')."""
    kubectl = control_plane.kubectl
    vm = apply_vm(kubectl, "unfinalized", **guest_spec(guest_image, NODE, disks=[
        {"name": "data", "emptyDisk": {"size": "16Mi"}}]))
    wait_vm(kubectl, "unfinalized", NAMESPACE, "condition=Ready")
    uid = vm["metadata"]["uid"]
    kubectl("patch", "vm", "unfinalized", "-n", NAMESPACE, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    kubectl("delete", "vm", "unfinalized", "-n", NAMESPACE, "--timeout=30s")
    wait_until(lambda: domain_name("unfinalized") not in virsh("list", "--all", "--name").split(), timeout=60,
               what="the domain of the VM deleted past its finalizer is gone")
    wait_until(lambda: owned_volumes(uid) == [], timeout=30, what="its volumes are gone")
    assert domain_state("web") == "running", "VMs that still exist keep their domains"


def test_a_vm_for_a_node_without_an_agent_is_pending(agent: AgentProcess, control_plane: ControlPlane) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "nowhere", nodeName="node-nowhere", memory="64Mi")
    wait_vm(kubectl, "nowhere", NAMESPACE, "jsonpath={.status.printableStatus}=Pending")
    stalled = next(c for c in status(kubectl, "nowhere")["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and "node-nowhere" in stalled["message"]
    kubectl("delete", "vm", "nowhere", "-n", NAMESPACE)
    nodes = json.loads(kubectl("get", "libvirtnodes", "-o", "json").stdout)["items"]
    mine = next(node for node in nodes if node["metadata"]["name"] == NODE)
    assert mine["status"]["hypervisor"]["type"] == "QEMU" and mine["status"]["capacity"]["vcpus"] >= 1


def test_bad_input_at_reconcile_is_stalled_naming_the_field_then_fixed(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "escape", **guest_spec(guest_image, NODE, disks=[
        {"name": "root", "image": {"path": "/var/lib/libvirt/../../etc/passwd", "clone": True}}]))
    wait_vm(kubectl, "escape", NAMESPACE, "condition=Stalled")
    current = status(kubectl, "escape")
    stalled = next(c for c in current["conditions"] if c["type"] == "Stalled")
    assert stalled["message"].startswith("spec.disks[0].image.path: ")
    assert "outside the allowed roots" in stalled["message"]
    assert current["printableStatus"] == "Failed" and current["ready"] is False
    assert current["observedGeneration"] == 1
    assert "Failed" in event_reasons(kubectl, "escape", NAMESPACE) or stalled["reason"] == "InvalidSpec"
    assert domain_name("escape") not in virsh("list", "--all", "--name").split()
    kubectl("patch", "vm", "escape", "-n", NAMESPACE, "--type=json", "-p",
            '[{"op":"replace","path":"/spec/disks/0/image/path","value":"%s"}]' % guest_image.disk)
    wait_vm(kubectl, "escape", NAMESPACE, "condition=Ready")
    assert status(kubectl, "escape")["observedGeneration"] == 2
    delete_vm(kubectl, "escape")
    assert guest_image.disk.exists()


def console_log(name: str) -> str:
    path = re.search(r"<log file='([^']+)'", virsh("dumpxml", domain_name(name))).group(1)
    return Path(path).read_text(errors="replace")


def max_memory_kib(name: str) -> int:
    return int(re.search(r"Max memory:\s+(\d+) KiB", virsh("dominfo", domain_name(name))).group(1))


def condition_status(kubectl: Kubectl, name: str, kind: str) -> str:
    return next(c["status"] for c in status(kubectl, name)["conditions"] if c["type"] == kind)


def test_memory_cpu_and_firmware_changes_wait_for_a_restart_not_a_guest_reboot(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage) -> None:
    """Memory, vCPUs and firmware (bios to uefi): RestartRequired stays True while the domain runs the old
    definition, a guest reboot included (libvirt keeps the QEMU process and its definition); the restart
    annotation boots the new one and clears it."""
    kubectl = control_plane.kubectl
    apply_vm(kubectl, "resize", **guest_spec(guest_image, NODE, marker="resize"))
    wait_vm(kubectl, "resize", NAMESPACE, "condition=Ready")
    wait_until(lambda: "LVO-GUEST-READY resize" in console_log("resize"), what="the guest booted")
    assert max_memory_kib("resize") == 128 * 1024
    kubectl("patch", "vm", "resize", "-n", NAMESPACE, "--type=merge",
            "-p", '{"spec":{"memory":"192Mi","cpu":{"cores":2},"firmware":"uefi"}}')
    wait_vm(kubectl, "resize", NAMESPACE, "condition=RestartRequired")
    pending = status(kubectl, "resize")
    assert pending["observedGeneration"] == 2 and pending["ready"] is True and pending["vcpus"] == 1
    assert max_memory_kib("resize") == 128 * 1024 and "<loader" not in virsh("dumpxml", domain_name("resize"))

    pid = qemu_pid("resize")
    virsh("reset", domain_name("resize"))  # a reboot inside the same QEMU process, as a guest's own reboot
    wait_until(lambda: console_log("resize").count("LVO-GUEST-READY resize") >= 2, what="the guest rebooted")
    kubectl("patch", "vm", "resize", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"paused":true}}')
    wait_vm(kubectl, "resize", NAMESPACE, "jsonpath={.status.printableStatus}=Paused")  # reconciled after the reboot
    assert condition_status(kubectl, "resize", "RestartRequired") == "True"
    assert qemu_pid("resize") == pid and max_memory_kib("resize") == 128 * 1024

    kubectl("patch", "vm", "resize", "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"paused":false}}')
    kubectl("annotate", "vm", "resize", "-n", NAMESPACE, "libvirt-operator.io/restart=1")
    wait_vm(kubectl, "resize", NAMESPACE, "condition=RestartRequired=False", timeout=120)
    assert max_memory_kib("resize") == 192 * 1024 and qemu_pid("resize") != pid
    assert "<loader" in virsh("dumpxml", domain_name("resize"))  # booted on OVMF
    wait_vm(kubectl, "resize", NAMESPACE, "jsonpath={.status.vcpus}=2")
    assert "Restarted" in event_reasons(kubectl, "resize", NAMESPACE)
    delete_vm(kubectl, "resize")


def qcow2_facts(path: str) -> tuple[int, str | None]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)
    return info["virtual-size"], info.get("backing-filename")


def test_a_grown_empty_disk_and_a_new_base_reach_the_domain_at_the_restart(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage, tmp_path: Path) -> None:
    """RestartRequired is true while the running guest has the old disks, and the restart applies them:
    the empty disk grown, the clone a new overlay over the new base (the old overlay gone)."""
    kubectl = control_plane.kubectl
    bases = [Path("/var/lib/libvirt/images") / f"lvo-e2e-base-{n}.qcow2" for n in (1, 2)]
    for base in bases:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    try:
        def disks(base: Path, size: str) -> list[dict]:
            return [{"name": "root", "image": {"path": str(base), "clone": True}},
                    {"name": "data", "emptyDisk": {"size": size}}]

        vm = apply_vm(kubectl, "grow", **guest_spec(guest_image, NODE, disks=disks(bases[0], "16Mi")))
        wait_vm(kubectl, "grow", NAMESPACE, "condition=Ready")
        pool = Path("/var/lib/libvirt/images")
        data, root = (str(pool / f"{vm['metadata']['uid']}-{name}.qcow2") for name in ("data", "root"))
        assert qcow2_facts(data)[0] == 16 << 20 and qcow2_facts(root)[1] == str(bases[0])
        kubectl("apply", "-f", "-", input=vm_manifest("grow", NAMESPACE, **guest_spec(
            guest_image, NODE, disks=disks(bases[1], "32Mi"))))
        wait_vm(kubectl, "grow", NAMESPACE, "condition=RestartRequired")
        assert qcow2_facts(data)[0] == 16 << 20 and qcow2_facts(root)[1] == str(bases[0])
        kubectl("annotate", "vm", "grow", "-n", NAMESPACE, "libvirt-operator.io/restart=1")
        wait_vm(kubectl, "grow", NAMESPACE, "condition=RestartRequired=False", timeout=120)
        wait_vm(kubectl, "grow", NAMESPACE, "condition=Ready")
        assert qcow2_facts(data)[0] == 32 << 20 and qcow2_facts(root)[1] == str(bases[1])
        live = virsh("dumpxml", domain_name("grow"))
        assert str(bases[1]) in live and str(bases[0]) not in live
        delete_vm(kubectl, "grow")
    finally:
        for base in bases:
            base.unlink(missing_ok=True)


def seed_user_data(path: str) -> bytes:
    import io

    import pycdlib
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/user-data")
        return out.getvalue()
    finally:
        iso.close()


def test_binary_user_data_in_a_secret_reaches_the_seed_as_it_is(
        agent: AgentProcess, control_plane: ControlPlane, guest_image: GuestImage, tmp_path: Path) -> None:
    """cloud-init takes gzip-compressed user data: a Secret holding it (not UTF-8) is put in the seed byte
    for byte (it left the VM neither Ready nor Stalled, retrying a UnicodeDecodeError for good)."""
    import gzip
    kubectl = control_plane.kubectl
    packed = gzip.compress(b"#cloud-config\nhostname: zipped\n")
    (tmp_path / "userdata").write_bytes(packed)
    kubectl("-n", NAMESPACE, "create", "secret", "generic", "zipped-userdata", f"--from-file=userdata={tmp_path / 'userdata'}")
    vm = apply_vm(kubectl, "zipped", **guest_spec(guest_image, NODE, disks=[
        {"name": "seed", "cloudInit": {"userDataSecretRef": {"name": "zipped-userdata"}}}]))
    wait_vm(kubectl, "zipped", NAMESPACE, "condition=Ready")
    assert seed_user_data(f"/var/lib/libvirt/images/{vm['metadata']['uid']}-seed-cidata.iso") == packed
    delete_vm(kubectl, "zipped")
