"""An independent, minimal VHDX writer for tests, written from shared/FORMATS-VHDX.md.

It deliberately imports nothing from ``vhdfs.formats.vhdx``: a misreading of the spec shared by
the parser and its test fixtures would otherwise pass unnoticed. Every layout here is spelled
out again from the digest (offsets, struct formats, GUIDs, BAT interleaving, log framing).

The image is built in memory (a ``bytearray``); tests then mutate it (corruption hooks, stale
BAT pages, log entries) and write it out. Fixed layout of what it produces:

    0        file type identifier     64 KiB   header 1     128 KiB  header 2
    192 KiB  region table 1           256 KiB  region table 2
    1 MiB    log (1 MiB)              2 MiB    metadata region (1 MiB)
    3 MiB    BAT (rounded up to 1 MiB), then sector bitmaps and payload blocks, 1 MiB aligned
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

import google_crc32c

KiB, MiB = 1024, 1024 * 1024
LOG_OFFSET, LOG_LENGTH = 1 * MiB, 1 * MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * MiB, 1 * MiB
BAT_OFFSET = 3 * MiB
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_OFFSETS = (192 * KiB, 256 * KiB)

BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83 = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")
CHS_PARAMETERS = uuid.UUID("da02d7bc-3d3a-423c-ac88-2a36ab21479b")

NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6


def crc(data: bytes | bytearray) -> int:
    return google_crc32c.value(bytes(data))


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def sealed(buf: bytearray | bytes, crc_at: int = 4) -> bytes:
    """Zero the 4-byte checksum field at ``crc_at``, compute CRC-32C over all of buf, store it."""
    b = bytearray(buf)
    b[crc_at:crc_at + 4] = bytes(4)
    struct.pack_into("<I", b, crc_at, crc(b))
    return bytes(b)


def header_bytes(seq: int, log_guid: uuid.UUID = uuid.UUID(int=0), *,
                 file_write_guid: uuid.UUID = uuid.UUID(int=0x1111),
                 data_write_guid: uuid.UUID = uuid.UUID(int=0x2222), version: int = 1,
                 log_version: int = 0, log_offset: int = LOG_OFFSET,
                 log_length: int = LOG_LENGTH) -> bytes:
    """4 KiB header: 'head', crc, seq, FileWriteGuid, DataWriteGuid, LogGuid, LogVersion,
    Version, LogLength, LogOffset, reserved; CRC over the whole 4 KiB with the field zeroed."""
    b = bytearray(4096)
    struct.pack_into("<4sIQ16s16s16sHHIQ", b, 0, b"head", 0, seq, file_write_guid.bytes_le,
                     data_write_guid.bytes_le, log_guid.bytes_le, log_version, version,
                     log_length, log_offset)
    return sealed(b)


def region_table_bytes(entries: list[tuple[uuid.UUID, int, int, bool]]) -> bytes:
    """64 KiB: 'regi', crc, count, reserved, then (guid, offset u64, length u32, flags u32)."""
    b = bytearray(64 * KiB)
    struct.pack_into("<4sIII", b, 0, b"regi", 0, len(entries), 0)
    for i, (g, off, length, required) in enumerate(entries):
        struct.pack_into("<16sQII", b, 16 + 32 * i, g.bytes_le, off, length, int(required))
    return sealed(b)


def locator_bytes(keys: dict[str, str]) -> bytes:
    """Parent locator: type GUID, reserved u16, count u16, then 12-byte entries and strings."""
    head = struct.pack("<16sHH", LOCATOR_TYPE.bytes_le, 0, len(keys))
    strings = b""
    table = b""
    base = 20 + 12 * len(keys)
    for k, v in keys.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        table += struct.pack("<IIHH", base + len(strings), base + len(strings) + len(kb),
                             len(kb), len(vb))
        strings += kb + vb
    return head + table + strings


@dataclass
class Entry:
    """One log entry to place in the log (defaults: the header's LogGuid, Tail = itself)."""

    sequence: int
    pages: dict[int, bytes] = field(default_factory=dict)   # file offset -> 4096 bytes
    zeros: dict[int, int] = field(default_factory=dict)     # file offset -> length
    tail: int | None = None          # log offset of the sequence start; None: this entry
    at: int | None = None            # log offset; None: right after the previous entry
    guid: uuid.UUID | None = None
    flushed: int | None = None       # None: the file size
    last: int | None = None
    bad_crc: bool = False
    data_seq_mismatch: bool = False  # data sector carries sequence+1 in its low half


def log_entry_bytes(e: Entry, guid: uuid.UUID, tail: int, flushed: int, last: int) -> bytes:
    """'loge' header (64 B), 32-byte zero/desc descriptors, data sectors, CRC over it all."""
    descs = b""
    for off, length in e.zeros.items():
        descs += struct.pack("<4s4xQQQ", b"zero", length, off, e.sequence)
    sectors = b""
    for off, page in e.pages.items():
        assert len(page) == 4096
        # 'desc', TrailingBytes (page's last 4), LeadingBytes (page's first 8), offset, seq
        descs += struct.pack("<4s4s8sQQ", b"desc", page[-4:], page[:8], off, e.sequence)
        low = (e.sequence + (1 if e.data_seq_mismatch else 0)) & 0xFFFFFFFF
        sectors += b"data" + struct.pack("<I", e.sequence >> 32) + page[8:-4] + \
            struct.pack("<I", low)
    count = len(e.zeros) + len(e.pages)
    desc_area = _up(64 + 32 * count, 4096)
    length = desc_area + len(sectors)
    b = bytearray(struct.pack("<4sIIIQII16sQQ", b"loge", 0, length, tail, e.sequence, count, 0,
                              guid.bytes_le, flushed, last) + descs)
    b += bytes(desc_area - len(b))
    b += sectors
    out = bytearray(sealed(b))
    if e.bad_crc:
        out[-1] ^= 0xFF              # torn: last byte changed after the CRC was computed
    return bytes(out)


@dataclass
class Built:
    data: bytearray
    virtual_size: int
    block_size: int
    logical: int
    chunk_ratio: int
    bat_entries: list[int]           # as intended (what a correct reader should end up with)
    block_offsets: dict[int, int]
    log_guid: uuid.UUID = uuid.UUID(int=0)

    def bat_page(self, index: int = 0) -> bytes:
        return bytes(self.data[BAT_OFFSET + 4096 * index:BAT_OFFSET + 4096 * (index + 1)])

    def set_headers(self, seqs: tuple[int, int] = (1, 2), log_guid: uuid.UUID | None = None,
                    **kw) -> None:
        """Rewrite both headers (same fields, given sequence numbers)."""
        if log_guid is not None:
            self.log_guid = log_guid
        for off, seq in zip(HEADER_OFFSETS, seqs):
            self.data[off:off + 4096] = header_bytes(seq, self.log_guid, **kw)

    def add_log(self, log_guid: uuid.UUID, entries: list[Entry]) -> None:
        """Write entries into the log region and make the headers point at ``log_guid``."""
        self.set_headers(log_guid=log_guid)
        at = 0
        for e in entries:
            at = e.at if e.at is not None else at
            tail = e.tail if e.tail is not None else at
            size = len(self.data)
            raw = log_entry_bytes(e, e.guid or log_guid, tail,
                                  size if e.flushed is None else e.flushed,
                                  size if e.last is None else e.last)
            for i in range(0, len(raw), 4096):   # circular placement
                pos = LOG_OFFSET + (at + i) % LOG_LENGTH
                self.data[pos:pos + 4096] = raw[i:i + 4096]
            at = (at + len(raw)) % LOG_LENGTH

    def raw_content(self) -> bytes:
        """The virtual disk as intended (no parent: NOT_PRESENT etc. read as zeros)."""
        out = bytearray(self.virtual_size)
        for b, off in self.block_offsets.items():
            start = b * self.block_size
            n = min(self.block_size, self.virtual_size - start)
            out[start:start + n] = self.data[off:off + n]
        return bytes(out)


def build_vhdx(virtual_size: int, *, block_size: int = 1 * MiB, logical: int = 512,
               physical: int = 4096, kind: str = "dynamic",
               blocks: dict[int, bytes | int | tuple[int, bytes]] | None = None,
               bitmaps: dict[int, bytes] | None = None,
               parent_locator: dict[str, str] | None = None,
               seqs: tuple[int, int] = (1, 2),
               extra_regions: list[tuple[uuid.UUID, int, int, bool]] = (),
               extra_items: list[tuple[uuid.UUID, bytes, int]] = (),
               shuffle_items: bool = False, metadata_first: bool = False,
               region_required: bool = True, creator: str = "vhdfs test writer") -> Built:
    """Build a VHDX image in memory.

    ``blocks`` maps payload block numbers to bytes (FULLY_PRESENT, zero padded to the block),
    to a bare state int (ZERO, UNMAPPED, NOT_PRESENT...: offset 0, no data), or to a
    ``(state, data)`` tuple such as ``(PARTIALLY_PRESENT, data)`` for differencing files. ``bitmaps`` maps chunk numbers
    to sector-bitmap contents (PRESENT). ``kind="fixed"`` makes every block FULLY_PRESENT and sets
    LeaveBlockAllocated. ``extra_items``: (guid, data, flags bits: 1 user, 2 virtual disk,
    4 required).
    """
    blocks = dict(blocks or {})
    bitmaps = dict(bitmaps or {})
    has_parent = kind == "differencing"
    ratio = (1 << 23) * logical // block_size          # chunk ratio
    payload = _up(virtual_size, block_size) // block_size
    nbitmaps = _up(payload, ratio) // ratio
    count = nbitmaps * (ratio + 1) if has_parent else payload + (payload - 1) // ratio
    if kind == "fixed":
        for b in range(payload):
            blocks.setdefault(b, b"")
    bat_len = _up(count * 8, MiB)
    buf = bytearray(BAT_OFFSET + bat_len)
    buf[0:8] = b"vhdxfile"
    cb = creator.encode("utf-16-le")[:512]
    buf[8:8 + len(cb)] = cb
    entries = [0] * count
    offsets: dict[int, int] = {}
    for c, bm in sorted(bitmaps.items()):              # bitmap entry of chunk c
        off = len(buf)
        buf += bytes(bm).ljust(MiB, b"\0")
        entries[(c + 1) * ratio + c] = (off >> 20) << 20 | SB_PRESENT
    for b, v in sorted(blocks.items()):
        index = b + b // ratio                          # payload entry of block b
        if isinstance(v, int):
            entries[index] = v
            continue
        state, data = (v if isinstance(v, tuple) else (FULLY_PRESENT, v))
        off = len(buf)
        buf += bytes(data).ljust(block_size, b"\0")[:block_size]
        entries[index] = (off >> 20) << 20 | state
        offsets[b] = off
    buf[BAT_OFFSET:BAT_OFFSET + 8 * count] = struct.pack(f"<{count}Q", *entries)

    # metadata: table at region start, items from 64 KiB on
    params = struct.pack("<II", block_size, int(kind == "fixed") | 2 * int(has_parent))
    items = [(FILE_PARAMETERS, params, 4), (VIRTUAL_DISK_SIZE, struct.pack("<Q", virtual_size), 6),
             (PAGE83, uuid.UUID(int=0xABCDEF).bytes_le, 6),
             (LOGICAL_SECTOR, struct.pack("<I", logical), 6),
             (PHYSICAL_SECTOR, struct.pack("<I", physical), 6)]
    if parent_locator is not None:
        items.append((PARENT_LOCATOR, locator_bytes(parent_locator), 4))
    items += list(extra_items)
    placed = list(reversed(items)) if shuffle_items else items   # data order differs
    table_order = items[2:] + items[:2] if shuffle_items else items
    meta = bytearray(METADATA_LENGTH)
    struct.pack_into("<8sHH", meta, 0, b"metadata", 0, len(items))
    pos, where = 64 * KiB, {}
    for g, data, _ in placed:
        where[g] = pos
        meta[pos:pos + len(data)] = data
        pos += _up(len(data), 8)
    for i, (g, data, flags) in enumerate(table_order):
        struct.pack_into("<16sIII4x", meta, 32 + 32 * i, g.bytes_le, where[g], len(data), flags)
    buf[METADATA_OFFSET:METADATA_OFFSET + METADATA_LENGTH] = meta

    regions = [(BAT_GUID, BAT_OFFSET, bat_len, region_required),
               (METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, region_required)]
    if metadata_first:
        regions.reverse()
    regions += list(extra_regions)
    rt = region_table_bytes(regions)
    for off in REGION_OFFSETS:
        buf[off:off + len(rt)] = rt
    built = Built(buf, virtual_size, block_size, logical, ratio, entries, offsets)
    built.set_headers(seqs)
    return built
