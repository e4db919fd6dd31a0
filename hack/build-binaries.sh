#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from the Go module proxy at the versions pinned in
# hack/kube and hack/etcd, into a cache outside the repo keyed by those go.mod/go.sum files,
# so only the first run on a machine pays for the build. Prints the cache directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LIBVIRT_OPERATOR_CACHE:-/var/cache/libvirt-operator}
# shellcheck source=hack/lib/kube-build.sh
source "$here/lib/kube-build.sh"
key=$(cat "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$here/lib/kube-build.sh" "$0" \
  | sha256sum | cut -c1-16)
out="$cache_root/bin/$key"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out.tmp"
kube_build "$out.tmp" kube-apiserver kubectl
echo "building etcd" >&2
(cd "$here/etcd" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3) >&2
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
