"""Every Kubernetes write the agent makes goes through here, counted by verb and resource.

The `kubernetes` client is synchronous: each call runs in a worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from libvirt_operator import API_GROUP, API_VERSION, PLURAL
from libvirt_operator.model import Tuning

log = logging.getLogger(__name__)

FINALIZER = f"{API_GROUP}/domain"
NODE_PLURAL = "libvirtnodes"
MIGRATION_PLURAL = "virtualmachinemigrations"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning `old` into `new`; empty when nothing changes."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            patch[key] = status_merge_patch(before, value)
        else:
            patch[key] = value
    return patch


class KubeClient:
    """Counted access to the VirtualMachine API, Secrets, Events and the agents' LibvirtNodes."""

    def __init__(self, api_client: kubernetes.client.ApiClient, component: str, node_name: str,
                 page_size: int = Tuning.list_chunk_size) -> None:
        self.page_size = page_size
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(api_client)
        self.component = component
        self.node_name = node_name
        self.writes: Counter[tuple[str, str]] = Counter()

    @classmethod
    def from_environment(cls, component: str, node_name: str, kubeconfig: str | None = None,
                         page_size: int = Tuning.list_chunk_size) -> KubeClient:
        if kubeconfig:
            kubernetes.config.load_kube_config(config_file=kubeconfig)
        else:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
        configuration = kubernetes.client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 32
        return cls(kubernetes.client.ApiClient(configuration), component, node_name, page_size)

    async def _write(self, verb: str, resource: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        self.writes[(verb, resource)] += 1
        return await asyncio.to_thread(call, *args, **kwargs)

    async def patch_vm_status(self, namespace: str, name: str, patch: dict[str, Any],
                              resource_version: str | None = None) -> dict[str, Any]:
        """A merge patch of the status; with `resource_version`, failing with 409 if the VM changed since."""
        body: dict[str, Any] = {"status": patch}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._write(
            "patch", "virtualmachines/status", self.custom.patch_namespaced_custom_object_status,
            API_GROUP, API_VERSION, namespace, PLURAL, name, body,
        )

    async def patch_migration_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._write("patch", "virtualmachinemigrations/status", self.custom.patch_namespaced_custom_object_status,
                          API_GROUP, API_VERSION, namespace, MIGRATION_PLURAL, name, {"status": patch})

    async def patch_node_status(self, name: str, patch: dict[str, Any]) -> None:
        await self._write("patch", "libvirtnodes/status", self.custom.patch_cluster_custom_object_status,
                          API_GROUP, API_VERSION, NODE_PLURAL, name, {"status": patch})

    async def set_finalizers(self, namespace: str, name: str, finalizers: list[str], resource_version: str) -> dict[str, Any]:
        """Replaces the finalizer list, failing with 409 if the object changed since it was read."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        return await self._write(
            "patch", "virtualmachines", self.custom.patch_namespaced_custom_object,
            API_GROUP, API_VERSION, namespace, PLURAL, name, body,
        )

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | bytes | None:
        """One Secret's key, read with `get` only (the agent never lists or watches Secrets); text when it
        is UTF-8, else the bytes."""
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        value = (secret.data or {}).get(key)
        if value is None:
            return None
        data = base64.b64decode(value)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return data

    async def post_event(self, involved: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        meta = involved["metadata"]
        timestamp = now_iso()
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "VirtualMachine",
                "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            },
            "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": self.component, "host": self.node_name},
            "reportingComponent": self.component, "reportingInstance": self.node_name,
            "firstTimestamp": timestamp, "lastTimestamp": timestamp, "count": 1,
        }
        try:
            await self._write("create", "events", self.core.create_namespaced_event, meta["namespace"], body)
        except Exception as error:  # an Event is a courtesy: losing one must not stop a reconcile
            log.info("event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], error)

    async def _pages(self, plural: str) -> AsyncIterator[list[dict[str, Any]]]:
        """Every object of `plural` in the cluster, `page_size` at a time: the 10,000 VMs of a cluster in one
        answer took 250 MiB in the agent while it read them."""
        token = None
        while True:
            page = await asyncio.to_thread(self.custom.list_cluster_custom_object, API_GROUP, API_VERSION, plural,
                                           limit=self.page_size, _continue=token)
            yield page.get("items", [])
            token = page.get("metadata", {}).get("continue")
            if not token:
                return

    async def list_nodes(self) -> list[dict[str, Any]]:
        return [node async for page in self._pages(NODE_PLURAL) for node in page]

    async def cluster_identity(self) -> str:
        """The uid of the kube-system namespace: it lives as long as the cluster (kubeadm and Cilium use it so)."""
        try:
            namespace = await asyncio.to_thread(self.core.read_namespace, "kube-system")
        except ApiException as error:
            raise RuntimeError(f"cannot read namespace kube-system ({error.status} {error.reason}), whose uid is this "
                               "cluster's identity in every domain's mark: grant `get` on it or pass --cluster-id") from error
        return namespace.metadata.uid

    async def vm_uids(self) -> set[str]:
        """The uid of every VirtualMachine in the cluster."""
        return {vm["metadata"]["uid"] async for page in self._pages(PLURAL) for vm in page}

    async def announce_node(self, status: dict[str, Any]) -> None:
        """Creates this agent's LibvirtNode if missing and writes its heartbeat and capacity."""
        try:
            await self._write("patch", "libvirtnodes/status", self.custom.patch_cluster_custom_object_status,
                              API_GROUP, API_VERSION, NODE_PLURAL, self.node_name, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise
            body = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "LibvirtNode",
                    "metadata": {"name": self.node_name}}
            try:
                await self._write("create", "libvirtnodes", self.custom.create_cluster_custom_object,
                                  API_GROUP, API_VERSION, NODE_PLURAL, body)
            except ApiException as conflict:
                if conflict.status != 409:  # created meanwhile (by this agent's other heartbeat): fine
                    raise
            await self.announce_node(status)

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A coordination.k8s.io Lease as a plain dict, None when there is none."""
        try:
            lease = await asyncio.to_thread(self.coordination.read_namespaced_lease, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return self.coordination.api_client.sanitize_for_serialization(lease)

    async def write_lease(self, namespace: str, name: str, spec: dict[str, Any], resource_version: str | None) -> None:
        """Creates the Lease (resource_version None) or replaces it, failing with 409 if it changed since read."""
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
        if resource_version is None:
            await self._write("create", "leases", self.coordination.create_namespaced_lease, namespace, body)
        else:
            body["metadata"]["resourceVersion"] = resource_version
            await self._write("update", "leases", self.coordination.replace_namespaced_lease, name, namespace, body)
