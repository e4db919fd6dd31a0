"""libvirt's errors, classified by error domain and code only (as Nova does), never by message."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import libvirt

T = TypeVar("T")

LibvirtError = libvirt.libvirtError
"""libvirt's error, for modules that must not import libvirt themselves."""


class HostUnavailable(Exception):
    """The libvirt connection is down; the Host is reconnecting in the background."""



_LOST_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
_LOST_IN_TRANSPORT = frozenset({libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR})
_TRANSPORT_DOMAINS = frozenset({libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC})
UNSUPPORTED = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED})


def connection_lost(err: libvirt.libvirtError) -> bool:
    """Whether `err` means the connection is gone: decided by error code and domain only."""
    code = err.get_error_code()
    return code in _LOST_CODES or (code in _LOST_IN_TRANSPORT and err.get_error_domain() in _TRANSPORT_DOMAINS)


def has_code(err: libvirt.libvirtError, *codes: int) -> bool:
    return err.get_error_code() in codes



def lookup(call: Callable[[], T], missing_code: int) -> T | None:
    """`call()`, or None when libvirt answers that the object does not exist."""
    try:
        return call()
    except libvirt.libvirtError as error:
        if has_code(error, missing_code):
            return None
        raise
