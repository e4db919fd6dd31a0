# Sourced by hack/build-binaries.sh and hack/build-node-binaries.sh.
# kube_build OUT COMMAND...: builds k8s.io/kubernetes/cmd/COMMAND... at the version hack/kube/go.mod
# pins into OUT, with the version stamped in as the release build does (`kubectl version` and the
# API server's /version report it).
kube_build() {
  local out=$1; shift
  local mod
  mod=$(cd "$(dirname "${BASH_SOURCE[0]}")/../kube" && pwd)
  local k8s_version minor stamp="" pkg
  k8s_version=$(awk '/^require k8s.io\/kubernetes /{print $3}' "$mod/go.mod")
  minor=${k8s_version#v1.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  done
  echo "building $* $k8s_version into $out" >&2
  (cd "$mod" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod \
     go build -trimpath -ldflags "-s -w$stamp" -o "$out/" "${@/#/k8s.io/kubernetes/cmd/}") >&2
}
