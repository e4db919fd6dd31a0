"""The image recipe lints clean and installs exactly what the lock pins; the image and the wheel carry
the operator and no test helper; the kustomize base carries the CRDs unchanged and a DaemonSet matching the agent's flags; every example renders."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
MANIFESTS = ROOT / "manifests"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def final_stage() -> str:
    return (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1]


def test_dockerfile_passes_hadolint() -> None:
    # No --ignore: apt packages are pinned (DL3008), so is the base image and the pip install.
    result = subprocess.run([str(Path(sys.executable).parent / "hadolint"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_on_a_pinned_base_with_no_compiler_in_the_final_image() -> None:
    bases = re.findall(r"^FROM (\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert len(bases) == 2
    # Debian's python3 on Debian's base: libvirt-python is built against the libvirt0 it runs with.
    assert all(re.fullmatch(r"debian:bookworm-slim(@sha256:[0-9a-f]{64})?", base) for base in bases), bases
    for build_only in ("gcc", "-dev", "pkg-config", "build-essential"):
        assert build_only not in final_stage()
    assert "COPY --from=build /opt/libvirt-operator /opt/libvirt-operator" in final_stage()
    assert 'ENTRYPOINT ["libvirt-operator", "run"]' in final_stage()


def runtime_requirements(name: str, seen: set[str]) -> set[str]:
    """`name` and everything it needs at run time (no extras), as installed in this environment."""
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        dependency = canonicalize_name(requirement.name)
        if dependency not in seen:
            seen.add(dependency)
            runtime_requirements(dependency, seen)
    return seen


def test_the_lock_pins_every_runtime_dependency_the_image_installs() -> None:
    """The image builds with `--constraint requirements.lock`: every package it installs must be pinned
    there, at the version the tests ran with, or the image would run untested versions."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.split(";")[0].strip().partition("==")
            pins[canonicalize_name(name)] = version
    needed = runtime_requirements("libvirt-operator", set())
    assert {"kopf", "libvirt-python", "lxml", "pycdlib"} <= needed
    unpinned = needed - pins.keys()
    assert not unpinned, f"run make lock; not pinned: {sorted(unpinned)}"
    drifted = {name: (pins[name], importlib.metadata.version(name)) for name in needed
               if pins[name] != importlib.metadata.version(name)}
    assert not drifted, drifted


def dockerignore() -> tuple[set[str], list[str]]:
    """The allow-list of .dockerignore: the entries let in, and the patterns kept out of them."""
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*", "an allow-list: everything else stays out of the build context"
    allowed = {line[1:].rstrip("/") for line in lines[1:] if line.startswith("!")}
    return allowed, [line.removeprefix("**/") for line in lines[1:] if not line.startswith("!")]


def build_context(into: Path) -> Path:
    """A copy of what `docker build .` sends: the entries .dockerignore lets in, less its patterns."""
    allowed, excluded = dockerignore()
    into.mkdir()
    for entry in allowed:
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(source, into / entry, ignore=shutil.ignore_patterns(*excluded))
        else:
            shutil.copy2(source, into / entry)
    return into


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed, _ = dockerignore()
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(line.split()[1:-1])
    assert copied <= allowed, copied - allowed


TEST_HELPERS = {path.name for path in (ROOT / "testing" / "lvo_testing").glob("*.py")} - {"__init__.py"}


def test_the_image_and_the_wheel_carry_the_operator_and_no_test_helpers(tmp_path: Path) -> None:
    """The image installs the package from its build context, as a wheel would carry it: setuptools
    builds its modules here from that context. Only the operator's own modules may be in it."""
    context = build_context(tmp_path / "context")
    in_context = {path.relative_to(context).as_posix() for path in context.rglob("*") if path.is_file()}
    assert not {path for path in in_context if path.startswith(("tests/", "testing/", "bench/", "hack/"))}
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(tmp_path / "wheel")], cwd=context, check=True, capture_output=True)
    shipped = sorted((tmp_path / "wheel").rglob("*.py"))
    assert shipped, "setuptools built no module"
    for module in shipped:
        relative = module.relative_to(tmp_path / "wheel")
        assert relative.parts[0] == "libvirt_operator", relative
        assert module.name not in TEST_HELPERS and "testing" not in relative.parts, f"a test helper ships: {relative}"
        source = module.read_text()
        for helper_only in ("lvo_testing", "import pytest"):
            assert helper_only not in source, f"{relative} needs {helper_only}, which the image lacks"


CRDS = sorted(path.name for path in (ROOT / "crds").glob("*.yaml"))


def test_the_crds_are_all_there() -> None:
    assert CRDS == ["libvirtnode.yaml", "virtualmachine-updates.yaml", "virtualmachine.yaml",
                    "virtualmachinemigration.yaml"]


@pytest.mark.parametrize("crd", CRDS)
def test_manifests_carry_the_crds_unchanged(crd: str) -> None:
    # kustomize refuses files outside manifests/ (symlinks too), so the base holds copies.
    assert (MANIFESTS / "crds" / crd).read_bytes() == (ROOT / "crds" / crd).read_bytes(), \
        "run: cp crds/*.yaml manifests/crds/"
    resources = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    assert f"crds/{crd}" in resources, "list it in manifests/kustomization.yaml"


def manifest_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((MANIFESTS / resource).read_text()):
            objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def test_the_daemonset_runs_the_image_as_the_agent_expects() -> None:
    objects = manifest_objects()
    namespace = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["namespace"]
    pod = objects[("DaemonSet", "libvirt-operator-agent")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "libvirt-operator"
    assert ("ServiceAccount", "libvirt-operator") in objects
    binding = objects[("ClusterRoleBinding", "libvirt-operator")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "libvirt-operator", "namespace": namespace}]
    [agent] = pod["containers"]
    assert agent["image"] == f"libvirt-operator:{VERSION}"
    args = dict(zip(agent["args"][::2], agent["args"][1::2]))
    assert args == {"--libvirt-uri": "qemu:///system", "--liveness-port": "8080", "--metrics-port": "9090"}
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    assert not agent["securityContext"].get("privileged")
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for path in ("/var/run/libvirt", "/var/lib/libvirt"):
        assert host_paths[mounts[path]] == path, "mounted where the host has it: specs name host paths"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_renders(example: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "libvirt_operator.cli", "render", str(example)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<domain")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_is_small_and_runs_on_the_demo_driver(example: Path) -> None:
    """The demo runs the examples on libvirt's test driver: no image files, namespace default, little memory."""
    vm = yaml.safe_load(example.read_text())
    assert vm["metadata"]["namespace"] == "default" and vm["metadata"]["name"] == example.stem
    assert vm["spec"]["memory"] in ("64Mi", "128Mi", "256Mi")
    assert all(not {"image", "http", "volume"} & disk.keys() for disk in vm["spec"].get("disks", []))


def test_there_are_five_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["cloud-init", "data-disks", "halted", "minimal", "rerun-on-failure"]
    strategies = {p.stem: yaml.safe_load(p.read_text())["spec"].get("runStrategy", "Always") for p in EXAMPLES}
    assert strategies["halted"] == "Halted" and strategies["rerun-on-failure"] == "RerunOnFailure"
