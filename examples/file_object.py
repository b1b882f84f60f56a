#!/usr/bin/env python3
"""The virtual disk of an image as a Python file object (``vhdfs.open``): hash it, read its
MBR partition table, and -- when pytsk3 is installed -- list a partition's root folder through
pytsk3's ``Img_Info`` subclass pattern, the way forensic tools take any seekable disk.

    python examples/file_object.py disk.vhd [--parent-dir DIR]
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import sys

import vhdfs


class _Sha256:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.h.update(data)


def mbr_partitions(disk) -> list[tuple[int, int, int]]:  # noqa: ANN001
    """(number, byte offset, byte length) of the primary MBR entries, from any binary file."""
    disk.seek(0)
    sector = disk.read(512)
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return []
    out = []
    for i in range(4):
        kind, lba, count = struct.unpack_from("<4xB3xII", sector, 446 + 16 * i)
        if kind and count and kind != 0xEE:   # 0xEE: a GPT's protective entry
            out.append((i + 1, lba * 512, count * 512))
    return out


def list_with_pytsk3(path: str, offset: int, parent_dirs: list[str]) -> None:
    try:
        import pytsk3
    except ImportError:
        print("(pytsk3 not installed: skipping the file system listing)")
        return

    class VhdfsImgInfo(pytsk3.Img_Info):   # the usual pattern: pytsk3 asks, vhdfs reads
        def __init__(self, path: str) -> None:
            self._disk = vhdfs.open(path, parent_dirs=parent_dirs)
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, size: int) -> bytes:
            self._disk.seek(offset)
            return self._disk.read(size)

        def get_size(self) -> int:
            return self._disk.seek(0, 2)

        def close(self) -> None:
            self._disk.close()

    img = VhdfsImgInfo(path)
    try:
        fs = pytsk3.FS_Info(img, offset=offset)
        for entry in fs.open_dir("/"):
            print("   ", entry.info.name.name.decode(errors="replace"))
    except OSError as exc:
        print(f"    (pytsk3: {exc})")
    finally:
        img.close()


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    path, parent_dirs = argv[0], argv[2::2] if argv[1:2] == ["--parent-dir"] else []
    with vhdfs.open(path, parent_dirs=parent_dirs) as disk:   # read-only; "r+b" writes
        size = disk.seek(0, 2)
        disk.seek(0)
        digest = _Sha256()
        shutil.copyfileobj(disk, digest, 1 << 20)
        print(f"{path}: {size} bytes of virtual disk, sha256 {digest.h.hexdigest()}")
        parts = mbr_partitions(disk)
    for number, offset, length in parts:
        print(f"partition {number}: offset {offset}, {length} bytes")
    if parts:
        list_with_pytsk3(path, parts[0][1], parent_dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
