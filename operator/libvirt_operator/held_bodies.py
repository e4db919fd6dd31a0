"""What an agent keeps of each VirtualMachine object it watches: every agent holds every VM of the cluster (the
placement and the moves read them all), so what is kept per VM decides the agent's memory at 10,000 VMs.

Kept: the object as the API server sent it, without `metadata.managedFields` and kubectl's
last-applied-configuration (nothing here reads them: they are half of a VM's JSON), and with its keys and
short strings interned, so the many VMs share one copy of "type", "Ready", "RunningAsDesired", a node's name...
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

UNREAD_METADATA = ("managedFields",)
UNREAD_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)
SHARED_STRING_LENGTH = 64
"""Strings up to this long are interned: names, reasons, states, timestamps; not messages or user data."""


def kept(body: Mapping[str, Any]) -> dict[str, Any]:
    """A compact copy of `body`, equal to it but for the unread metadata."""
    metadata = {key: value for key, value in body.get("metadata", {}).items() if key not in UNREAD_METADATA}
    annotations = metadata.get("annotations")
    if annotations and any(key in annotations for key in UNREAD_ANNOTATIONS):
        metadata["annotations"] = {key: value for key, value in annotations.items() if key not in UNREAD_ANNOTATIONS}
    return _shared({**body, "metadata": metadata})


def _shared(value: Any) -> Any:
    if isinstance(value, dict):
        return {sys.intern(key): _shared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shared(item) for item in value]
    if isinstance(value, str) and len(value) <= SHARED_STRING_LENGTH:
        return sys.intern(value)
    return value
