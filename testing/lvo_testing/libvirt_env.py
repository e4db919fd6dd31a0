"""A real libvirt for tests, benchmarks and the demo.

`running_libvirtd()` starts `virtlogd` and `libvirtd` (system mode, as root) when none answers
on qemu:///system, with the QEMU settings this sandboxed machine needs, and stops what it
started. `build_guest_image()` makes a tiny bootable guest from Debian's cloud kernel and a
busybox initramfs, cached outside the repository.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from lvo_testing.controlplane import pid_alive

SYSTEM_URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
# As Debian's libvirt runs on hosts: QEMU as libvirt-qemu, files relabelled by the DAC driver (always stacked
# under the configured driver; the key left unset, libvirt picks the host's default: none without AppArmor).
QEMU_SETTINGS: dict[str, str | None] = {
    "user": '"libvirt-qemu"',
    "group": '"libvirt-qemu"',
    "dynamic_ownership": "1",
    "remember_owner": "1",
    "security_driver": None,
}
# Only the CPU controllers: libvirt then puts every guest under the `machine` cgroup, whose one
# weight all guests share against the host's own processes (libvirtd, the agent, QEMU starting a
# guest), as systemd hosts do with machine.slice (see README, "Guests and the host's own
# processes"). The other controllers stay off, as they were before guests had a cgroup here.
GUEST_CPU_CGROUP = '[ "cpu", "cpuacct" ]'
NO_CGROUPS = "[ ]"
LIBVIRTD_CONF = Path("/etc/libvirt/libvirtd.conf")
# libvirtd runs 20 calls at a time by default, whoever sends them: 50 guests starting at once would
# queue behind 20 (see README, "The host's libvirtd").
LIBVIRTD_SETTINGS = {
    "max_workers": "64",
}
DEFAULT_POOL = "default"
DEFAULT_POOL_PATH = Path("/var/lib/libvirt/images")
GUEST_CACHE = Path("/var/lib/libvirt/boot/libvirt-operator-tests")
GUEST_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "sr_mod", "ahci", "isofs",
    "button", "evdev", "virtio_net",
)
BOOT_MARKER = "LVO-GUEST-BOOTED"
# Where the counter guest keeps its counts on its disk: count n in 512-byte slot n % COUNTER_SLOTS from
# COUNTER_OFFSET on, past the base disk's marker (which stays readable).
COUNTER_OFFSET = 1024 * 1024
COUNTER_SLOTS = 2048


def _virsh(*args: str, uri: str = SYSTEM_URI, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=check, timeout=60)


def libvirtd_answers(uri: str = SYSTEM_URI) -> bool:
    try:
        return _virsh("version", uri=uri, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _set_config(path: Path, settings: Mapping[str, str | None]) -> bool:
    """Sets `settings` in a libvirt config file (None: the key unset), keeping its other lines; True if the file
    changed."""
    before = path.read_text() if path.exists() else ""
    kept = [line for line in before.splitlines() if line.split("=")[0].strip() not in settings]
    after = "\n".join(kept + [f"{k} = {v}" for k, v in settings.items() if v is not None]) + "\n"
    if after == before:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(after)
    return True


def _configure(guest_cpu_cgroup: bool) -> bool:
    """Writes the daemons' settings and makes the users they need; True if libvirtd's settings changed."""
    cgroups = GUEST_CPU_CGROUP if guest_cpu_cgroup else NO_CGROUPS
    qemu_changed = _set_config(QEMU_CONF, {**QEMU_SETTINGS, "cgroup_controllers": cgroups})
    libvirtd_changed = _set_config(LIBVIRTD_CONF, LIBVIRTD_SETTINGS)
    for group in ("kvm", "libvirt-qemu"):
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            subprocess.run(["groupadd", "--system", group], check=True)
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-g", "libvirt-qemu", "-G", "kvm", "libvirt-qemu"], check=True,
        )
    for d in ("/var/run/libvirt", "/var/lib/libvirt/qemu", "/var/log/libvirt/qemu", "/var/cache/libvirt"):
        Path(d).mkdir(parents=True, exist_ok=True)
    return qemu_changed or libvirtd_changed


def _pids(name: str) -> list[int]:
    """Live processes called `name`; a killed daemon's zombie, not yet reaped by PID 1, does not count."""
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if pid_alive(int(p))]


def _socket_answers(path: Path) -> bool:
    """Something accepts connections on the Unix socket `path` (a file left by a killed daemon does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start_daemons(guest_cpu_cgroup: bool = True) -> None:
    """Starts virtlogd and libvirtd as daemons (or restarts libvirtd whose settings changed) and waits
    until qemu:///system answers."""
    if _configure(guest_cpu_cgroup) and _pids("libvirtd"):
        kill_libvirtd(signal.SIGTERM)  # libvirtd reads its settings when it starts; running guests stay
    if not _socket_answers(VIRTLOGD_SOCKET):
        for pid in _pids("virtlogd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        VIRTLOGD_SOCKET.unlink(missing_ok=True)
        subprocess.run(["virtlogd", "-d"], check=True)
    if not _pids("libvirtd"):
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 30
    while not libvirtd_answers():
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd did not answer on qemu:///system within 30 s")
        time.sleep(0.2)


def stop_daemons() -> None:
    for name in ("libvirtd", "virtlogd"):
        for pid in _pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while (_pids("libvirtd") or _pids("virtlogd")) and time.monotonic() < deadline:
        time.sleep(0.1)


def kill_libvirtd(signum: int = signal.SIGKILL) -> None:
    """`kill -9` of libvirtd, as a crash would (SIGTERM: a service restart); QEMU guests keep running."""
    for pid in _pids("libvirtd"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    deadline = time.monotonic() + 10
    while _pids("libvirtd") and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def libvirtd_stopped() -> Iterator[None]:
    """libvirtd SIGSTOPped (hung: connections stay open, nothing answers), SIGCONTed on leaving."""
    pids = _pids("libvirtd")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def restart_libvirtd(signum: int = signal.SIGKILL) -> None:
    kill_libvirtd(signum)
    start_daemons()


def ensure_storage_pool(name: str = DEFAULT_POOL, path: Path = DEFAULT_POOL_PATH) -> None:
    """Defines and starts a directory pool, as `virsh pool-define-as NAME dir` would."""
    path.mkdir(parents=True, exist_ok=True)
    info = _virsh("pool-info", name, check=False)
    if info.returncode != 0:
        _virsh("pool-define-as", name, "dir", "--target", str(path))
        _virsh("pool-autostart", name)
    if "State:          running" not in _virsh("pool-info", name).stdout:
        _virsh("pool-start", name)


@contextlib.contextmanager
def running_libvirtd(guest_cpu_cgroup: bool = True) -> Iterator[str]:
    """Yields qemu:///system with these settings: starts the daemons when none answer (and stops them
    afterwards), restarts a libvirtd whose settings differ (its guests keep running)."""
    started = not libvirtd_answers() or not _socket_answers(VIRTLOGD_SOCKET)
    start_daemons(guest_cpu_cgroup)
    ensure_storage_pool()
    try:
        yield SYSTEM_URI
    finally:
        if started:
            stop_daemons()


def test_driver_domain_names(uri: str) -> set[str]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()


def remove_test_driver_domains(uri: str, keep: set[str]) -> None:
    import libvirt

    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name() in keep:
                continue
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
    finally:
        conn.close()


@dataclass(frozen=True)
class GuestImage:
    """A kernel, an initramfs whose init reports what it sees, and a base disk with a marker.

    The init prints `LVO-GUEST-BOOTED <lvo.marker>` on the serial console, then
    `LVO-DISK <dev> <first 64 printable bytes>` for every block device, `LVO-CIDATA <first line
    of user-data>` for an ISO9660 seed labelled cidata, and powers off after `lvo.poweroff=N`
    seconds when given; an ACPI power button press powers it off at once.

    With `lvo.counter=1` it then counts, every 0.2 s from 1 at each boot: it reads back count n-1 from
    /dev/vda (`lvo.counterdisk=vdX` names another disk), prints `LVO-COUNT <n> disk=<what it read, or
    none>` on the serial console, then writes n to its own slot (COUNTER_SLOTS slots of 512 bytes from
    COUNTER_OFFSET; reads and writes pass the page cache, writes are synced): earlier counts stay on the
    disk, where a test can read them from the host. A guest that went on has counts that only grow and
    one `LVO-GUEST-BOOTED` line; `lvo_testing.guest_counter` reads both.
    """

    kernel: Path
    initrd: Path
    disk: Path
    disk_marker: str

    def cmdline(self, marker: str = "", poweroff_after: int | None = None, counter: bool = False,
                counter_disk: str | None = None) -> str:
        # no_timer_check: a vCPU starved by other guests (50 booting on 2 cores) fails the kernel's
        # IO-APIC timer check, which then panics ("IO-APIC + timer doesn't work!") or hangs the boot.
        parts = ["console=ttyS0", "quiet", "panic=-1", "no_timer_check"]
        if marker:
            parts.append(f"lvo.marker={marker}")
        if poweroff_after is not None:
            parts.append(f"lvo.poweroff={poweroff_after}")
        if counter:
            parts.append("lvo.counter=1")
        if counter_disk:
            parts.append(f"lvo.counterdisk={counter_disk}")
        return " ".join(parts)


INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules-order); do insmod "/lib/modules/$m" 2>/dev/null; done
marker=""; poweroff_after=""; counter=""; counter_disk="vda"
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    lvo.marker=*) marker="${arg#lvo.marker=}" ;;
    lvo.poweroff=*) poweroff_after="${arg#lvo.poweroff=}" ;;
    lvo.counter=*) counter="${arg#lvo.counter=}" ;;
    lvo.counterdisk=*) counter_disk="${arg#lvo.counterdisk=}" ;;
  esac
done
echo "LVO-GUEST-BOOTED $marker" > /dev/ttyS0
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -d /etc/acpi >/dev/null 2>&1 &
sleep 1
mkdir -p /mnt
for path in /sys/block/vd* /sys/block/sd* /sys/block/sr*; do
  [ -e "$path" ] || continue
  dev="${path##*/}"
  echo "LVO-DISK $dev $(head -c 64 "/dev/$dev" | tr -cd 'A-Za-z0-9._ -')" > /dev/ttyS0
  if mount -t iso9660 -o ro "/dev/$dev" /mnt 2>/dev/null; then
    [ -f /mnt/user-data ] && echo "LVO-CIDATA $(head -n 1 /mnt/user-data)" > /dev/ttyS0
    umount /mnt
  fi
done
echo "LVO-GUEST-READY $marker" > /dev/ttyS0
if [ "$counter" = 1 ]; then
  (
    n=1
    while true; do
      was=$(dd if="/dev/$counter_disk" bs=512 skip=$((COUNTER_SECTOR + (n - 1) % COUNTER_SLOTS)) count=1 iflag=direct 2>/dev/null | tr -cd '0-9')
      echo "LVO-COUNT $n disk=${was:-none}" > /dev/ttyS0
      printf '%-511s\n' "$n" | dd of="/dev/$counter_disk" bs=512 seek=$((COUNTER_SECTOR + n % COUNTER_SLOTS)) count=1 oflag=direct conv=notrunc,fsync 2>/dev/null
      n=$((n + 1))
      sleep 0.2
    done
  ) &
fi
if [ -n "$poweroff_after" ]; then
  sleep "$poweroff_after"
  echo "LVO-GUEST-POWEROFF $marker" > /dev/ttyS0
  poweroff -f
fi
while true; do sleep 3600; done
""".replace("COUNTER_SECTOR", str(COUNTER_OFFSET // 512)).replace("COUNTER_SLOTS", str(COUNTER_SLOTS))


def _module_order(kernel_release: str, wanted: tuple[str, ...]) -> list[str]:
    """The .ko paths to load for `wanted`, dependencies first, from modules.dep."""
    moddir = Path("/lib/modules") / kernel_release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    by_name = {Path(p).name.removesuffix(".ko"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return order


def _cloud_kernel() -> tuple[str, Path]:
    kernels = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise RuntimeError("no Debian cloud kernel in /boot: install linux-image-cloud-amd64")
    kernel = kernels[-1]
    return kernel.name.removeprefix("vmlinuz-"), kernel


def _write_initramfs(kernel_release: str, target: Path, workdir: Path) -> None:
    root = workdir / "root"
    for d in ("bin", "dev", "proc", "sys", "etc", "mnt", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    order = _module_order(kernel_release, GUEST_MODULES)
    for rel in order:
        shutil.copy2(Path("/lib/modules") / kernel_release / rel, root / "lib/modules" / Path(rel).name)
    (root / "etc/modules-order").write_text("\n".join(Path(rel).name for rel in order) + "\n")
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names.encode(), capture_output=True, check=True,
    ).stdout
    target.write_bytes(gzip.compress(archive, mtime=0))


def _write_base_disk(target: Path, marker: str, workdir: Path) -> None:
    raw = workdir / "disk.raw"
    with raw.open("wb") as f:
        f.write(marker.encode().ljust(64, b" "))
        f.truncate(8 * 1024 * 1024)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(target)], check=True)


def build_guest_image(cache: Path = GUEST_CACHE) -> GuestImage:
    """Builds (once per machine and kernel) the guest image under `cache` and returns it."""
    release, kernel = _cloud_kernel()
    key = hashlib.sha256((release + INIT_SCRIPT + ",".join(GUEST_MODULES)).encode()).hexdigest()[:12]
    out = cache / key
    marker = f"LVO-BASE-DISK-{key}"
    image = GuestImage(out / "vmlinuz", out / "initrd.img", out / "base.qcow2", marker)
    if image.disk.exists():
        return image
    work = cache / f"{key}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy2(kernel, work / "vmlinuz")
    _write_initramfs(release, work / "initrd.img", work)
    _write_base_disk(work / "base.qcow2", marker, work)
    shutil.rmtree(work / "root")
    (work / "disk.raw").unlink()
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return image
