#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmarks need on a fresh Debian 12 machine, as
# root: Debian packages (libvirt, QEMU, the guest kernel), a virtualenv with the project and
# its test dependencies, the Go-built control plane and node binaries, and the agent's image. Idempotent and quick when
# everything is already there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$repo/.venv}
apt_packages=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev pkg-config qemu-system-x86 qemu-utils ovmf
  linux-image-cloud-amd64 busybox-static cpio
  python3-venv python3-dev gcc libxml2-utils
  containerd runc containernetworking-plugins iptables mmdebstrap buildah
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.installed-$(cat "$repo/pyproject.toml" "$repo/requirements.lock" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$repo/requirements.lock"
  "$venv/bin/pip" install -q --no-deps -e "$repo[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
"$repo/hack/build-binaries.sh"
"$repo/hack/build-node-binaries.sh" >/dev/null
"$repo/hack/build-image.sh" >/dev/null
