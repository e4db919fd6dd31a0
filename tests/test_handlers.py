"""How the agent finds the API server from inside a pod."""

from __future__ import annotations

import pytest

from libvirt_operator.handlers import in_cluster_server

pytestmark = pytest.mark.unit


def test_the_kubernetes_service_address_from_the_pod_environment() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_server(environ) == "https://10.0.0.1:443"


def test_an_ipv6_service_address_is_bracketed() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster_server(environ) == "https://[fd00::1]:443"


def test_outside_a_pod_there_is_no_in_cluster_server() -> None:
    assert in_cluster_server({}) is None
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None
