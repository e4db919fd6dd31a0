"""The `libvirt-operator` command.

    libvirt-operator render FILE.yaml [--uid UID]   the domain XML a manifest gives, without libvirt
    libvirt-operator run --libvirt-uri URI --node-name NAME ...   the agent

Each subcommand is one entry in SUBCOMMANDS: a function adding its arguments and a function
running it, returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from libvirt_operator import API_GROUP, KIND
from libvirt_operator.disk_plan import plan_disks
from libvirt_operator.domain_xml import render
from libvirt_operator.model import AgentSettings, VMRef
from libvirt_operator.paths import confine_spec
from libvirt_operator.runner import add_run_arguments, run as run_agent
from libvirt_operator.spec import SpecError, parse_spec, spec_hash

EXIT_INVALID = 2


def _add_render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="a VirtualMachine manifest (YAML)")
    parser.add_argument("--uid", help="the VirtualMachine's metadata.uid (default: derived from namespace/name)")


def _virtual_machine(manifest: Path) -> Mapping[str, Any]:
    """The first VirtualMachine document in `manifest`."""
    with manifest.open() as stream:
        for document in yaml.safe_load_all(stream):
            if isinstance(document, Mapping) and document.get("kind") == KIND:
                return document
    raise SpecError("kind", f"{manifest} has no document of kind {KIND}")


def _vm_ref(manifest: Mapping[str, Any], uid: str | None) -> VMRef:
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError("metadata.name", "is required")
    namespace = metadata.get("namespace") or "default"
    if uid is None:
        uid = metadata.get("uid") or str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://{API_GROUP}/{namespace}/{name}"))
    try:
        uid = str(uuid.UUID(uid))
    except ValueError as error:
        raise SpecError("metadata.uid", f"{uid!r} is not a UUID") from error
    return VMRef(uid=uid, namespace=namespace, name=name)


def _render(args: argparse.Namespace) -> int:
    settings = AgentSettings()
    try:
        manifest = _virtual_machine(args.manifest)
        vm = _vm_ref(manifest, args.uid)
        raw_spec = manifest.get("spec") or {}
        spec = confine_spec(parse_spec(raw_spec), settings.allowed_roots)
    except (SpecError, OSError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    generation = int((manifest.get("metadata") or {}).get("generation") or 1)
    xml = render(
        spec, vm, settings, generation=generation, spec_hash=spec_hash(raw_spec), disks=plan_disks(spec, vm, settings),
    )
    sys.stdout.write(xml)
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "render": ("print the domain XML a VirtualMachine manifest gives, without libvirt", _add_render_arguments, _render),
    "run": ("run the agent for one node", add_run_arguments, run_agent),
}
"""name -> (help, add its arguments, run it)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libvirt-operator")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, command) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
