# The libvirt-operator agent. Build: docker build -t libvirt-operator:0.1.0 .
# Deploy: kubectl apply -k manifests/ (a DaemonSet running this image on every node).
#
# Debian's own python3 on Debian's slim base, so libvirt-python is compiled against, and runs with,
# the libvirt0 of the same release. Stage 1 builds a virtualenv: libvirt-python compiles against
# libvirt-dev; every other dependency comes as a wheel at the version requirements.lock pins.
# Stage 2 gets only what the agent needs at run time: python3, libvirt0 for libvirt-python, and
# qemu-utils for `qemu-img info` (lxml's wheels bundle libxml2, pycdlib is pure Python). No
# compiler, no headers and no pip cache reach the final image.
FROM debian:bookworm-slim AS build
# For a build behind a TLS-intercepting proxy: the path of a CA bundle mounted into the build.
ARG PIP_CERT
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 python3-venv=3.11.2-1+b1 python3-dev=3.11.2-1+b1 \
      gcc=4:12.2.0-3 pkg-config=1.8.1-1 libvirt-dev=9.0.0-4+deb12u2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY operator ./operator
# The package and its runtime dependencies only (the lock also pins the test tools; --constraint
# takes its versions without installing what the package does not need).
RUN python3 -m venv /opt/libvirt-operator \
 && /opt/libvirt-operator/bin/pip install --no-cache-dir --no-compile --constraint requirements.lock . \
 && /opt/libvirt-operator/bin/pip uninstall -y pip setuptools \
 && find /opt/libvirt-operator -name __pycache__ -prune -exec rm -rf {} +

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 libvirt0=9.0.0-4+deb12u2 \
      qemu-utils=1:7.2+dfsg-7+deb12u18+b3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/libvirt-operator /opt/libvirt-operator
ENV PATH=/opt/libvirt-operator/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Runs as root (the image default), on purpose: the agent talks to the host's libvirtd socket and
# reads files under /var/lib/libvirt, both root's on a libvirt host. The DaemonSet drops every
# capability but DAC_READ_SEARCH and mounts the root filesystem read-only.
EXPOSE 8080 9090
ENTRYPOINT ["libvirt-operator", "run"]
