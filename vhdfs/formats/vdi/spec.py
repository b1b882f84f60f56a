"""VirtualBox VDI on-disk structures: pre-header, header v1.1 (0x180 and 0x190), block map.

Pure functions over bytes, no file I/O, so the reader (``block/vdi.py``) and the creator
(``block/vdi_create.py``) share one layout and one set of sanity rules. Every parse error is a
one-line ``FormatError``; the caller attaches the file name. All VDI integers are little-endian
(FORMATS.md §6); UUIDs are IPRT mixed-endian, i.e. ``uuid.UUID(bytes_le=...)``.
"""

from __future__ import annotations

import struct
import sys
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...errors import FormatError, UnsupportedError
from .magic import PRE_HEADER_SIZE, SIGNATURE, probe

VERSION_1_1 = 0x00010001
HEADER_V1 = 0x180  # QEMU writes this size
HEADER_V1PLUS = 0x190  # VirtualBox: adds the LCHS geometry
HEADER_READ_SIZE = PRE_HEADER_SIZE + HEADER_V1PLUS  # the most we ever parse (0x1D8)
PRE_HEADER_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
QEMU_PRE_HEADER_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"

TYPE_NORMAL = 1  # dynamic
TYPE_FIXED = 2  # static
TYPE_UNDO = 3  # legacy, not handled
TYPE_DIFF = 4  # differencing (snapshot)
TYPE_NAMES = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "fixed", TYPE_DIFF: "differencing"}
TYPE_CODES = {
    "dynamic": TYPE_NORMAL,
    "normal": TYPE_NORMAL,
    "fixed": TYPE_FIXED,
    "static": TYPE_FIXED,
    "differencing": TYPE_DIFF,
    "diff": TYPE_DIFF,
}

BLOCK_FREE = 0xFFFFFFFF  # base image: zeros; diff image: the parent's data
BLOCK_ZERO = 0xFFFFFFFE  # zeros, never inherited (discard, whole zero block)
MAX_BLOCK_INDEX = BLOCK_ZERO - 1
SECTOR = 512
MIN_BLOCK_SIZE = SECTOR
MAX_BLOCK_SIZE = 128 * 1024 * 1024  # VirtualBox opens 128 KiB .. 128 MiB
DEFAULT_BLOCK_SIZE = 1024 * 1024  # the only size QEMU accepts
DESCRIPTION_SIZE = 256
NULL_UUID = uuid.UUID(int=0)

# Offsets of the fields that change after creation (patched in place, one small pwrite each).
BLOCKS_ALLOCATED_OFFSET = 0x184
MODIFY_UUID_OFFSET = 0x198

# Header v1 after the pre-header (offsets in the comments are absolute):
# 0x48 header size, 0x4C type, 0x50 flags, 0x54 description[256], 0x154 map offset,
# 0x158 data offset, 0x15C C, H, S, sector size, 0x16C unused, 0x170 disk size,
# 0x178 block size, 0x17C block extra, 0x180 blocks, 0x184 blocks allocated,
# 0x188 create, 0x198 modify, 0x1A8 link, 0x1B8 parent-modify UUIDs.
PRE_HEADER_STRUCT = struct.Struct("<64sII")
HEADER_STRUCT = struct.Struct("<III256sIIIIIIIQIIII16s16s16s16s")
LCHS_STRUCT = struct.Struct("<IIII")
assert PRE_HEADER_STRUCT.size + HEADER_STRUCT.size == PRE_HEADER_SIZE + HEADER_V1
assert PRE_HEADER_SIZE + HEADER_V1 + LCHS_STRUCT.size == HEADER_READ_SIZE


@dataclass
class VdiHeader:
    """Every field of a v1.1 header; ``lchs`` only when the header is 0x190 bytes or more."""

    text: bytes = QEMU_PRE_HEADER_TEXT
    version: int = VERSION_1_1
    header_size: int = HEADER_V1
    image_type: int = TYPE_NORMAL
    flags: int = 0
    description: bytes = b""
    offset_bmap: int = 0
    offset_data: int = 0
    geometry: tuple[int, int, int] = (0, 0, 0)
    sector_size: int = SECTOR
    disk_size: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    block_extra: int = 0
    blocks_in_image: int = 0
    blocks_allocated: int = 0
    uuid_create: uuid.UUID = NULL_UUID
    uuid_modify: uuid.UUID = NULL_UUID
    uuid_link: uuid.UUID = NULL_UUID
    uuid_parent_modify: uuid.UUID = NULL_UUID
    lchs: tuple[int, int, int, int] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.image_type, f"type {self.image_type}")

    @property
    def is_diff(self) -> bool:
        return self.image_type == TYPE_DIFF

    @property
    def block_stride(self) -> int:
        """Bytes one block takes in the file (its private extra bytes come first)."""
        return self.block_extra + self.block_size

    @property
    def description_text(self) -> str:
        return self.description.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def map_bytes(self) -> int:
        return 4 * self.blocks_in_image


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_header(buf: bytes, file_size: int) -> VdiHeader:
    """Decode and sanity-check a header; ``buf`` is the first bytes of the file.

    Everything a later allocation depends on (block count, block size, map and data offsets)
    is checked against ``file_size`` here, so a corrupt header can never make the reader
    allocate a map larger than the file or compute offsets into the header.
    """
    if len(buf) < PRE_HEADER_SIZE or not probe(buf):
        raise FormatError("not a VDI image (no signature 0xBEDA107F at offset 0x40)")
    text, _sig, version = PRE_HEADER_STRUCT.unpack_from(buf, 0)
    major = version >> 16
    if major == 0:
        raise UnsupportedError(
            f"VDI header version 0.{version & 0xFFFF} (pre-1.1 VirtualBox) is not supported"
        )
    if major != 1:
        raise UnsupportedError(f"VDI header version {major}.{version & 0xFFFF} is not supported (only 1.x)")
    if len(buf) < PRE_HEADER_SIZE + HEADER_V1:
        raise FormatError(
            f"truncated: the VDI header needs {PRE_HEADER_SIZE + HEADER_V1} bytes, file has {len(buf)}"
        )
    try:
        (
            header_size,
            image_type,
            flags,
            description,
            offset_bmap,
            offset_data,
            cyl,
            heads,
            secs,
            sector_size,
            _unused,
            disk_size,
            block_size,
            block_extra,
            blocks,
            allocated,
            u_create,
            u_modify,
            u_link,
            u_parent,
        ) = HEADER_STRUCT.unpack_from(buf, PRE_HEADER_SIZE)
    except struct.error as exc:  # pragma: no cover - length checked above
        raise FormatError(f"unreadable VDI header: {exc}") from None
    h = VdiHeader(
        text=text.split(b"\0", 1)[0],
        version=version,
        header_size=header_size,
        image_type=image_type,
        flags=flags,
        description=description,
        offset_bmap=offset_bmap,
        offset_data=offset_data,
        geometry=(cyl, heads, secs),
        sector_size=sector_size,
        disk_size=disk_size,
        block_size=block_size,
        block_extra=block_extra,
        blocks_in_image=blocks,
        blocks_allocated=allocated,
        uuid_create=uuid.UUID(bytes_le=u_create),
        uuid_modify=uuid.UUID(bytes_le=u_modify),
        uuid_link=uuid.UUID(bytes_le=u_link),
        uuid_parent_modify=uuid.UUID(bytes_le=u_parent),
    )
    if header_size < HEADER_V1:
        raise FormatError(f"VDI header size {header_size:#x} is smaller than v1.1's {HEADER_V1:#x}")
    if header_size >= HEADER_V1PLUS:
        if len(buf) < HEADER_READ_SIZE:
            raise FormatError(
                f"truncated: the VDI header needs {HEADER_READ_SIZE} bytes, file has {len(buf)}"
            )
        h.lchs = LCHS_STRUCT.unpack_from(buf, PRE_HEADER_SIZE + HEADER_V1)
    _validate(h, file_size)
    return h


def _validate(h: VdiHeader, file_size: int) -> None:
    if h.image_type == TYPE_UNDO:
        raise UnsupportedError("VDI undo images (type 3) are not supported")
    if h.image_type not in TYPE_NAMES:
        raise UnsupportedError(f"VDI image type {h.image_type} is not supported (known: 1, 2, 4)")
    if not _is_power_of_two(h.block_size) or not MIN_BLOCK_SIZE <= h.block_size <= MAX_BLOCK_SIZE:
        raise FormatError(f"VDI block size {h.block_size} must be a power of two between 512 and 128 MiB")
    if h.block_extra > MAX_BLOCK_SIZE:
        raise FormatError(f"VDI block extra {h.block_extra} is absurd (more than 128 MiB)")
    if h.blocks_in_image > MAX_BLOCK_INDEX:
        raise FormatError(f"VDI block count {h.blocks_in_image} is absurd")
    if h.disk_size > h.blocks_in_image * h.block_size:
        raise FormatError(
            f"VDI disk size {h.disk_size} needs more than the {h.blocks_in_image} blocks "
            f"of {h.block_size} bytes"
        )
    header_end = PRE_HEADER_SIZE + h.header_size
    if h.offset_bmap < header_end:
        raise FormatError(
            f"VDI block map offset {h.offset_bmap:#x} overlaps the header (ends {header_end:#x})"
        )
    if h.offset_bmap + h.map_bytes > file_size:
        raise FormatError(
            f"VDI block map ({h.blocks_in_image} entries at {h.offset_bmap:#x}) "
            f"runs past the end of the file ({file_size})"
        )
    if h.offset_data < h.offset_bmap + h.map_bytes:
        raise FormatError(f"VDI data offset {h.offset_data:#x} overlaps the block map")
    if h.sector_size != SECTOR:
        h.warnings.append(f"VDI sector size field is {h.sector_size}, not 512 (ignored)")
    if h.uuid_create == NULL_UUID:
        h.warnings.append("VDI image UUID is null (VirtualBox refuses such images)")
    if h.uuid_modify == NULL_UUID:
        h.warnings.append("VDI modification UUID is null (VirtualBox refuses such images)")
    if h.is_diff and h.uuid_link == NULL_UUID:
        raise FormatError("VDI differencing image has a null link UUID: its parent cannot be identified")


def pack_header(h: VdiHeader) -> bytes:
    """The header bytes (pre-header + v1 + LCHS when ``header_size`` ≥ 0x190), for creation."""
    text = h.text[:64]
    desc = h.description[:DESCRIPTION_SIZE]
    for name, value in (
        ("disk size", h.disk_size),
        ("block map offset", h.offset_bmap),
        ("data offset", h.offset_data),
        ("blocks", h.blocks_in_image),
        ("blocks allocated", h.blocks_allocated),
        ("block size", h.block_size),
    ):
        limit = (1 << 64) - 1 if name == "disk size" else 0xFFFFFFFF
        if not 0 <= value <= limit:
            raise ValueError(f"VDI {name} {value} does not fit its field")
    out = PRE_HEADER_STRUCT.pack(text, SIGNATURE, h.version) + HEADER_STRUCT.pack(
        h.header_size,
        h.image_type,
        h.flags,
        desc,
        h.offset_bmap,
        h.offset_data,
        *h.geometry,
        h.sector_size,
        0,
        h.disk_size,
        h.block_size,
        h.block_extra,
        h.blocks_in_image,
        h.blocks_allocated,
        h.uuid_create.bytes_le,
        h.uuid_modify.bytes_le,
        h.uuid_link.bytes_le,
        h.uuid_parent_modify.bytes_le,
    )
    if h.header_size >= HEADER_V1PLUS:
        out += LCHS_STRUCT.pack(*(h.lchs or (0, 0, 0, SECTOR)))
    return out


def parse_map(raw: bytes) -> array:
    """The block map as an ``array('I')`` in host order (mutable: writes update it)."""
    if len(raw) % 4:
        raise FormatError("VDI block map length is not a multiple of 4")
    entries = array("I")
    if entries.itemsize != 4:  # pragma: no cover - every Linux ABI has a 4-byte unsigned int
        entries = array("L")
    entries.frombytes(raw)
    if sys.byteorder == "big":  # pragma: no cover
        entries.byteswap()
    return entries


def pack_entries(entries: Sequence[int]) -> bytes:
    """Map entries as little-endian bytes, for one pwrite of a contiguous run."""
    return struct.pack(f"<{len(entries)}I", *entries)


def encode_uuid(u: uuid.UUID) -> bytes:
    """The 16 on-disk bytes of a UUID (IPRT mixed-endian)."""
    return u.bytes_le
