"""Listing a host's domains and reading the operator's mark from one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import libvirt
from lxml import etree

from libvirt_operator import METADATA_NAMESPACE, metadata
from libvirt_operator.libvirt_errors import has_code
from libvirt_operator.model import OwnerMetadata


@dataclass(frozen=True)
class ListedDomain:
    uuid: str
    name: str
    owner: OwnerMetadata | None
    domain: libvirt.virDomain


def legacy_list_domains(conn: Any, flags: int = 0) -> list[Any]:
    """The pre-0.9.13 listing, O(N) calls and racy; only the active/inactive flag group applies."""
    group = flags & (libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE | libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)
    domains = []
    if group != libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE:
        domains += _lookup_each(conn.lookupByID, conn.listDomainsID())
    if group != libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE:
        domains += _lookup_each(conn.lookupByName, conn.listDefinedDomains())
    return domains


def _lookup_each(lookup: Callable[[Any], Any], keys: Iterable[Any]) -> list[Any]:
    found = []
    for key in keys:
        try:
            found.append(lookup(key))
        except libvirt.libvirtError as err:
            if not has_code(err, libvirt.VIR_ERR_NO_DOMAIN):
                raise
    return found


def list_all_domains(conn: Any, flags: int = 0) -> list[Any]:
    """One `listAllDomains` call; the legacy calls only where the driver lacks it."""
    try:
        return conn.listAllDomains(flags)
    except libvirt.libvirtError as err:
        if not has_code(err, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        return legacy_list_domains(conn, flags)


def read_owner(dom: Any) -> OwnerMetadata | None:
    """The operator's mark from the domain's current definition; None for a foreign domain."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE)
    except libvirt.libvirtError as err:
        if has_code(err, libvirt.VIR_ERR_NO_DOMAIN_METADATA):
            return None
        raise
    element = metadata.parse(xml)
    if etree.QName(element).localname != etree.QName(metadata.OWNER_TAG).localname:
        return None
    element.tag = metadata.OWNER_TAG  # libvirt hands the element back without its namespace
    return metadata.owner_from_element(element)

