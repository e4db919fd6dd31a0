"""Listing plus statistics of N test-driver domains: Host versus the legacy per-domain calls.

    .venv/bin/python bench/host_listing.py [--quick] [--uri qemu:///system]

(a) Host.list_domains + Host.all_domain_stats, warm (owners known to the caller that
defined the domains, as the domain cache knows them); (b) listDomainsID + lookupByID each + listDefinedDomains + lookupByName
each + info() each. Both are counted by the same Host.calls wrapper. Prints a table, then one
JSON object per line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

from libvirt_operator import metadata
from libvirt_operator.domain_listing import legacy_list_domains
from libvirt_operator.host import Host
from libvirt_operator.model import OwnerMetadata

URI = "test:///default"
SIZES = (10, 100, 1000, 5000)
QUICK_SIZES = (10, 100)
PREFIX = "lvo-bench"


def _xml(uuid: str, domain_type: str) -> str:
    mark = metadata.owner_xml(OwnerMetadata(uid=uuid, namespace="bench", name=uuid[:8], generation=1, spec_hash="-"))
    return (f"<domain type='{domain_type}'><name>{PREFIX}-{uuid}</name><uuid>{uuid}</uuid>"
            f"<memory unit='MiB'>64</memory><os><type>hvm</type></os><metadata>{mark}</metadata></domain>")


def _define(conn: Any, uuids: list[str], domain_type: str) -> None:
    for uuid in uuids:
        conn.defineXML(_xml(uuid, domain_type))


def _undefine(conn: Any, uuids: list[str]) -> None:
    for uuid in uuids:
        conn.lookupByUUIDString(uuid).undefine()


def _legacy(conn: Any) -> int:
    domains = legacy_list_domains(conn)
    for dom in domains:
        dom.info()
    return len(domains)


async def _host_path(host: Host, known: dict[str, OwnerMetadata | None]) -> None:
    """A listing, then the statistics of the domains it found to be ours."""
    listed = await host.list_domains(include_foreign=True, known=known)
    await host.all_domain_stats(known={domain.uuid: domain.owner for domain in listed})


async def measure(host: Host, work: Callable[[], Awaitable[Any]]) -> tuple[int, float]:
    """Counted libvirt calls and wall seconds of `work`."""
    calls = sum(host.calls.values())
    started = time.perf_counter()
    await work()
    return sum(host.calls.values()) - calls, time.perf_counter() - started


async def bench_size(host: Host, n: int) -> dict[str, Any]:
    uuids = [str(uuidlib.uuid4()) for _ in range(n)]
    domain_type = "test" if host.uri.startswith("test:") else "qemu"
    await host.call(_define, uuids, domain_type)
    known = {uuid: metadata.owner_from_domain(metadata.parse(_xml(uuid, domain_type))) for uuid in uuids}
    cold = Host(host.uri)
    await cold.start()
    try:
        cold_calls, cold_seconds = await measure(cold, lambda: _host_path(cold, {}))
    finally:
        await cold.stop()
    known |= {d.uuid: d.owner for d in await host.list_domains(include_foreign=True, known=known)}  # the "test" domain's
    host_calls, host_seconds = await measure(host, lambda: _host_path(host, known))
    legacy_calls, legacy_seconds = await measure(host, lambda: host.call(_legacy))
    await host.call(_undefine, uuids)
    return {
        "n": n, "host_calls": host_calls, "host_seconds": round(host_seconds, 4),
        "legacy_calls": legacy_calls, "legacy_seconds": round(legacy_seconds, 4),
        "ratio": round(legacy_seconds / host_seconds, 1),
        "cold_host_calls": cold_calls, "cold_host_seconds": round(cold_seconds, 4),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = ("n", "host_calls", "host_seconds", "legacy_calls", "legacy_seconds", "ratio")
    titles = ("n", "host calls", "host s", "legacy calls", "legacy s", "ratio b/a (time)")
    print(" | ".join(f"{title:>12}" for title in titles))
    for row in rows:
        print(" | ".join(f"{row[column]:>12}" for column in columns))
    print("note: a fresh Host's first listing + stats (cold, one metadata read per domain):",
          ", ".join(f"n={row['n']}: {row['cold_host_calls']} calls {row['cold_host_seconds']} s" for row in rows))


async def main(uri: str, sizes: tuple[int, ...]) -> None:
    host = Host(uri)
    await host.start()
    try:
        rows = [await bench_size(host, n) for n in sizes]
    finally:
        await host.stop()
    print_table(rows)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only N = 10 and 100")
    parser.add_argument("--uri", default=URI, help="libvirt URI (default: the in-process test driver)")
    args = parser.parse_args()
    asyncio.run(main(args.uri, QUICK_SIZES if args.quick else SIZES))
