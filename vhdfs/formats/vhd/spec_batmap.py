"""blktap's batmap (FORMATS.md §2.3): a one-bit-per-block "fully populated" map. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import BATMAP_COOKIE, BATMAP_STRUCT, SECTOR, Footer


@dataclass
class BatmapHeader:
    offset: int  # where the header itself sits
    map_offset: int
    map_sectors: int
    version: int
    checksum: int
    marker: int


def parse_batmap_header(buf: bytes, offset: int) -> BatmapHeader | None:
    """The ``tdbatmap`` header sector, or None when the cookie is absent."""
    if len(buf) < BATMAP_STRUCT.size or buf[:8] != BATMAP_COOKIE:
        return None
    _c, map_off, map_secs, version, csum, marker = BATMAP_STRUCT.unpack_from(buf, 0)
    return BatmapHeader(offset, map_off, map_secs, version, csum, marker)


def pack_batmap_header(h: BatmapHeader, original: bytes) -> bytes:
    """The header sector with ``h``'s fields, keeping the rest (key hash) as it was."""
    buf = bytearray(original.ljust(SECTOR, b"\0")[:SECTOR])
    BATMAP_STRUCT.pack_into(
        buf, 0, BATMAP_COOKIE, h.map_offset, h.map_sectors, h.version, h.checksum, h.marker
    )
    return bytes(buf)


def batmap_checksum(data: bytes | bytearray, version: int) -> int:
    """One's complement byte sum of the map; version 1.1 summed signed chars."""
    total = sum(data)
    if version == 0x00010001:
        total -= 256 * sum(1 for b in data if b >= 0x80)
    return ~total & 0xFFFFFFFF


def has_batmap_by_creator(footer: Footer) -> bool:
    """blktap decides from creator ``tap`` and its version (≥ 1.1 may have one)."""
    return footer.creator_app[:3] == b"tap" and footer.creator_version >= 0x00010001
