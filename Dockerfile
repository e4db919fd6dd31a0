# The libvirt-operator agent. Build: docker build -t libvirt-operator:0.1.0 .
# Deploy: kubectl apply -k manifests/ (a DaemonSet running this image on every node).
#
# Stage 1 builds wheels: libvirt-python compiles against libvirt-dev; every other dependency comes
# as a wheel at the version requirements.lock pins. Stage 2 gets only runtime libraries: libvirt0
# for libvirt-python, qemu-utils for `qemu-img info` on image disks (lxml's wheels bundle libxml2,
# pycdlib is pure Python). No compiler and no headers reach the final image.
FROM python:3.11.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 pkg-config=1.8.1-1 libvirt-dev=9.0.0-4+deb12u2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY operator ./operator
# The package and its runtime dependencies only (the lock also pins the test tools; --constraint
# takes its versions without installing what the package does not need).
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint requirements.lock .

FROM python:3.11.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0=9.0.0-4+deb12u2 qemu-utils=1:7.2+dfsg-7+deb12u18+b3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels libvirt-operator==0.1.0 \
 && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Runs as root (the image default), on purpose: the agent talks to the host's libvirtd socket and
# reads files under /var/lib/libvirt, both root's on a libvirt host. The DaemonSet drops every
# capability but DAC_READ_SEARCH and mounts the root filesystem read-only.
EXPOSE 8080 9090
ENTRYPOINT ["libvirt-operator", "run"]
