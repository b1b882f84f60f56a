"""VHDX log structures ([MS-VHDX] §2.3.1): entry header, descriptors, data sectors.

Split from ``spec.py`` to keep each module small; like it, pure struct layouts with parse and
pack functions and no I/O. The scanner and replay planner (``log.py``) and a future writer both
build on these. A logged 4 KiB page travels in two pieces: its first 8 and last 4 bytes sit in
the ``desc`` descriptor, the middle 4084 bytes in a ``data`` sector framed by the two halves of
the entry's sequence number, so a torn sector is detectable.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ...errors import FormatError
from .spec import (
    DATA_SIGNATURE,
    DESC_SIGNATURE,
    LOG_ENTRY_SIGNATURE,
    LOG_SECTOR,
    ZERO_SIGNATURE,
    require_length,
)

# signature, checksum, entry length, tail, sequence, descriptor count, reserved, LogGuid,
# FlushedFileOffset, LastFileOffset
LOG_HEADER_STRUCT = struct.Struct("<4sIIIQII16sQQ")
LOG_CHECKSUM_OFFSET = 4
DESCRIPTOR_SIZE = 32
ZERO_DESC_STRUCT = struct.Struct("<4s4xQQQ")  # sig, reserved, length, offset, seq
DATA_DESC_STRUCT = struct.Struct("<4sIQQQ")  # sig, trailing, leading, offset, seq
DATA_SECTOR_STRUCT = struct.Struct("<4sI4084sI")  # sig, seq high, data, seq low


@dataclass(frozen=True)
class LogEntryHeader:
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int
    checksum: int = 0


def parse_log_entry_header(data: bytes) -> LogEntryHeader:
    """Parse the 64-byte entry header (no CRC check: that needs the whole entry)."""
    require_length(data, LOG_HEADER_STRUCT.size, "log entry header")
    sig, crc, length, tail, seq, count, _, g, flushed, last = LOG_HEADER_STRUCT.unpack_from(data)
    if sig != LOG_ENTRY_SIGNATURE:
        raise FormatError(f"log entry header: bad signature {sig!r}")
    return LogEntryHeader(length, tail, seq, count, uuid.UUID(bytes_le=g), flushed, last, crc)


def pack_log_entry_header(h: LogEntryHeader, checksum: int = 0) -> bytes:
    return LOG_HEADER_STRUCT.pack(
        LOG_ENTRY_SIGNATURE,
        checksum,
        h.entry_length,
        h.tail,
        h.sequence_number,
        h.descriptor_count,
        0,
        h.log_guid.bytes_le,
        h.flushed_file_offset,
        h.last_file_offset,
    )


def descriptor_area_length(descriptor_count: int) -> int:
    """Header + descriptors rounded up to 4 KiB: 126 fit the first sector, 128 each later one."""
    raw = LOG_HEADER_STRUCT.size + DESCRIPTOR_SIZE * descriptor_count
    return -(-raw // LOG_SECTOR) * LOG_SECTOR


@dataclass(frozen=True)
class ZeroDescriptor:
    file_offset: int
    length: int
    sequence_number: int


@dataclass(frozen=True)
class DataDescriptor:
    file_offset: int
    leading_bytes: bytes  # the page's first 8 bytes
    trailing_bytes: bytes  # the page's last 4 bytes
    sequence_number: int


def parse_descriptor(data: bytes) -> ZeroDescriptor | DataDescriptor:
    require_length(data, DESCRIPTOR_SIZE, "log descriptor")
    sig = bytes(data[:4])
    if sig == ZERO_SIGNATURE:
        _, length, off, seq = ZERO_DESC_STRUCT.unpack_from(data)
        return ZeroDescriptor(off, length, seq)
    if sig == DESC_SIGNATURE:
        _, trailing, leading, off, seq = DATA_DESC_STRUCT.unpack_from(data)
        return DataDescriptor(off, struct.pack("<Q", leading), struct.pack("<I", trailing), seq)
    raise FormatError(f"log descriptor: bad signature {sig!r}")


def pack_zero_descriptor(d: ZeroDescriptor) -> bytes:
    return ZERO_DESC_STRUCT.pack(ZERO_SIGNATURE, d.length, d.file_offset, d.sequence_number)


def pack_data_descriptor(d: DataDescriptor) -> bytes:
    (leading,) = struct.unpack("<Q", d.leading_bytes)
    (trailing,) = struct.unpack("<I", d.trailing_bytes)
    return DATA_DESC_STRUCT.pack(DESC_SIGNATURE, trailing, leading, d.file_offset, d.sequence_number)


def parse_data_sector(data: bytes) -> tuple[int, bytes]:
    """Return (sequence number from both halves, the 4084 data bytes)."""
    require_length(data, LOG_SECTOR, "log data sector")
    sig, high, body, low = DATA_SECTOR_STRUCT.unpack_from(data)
    if sig != DATA_SIGNATURE:
        raise FormatError(f"log data sector: bad signature {sig!r}")
    return (high << 32) | low, body


def pack_data_sector(sequence_number: int, body: bytes) -> bytes:
    return DATA_SECTOR_STRUCT.pack(DATA_SIGNATURE, sequence_number >> 32, body, sequence_number & 0xFFFFFFFF)


def split_page(file_offset: int, page: bytes, sequence_number: int) -> tuple[DataDescriptor, bytes]:
    """Split a 4 KiB page into its descriptor (leading 8, trailing 4 bytes) and data sector."""
    if len(page) != LOG_SECTOR:
        raise ValueError("a logged page is exactly 4096 bytes")
    desc = DataDescriptor(file_offset, bytes(page[:8]), bytes(page[-4:]), sequence_number)
    return desc, pack_data_sector(sequence_number, bytes(page[8:-4]))


def join_page(desc: DataDescriptor, body: bytes) -> bytes:
    """Rebuild the page: LeadingBytes + 4084 data bytes + TrailingBytes."""
    return desc.leading_bytes + bytes(body) + desc.trailing_bytes
