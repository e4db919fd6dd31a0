"""Fixtures shared by every tier: libvirt (test driver and real libvirtd), guest image, control plane."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from libvirt_operator.testing import libvirt_env

TEST_DRIVER_URI = "test:///default"


@pytest.fixture
def test_uri() -> Iterator[str]:
    """libvirt's in-process test driver; every domain a test defines is removed afterwards."""
    before = libvirt_env.test_driver_domain_names(TEST_DRIVER_URI)
    yield TEST_DRIVER_URI
    libvirt_env.remove_test_driver_domains(TEST_DRIVER_URI, keep=before)


@pytest.fixture(scope="session")
def system_uri() -> Iterator[str]:
    """A real libvirtd with QEMU at qemu:///system, started for the session when none runs."""
    with libvirt_env.running_libvirtd() as uri:
        yield uri


@pytest.fixture(scope="session")
def guest_image(system_uri: str) -> libvirt_env.GuestImage:
    """A tiny bootable guest (Debian cloud kernel + busybox initramfs), built once per machine."""
    return libvirt_env.build_guest_image()
