"""The counting proxy: every libvirt driver call made through it is counted (API name, domains, seconds)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import libvirt

LOCAL_ACCESSORS = frozenset({"UUIDString", "UUID", "name", "ID", "connect", "c_pointer"})
"""Methods answered from the client-side object, without a call to the driver."""

_COUNTED_TYPES = frozenset({
    libvirt.virConnect, libvirt.virDomain, libvirt.virStoragePool, libvirt.virStorageVol, libvirt.virNetwork,
})

Count = Callable[[str, Sequence[str], float], None]


class Counted:
    """A libvirt object whose driver calls are counted; the objects its calls return are too.

    Arguments are unwrapped before the real call, so a Counted domain can be passed wherever
    libvirt expects a `virDomain`.
    """

    __slots__ = ("target", "_count")

    def __init__(self, target: Any, count: Count) -> None:
        self.target = target
        self._count = count

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's names; spelled out as the hot local accessors
        return self.target.UUIDString()

    def name(self) -> str:
        return self.target.name()

    def ID(self) -> int:  # noqa: N802
        return self.target.ID()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.target, name)
        if name in LOCAL_ACCESSORS or name.startswith("_") or not callable(attr):
            return attr
        return functools.partial(self._invoke, name, attr)

    def _invoke(self, name: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raw = [unwrap(arg) for arg in args]
        result = None
        began = time.monotonic()
        try:
            result = method(*raw, **kwargs)
            return wrap(result, self._count)
        finally:
            self._count(name, _domain_uuids(self.target, result, raw), time.monotonic() - began)


def _domain_uuids(target: Any, result: Any, args: list[Any]) -> list[str]:
    """The domains a call concerns: its object, a domain it returns, domains among its arguments."""
    nested = [item for arg in args if isinstance(arg, list | tuple) for item in arg]
    return [obj.UUIDString() for obj in (target, result, *args, *nested) if isinstance(obj, libvirt.virDomain)]


def wrap(value: Any, count: Count) -> Any:
    kind = type(value)
    if kind in _COUNTED_TYPES:
        return Counted(value, count)
    if kind is list or kind is tuple:
        return kind([wrap(item, count) for item in value])
    return value


def unwrap(value: Any) -> Any:
    kind = type(value)
    if kind is Counted:
        return value.target
    if kind is list or kind is tuple:
        return kind([unwrap(item) for item in value])
    return value
