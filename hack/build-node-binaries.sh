#!/usr/bin/env bash
# Builds the binaries of a real Kubernetes node (kubelet, kube-scheduler, kube-controller-manager,
# kube-proxy) from the same module as the control plane (hack/kube), into a cache outside the
# repo keyed by its go.mod/go.sum, so only the first run on a machine pays (about 150 s with a
# warm module cache). Prints the cache directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LIBVIRT_OPERATOR_CACHE:-/var/cache/libvirt-operator}
# shellcheck source=hack/lib/kube-build.sh
source "$here/lib/kube-build.sh"
key=$(cat "$here"/kube/go.mod "$here"/kube/go.sum "$here/lib/kube-build.sh" "$0" | sha256sum | cut -c1-16)
out="$cache_root/node-bin/$key"
commands=(kubelet kube-scheduler kube-controller-manager kube-proxy)
ready=1
for c in "${commands[@]}"; do [ -x "$out/$c" ] || ready=0; done
if [ "$ready" = 1 ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out.tmp"
kube_build "$out.tmp" "${commands[@]}"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
