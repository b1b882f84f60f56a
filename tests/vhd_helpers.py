"""Helpers for VHD tests: patch footers/headers in place with correct checksums, run qemu-img."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from vhdfs.formats.vhd import spec as fmt

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"


def read_footer(path: Path) -> fmt.Footer:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return fmt.parse_footer(f.read(512))


def write_footer(path: Path, footer: fmt.Footer, *, both: bool = True) -> None:
    raw = footer.pack()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(raw)
        if both and footer.disk_type != fmt.DISK_FIXED:
            f.seek(0)
            f.write(raw)


def patch_footer(path: Path, **changes: object) -> None:
    write_footer(path, replace(read_footer(path), **changes))


def read_header(path: Path) -> fmt.DynamicHeader:
    with open(path, "rb") as f:
        f.seek(512)
        return fmt.parse_header(f.read(1024))


def write_header(path: Path, header: fmt.DynamicHeader) -> None:
    with open(path, "r+b") as f:
        f.seek(512)
        f.write(header.pack())


def patch_header(path: Path, **changes: object) -> None:
    write_header(path, replace(read_header(path), **changes))


def set_locators(path: Path, locs: list[tuple[int, bytes]], name: str | None = None) -> None:
    """Replace the locators by ``(code, data)`` pairs, data appended at the end of the file
    (before a moved footer), and optionally the header's parent name."""
    footer = read_footer(path)
    size = path.stat().st_size
    pos = size - 512
    new = []
    with open(path, "r+b") as f:
        for code, data in locs:
            space = (len(data) + 511) // 512 * 512 or 512
            f.seek(pos)
            f.write(data.ljust(space, b"\0"))
            new.append(fmt.Locator(code, space, len(data), 0, pos))
            pos += space
        f.seek(pos)
        f.write(footer.pack())
    changes: dict[str, object] = {"locators": new}
    if name is not None:
        changes["parent_name_raw"] = name.encode("utf-16-be")
    patch_header(path, **changes)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_info_size(path: Path) -> int:
    out = subprocess.run([QEMU_IMG, "info", "--output=json", "-f", "vpc", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(json.loads(out.stdout)["virtual-size"])


def qemu_raw(path: Path, out: Path) -> bytes:
    subprocess.run([QEMU_IMG, "convert", "-f", "vpc", "-O", "raw", str(path), str(out)],
                   capture_output=True, timeout=60, check=True)
    return out.read_bytes()


def qemu_check_ok(path: Path) -> bool:
    """qemu-img check; exit 63 means qemu's vpc driver has no check (7.2): nothing to learn."""
    res = subprocess.run([QEMU_IMG, "check", "-f", "vpc", str(path)], capture_output=True,
                         text=True, timeout=60)
    return res.returncode == 0 or (res.returncode == 63 and "does not support checks" in res.stderr)
