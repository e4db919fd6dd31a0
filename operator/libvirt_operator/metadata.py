"""The operator's mark in a domain's XML, and the user aliases that carry the spec's device names.

A domain is this operator's only if its `<metadata>` holds an element in the operator's
namespace naming the VirtualMachine and the cluster (the uid of its kube-system namespace):

    <metadata>
      <lvo:vm xmlns:lvo="https://libvirt-operator.io/xmlns/domain/v1"
              uid="..." namespace="..." name="..." generation="3" specHash="..." cluster="..."/>
    </metadata>

A mark naming another cluster is foreign (`belongs_to`). A mark without `cluster` was made before the
attribute existed: it is this cluster's only if its VM is (uids are unique), and never an orphan.

Disks and interfaces carry the spec's name as a user alias (`<alias name="ua-disk-NAME"/>`,
`<alias name="ua-nic-NAME"/>`: libvirt wants aliases unique across all devices, and a disk and an
interface may share a name).
"""

from __future__ import annotations

from lxml import etree

from libvirt_operator import METADATA_NAMESPACE, METADATA_PREFIX
from libvirt_operator.model import OwnerMetadata

OWNER_TAG = f"{{{METADATA_NAMESPACE}}}vm"
INTERFACE_ALIAS_PREFIX = "ua-nic-"
DISK_ALIAS_PREFIX = "ua-disk-"
LEGACY_ALIAS_PREFIX = "ua-"
"""Domains defined before the per-kind prefixes name their devices `ua-NAME`."""


def spec_name(device: etree._Element, prefix: str) -> str | None:
    """The spec's name of a disk or interface from its user alias (`prefix` + name), else None."""
    alias = device.find("alias")
    name = alias.get("name", "") if alias is not None else ""
    if name.startswith(prefix):
        return name[len(prefix):]
    if name.startswith(LEGACY_ALIAS_PREFIX) and not name.startswith((DISK_ALIAS_PREFIX, INTERFACE_ALIAS_PREFIX)):
        return name[len(LEGACY_ALIAS_PREFIX):]
    return None


def owner_element(owner: OwnerMetadata) -> etree._Element:
    """The `<lvo:vm>` element for `owner`, to place under a domain's `<metadata>`."""
    element = etree.Element(OWNER_TAG, nsmap={METADATA_PREFIX: METADATA_NAMESPACE})
    element.set("uid", owner.uid)
    element.set("namespace", owner.namespace)
    element.set("name", owner.name)
    element.set("generation", str(owner.generation))
    element.set("specHash", owner.spec_hash)
    if owner.cluster:
        element.set("cluster", owner.cluster)
    return element


def owner_xml(owner: OwnerMetadata) -> str:
    """`owner_element` as text, the form `virDomainSetMetadata` takes."""
    return etree.tostring(owner_element(owner), encoding="unicode")


def owner_from_element(element: etree._Element) -> OwnerMetadata | None:
    """Reads an `<lvo:vm>` element; None when it is not a complete mark."""
    if element.tag != OWNER_TAG:
        return None
    try:
        return OwnerMetadata(
            uid=element.attrib["uid"],
            namespace=element.attrib["namespace"],
            name=element.attrib["name"],
            generation=int(element.attrib["generation"]),
            spec_hash=element.attrib["specHash"],
            cluster=element.get("cluster", ""),
        )
    except (KeyError, ValueError):
        return None


def belongs_to(owner: OwnerMetadata | None, cluster: str) -> OwnerMetadata | None:
    """`owner` if the mark may be this cluster's (its own or a mark from before cluster identities), else None."""
    if owner is None or (cluster and owner.cluster and owner.cluster != cluster):
        return None
    return owner


def parse(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode(), parser=etree.XMLParser(resolve_entities=False, no_network=True))


def owner_from_domain(root: etree._Element) -> OwnerMetadata | None:
    """The mark in a parsed domain XML, or None for a foreign domain."""
    for element in root.iterfind(f"metadata/{OWNER_TAG}"):
        owner = owner_from_element(element)
        if owner is not None:
            return owner
    return None
