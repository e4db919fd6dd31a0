# The libvirt-operator agent. Build: docker build -t libvirt-operator:0.1.0 .
# Stage 1 builds wheels (libvirt-python compiles against libvirt-dev); stage 2 has no compilers.
FROM python:3.11.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 pkg-config=1.8.1-1 libvirt-dev=9.0.0-4+deb12u2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.lock \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0=9.0.0-4+deb12u2 qemu-utils=1:7.2+dfsg-7+deb12u18+b3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels libvirt-operator==0.1.0 \
 && rm -rf /wheels
# Runs as root (the image default): the agent talks to the host's libvirtd socket and manages
# files under /var/lib/libvirt, both root's on a libvirt host.
EXPOSE 8080 9090
ENTRYPOINT ["libvirt-operator", "run"]
