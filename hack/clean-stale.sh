#!/usr/bin/env bash
# CI's machine may hold what an earlier, killed run left: test control planes and agents, a demo, a
# benchmark's processes, guests of the operator's test clusters and their disks. Removes those (and only
# the operator's: domains without the operator's mark and other processes are left alone), so a run
# starts clean. CI runs it before the suite; on a host that runs real clusters' VMs do not run it.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${VENV:-$repo/.venv}/bin/python

if [ -f /var/tmp/libvirt-operator-demo/agent.json ] && [ -x "$py" ]; then
  "$py" "$repo/hack/demo.py" down || true
fi
# Processes of earlier test sessions and benchmarks: their command lines name their work directories.
for pattern in '/tmp/pytest-of-' '/tmp/lvo-bench-' '/var/tmp/libvirt-operator-demo'; do
  pkill -KILL -f -- "$pattern" 2>/dev/null && echo "clean-stale: stopped processes of $pattern"
done
# A killed run's domains persist in libvirtd's configuration while no libvirtd runs (a rebooted machine):
# start it to remove them, as the suite would start it and find them.
if command -v libvirtd >/dev/null && ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 150); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
fi
if virsh -c qemu:///system version >/dev/null 2>&1; then
  for uuid in $(virsh -c qemu:///system list --all --uuid); do
    if virsh -c qemu:///system dumpxml --inactive "$uuid" 2>/dev/null | grep -q 'xmlns/domain/v1'; then
      virsh -c qemu:///system destroy "$uuid" >/dev/null 2>&1
      virsh -c qemu:///system undefine "$uuid" --nvram >/dev/null 2>&1 || virsh -c qemu:///system undefine "$uuid" >/dev/null 2>&1
      echo "clean-stale: removed the operator's domain $uuid"
    fi
  done
  for volume in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk 'NR>2 {print $1}'); do
    case "$volume" in
      [0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-*)
        virsh -c qemu:///system vol-delete "$volume" --pool default >/dev/null 2>&1 && echo "clean-stale: deleted volume $volume";;
    esac
  done
fi
# A real test node (kubelet, containerd, its network namespace, mounts, cgroups and sysctls), and the
# test bed of several libvirt hosts (testing/lvo_testing/libvirt_hosts.py).
python3 "$(dirname "$0")/../testing/lvo_testing/node_cleanup.py"
exit 0
