"""Load and validate the metadata of a dynamic or differencing VHD, and name its parent.

Everything here runs at open time and only reads. Sizes claimed by the file are checked
against the file's length *before* anything is allocated from them, so a hostile header can
neither make us allocate gigabytes nor index outside the BAT. Problems that make reading unsafe
(a block past the end of the file) raise; problems a forensic reader can live with (a bad
checksum, overlapping blocks) become findings, which refuse a writable open unless forced.
"""

from __future__ import annotations

import itertools
import os
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...block.image import ParentRef
from ...block.rawfile import RawFile
from ...errors import FormatError
from . import spec as fmt
from . import spec_batmap as vbat
from . import spec_locators as vloc

MAX_BATMAP_BYTES = 16 * 1024 * 1024


@dataclass
class Batmap:
    """blktap's one-bit-per-block "fully populated" map, with its header."""

    header: vbat.BatmapHeader
    header_raw: bytes
    data: bytearray
    valid: bool  # checksum matched: only then do we trust a set bit

    cleared: bool = False  # an untrusted map was already rewritten all-clear

    def is_full(self, block: int) -> bool:
        byte = block >> 3
        return self.valid and byte < len(self.data) and bool(self.data[byte] & (0x80 >> (block & 7)))

    def clear_bit(self, f: RawFile, block: int) -> bool:
        """Durably clear ``block``'s bit before the block changes; True when the map changed.

        An untrusted map (bad checksum) is cleared whole, once, with a good checksum.
        """
        if not self.data:
            return False
        if not self.valid:
            if self.cleared:
                return False
            data = bytearray(len(self.data))
        elif self.is_full(block):
            data = bytearray(self.data)
            data[block >> 3] &= ~(0x80 >> (block & 7)) & 0xFF
        else:
            return False
        hdr = self.header
        hdr.checksum = vbat.batmap_checksum(data, hdr.version)
        f.pwrite(data, hdr.map_offset)
        f.pwrite(vbat.pack_batmap_header(hdr, self.header_raw), hdr.offset)
        f.sync()
        self.data[:] = data
        self.valid = self.cleared = True
        return True


@dataclass
class SparseLayout:
    """What ``load_layout`` learned: header, BAT, where metadata sits, and what is wrong."""

    header: fmt.DynamicHeader
    bat: array
    bitmap_bytes: int
    batmap: Batmap | None
    locators: list[tuple[int, fmt.Locator, str | None]]  # (index, entry, decoded path)
    regions: list[tuple[int, int, str]]  # metadata [start, end) + name
    floor: int  # first byte free for a new block
    findings: list[str] = field(default_factory=list)  # each refuses a writable open


def load_layout(
    f: RawFile, footer: fmt.Footer, footer_offset: int, file_size: int, vsize: int
) -> SparseLayout:
    """Read header, BAT, locators and batmap; raise on anything that makes reads unsafe."""
    findings: list[str] = []
    hoff = footer.data_offset
    if hoff % fmt.SECTOR or hoff < fmt.FOOTER_SIZE or hoff + fmt.HEADER_SIZE > file_size:
        raise FormatError(f"dynamic header offset {hoff} lies outside the file ({file_size} bytes)")
    header = fmt.parse_header(f.pread(fmt.HEADER_SIZE, hoff))
    if not header.checksum_ok:
        findings.append(f"dynamic header checksum mismatch (stored 0x{header.checksum:08x})")
    entries, bsize = header.max_table_entries, header.block_size
    bat_len = fmt.bat_bytes(entries)
    if header.table_offset + entries * 4 > file_size:
        raise FormatError(
            f"BAT ({entries} entries at offset {header.table_offset}) runs past the "
            f"end of the file ({file_size} bytes)"
        )
    if entries * bsize < vsize:
        raise FormatError(f"BAT has {entries} entries of {bsize} bytes, too few for the virtual size {vsize}")
    bat = array("I")
    bat.frombytes(f.pread(entries * 4, header.table_offset))
    if sys.byteorder == "little":
        bat.byteswap()
    bm_bytes = fmt.bitmap_size(bsize)

    regions = [
        (0, fmt.FOOTER_SIZE, "footer copy"),
        (hoff, hoff + fmt.HEADER_SIZE, "dynamic header"),
        (header.table_offset, header.table_offset + bat_len, "BAT"),
    ]
    batmap = _load_batmap(f, footer, header, file_size, regions, findings)
    locators = _load_locators(f, header, footer, file_size, regions, findings)
    floor = _check_blocks(bat, bsize, bm_bytes, vsize, regions, footer_offset, file_size, findings)
    floor = max([floor, footer_offset] + [end for _s, end, _n in regions])
    floor = (floor + fmt.SECTOR - 1) // fmt.SECTOR * fmt.SECTOR
    return SparseLayout(header, bat, bm_bytes, batmap, locators, regions, floor, findings)


def _check_blocks(
    bat: array,
    bsize: int,
    bm_bytes: int,
    vsize: int,
    regions: list[tuple[int, int, str]],
    footer_offset: int,
    file_size: int,
    findings: list[str],
) -> int:
    """Validate every allocated entry in O(n log n); return the end of the last block."""
    spans: list[tuple[int, int, int, int]] = []
    unused = fmt.UNUSED_BAT
    for i, entry in _allocated_entries(bat, unused):
        start = entry * fmt.SECTOR
        readable = bm_bytes + max(0, min(bsize, vsize - i * bsize))
        if start + readable > file_size:
            raise FormatError(
                f"BAT entry {i} points past the end of the file (block at {start}, file is {file_size} bytes)"
            )
        spans.append((start, start + bm_bytes + bsize, start + readable, i))
    if not spans:
        return 0
    spans.sort()
    for (s1, _e1, r1, i1), (s2, _e2, _r2, i2) in itertools.pairwise(spans):
        if s2 < r1:
            findings.append(f"BAT entries {i1} and {i2} overlap (blocks at {s1} and {s2})")
    for start, _end, readable_end, i in spans:
        if (
            footer_offset < file_size
            and start < footer_offset + fmt.FOOTER_SIZE
            and readable_end > footer_offset
        ):
            findings.append(f"BAT entry {i} (block at {start}) overlaps the footer at {footer_offset}")
        for rs, re_, name in regions:
            if start < re_ and rs < readable_end:
                findings.append(f"BAT entry {i} (block at {start}) overlaps the {name} at {rs}")
    return max(end for _s, end, _r, _i in spans)


def count_unused(bat: array, unused: int, chunk: int = 4096) -> int:
    """``bat.count(unused)``, skipping whole unused chunks by bytes (~5 ms, not ~30, for 1 M entries)."""
    raw = memoryview(bat).cast("B")  # no copy of the whole table: RSS stays flat
    width = bat.itemsize * chunk
    empty = array(bat.typecode, [unused]).tobytes() * chunk
    n = 0
    try:
        for base in range(0, len(bat), chunk):
            if bytes(raw[base * bat.itemsize : base * bat.itemsize + width]) == empty[:width]:
                n += min(chunk, len(bat) - base)
            else:
                n += bat[base : base + chunk].count(unused)
    finally:
        raw.release()  # the table may grow again once no view pins it
    return n


def _allocated_entries(bat: array, unused: int, chunk: int = 4096) -> Iterator[tuple[int, int]]:
    """``(index, entry)`` of every allocated BAT entry, in index order.

    Whole chunks of unused entries are skipped by comparing their bytes (memcmp speed): a
    2040 GiB image has ~1 M entries, and looping over them in Python cost ~40 ms of every mount.
    """
    raw = memoryview(bat).cast("B")  # no copy of the whole table: RSS stays flat
    width = bat.itemsize * chunk
    empty = array(bat.typecode, [unused]).tobytes() * chunk
    try:
        for base in range(0, len(bat), chunk):
            if bytes(raw[base * bat.itemsize : base * bat.itemsize + width]) == empty[:width]:
                continue
            for j, entry in enumerate(bat[base : base + chunk]):
                if entry != unused:
                    yield base + j, entry
    finally:
        raw.release()


def _load_locators(
    f: RawFile,
    header: fmt.DynamicHeader,
    footer: fmt.Footer,
    file_size: int,
    regions: list[tuple[int, int, str]],
    findings: list[str],
) -> list[tuple[int, fmt.Locator, str | None]]:
    out: list[tuple[int, fmt.Locator, str | None]] = []
    for i, loc in enumerate(header.locators):
        if loc.code == fmt.PLAT_NONE:
            continue
        what = f"parent locator {i} ({loc.name})"
        space = loc.space_bytes()
        if space is None:
            findings.append(f"{what} has an invalid data space {loc.data_space}")
        if loc.data_offset >= file_size or loc.data_offset + loc.data_length > file_size:
            findings.append(f"{what} data at {loc.data_offset} (+{loc.data_length}) lies outside the file")
            continue
        start, end = loc.extent()
        regions.append((start, min(end, file_size), what))  # reserved space past EOF holds nothing
        if loc.data_length > fmt.MAX_LOCATOR_LENGTH:
            findings.append(f"{what} claims {loc.data_length} bytes; ignored")
            continue
        value = vloc.decode_locator(loc.code, f.pread(loc.data_length, loc.data_offset))
        out.append((i, loc, value))
    return out


def _load_batmap(
    f: RawFile,
    footer: fmt.Footer,
    header: fmt.DynamicHeader,
    file_size: int,
    regions: list[tuple[int, int, str]],
    findings: list[str],
) -> Batmap | None:
    if not vbat.has_batmap_by_creator(footer):
        return None
    hdr_off = header.table_offset + fmt.bat_bytes(header.max_table_entries)
    if hdr_off + fmt.SECTOR > file_size:
        return None
    raw = f.pread(fmt.SECTOR, hdr_off)
    hdr = vbat.parse_batmap_header(raw, hdr_off)
    if hdr is None:
        return None
    map_len = hdr.map_sectors * fmt.SECTOR
    regions.append((hdr_off, hdr_off + fmt.SECTOR, "batmap header"))
    if map_len > MAX_BATMAP_BYTES or hdr.map_offset + map_len > file_size or hdr.map_offset % fmt.SECTOR:
        findings.append(
            f"batmap at {hdr.map_offset} ({hdr.map_sectors} sectors) lies outside the file; ignored"
        )
        return Batmap(hdr, raw, bytearray(), valid=False)
    regions.append((hdr.map_offset, hdr.map_offset + map_len, "batmap"))
    data = bytearray(f.pread(map_len, hdr.map_offset))
    valid = vbat.batmap_checksum(data, hdr.version) == hdr.checksum
    if not valid:
        findings.append("batmap checksum mismatch; its bits are ignored")
    return Batmap(hdr, raw, data, valid)


def parent_ref(
    path: str, header: fmt.DynamicHeader, locators: list[tuple[int, fmt.Locator, str | None]]
) -> ParentRef:
    """Candidates in order W2ru, W2ku, MacX, Wi2r, Wi2k, then the header's parent name."""
    folder = os.path.dirname(os.path.abspath(path))
    by_code: dict[int, list[str]] = {}
    for _i, loc, value in locators:
        if value:
            by_code.setdefault(loc.code, []).append(value)
    cands: list[str] = []

    def windows(value: str) -> None:
        p, absolute = vloc.windows_path_to_posix(value)
        if not p.strip("/"):
            return
        if absolute:
            cands.append(p)
        cands.append(os.path.join(folder, p.lstrip("/")))

    for code in (fmt.PLAT_W2RU, fmt.PLAT_W2KU):
        for v in by_code.get(code, []):
            windows(v)
    for v in by_code.get(fmt.PLAT_MACX, []):
        p = vloc.macx_to_posix(v)
        if p:
            cands.append(p if p.startswith("/") else os.path.join(folder, p))
    for code in (fmt.PLAT_WI2R, fmt.PLAT_WI2K):
        for v in by_code.get(code, []):
            windows(v)
    name = header.parent_name
    if name:
        base = os.path.basename(vloc.windows_path_to_posix(name)[0])
        if base:
            cands.append(os.path.join(folder, base))
    unique: list[str] = []
    for c in cands:
        c = os.path.normpath(c)
        if c not in unique:
            unique.append(c)
    names: list[str] = []
    for c in unique:
        b = os.path.basename(c)
        if b and b not in names:
            names.append(b)
    display = name or (names[0] if names else "(unnamed parent)")
    return ParentRef(
        name=display,
        expected_id=fmt.uuid_str(header.parent_id),
        candidates=unique,
        search_names=names,
        format="vhd",
    )
