"""The placement Lease against a real API server: one holder at a time, takeover only after a whole lease of
silence on the taker's own clock, a holder that cannot renew stops deciding first, a clean stop hands over."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from libvirt_operator.election import LEASE_NAME, Election
from libvirt_operator.kube import KubeClient
from lvo_testing.controlplane import ControlPlane

pytestmark = pytest.mark.e2e

LEASE = 40


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"election-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


def candidates(control_plane: ControlPlane, namespace: str, *names: str) -> list[tuple[Election, Clock]]:
    kube = KubeClient.from_environment("libvirt-operator", "test", str(control_plane.admin_kubeconfig))
    made = []
    for name in names:
        clock = Clock()
        made.append((Election(kube, namespace, name, LEASE, clock=clock), clock))
    return made


def test_one_holder_and_takeover_only_after_a_silent_lease(control_plane: ControlPlane, namespace: str) -> None:
    (a, clock_a), (b, clock_b) = candidates(control_plane, namespace, "node-a", "node-b")

    async def scenario() -> None:
        assert await a.renew() and a.leading
        assert not await b.renew() and not b.leading
        clock_b.now += LEASE - 1
        assert not await b.renew(), "taken before a whole lease passed on the taker's clock"
        clock_a.now += LEASE * 0.75
        assert not a.leading, "a holder that could not renew stops deciding before anyone may take over"
        clock_b.now += 2
        assert await b.renew() and b.leading
        assert not await a.renew() and not a.leading
        lease = await a.kube.read_lease(namespace, LEASE_NAME)
        assert lease["spec"]["holderIdentity"] == "node-b" and lease["spec"]["leaseTransitions"] == 1

    asyncio.run(scenario())


def test_renewals_keep_the_lease_and_a_clean_stop_hands_it_over(control_plane: ControlPlane, namespace: str) -> None:
    (a, clock_a), (b, clock_b) = candidates(control_plane, namespace, "node-a", "node-b")

    async def scenario() -> None:
        assert await a.renew()
        for _ in range(5):
            clock_a.now += 20
            clock_b.now += 20
            assert await a.renew()
            assert not await b.renew(), "renewals seen by b keep the lease a's"
        await a.release()
        assert not a.leading
        assert await b.renew(), "given up: taken at once"

    asyncio.run(scenario())
