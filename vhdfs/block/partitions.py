"""Find the partitions of a disk image (MBR with logical partitions, or GPT).

Each partition becomes its own file ``<stem>-p<N>.raw`` so that ``mount -o loop`` needs no
``losetup -P`` and no offset arithmetic. Numbering follows the Linux kernel (what ``losetup -P``
shows as ``loopNpN``): MBR primaries 1-4 by slot, logical partitions from 5 in chain order; GPT
entries by slot index + 1. Parsing is deliberately strict: anything odd yields no partitions
(the whole-disk file is always there), never an exception.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass

from .image import Image

log = logging.getLogger(__name__)

_EXTENDED = {0x05, 0x0F, 0x85}
_GPT_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128


@dataclass(frozen=True)
class Partition:
    """Partition ``number`` at byte ``start``, ``length`` bytes long."""

    number: int
    start: int
    length: int


def find_partitions(image: Image, sector: int | None = None) -> list[Partition]:
    """The partitions of ``image`` (empty when it has no readable partition table).

    Tables count in the disk's logical sectors (``image.sector_size``: 4096 on a 4K VHDX);
    a GPT is also looked for at 4096-byte LBA 1, as some tools write one on 512-byte disks.
    """
    sector = sector or image.sector_size
    try:
        mbr = image.read(0, 512)
    except Exception as exc:  # a read error must not stop the mount: the whole disk still shows
        log.warning("%s: cannot read the partition table: %s", image.path, exc)
        return []
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return []
    entries = _mbr_entries(mbr)
    if any(kind == _GPT_PROTECTIVE for kind, _, _ in entries):
        for sec in dict.fromkeys((sector, 4096)):
            gpt = _gpt(image, sec)
            if gpt is not None:
                return gpt
        return []
    parts: list[Partition] = []
    for slot, (kind, lba, count) in enumerate(entries, start=1):
        if kind == 0 or count == 0:
            continue
        if kind in _EXTENDED:
            parts.extend(_logical(image, lba * sector, sector))
            continue
        parts.append(Partition(slot, lba * sector, count * sector))
    return _clip(image, parts)


def _mbr_entries(block: bytes) -> list[tuple[int, int, int]]:
    out = []
    for i in range(4):
        raw = block[446 + 16 * i : 446 + 16 * (i + 1)]
        kind = raw[4]
        lba, count = struct.unpack_from("<II", raw, 8)
        out.append((kind, lba, count))
    return out


def _logical(image: Image, ext_start: int, sector: int) -> list[Partition]:
    """Walk the EBR chain of an extended partition; logical partitions are numbered from 5."""
    parts: list[Partition] = []
    ebr_at = ext_start
    seen: set[int] = set()
    while len(parts) < _MAX_LOGICAL and ebr_at not in seen and ebr_at + 512 <= image.size:
        seen.add(ebr_at)
        ebr = image.read(ebr_at, 512)
        if ebr[510:512] != b"\x55\xaa":
            break
        first, nxt = _mbr_entries(ebr)[:2]
        if first[0] and first[2]:
            parts.append(Partition(5 + len(parts), ebr_at + first[1] * sector, first[2] * sector))
        if nxt[0] not in _EXTENDED or nxt[1] == 0:
            break
        ebr_at = ext_start + nxt[1] * sector
    return parts


def _gpt(image: Image, sector: int) -> list[Partition] | None:
    """GPT partitions if a valid header sits at LBA 1 for this sector size, else None."""
    if 2 * sector > image.size:
        return None
    hdr = image.read(sector, sector)
    if hdr[:8] != b"EFI PART":
        return None
    hsize, hcrc = struct.unpack_from("<II", hdr, 12)
    if not 92 <= hsize <= sector:
        return None
    check = bytearray(hdr[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        log.warning("%s: GPT header checksum mismatch; partitions not exposed", image.path)
        return None
    entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", hdr, 72)
    if count == 0 or count > 1024 or esize < 128 or esize > 4096:
        return None
    table = image.read(entries_lba * sector, count * esize)
    if zlib.crc32(table) != ecrc:
        log.warning("%s: GPT entry table checksum mismatch; partitions not exposed", image.path)
        return None
    parts = []
    for i in range(count):
        entry = table[i * esize : (i + 1) * esize]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            continue
        parts.append(Partition(i + 1, first * sector, (last - first + 1) * sector))
    return _clip(image, parts)


def _clip(image: Image, parts: list[Partition]) -> list[Partition]:
    """Drop partitions that start past the disk, shorten those that run past it."""
    out = []
    for p in parts:
        if p.start >= image.size or p.length <= 0:
            continue
        out.append(Partition(p.number, p.start, min(p.length, image.size - p.start)))
    return out
