"""Prometheus metrics of one agent, read from its counters at scrape time (nothing on the hot path)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "libvirt_operator"
ALWAYS_SHOWN_STATES = ("running", "paused", "shutoff")
"""Domain states /metrics shows even at 0: who counts running domains finds the line on an empty host too."""
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


@dataclass(frozen=True)
class Readings:
    """What an agent's counters read at one scrape: all the metrics know of the agent."""

    reconciles: int
    reconcile_seconds: float
    libvirt_calls: Counter[str]
    libvirt_call_seconds: Counter[str]
    libvirt_connections_opened: int
    kubernetes_writes: Counter[tuple[str, str]]
    domain_states: Counter[str]
    foreign_domains: int
    queue_depth: int
    libvirt_connected: bool
    placement_leader: bool
    placement_decisions: int
    placement_decision_seconds: float
    moves: Counter[str] = field(default_factory=Counter)
    """Live moves this agent ran as the source, by outcome (Succeeded, Failed)."""


class AgentCollector:
    def __init__(self, read: Callable[[], Readings]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        now = self.read()
        yield CounterMetricFamily(f"{PREFIX}_reconciles", "Reconciles run.", value=now.reconciles)
        yield CounterMetricFamily(f"{PREFIX}_reconcile_seconds", "Time spent reconciling.", value=now.reconcile_seconds)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_libvirt_calls", "libvirt calls made, by API.", ["api"],
                        now.libvirt_calls)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_libvirt_call_seconds", "Time spent in libvirt calls, by API.",
                        ["api"], now.libvirt_call_seconds)
        yield CounterMetricFamily(f"{PREFIX}_libvirt_connections_opened",
                                  "libvirt connections opened: the agent's own and one per worker thread.",
                                  value=now.libvirt_connections_opened)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_kubernetes_writes", "Kubernetes writes made, by verb and resource.",
                        ["verb", "resource"], now.kubernetes_writes)
        states = Counter({**dict.fromkeys(ALWAYS_SHOWN_STATES, 0), **now.domain_states})
        yield _labelled(GaugeMetricFamily, f"{PREFIX}_domains", "Owned domains on this host, by state.", ["state"],
                        states)
        yield GaugeMetricFamily(f"{PREFIX}_foreign_domains",
                                "Domains on this host that are not this cluster's (unmarked, or another cluster's).",
                                value=now.foreign_domains)
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "VMs waiting for or in a reconcile.", value=now.queue_depth)
        yield GaugeMetricFamily(f"{PREFIX}_libvirt_connected", "1 while the libvirt connection is up.",
                                value=1 if now.libvirt_connected else 0)
        yield GaugeMetricFamily(f"{PREFIX}_placement_leader", "1 while this agent holds the placement Lease.",
                                value=1 if now.placement_leader else 0)
        yield CounterMetricFamily(f"{PREFIX}_placement_decisions", "Placement decisions made (placed or not).",
                                  value=now.placement_decisions)
        yield CounterMetricFamily(f"{PREFIX}_placement_decision_seconds", "Time spent choosing nodes.",
                                  value=now.placement_decision_seconds)
        yield _labelled(CounterMetricFamily, f"{PREFIX}_moves", "Live moves run from this host, by outcome.",
                        ["outcome"], now.moves)
        yield from EVENT_TO_STATUS.collect()


def serve(read: Callable[[], Readings], port: int) -> None:
    """Serves /metrics on `port` from a background thread, each scrape calling `read`."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(read))  # type: ignore[arg-type]
    start_http_server(port, registry=registry)
