"""libvirt-operator: VirtualMachine custom resources reconciled into libvirt domains."""

API_GROUP = "libvirt-operator.io"
API_VERSION = "v1alpha1"
PLURAL = "virtualmachines"
KIND = "VirtualMachine"
METADATA_NAMESPACE = "https://libvirt-operator.io/xmlns/domain/v1"
METADATA_PREFIX = "lvo"
