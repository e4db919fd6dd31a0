"""Prometheus metrics of one agent, read from its counters at scrape time (nothing on the hot path)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from libvirt_operator.agent import Agent

PREFIX = "libvirt_operator"
EVENT_TO_STATUS = Histogram(
    f"{PREFIX}_event_to_status_seconds", "From a libvirt domain event to the status patch that reports it.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=None,
)


def _labelled(kind: type[Metric], name: str, documentation: str, labels: list[str],
              values: Counter[tuple[str, ...]] | Counter[str]) -> Metric:
    family = kind(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class AgentCollector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        yield CounterMetricFamily(f"{PREFIX}_reconciles", "Reconciles run.", value=agent.reconciles)
        yield CounterMetricFamily(f"{PREFIX}_reconcile_seconds", "Time spent reconciling.", value=agent.reconcile_seconds)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_libvirt_calls", "libvirt calls made, by API.", ["api"],
                        agent.host.calls)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_libvirt_call_seconds", "Time spent in libvirt calls, by API.",
                        ["api"], agent.host.call_seconds)
        yield CounterMetricFamily(f"{PREFIX}_libvirt_connections_opened",
                                  "libvirt connections opened: the agent's own and one per worker thread.",
                                  value=agent.host.connections_opened)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_kubernetes_writes", "Kubernetes writes made, by verb and resource.",
                        ["verb", "resource"], agent.kube.writes)
        states = Counter(snapshot.state for snapshot in agent.cache.snapshots().values())
        yield _labelled(GaugeMetricFamily, f"{PREFIX}_domains", "Owned domains on this host, by state.", ["state"], states)
        yield GaugeMetricFamily(f"{PREFIX}_foreign_domains",
                                "Domains on this host that are not this cluster's (unmarked, or another cluster's).",
                                value=agent.cache.foreign_domains)
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "VMs waiting for or in a reconcile.", value=len(agent.queue))
        yield GaugeMetricFamily(f"{PREFIX}_libvirt_connected", "1 while the libvirt connection is up.",
                                value=1 if agent.host.connected else 0)
        yield GaugeMetricFamily(f"{PREFIX}_placement_leader", "1 while this agent holds the placement Lease.",
                                value=1 if agent.election.leading else 0)
        yield CounterMetricFamily(f"{PREFIX}_placement_decisions", "Placement decisions made (placed or not).",
                                  value=agent.scheduler.decisions)
        yield CounterMetricFamily(f"{PREFIX}_placement_decision_seconds", "Time spent choosing nodes.",
                                  value=agent.scheduler.decision_seconds)
        yield from EVENT_TO_STATUS.collect()


def serve(agent: Agent, port: int) -> None:
    """Serves /metrics on `port` from a background thread."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))  # type: ignore[arg-type]
    start_http_server(port, registry=registry)
