"""Disk image files as `qemu-img` reads them, and the rules a file must pass before QEMU gets it.

QEMU follows what a qcow2 header says: a backing file (any host file or device, read through the
guest's disk) and an external data file. A spec names files a namespace user chose, so the agent
never lets QEMU probe: it reads each file's format with `qemu-img info`, checks it with that format
given explicitly, and pins the format (and the backing chain of its own overlays) in the domain XML.
Only backing files the agent made itself are allowed: its overlays over a base that passed these rules.
Nothing here imports libvirt.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from libvirt_operator.spec import SpecError

FORMATS = ("raw", "qcow2")
"""The formats a VM may use; others (vmdk, vdi, vpc, luks, ...) are refused."""
QEMU_IMG_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info --output=json -f FORMAT` says of one file (its backing file is not opened)."""

    path: str
    format: str
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None

    @classmethod
    def from_json(cls, path: str, info: dict) -> ImageInfo:
        specific = (info.get("format-specific") or {}).get("data") or {}
        return cls(path=path, format=info["format"], virtual_size=int(info["virtual-size"]),
                   backing_file=info.get("full-backing-filename") or info.get("backing-filename"),
                   backing_format=info.get("backing-filename-format"), data_file=specific.get("data-file"))


def _qemu_img_info(path: str, fmt: str | None, field: str) -> dict:
    command = ["qemu-img", "info", "-U", "--output=json", *(("-f", fmt) if fmt else ()), path]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_SECONDS)
    except FileNotFoundError as error:
        raise SpecError(field, "qemu-img is not installed on this node, so the image cannot be checked; "
                        "install qemu-utils there") from error
    except subprocess.TimeoutExpired as error:
        raise SpecError(field, f"qemu-img took over {QEMU_IMG_TIMEOUT_SECONDS} s to read {path}; "
                        "is the file on a hung mount?") from error
    if result.returncode != 0:
        raise SpecError(field, f"{path} is not a readable {fmt or 'disk'} image: {result.stderr.strip()}")
    return json.loads(result.stdout)


def detected_format(path: str, field: str) -> str:
    """The format qemu-img detects in the file's contents (a probe by qemu-img, never by QEMU)."""
    return _qemu_img_info(path, None, field)["format"]


def inspect(path: str, fmt: str, field: str) -> ImageInfo:
    """The file read as `fmt`, and nothing else."""
    if not Path(path).is_file():
        raise SpecError(field, f"{path} does not exist on this node; put the image there or fix the path")
    return ImageInfo.from_json(path, _qemu_img_info(path, fmt, field))


def checked_image(path: str, expected: str | None, field: str) -> ImageInfo:
    """A file a user named (an image, a volume's file, a download), with its format pinned: `expected`
    if the spec says, else what its contents say. SpecError naming `field` unless the file is a plain
    raw or qcow2 image whose contents agree with that format, with no backing file and no data file."""
    if not Path(path).is_file() and not Path(path).is_block_device():
        raise SpecError(field, f"{path} does not exist on this node; put the image there or fix the path")
    found = detected_format(path, field)
    fmt = expected or found
    if fmt not in FORMATS:
        raise SpecError(field, f"{path} is a {found} image; only {' and '.join(FORMATS)} are used: convert it "
                        f"(qemu-img convert -O qcow2)")
    if expected and found != expected:
        raise SpecError(field, f"{path} holds a {found} image, not {expected} as the spec says; fix the format or "
                        "the file")
    info = ImageInfo.from_json(path, _qemu_img_info(path, fmt, field))
    refuse_external_files(info, field)
    return info


def refuse_external_files(info: ImageInfo, field: str) -> None:
    """SpecError if the image would make QEMU open another file: a backing file or a qcow2 data file."""
    if info.backing_file:
        raise SpecError(field, f"{info.path} has a backing file ({info.backing_file}); only backing files the agent "
                        "makes are used: flatten it (qemu-img convert) or give the base image with clone: true")
    if info.data_file:
        raise SpecError(field, f"{info.path} keeps its data in an external file ({info.data_file}); "
                        "convert it to a self-contained image (qemu-img convert -O qcow2)")


def overlay_matches(info: ImageInfo, base: str, base_format: str) -> bool:
    """Whether an overlay the agent made is still over `base` (as `base_format`) and nothing else."""
    return (info.format == "qcow2" and info.data_file is None and info.backing_file == base
            and info.backing_format == base_format)
