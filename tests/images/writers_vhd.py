"""A tiny VHD writer and patcher, written from FORMATS.md, not from ``vhdfs.formats``.

``build_sparse_vhd``/``build_fixed_vhd`` produce images whose raw content is known byte for
byte; the patch helpers fix checksums the way the spec says (one's complement of the byte sum
with the field zeroed). VHD integers are big-endian.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from .content import SECTOR, MiB, get_field, patch_bytes, set_fields

# -- VHD structures -------------------------------------------------------------------------

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
UNUSED = 0xFFFFFFFF
W2RU = 0x57327275
W2KU = 0x57326B75
MACX = 0x4D616358

# name -> (offset, struct code) in the 512-byte footer
FOOTER_FIELDS = {
    "cookie": (0x00, "8s"), "features": (0x08, ">I"), "format_version": (0x0C, ">I"),
    "data_offset": (0x10, ">Q"), "timestamp": (0x18, ">I"), "creator_app": (0x1C, "4s"),
    "creator_version": (0x20, ">I"), "creator_os": (0x24, "4s"), "original_size": (0x28, ">Q"),
    "current_size": (0x30, ">Q"), "cylinders": (0x38, ">H"), "heads": (0x3A, "B"),
    "sectors": (0x3B, "B"), "disk_type": (0x3C, ">I"), "checksum": (0x40, ">I"),
    "unique_id": (0x44, "16s"), "saved_state": (0x54, "B"),
}
FOOTER_CSUM = 0x40
# name -> (offset, struct code) in the 1024-byte dynamic header
HEADER_FIELDS = {
    "cookie": (0x00, "8s"), "data_offset": (0x08, ">Q"), "table_offset": (0x10, ">Q"),
    "header_version": (0x18, ">I"), "max_table_entries": (0x1C, ">I"), "block_size": (0x20, ">I"),
    "checksum": (0x24, ">I"), "parent_id": (0x28, "16s"), "parent_timestamp": (0x38, ">I"),
    "parent_name": (0x40, "512s"),
}
for _i in range(8):
    _b = 0x240 + 24 * _i
    HEADER_FIELDS.update({f"loc{_i}_code": (_b, ">I"), f"loc{_i}_space": (_b + 4, ">I"),
                          f"loc{_i}_length": (_b + 8, ">I"), f"loc{_i}_reserved": (_b + 12, ">I"),
                          f"loc{_i}_offset": (_b + 16, ">Q")})
HEADER_CSUM = 0x24


def vhd_checksum(buf: bytes | bytearray, field_offset: int) -> int:
    """One's complement of the byte sum with the 4-byte checksum field taken as zero."""
    return ~(sum(buf) - sum(buf[field_offset:field_offset + 4])) & 0xFFFFFFFF


def fix_vhd_checksum(buf: bytearray, field_offset: int) -> None:
    struct.pack_into(">I", buf, field_offset, vhd_checksum(buf, field_offset))


def make_vhd_footer(size: int, disk_type: int, uid: bytes, *, data_offset: int | None = None,
                    creator: bytes = b"win ") -> bytearray:
    """A valid footer: ``win `` creator so every reader sizes it by current_size."""
    buf = bytearray(512)
    cyl, heads, spt = chs(size)
    set_fields(buf, FOOTER_FIELDS, cookie=FOOTER_COOKIE, features=2, format_version=0x00010000,
               data_offset=(0xFFFFFFFFFFFFFFFF if disk_type == 2 else 512) if data_offset is None
               else data_offset,
               timestamp=700000000, creator_app=creator, creator_version=0x000A0000,
               creator_os=b"Wi2k", original_size=size, current_size=size, cylinders=cyl,
               heads=heads, sectors=spt, disk_type=disk_type, unique_id=uid)
    fix_vhd_checksum(buf, FOOTER_CSUM)
    return buf


def chs(size: int) -> tuple[int, int, int]:
    n = min(size // SECTOR, 65535 * 16 * 255)
    if n >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = n // spt
    else:
        spt = 17
        cth = n // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads, cth = 31, 16, n // 31
        if cth >= heads * 1024:
            spt, heads, cth = 63, 16, n // 63
    return cth // heads, heads, spt


def bitmap_bytes(block_size: int) -> int:
    return ((block_size // SECTOR + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR


@dataclass
class VhdInfo:
    """Where things were put by ``build_sparse_vhd`` (for tests that corrupt them)."""

    path: Path
    size: int
    block_size: int
    uid: bytes
    table_offset: int
    entries: int
    blocks: dict[int, int]          # block index -> file offset of its bitmap
    locators: list[tuple[int, int, int]] = field(default_factory=list)  # (code, offset, length)
    file_size: int = 0


def build_sparse_vhd(path: str | os.PathLike[str], size: int, sectors: dict[int, bytes], *,
                     block_size: int = 2 * MiB, disk_type: int = 3, uid: bytes | None = None,
                     parent_uid: bytes = bytes(16), parent_name: str = "",
                     locators: list[tuple[int, bytes]] = (), creator: bytes = b"win ",
                     reverse_blocks: bool = False, extra_entries: int = 0) -> VhdInfo:
    """A dynamic (3) or differencing (4) VHD whose present sectors are exactly ``sectors``.

    ``sectors`` maps a sector number to its 512 bytes; their blocks are allocated (in reverse
    order when ``reverse_blocks``), bitmap bits set only for those sectors.
    """
    path = Path(path)
    uid = uid or uuidlib.uuid4().bytes
    entries = (size + block_size - 1) // block_size + extra_entries
    spb = block_size // SECTOR
    bm_len = bitmap_bytes(block_size)
    table_offset = 1536
    pos = table_offset + (entries * 4 + 511) // 512 * 512
    loc_entries: list[tuple[int, int, int, int]] = []
    pieces: list[tuple[int, bytes]] = []
    for code, data in locators:
        space = (len(data) + 511) // 512 * 512
        loc_entries.append((code, space, len(data), pos))
        pieces.append((pos, data))
        pos += space
    used = sorted({s // spb for s in sectors})
    if reverse_blocks:
        used.reverse()
    bat = [UNUSED] * entries
    blocks: dict[int, int] = {}
    for b in used:
        bm = bytearray(bm_len)
        data = bytearray(block_size)
        for s in range(b * spb, (b + 1) * spb):
            if s in sectors:
                k = s - b * spb
                bm[k // 8] |= 0x80 >> (k % 8)
                data[k * SECTOR:(k + 1) * SECTOR] = sectors[s]
        bat[b] = pos // SECTOR
        blocks[b] = pos
        pieces.append((pos, bytes(bm) + bytes(data)))
        pos += bm_len + block_size
    footer = make_vhd_footer(size, disk_type, uid, creator=creator)
    header = bytearray(1024)
    set_fields(header, HEADER_FIELDS, cookie=HEADER_COOKIE, data_offset=0xFFFFFFFFFFFFFFFF,
               table_offset=table_offset, header_version=0x00010000, max_table_entries=entries,
               block_size=block_size, parent_id=parent_uid, parent_timestamp=0,
               parent_name=parent_name.encode("utf-16-be"))
    for i, (code, space, length, off) in enumerate(loc_entries):
        set_fields(header, HEADER_FIELDS, **{f"loc{i}_code": code, f"loc{i}_space": space,
                                             f"loc{i}_length": length, f"loc{i}_offset": off})
    fix_vhd_checksum(header, HEADER_CSUM)
    bat_raw = b"".join(struct.pack(">I", e) for e in bat).ljust(
        (entries * 4 + 511) // 512 * 512, b"\xff")
    with open(path, "wb") as f:
        f.truncate(pos + 512)
        for off, data in [(0, footer), (512, header), (table_offset, bat_raw), *pieces,
                          (pos, footer)]:
            f.seek(off)
            f.write(data)
    return VhdInfo(path, size, block_size, uid, table_offset, entries, blocks,
                   [(c, o, ln) for c, _s, ln, o in loc_entries], pos + 512)


def build_fixed_vhd(path: str | os.PathLike[str], raw: bytes, uid: bytes | None = None) -> Path:
    path = Path(path)
    assert len(raw) % SECTOR == 0
    with open(path, "wb") as f:
        f.write(raw)
        f.write(make_vhd_footer(len(raw), 2, uid or uuidlib.uuid4().bytes))
    return path


def sectors_of(raw: bytes) -> dict[int, bytes]:
    """Non-zero sectors of a flat image (what a dynamic VHD must store)."""
    zero = bytes(SECTOR)
    out = {}
    for s in range(0, len(raw) // SECTOR):
        chunk = raw[s * SECTOR:(s + 1) * SECTOR]
        if chunk != zero:
            out[s] = chunk
    return out


def w2_locators(parent_name: str) -> list[tuple[int, bytes]]:
    """Relative then absolute-style locators naming ``parent_name`` next to the child."""
    return [(W2RU, (".\\" + parent_name).encode("utf-16-le")),
            (W2KU, ("C:\\nowhere\\" + parent_name).encode("utf-16-le"))]


# -- VHD patching ---------------------------------------------------------------------------


def vhd_footer_offsets(path: str | os.PathLike[str]) -> list[int]:
    """Offsets of the footer copies present (tail first, then head)."""
    size = os.path.getsize(path)
    out = []
    with open(path, "rb") as f:
        for off in (size - 512, 0):
            if off >= 0:
                f.seek(off)
                if f.read(8) == FOOTER_COOKIE and off not in out:
                    out.append(off)
    return out


def patch_vhd_footer(path: str | os.PathLike[str], *, which: str = "both", fix: bool = True,
                     **values) -> None:
    """Set footer fields in the tail copy, the head copy or both, re-summing when ``fix``."""
    size = os.path.getsize(path)
    offs = {"tail": [size - 512], "head": [0], "both": [size - 512, 0]}[which]
    with open(path, "r+b") as f:
        for off in offs:
            f.seek(off)
            buf = bytearray(f.read(512))
            set_fields(buf, FOOTER_FIELDS, **values)
            if fix:
                fix_vhd_checksum(buf, FOOTER_CSUM)
            f.seek(off)
            f.write(buf)


def read_vhd_header(path: str | os.PathLike[str]) -> tuple[int, bytearray]:
    with open(path, "rb") as f:
        f.seek(-512, 2) if os.path.getsize(path) >= 512 else f.seek(0)
        foot = f.read(512)
        if foot[:8] != FOOTER_COOKIE:
            f.seek(0)
            foot = f.read(512)
        hoff = get_field(foot, FOOTER_FIELDS, "data_offset")
        f.seek(hoff)
        return hoff, bytearray(f.read(1024))


def patch_vhd_header(path: str | os.PathLike[str], *, fix: bool = True, **values) -> None:
    hoff, buf = read_vhd_header(path)
    set_fields(buf, HEADER_FIELDS, **values)
    if fix:
        fix_vhd_checksum(buf, HEADER_CSUM)
    with open(path, "r+b") as f:
        f.seek(hoff)
        f.write(buf)


def vhd_bat(path: str | os.PathLike[str]) -> tuple[int, list[int]]:
    _hoff, h = read_vhd_header(path)
    table = get_field(h, HEADER_FIELDS, "table_offset")
    n = get_field(h, HEADER_FIELDS, "max_table_entries")
    with open(path, "rb") as f:
        f.seek(table)
        raw = f.read(4 * n)
    return table, list(struct.unpack(f">{n}I", raw))


def set_bat_entry(path: str | os.PathLike[str], index: int, value: int) -> None:
    table, _bat = vhd_bat(path)
    patch_bytes(path, table + 4 * index, struct.pack(">I", value))
