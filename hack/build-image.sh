#!/usr/bin/env bash
# Builds the agent's image from the repository's Dockerfile with buildah, as a user's
# `docker build -t libvirt-operator:0.1.0 .` would, and writes it as a docker-archive that
# `ctr images import` (containerd) and `docker load` read. Prints the archive's path.
#
# No container registry is reachable here, so the two images the build starts from are made
# locally under the names a user pulls:
#   - debian:bookworm-slim, from Debian's packages with mmdebstrap (minbase, no docs, apt cleaning
#     its cache as Docker's Debian images do); an image of that name that this script did not make
#     (a real pull) is used as it is;
#   - the pause image containerd runs as each pod's sandbox: a static binary that waits for a signal.
# Everything is cached by the hash of what goes into it: a second run with nothing changed takes a
# second. LIBVIRT_OPERATOR_CACHE moves the cache (default /var/cache/libvirt-operator).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${LIBVIRT_OPERATOR_CACHE:-/var/cache/libvirt-operator}/images
mkdir -p "$cache"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml")
image=docker.io/library/libvirt-operator:$version
base=docker.io/library/debian:bookworm-slim
pause=localhost/libvirt-operator-pause:1
recipe_label=io.libvirt-operator.recipe

label_of() {  # the recipe label of a local image, empty when the image is absent or has none
  buildah inspect --type image --format "{{index .ImageAnnotations \"$recipe_label\"}}" "$1" 2>/dev/null || true
}

build_base() {
  local key=$1 tar=$cache/debian-bookworm-slim.tar
  echo "making $base from Debian's packages (mmdebstrap)" >&2
  local clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
  mmdebstrap --variant=minbase --format=tar --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="printf '%s\n' 'DPkg::Post-Invoke { \"$clean\"; };' 'APT::Update::Post-Invoke { \"$clean\"; };' 'Dir::Cache::pkgcache \"\";' 'Dir::Cache::srcpkgcache \"\";' > \"\$1/etc/apt/apt.conf.d/docker-clean\"" \
    --customize-hook='rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*' \
    bookworm "$tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2
  local c
  c=$(buildah from scratch)
  buildah add "$c" "$tar" / >/dev/null
  buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --annotation "$recipe_label=$key" "$c"
  buildah commit --quiet --rm "$c" "$base" >/dev/null
  rm -f "$tar"
}

build_pause() {
  local key=$1 work
  work=$(mktemp -d)
  printf '%s\n' '#include <signal.h>' '#include <unistd.h>' \
    'static void done(int s) { (void)s; _exit(0); }' \
    'int main(void) { signal(SIGINT, done); signal(SIGTERM, done); for (;;) pause(); }' > "$work/pause.c"
  gcc -static -Os -o "$work/pause" "$work/pause.c"
  local c
  c=$(buildah from scratch)
  buildah copy "$c" "$work/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --annotation "$recipe_label=$key" "$c"
  buildah commit --quiet --rm "$c" "$pause" >/dev/null
  rm -rf "$work"
}

context_hash() {  # what the Dockerfile reads: the allow-list of .dockerignore
  (cd "$repo" && find Dockerfile .dockerignore README.md pyproject.toml requirements.lock operator \
      -type f ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

script_key=$(sha256sum "$0" | cut -c1-16)
base_label=$(label_of "$base")
if ! buildah inspect --type image "$base" >/dev/null 2>&1 || { [ -n "$base_label" ] && [ "$base_label" != "$script_key" ]; }; then
  build_base "$script_key"
fi
[ "$(label_of "$pause")" = "$script_key" ] || build_pause "$script_key"

key=$(printf '%s %s %s' "$(context_hash)" "$(buildah inspect --type image --format '{{.FromImageID}}' "$base")" "$script_key" \
  | sha256sum | cut -c1-16)
archive=$cache/libvirt-operator-$key.tar
if [ ! -f "$archive" ]; then
  echo "building $image from the Dockerfile (buildah)" >&2
  # Outbound TLS may be re-signed by a local CA: pip in the build trusts the host's bundle.
  buildah bud --pull-never --network host --isolation chroot --layers --quiet \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.pem:ro --build-arg PIP_CERT=/etc/ssl/host-ca.pem \
    -t "$image" "$repo" >&2
  rm -f "$cache"/libvirt-operator-*.tar "$archive.tmp"
  buildah push --quiet "$image" "docker-archive:$archive.tmp:$image" >&2
  mv "$archive.tmp" "$archive"
fi
pause_archive=$cache/pause-$script_key.tar
if [ ! -f "$pause_archive" ]; then
  rm -f "$cache"/pause-*.tar
  buildah push --quiet "$pause" "docker-archive:$pause_archive.tmp:$pause" >&2
  mv "$pause_archive.tmp" "$pause_archive"
fi
echo "$archive"
echo "$pause_archive"
