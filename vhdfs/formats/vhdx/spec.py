"""VHDX on-disk structures ([MS-VHDX] §2): fixed layouts, GUIDs, checksums, BAT geometry.

Pure functions over bytes, no I/O, so each rule can be tested on its own and shared by the
reader (``metadata.py``, ``log.py``) and a future writer: every structure has a ``parse_*``
and a ``pack_*``. All integers are little-endian; GUIDs are ``uuid.UUID`` stored as
``bytes_le`` (the Windows GUID layout). Parse errors are one-line ``FormatError``s naming the
structure; the caller attaches the file name.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

import google_crc32c

from ...errors import FormatError

KiB = 1024
MiB = 1024 * KiB
TiB = 1024 * 1024 * MiB

# --- layout of the first MiB (§2.1) ---------------------------------------------------------
FILE_ID_OFFSET = 0
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION_TABLE1_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
HEADER_AREA_SIZE = 1 * MiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
ALIGNMENT = 1 * MiB  # regions, log and blocks
LOG_SECTOR = 4 * KiB  # log entries, descriptors and logged pages
LOGGABLE_OFFSET = REGION_TABLE1_OFFSET  # headers are never logged (OpenVMM)

MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
SECTOR_SIZES = (512, 4096)
MAX_VIRTUAL_SIZE = 64 * TiB  # OpenVMM's and QEMU's cap
SECTORS_PER_CHUNK = 1 << 23  # one 1 MiB sector bitmap block covers 2^23 sectors
BITMAP_BLOCK_SIZE = 1 * MiB

FILE_ID_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_ENTRY_SIGNATURE = b"loge"
ZERO_SIGNATURE = b"zero"
DESC_SIGNATURE = b"desc"
DATA_SIGNATURE = b"data"

NULL_GUID = uuid.UUID(int=0)

# --- GUIDs (§2.2.3.2, §2.6.2) -----------------------------------------------------------------
BAT_REGION = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_REGION = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
REGION_NAMES = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}

FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83 = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
# Not in the spec, but written by Windows (OpenVMM format.rs): tolerated unless Required.
CHS_PARAMETERS = uuid.UUID("da02d7bc-3d3a-423c-ac88-2a36ab21479b")
INCOMPLETE_FILE = uuid.UUID("71cc85f0-1b69-4e28-9558-c3bf83ae75d3")
PMEM_LABEL = uuid.UUID("10e1ae8a-4b7e-4169-a40f-cd70de928393")
METADATA_NAMES = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    PAGE83: "page 83 data",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
    PARENT_LOCATOR: "parent locator",
    CHS_PARAMETERS: "CHS parameters",
    INCOMPLETE_FILE: "incomplete file",
    PMEM_LABEL: "PMEM label storage area",
}
PARENT_LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")

# --- BAT states (§2.5.1) --------------------------------------------------------------------
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5  # QEMU reads the v0.95 value as UNMAPPED
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
PAYLOAD_STATES = {
    0: "NOT_PRESENT",
    1: "UNDEFINED",
    2: "ZERO",
    3: "UNMAPPED",
    6: "FULLY_PRESENT",
    7: "PARTIALLY_PRESENT",
}
SB_NOT_PRESENT = 0
SB_PRESENT = 6
BITMAP_STATES = {0: "NOT_PRESENT", 6: "PRESENT"}
BAT_STATE_MASK = 0x7
BAT_OFFSET_SHIFT = 20  # FileOffsetMB lives in bits 20-63


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), optionally continuing ``crc``; what every VHDX checksum uses."""
    return google_crc32c.extend(crc, bytes(data))


def checksum_with_field_zeroed(data: bytes, field_offset: int) -> int:
    """CRC-32C of ``data`` with its 4-byte checksum field at ``field_offset`` read as zero."""
    crc = google_crc32c.value(bytes(data[:field_offset]) + b"\0\0\0\0")
    return google_crc32c.extend(crc, bytes(data[field_offset + 4 :]))


def require_length(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise FormatError(f"{what}: truncated ({len(data)} of {size} bytes)")


def _put_checksum(buf: bytearray, field_offset: int) -> bytes:
    buf[field_offset : field_offset + 4] = b"\0\0\0\0"
    struct.pack_into("<I", buf, field_offset, crc32c(buf))
    return bytes(buf)


# --- file type identifier (§2.2.1) ----------------------------------------------------------
def parse_file_identifier(data: bytes) -> str:
    """Check ``vhdxfile`` and return the creator string (informational only)."""
    require_length(data, 8, "file identifier")
    if data[:8] != FILE_ID_SIGNATURE:
        raise FormatError("file identifier: not a VHDX file (no 'vhdxfile' signature)")
    creator = bytes(data[8:520]).decode("utf-16-le", errors="replace")
    return creator.split("\0", 1)[0]


def pack_file_identifier(creator: str) -> bytes:
    raw = creator.encode("utf-16-le")[:512]
    return (FILE_ID_SIGNATURE + raw).ljust(64 * KiB, b"\0")


# --- header (§2.2.2) ------------------------------------------------------------------------
# signature, checksum, sequence, FileWriteGuid, DataWriteGuid, LogGuid, LogVersion, Version,
# LogLength, LogOffset; the rest of the 4 KiB is reserved (zero).
HEADER_STRUCT = struct.Struct("<4sIQ16s16s16sHHIQ")
HEADER_CHECKSUM_OFFSET = 4


@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int
    checksum: int = 0


def header_is_valid(data: bytes) -> bool:
    """Signature and CRC over all 4 KiB: what §2.2.2.1 calls a valid header."""
    if len(data) < HEADER_SIZE or data[:4] != HEADER_SIGNATURE:
        return False
    (stored,) = struct.unpack_from("<I", data, HEADER_CHECKSUM_OFFSET)
    return stored == checksum_with_field_zeroed(data[:HEADER_SIZE], HEADER_CHECKSUM_OFFSET)


def parse_header(data: bytes, what: str = "header") -> Header:
    """Parse a header, checking signature and CRC (not the semantic fields)."""
    require_length(data, HEADER_SIZE, what)
    if data[:4] != HEADER_SIGNATURE:
        raise FormatError(f"{what}: bad signature {bytes(data[:4])!r}")
    if not header_is_valid(data):
        raise FormatError(f"{what}: bad checksum")
    _sig, crc, seq, fwg, dwg, lg, lver, ver, llen, loff = HEADER_STRUCT.unpack_from(data)
    return Header(
        seq,
        uuid.UUID(bytes_le=fwg),
        uuid.UUID(bytes_le=dwg),
        uuid.UUID(bytes_le=lg),
        lver,
        ver,
        llen,
        loff,
        crc,
    )


def pack_header(h: Header) -> bytes:
    """4 KiB header with its CRC computed (the ``checksum`` field of ``h`` is ignored)."""
    buf = bytearray(HEADER_SIZE)
    HEADER_STRUCT.pack_into(
        buf,
        0,
        HEADER_SIGNATURE,
        0,
        h.sequence_number,
        h.file_write_guid.bytes_le,
        h.data_write_guid.bytes_le,
        h.log_guid.bytes_le,
        h.log_version,
        h.version,
        h.log_length,
        h.log_offset,
    )
    return _put_checksum(buf, HEADER_CHECKSUM_OFFSET)


# --- region table (§2.2.3) ------------------------------------------------------------------
REGION_HEADER_STRUCT = struct.Struct("<4sIII")  # signature, checksum, entry count, reserved
REGION_ENTRY_STRUCT = struct.Struct("<16sQII")  # guid, file offset, length, flags
REGION_CHECKSUM_OFFSET = 4


@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool
    flags: int = 0  # the raw 32-bit word, so a writer preserves reserved bits


def parse_region_table(data: bytes, what: str = "region table") -> list[RegionEntry]:
    """Parse a 64 KiB region table, checking signature, CRC and entry count."""
    require_length(data, REGION_TABLE_SIZE, what)
    sig, crc, count, _ = REGION_HEADER_STRUCT.unpack_from(data)
    if sig != REGION_SIGNATURE:
        raise FormatError(f"{what}: bad signature {sig!r}")
    if crc != checksum_with_field_zeroed(data[:REGION_TABLE_SIZE], REGION_CHECKSUM_OFFSET):
        raise FormatError(f"{what}: bad checksum")
    if count > MAX_REGION_ENTRIES:
        raise FormatError(f"{what}: {count} entries (at most {MAX_REGION_ENTRIES})")
    out = []
    for i in range(count):
        g, off, length, flags = REGION_ENTRY_STRUCT.unpack_from(data, 16 + 32 * i)
        out.append(RegionEntry(uuid.UUID(bytes_le=g), off, length, bool(flags & 1), flags))
    return out


def pack_region_table(entries: list[RegionEntry]) -> bytes:
    if len(entries) > MAX_REGION_ENTRIES:
        raise ValueError("too many region entries")
    buf = bytearray(REGION_TABLE_SIZE)
    REGION_HEADER_STRUCT.pack_into(buf, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, e in enumerate(entries):
        flags = (e.flags & ~1) | int(e.required)
        REGION_ENTRY_STRUCT.pack_into(buf, 16 + 32 * i, e.guid.bytes_le, e.file_offset, e.length, flags)
    return _put_checksum(buf, REGION_CHECKSUM_OFFSET)


# --- metadata table (§2.6.1) ----------------------------------------------------------------
METADATA_HEADER_STRUCT = struct.Struct("<8sHH20x")  # signature, reserved, entry count
METADATA_ENTRY_STRUCT = struct.Struct("<16sIII4x")  # item id, offset, length, flags
META_IS_USER = 1
META_IS_VIRTUAL_DISK = 2
META_IS_REQUIRED = 4


@dataclass(frozen=True)
class MetadataEntry:
    item_id: uuid.UUID
    offset: int  # relative to the metadata region
    length: int
    is_user: bool
    is_virtual_disk: bool
    is_required: bool
    flags: int = 0

    @property
    def name(self) -> str:
        return METADATA_NAMES.get(self.item_id, str(self.item_id))


def parse_metadata_table(data: bytes, what: str = "metadata table") -> list[MetadataEntry]:
    """Parse the 64 KiB metadata table (no checksum: the region table's job is placement)."""
    require_length(data, METADATA_TABLE_SIZE, what)
    sig, _, count = METADATA_HEADER_STRUCT.unpack_from(data)
    if sig != METADATA_SIGNATURE:
        raise FormatError(f"{what}: bad signature {sig!r}")
    if count > MAX_METADATA_ENTRIES:
        raise FormatError(f"{what}: {count} entries (at most {MAX_METADATA_ENTRIES})")
    out = []
    for i in range(count):
        g, off, length, flags = METADATA_ENTRY_STRUCT.unpack_from(data, 32 + 32 * i)
        out.append(
            MetadataEntry(
                uuid.UUID(bytes_le=g),
                off,
                length,
                bool(flags & META_IS_USER),
                bool(flags & META_IS_VIRTUAL_DISK),
                bool(flags & META_IS_REQUIRED),
                flags,
            )
        )
    return out


def pack_metadata_table(entries: list[MetadataEntry]) -> bytes:
    if len(entries) > MAX_METADATA_ENTRIES:
        raise ValueError("too many metadata entries")
    buf = bytearray(METADATA_TABLE_SIZE)
    METADATA_HEADER_STRUCT.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(entries))
    for i, e in enumerate(entries):
        flags = (
            (e.flags & ~7)
            | (META_IS_USER * e.is_user)
            | (META_IS_VIRTUAL_DISK * e.is_virtual_disk)
            | (META_IS_REQUIRED * e.is_required)
        )
        METADATA_ENTRY_STRUCT.pack_into(buf, 32 + 32 * i, e.item_id.bytes_le, e.offset, e.length, flags)
    return bytes(buf)


# --- metadata items (§2.6.2) ----------------------------------------------------------------
FILE_PARAMETERS_STRUCT = struct.Struct("<II")


@dataclass(frozen=True)
class FileParameters:
    block_size: int
    leave_block_allocated: bool
    has_parent: bool


def parse_file_parameters(data: bytes) -> FileParameters:
    require_length(data, 8, "metadata: file parameters")
    bs, flags = FILE_PARAMETERS_STRUCT.unpack_from(data)
    return FileParameters(bs, bool(flags & 1), bool(flags & 2))


def pack_file_parameters(p: FileParameters) -> bytes:
    return FILE_PARAMETERS_STRUCT.pack(p.block_size, int(p.leave_block_allocated) | 2 * int(p.has_parent))


def parse_u64(data: bytes, what: str) -> int:
    require_length(data, 8, f"metadata: {what}")
    return struct.unpack_from("<Q", data)[0]


def parse_u32(data: bytes, what: str) -> int:
    require_length(data, 4, f"metadata: {what}")
    return struct.unpack_from("<I", data)[0]


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def pack_u32(value: int) -> bytes:
    return struct.pack("<I", value)


def parse_page83(data: bytes) -> uuid.UUID:
    require_length(data, 16, "metadata: page 83 data")
    return uuid.UUID(bytes_le=bytes(data[:16]))


def pack_page83(value: uuid.UUID) -> bytes:
    return value.bytes_le


# --- BAT entries and geometry (§2.4, §2.5) --------------------------------------------------
def bat_state(entry: int) -> int:
    return entry & BAT_STATE_MASK


def bat_offset(entry: int) -> int:
    """File offset in bytes (FileOffsetMB × 1 MiB)."""
    return (entry >> BAT_OFFSET_SHIFT) << 20


def pack_bat_entry(state: int, file_offset: int = 0) -> int:
    if file_offset % MiB:
        raise ValueError("BAT file offset must be 1 MiB aligned")
    return ((file_offset >> 20) << BAT_OFFSET_SHIFT) | (state & BAT_STATE_MASK)


@dataclass(frozen=True)
class BatGeometry:
    """How payload and sector-bitmap entries interleave in the BAT (§2.5)."""

    chunk_ratio: int  # payload blocks per sector bitmap block
    payload_blocks: int
    bitmap_blocks: int
    entry_count: int  # entries the BAT must hold

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return (chunk + 1) * self.chunk_ratio + chunk


def chunk_ratio(logical_sector_size: int, block_size: int) -> int:
    return (SECTORS_PER_CHUNK * logical_sector_size) // block_size


def bat_geometry(
    virtual_size: int, block_size: int, logical_sector_size: int, has_parent: bool
) -> BatGeometry:
    ratio = chunk_ratio(logical_sector_size, block_size)
    payload = -(-virtual_size // block_size)
    bitmaps = -(-payload // ratio)
    if has_parent:
        entries = bitmaps * (ratio + 1)
    else:
        entries = payload + (payload - 1) // ratio if payload else 0
    return BatGeometry(ratio, payload, bitmaps, entries)
