"""The agent's --migration-uri and --migration-address reach LibvirtNode.status.migration (DESIGN.md §3)."""

from __future__ import annotations

import pytest

from libvirt_operator.cli import build_parser
from libvirt_operator.heartbeat import migration_status
from libvirt_operator.runner import settings_from

pytestmark = pytest.mark.unit


def _published(*flags: str) -> dict[str, str]:
    return migration_status(settings_from(build_parser().parse_args(["run", "--node-name", "n", *flags])))


def test_both_flags_are_published() -> None:
    assert _published("--migration-uri", "qemu+tls://node-a/system", "--migration-address", "10.0.0.7") == {
        "uri": "qemu+tls://node-a/system", "address": "10.0.0.7"}


def test_one_flag_publishes_only_itself() -> None:
    assert _published("--migration-address", "10.0.0.7") == {"address": "10.0.0.7"}


def test_by_default_nothing_is_published() -> None:
    assert _published() == {}
