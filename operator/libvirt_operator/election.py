"""Which agent places VMs: the holder of one coordination.k8s.io Lease, as kube-scheduler and
kube-controller-manager elect their leader.

Every agent runs `renew` on its heartbeat. The holder renews the Lease; another agent takes it only
after it saw no renewal for the Lease's whole duration on its own monotonic clock. The holder stops
deciding as soon as its last successful renewal is older than three quarters of that duration on its
own clock, before anyone else may take over.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from libvirt_operator.kube import KubeClient

log = logging.getLogger(__name__)

LEASE_NAME = "libvirt-operator-placement"
RENEW_DEADLINE_SHARE = 0.75
"""The holder stops deciding after this share of the Lease's duration without a successful renewal."""


def _micro_time() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Election:
    def __init__(self, kube: KubeClient, namespace: str, identity: str, lease_seconds: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_seconds = lease_seconds
        self.kube = kube
        self.namespace = namespace
        self.identity = identity
        self.clock = clock
        self._renewed_at: float | None = None
        self._observed: tuple[str | None, str | None] | None = None
        self._observed_at = clock()

    @property
    def leading(self) -> bool:
        return self._renewed_at is not None and self.clock() - self._renewed_at < self.lease_seconds * RENEW_DEADLINE_SHARE

    async def renew(self) -> bool:
        """One round: renew (holder), take over (an expired or missing Lease), or watch; True while leading."""
        began = self.clock()
        lease = await self.kube.read_lease(self.namespace, LEASE_NAME)
        spec: dict[str, Any] = (lease or {}).get("spec") or {}
        holder = spec.get("holderIdentity")
        observed = (holder, spec.get("renewTime"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, began
        duration = int(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if lease is not None and holder not in (None, "", self.identity) and began - self._observed_at < duration:
            self._renewed_at = None
            return False
        new_spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds, "renewTime": _micro_time(),
                    "acquireTime": spec.get("acquireTime") if holder == self.identity else _micro_time(),
                    "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (holder not in (None, "", self.identity))}
        try:
            await self.kube.write_lease(self.namespace, LEASE_NAME, new_spec,
                                        None if lease is None else lease["metadata"]["resourceVersion"])
        except ApiException as error:
            if error.status != 409:
                raise
            self._renewed_at = None
            return False
        if holder != self.identity:
            log.warning("this agent now places VMs (Lease %s/%s, previous holder %s)", self.namespace, LEASE_NAME, holder)
        self._renewed_at = began
        return True

    async def release(self) -> None:
        """Gives the Lease up on a clean stop, so another agent takes over at once instead of after its duration."""
        if not self.leading:
            return
        self._renewed_at = None
        lease = await self.kube.read_lease(self.namespace, LEASE_NAME)
        spec = (lease or {}).get("spec") or {}
        if lease is None or spec.get("holderIdentity") != self.identity:
            return
        try:
            await self.kube.write_lease(self.namespace, LEASE_NAME, {**spec, "holderIdentity": ""},
                                        lease["metadata"]["resourceVersion"])
        except ApiException as error:
            log.info("could not give the Lease up: %s", error)
