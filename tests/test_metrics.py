"""What an agent's /metrics shows."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from libvirt_operator.metrics import AgentCollector, Readings

pytestmark = pytest.mark.unit


def test_metrics_show_running_domains_on_a_host_with_none() -> None:
    """Whoever counts each agent's running domains (the fleet tests, an admin) finds the line at 0 too."""
    readings = Readings(reconciles=0, reconcile_seconds=0.0, libvirt_calls=Counter(), libvirt_call_seconds=Counter(),
                        libvirt_connections_opened=0, kubernetes_writes=Counter(), domain_states=Counter(paused=2),
                        foreign_domains=0, queue_depth=0, libvirt_connected=True, placement_leader=False,
                        placement_decisions=0, placement_decision_seconds=0.0)
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: readings))
    text = generate_latest(registry).decode()
    assert 'libvirt_operator_domains{state="running"} 0.0' in text
    assert 'libvirt_operator_domains{state="paused"} 2.0' in text
