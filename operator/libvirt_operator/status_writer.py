"""Where a VM's status and Events reach the API server, and what is dropped as unchanged.

A status is patched (a JSON merge patch of what changed) only when something a reader cares about
changed: `stats` and the snapshot's revision change on their own, and wait for `Tuning.stats_seconds`.
A status whose write failed is kept as the VM's last decided status (it carries the lifecycle
memory, e.g. the restarts made) until a later write succeeds. The time from a libvirt event to the
patch reporting it is observed here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from libvirt_operator.held_bodies import kept
from libvirt_operator.kube import KubeClient, status_merge_patch
from libvirt_operator.metrics import EVENT_TO_STATUS
from libvirt_operator.model import Tuning
from libvirt_operator.reconcile import Event

VOLATILE_STATUS = ("stats",)
VOLATILE_DOMAIN = ("resourceVersion",)


def significant(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without what changes on its own (stats, snapshot revision)."""
    kept = {key: value for key, value in status.items() if key not in VOLATILE_STATUS}
    if isinstance(kept.get("domain"), dict):
        kept["domain"] = {k: v for k, v in kept["domain"].items() if k not in VOLATILE_DOMAIN}
    return kept


def newer_or_same(held: Mapping[str, Any], incoming: Mapping[str, Any]) -> bool:
    """Whether the body held is at least as recent as the incoming one (by resourceVersion)."""
    try:
        return int(held["metadata"]["resourceVersion"]) >= int(incoming["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return False


class StatusWriter:
    def __init__(self, kube: KubeClient, bodies: dict[str, dict[str, Any]], tuning: Tuning) -> None:
        self.kube = kube
        self.bodies = bodies
        """The agent's latest body of every VM, updated with what a patch answers."""
        self.tuning = tuning
        self.started = time.monotonic()
        self.stats_written: dict[str, float] = {}
        self.woken_at: dict[str, float] = {}
        self.unwritten: dict[str, dict[str, Any]] = {}
        """Statuses whose write failed: they carry the lifecycle memory (restarts made) until written."""

    def domain_changed(self, uid: str) -> None:
        """A libvirt event about the VM's domain: the next patch is timed from here."""
        self.woken_at.setdefault(uid, time.monotonic())

    def decided(self, uid: str, status: dict[str, Any]) -> None:
        """A status the reconcile acted on, not written yet."""
        self.unwritten[uid] = status

    def last_decided(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The VM's status as the agent last decided it: the unwritten one, else the one the API server holds."""
        return self.unwritten.get(body["metadata"]["uid"]) or body.get("status") or {}

    def forget(self, uid: str) -> None:
        self.unwritten.pop(uid, None)
        self.stats_written.pop(uid, None)

    async def write(self, body: dict[str, Any], status: dict[str, Any], resource_version: str | None = None) -> None:
        """Patches status when something a reader cares about changed (stats alone wait); with
        `resource_version`, only if the VM is still as it was then (409 otherwise)."""
        old = body.get("status") or {}
        uid = body["metadata"]["uid"]
        now = time.monotonic()
        woken = self.woken_at.pop(uid, None)
        self.unwritten.pop(uid, None)
        if significant(old) == significant(status):
            last = self.stats_written.get(uid, self.started)
            if old.get("stats") == status.get("stats") or now - last < self.tuning.stats_seconds:
                return
        patch = status_merge_patch(old, status)
        if not patch:
            return
        meta = body["metadata"]
        try:
            updated = kept(await self.kube.patch_vm_status(meta["namespace"], meta["name"], patch, resource_version))
        except Exception:
            if resource_version is None:  # a write with a precondition was decided on that body: it goes with it
                self.unwritten[uid] = status
            raise
        if woken is not None:
            EVENT_TO_STATUS.observe(time.monotonic() - woken)
        self.stats_written[uid] = now
        if uid in self.bodies and not newer_or_same(self.bodies[uid], updated):
            self.bodies[uid] = updated
        body["status"] = updated.get("status") or status
        body["metadata"] = updated["metadata"]  # a finalizer patch after this one must not answer 409

    async def post_events(self, body: Mapping[str, Any], events: Iterable[Event]) -> None:
        for event in events:
            await self.kube.post_event(body, event.type, event.reason, event.message)
