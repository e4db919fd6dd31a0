#!/usr/bin/env bash
# Builds the binaries of a real Kubernetes node (kubelet, kube-scheduler, kube-controller-manager,
# kube-proxy) from the same module as the control plane (hack/kube), into a cache outside the
# repo keyed by its go.mod/go.sum, so only the first run on a machine pays (about 150 s with a
# warm module cache). Prints the cache directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LIBVIRT_OPERATOR_CACHE:-/var/cache/libvirt-operator}
key=$(cat "$here"/kube/go.mod "$here"/kube/go.sum "$0" | sha256sum | cut -c1-16)
out="$cache_root/node-bin/$key"
commands=(kubelet kube-scheduler kube-controller-manager kube-proxy)
ready=1
for c in "${commands[@]}"; do [ -x "$out/$c" ] || ready=0; done
if [ "$ready" = 1 ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out.tmp"
k8s_version=$(awk '/^require k8s.io\/kubernetes /{print $3}' "$here/kube/go.mod")
minor=${k8s_version#v1.}; minor=${minor%%.*}
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
done
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
echo "building ${commands[*]} $k8s_version into $out" >&2
(cd "$here/kube" && go build -trimpath -ldflags "-s -w$stamp" -o "$out.tmp/" \
  "${commands[@]/#/k8s.io/kubernetes/cmd/}") >&2
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
