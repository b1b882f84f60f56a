"""A tiny VDI writer and patcher, written from FORMATS.md. VDI integers are little-endian."""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from .content import MiB, get_field, patch_bytes, set_fields

# -- VDI structures -------------------------------------------------------------------------

VDI_SIGNATURE = 0xBEDA107F
VDI_FIELDS = {
    "signature": (0x40, "<I"), "version": (0x44, "<I"), "header_size": (0x48, "<I"),
    "image_type": (0x4C, "<I"), "flags": (0x50, "<I"), "offset_blocks": (0x154, "<I"),
    "offset_data": (0x158, "<I"), "cylinders": (0x15C, "<I"), "heads": (0x160, "<I"),
    "sectors": (0x164, "<I"), "sector_size": (0x168, "<I"), "disk_size": (0x170, "<Q"),
    "block_size": (0x178, "<I"), "block_extra": (0x17C, "<I"), "blocks": (0x180, "<I"),
    "blocks_allocated": (0x184, "<I"), "uuid_create": (0x188, "16s"),
    "uuid_modify": (0x198, "16s"), "uuid_link": (0x1A8, "16s"),
    "uuid_parent_modify": (0x1B8, "16s"),
}


@dataclass
class VdiInfo:
    path: Path
    size: int
    block_size: int
    offset_blocks: int
    offset_data: int
    blocks: int
    allocated: int
    block_extra: int
    file_size: int


def build_vdi(path: str | os.PathLike[str], raw: bytes, *, block_size: int = MiB,
              static: bool = False, block_extra: int = 0, header_size: int = 0x180,
              offset_blocks: int = 0x200, zero_marker: bool = False) -> VdiInfo:
    """A VDI 1.1 holding ``raw``: all-zero blocks stay free (or 0xFFFFFFFE with zero_marker)."""
    path = Path(path)
    size = len(raw)
    nblocks = (size + block_size - 1) // block_size
    offset_data = (offset_blocks + 4 * nblocks + 511) // 512 * 512
    bmap = []
    body = []
    for b in range(nblocks):
        chunk = raw[b * block_size:(b + 1) * block_size].ljust(block_size, b"\0")
        if static or chunk.count(0) != len(chunk):
            bmap.append(len(body))
            body.append(bytes(block_extra) + chunk)
        else:
            bmap.append(0xFFFFFFFE if zero_marker else 0xFFFFFFFF)
    hdr = bytearray(offset_blocks)
    hdr[:64] = b"<<< Oracle VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    set_fields(hdr, VDI_FIELDS, signature=VDI_SIGNATURE, version=0x00010001,
               header_size=header_size, image_type=2 if static else 1, flags=0,
               offset_blocks=offset_blocks, offset_data=offset_data, sector_size=512,
               disk_size=size, block_size=block_size, block_extra=block_extra, blocks=nblocks,
               blocks_allocated=len(body), uuid_create=uuidlib.uuid4().bytes,
               uuid_modify=uuidlib.uuid4().bytes, uuid_link=bytes(16),
               uuid_parent_modify=bytes(16))
    if header_size >= 0x190:
        struct.pack_into("<IIII", hdr, 0x1C8, 0, 0, 0, 512)
    with open(path, "wb") as f:
        f.write(hdr)
        f.write(b"".join(struct.pack("<I", e) for e in bmap))
        f.seek(offset_data)
        for blk in body:
            f.write(blk)
        f.truncate(offset_data + len(body) * (block_extra + block_size))
    return VdiInfo(path, size, block_size, offset_blocks, offset_data, nblocks, len(body),
                   block_extra, os.path.getsize(path))


def patch_vdi(path: str | os.PathLike[str], **values) -> None:
    with open(path, "r+b") as f:
        buf = bytearray(f.read(0x200))
        set_fields(buf, VDI_FIELDS, **values)
        f.seek(0)
        f.write(buf[:0x1C8])


def vdi_field(path: str | os.PathLike[str], name: str) -> int:
    with open(path, "rb") as f:
        return get_field(f.read(0x200), VDI_FIELDS, name)


def set_vdi_entry(path: str | os.PathLike[str], index: int, value: int) -> None:
    patch_bytes(path, vdi_field(path, "offset_blocks") + 4 * index, struct.pack("<I", value))
