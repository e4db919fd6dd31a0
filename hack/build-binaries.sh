#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from the Go module proxy at the versions pinned in
# hack/kube and hack/etcd, into a cache outside the repo keyed by those go.mod/go.sum files,
# so only the first run on a machine pays for the build. Prints the cache directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LIBVIRT_OPERATOR_CACHE:-/var/cache/libvirt-operator}
key=$(cat "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$0" | sha256sum | cut -c1-16)
out="$cache_root/bin/$key"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ] && [ -x "$out/etcd" ]; then
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
echo "building kube-apiserver and kubectl $k8s_version into $out" >&2
(cd "$here/kube" && go build -trimpath -ldflags "-s -w$stamp" -o "$out.tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl) >&2
echo "building etcd" >&2
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3) >&2
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
