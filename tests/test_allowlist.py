"""The networks, bridges and pools a VM may name are the admin's flags; `user` networking only when allowed."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from libvirt_operator.allowlist import refuse_unlisted
from libvirt_operator.model import AgentSettings
from libvirt_operator.spec import SpecError, parse_spec

pytestmark = pytest.mark.unit

FRESH_HOST = AgentSettings()


def spec(**fields: Any) -> Any:
    return parse_spec({"memory": "64Mi", **fields})


def test_a_fresh_host_takes_its_default_network_and_pool() -> None:
    refuse_unlisted(spec(interfaces=[{"name": "n", "network": "default"}],
                         disks=[{"name": "v", "volume": {"pool": "default", "name": "shared"}}]), FRESH_HOST)


@pytest.mark.parametrize(("fields", "field", "flag"), [
    ({"interfaces": [{"name": "n", "network": "corp"}]}, "spec.interfaces[0].network", "--allowed-network: default"),
    ({"interfaces": [{"name": "n", "bridge": "br0"}]}, "spec.interfaces[0].bridge", "--allowed-bridge: none"),
    ({"interfaces": [{"name": "n", "user": {}}]}, "spec.interfaces[0].user", "--allow-user-networking"),
    ({"disks": [{"name": "v", "volume": {"pool": "backups", "name": "x"}}]}, "spec.disks[0].volume.pool",
     "--allowed-pool: default"),
], ids=["network", "bridge", "user", "pool"])
def test_what_the_flags_do_not_allow_is_refused_naming_the_field_and_the_flag(
        fields: dict[str, Any], field: str, flag: str) -> None:
    with pytest.raises(SpecError) as error:
        refuse_unlisted(spec(**fields), FRESH_HOST)
    assert error.value.field == field and flag in error.value.message


def test_the_flags_open_what_they_name() -> None:
    open_host = dataclasses.replace(FRESH_HOST, allowed_networks=("corp",), allowed_bridges=("*",),
                                    allowed_pools=("backups",), allow_user_networking=True)
    refuse_unlisted(spec(interfaces=[{"name": "a", "network": "corp"}, {"name": "b", "bridge": "br7"},
                                     {"name": "c", "user": {}}],
                         disks=[{"name": "v", "volume": {"pool": "backups", "name": "x"}}]), open_host)
    with pytest.raises(SpecError):
        refuse_unlisted(spec(interfaces=[{"name": "a", "network": "default"}]), open_host)
