"""Fixtures shared by every tier: libvirt (test driver and real libvirtd), guest image, control plane."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from lvo_testing import libvirt_env
from lvo_testing.controlplane import ControlPlane

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


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver (TLS, RBAC) on loopback for the whole session."""
    with ControlPlane(tmp_path_factory.mktemp("control-plane")) as plane:
        yield plane


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Real kubectl as the cluster admin: `kubectl("get", "vm", input=None, check=True)`."""
    return control_plane.kubectl


TIERS = ("unit", "libvirt", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one tier, so `pytest -m TIER` runs a whole tier."""
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(set(tiers)) != 1:
            raise pytest.UsageError(f"{item.nodeid} must carry exactly one of the markers {TIERS}, has {tiers}")
