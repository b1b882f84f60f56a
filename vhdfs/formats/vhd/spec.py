"""VHD v1.0 on-disk structures: footer, dynamic header, parent locators, blktap batmap.

Pure functions over bytes: no file I/O, so each rule (checksum, CHS geometry, the QEMU 10
size rule, locator decoding) can be tested on its own and shared by the reader and the creator.
Every parse error is a one-line ``FormatError``; the caller attaches the file name.
All VHD integers are big-endian (FORMATS.md §1).
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass, field

from ...errors import FormatError
from .magic import DISK_DIFFERENCING, DISK_DYNAMIC, FOOTER_COOKIE, FOOTER_SIZE, SECTOR

HEADER_SIZE = 1024

HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"

DISK_FIXED = 2
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

FEATURES_RESERVED = 0x00000002  # bit1 must be set
FEATURE_TEMPORARY = 0x00000001
FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF  # footer.data_offset of a fixed disk
HEADER_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF  # header.data_offset: unused, all-ones
UNUSED_BAT = 0xFFFFFFFF  # BAT entry of an unallocated block
MAX_BAT_SECTOR = 0xFFFFFFFE
MAX_VIRTUAL_SIZE = 2040 * 1024**3  # 0xFF000000 sectors: QEMU's and Windows' cap
MAX_CHS = (65535, 16, 255)
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z as a Unix time
MAX_LOCATOR_LENGTH = 64 * 1024  # a path; anything longer is corrupt

# cookie, features, format version, data offset, timestamp, creator app, creator version,
# creator host OS, original size, current size, cylinders, heads, sectors/track, disk type,
# checksum, unique id, saved state, reserved
FOOTER_STRUCT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
FOOTER_CHECKSUM_OFFSET = 0x40
# cookie, data offset, table offset, header version, max table entries, block size, checksum,
# parent unique id, parent timestamp, reserved, parent unicode name, then 8 locators
HEADER_STRUCT = struct.Struct(">8sQQIIII16sII512s")
HEADER_CHECKSUM_OFFSET = 0x24
LOCATOR_STRUCT = struct.Struct(">IIIIQ")  # platform code, data space, data length, reserved, offset
LOCATOR_TABLE_OFFSET = 0x240
LOCATOR_COUNT = 8
# blktap batmap header: cookie, map offset, map size (sectors), version, checksum, marker
BATMAP_STRUCT = struct.Struct(">8sQIIIB")

CREATOR_OS_WINDOWS = b"Wi2k"
CREATOR_OS_MAC = b"Mac "

# Parent locator platform codes (FORMATS.md §2.1).
PLAT_NONE = 0
PLAT_WI2R = 0x57693272  # 'Wi2r' deprecated relative, ANSI
PLAT_WI2K = 0x5769326B  # 'Wi2k' deprecated absolute, ANSI
PLAT_W2RU = 0x57327275  # 'W2ru' relative, UTF-16LE
PLAT_W2KU = 0x57326B75  # 'W2ku' absolute, UTF-16LE
PLAT_MAC = 0x4D616320  # 'Mac ' alias blob: opaque
PLAT_MACX = 0x4D616358  # 'MacX' file:// URL, UTF-8
PLATFORM_NAMES = {
    PLAT_WI2R: "Wi2r",
    PLAT_WI2K: "Wi2k",
    PLAT_W2RU: "W2ru",
    PLAT_W2KU: "W2ku",
    PLAT_MAC: "Mac ",
    PLAT_MACX: "MacX",
}

CREATOR_APPS = {
    b"vpc ": "Virtual PC",
    b"vs  ": "Virtual Server",
    b"win ": "Windows / Hyper-V",
    b"d2v ": "Disk2vhd",
    b"d2v\0": "Disk2vhd",
    b"qemu": "QEMU",
    b"qem2": "QEMU (force_size)",
    b"vbox": "VirtualBox",
    b"tap\0": "blktap / XenServer",
    b"CTXS": "Citrix XenConverter",
    b"wa\0\0": "Azure",
    b"vhdf": "vhdfs",
}
# QEMU 10: only these creators are sized by CHS (unless the geometry is the maximum).
CHS_CREATORS = (b"vpc ", b"qemu")


def checksum(buf: bytes | bytearray, field_offset: int) -> int:
    """One's complement of the byte sum with the 4-byte checksum field taken as zero."""
    total = sum(buf) - sum(buf[field_offset : field_offset + 4])
    return ~total & 0xFFFFFFFF


def uuid_str(raw: bytes) -> str:
    """The printable form used everywhere (identity, expected parent id): RFC-4122 byte order."""
    return str(uuid.UUID(bytes=bytes(raw)))


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, clamped into a u32 (pre-2000 mtimes become 0)."""
    t = int(time.time() if unix_time is None else unix_time) - VHD_EPOCH
    return min(max(t, 0), 0xFFFFFFFF)


def unix_time(vhd_time: int) -> int:
    return vhd_time + VHD_EPOCH


def fourcc(raw: bytes) -> str:
    """Printable creator code: NULs shown as ``\\0`` so ``tap\\0`` stays recognisable."""
    return raw.decode("latin-1").replace("\0", "\\0")


def version_str(v: int) -> str:
    return f"{v >> 16}.{v & 0xFFFF}"


# -- footer ---------------------------------------------------------------------------------


@dataclass
class Footer:
    """The 512-byte hard disk footer (FORMATS.md §1.1)."""

    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int
    checksum_ok: bool = True

    def pack(self) -> bytes:
        """Serialise with a freshly computed checksum (we always write correct sums)."""
        buf = bytearray(
            FOOTER_STRUCT.pack(
                FOOTER_COOKIE,
                self.features,
                self.format_version,
                self.data_offset,
                self.timestamp,
                self.creator_app,
                self.creator_version,
                self.creator_os,
                self.original_size,
                self.current_size,
                self.cylinders,
                self.heads,
                self.sectors,
                self.disk_type,
                0,
                self.unique_id,
                self.saved_state,
            )
        )
        struct.pack_into(">I", buf, FOOTER_CHECKSUM_OFFSET, checksum(buf, FOOTER_CHECKSUM_OFFSET))
        return bytes(buf)

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors * SECTOR

    @property
    def type_name(self) -> str:
        return DISK_TYPE_NAMES.get(self.disk_type, f"type {self.disk_type}")


def parse_footer(buf: bytes) -> Footer:
    """Decode a footer; bad cookie is an error, a bad checksum only clears ``checksum_ok``."""
    if len(buf) == 511:  # pre-Virtual PC 2004: last reserved byte missing
        buf = bytes(buf) + b"\0"
    if len(buf) != FOOTER_SIZE or buf[:8] != FOOTER_COOKIE:
        raise FormatError("no VHD footer (cookie 'conectix' not found)")
    footer = Footer(*FOOTER_STRUCT.unpack(buf)[1:])  # the fields in the struct's order, cookie dropped
    footer.checksum_ok = footer.checksum == checksum(buf, FOOTER_CHECKSUM_OFFSET)
    return footer


def make_footer(
    size: int,
    disk_type: int,
    *,
    unique_id: bytes | None = None,
    creator_app: bytes = b"win ",
    creator_version: int = 0x000A0000,
    creator_os: bytes = CREATOR_OS_WINDOWS,
    timestamp: int | None = None,
    geometry: tuple[int, int, int] | None = None,
) -> Footer:
    """A new footer for ``size`` bytes; data offset follows the disk type."""
    c, h, s = geometry if geometry is not None else chs_geometry(size)
    return Footer(
        features=FEATURES_RESERVED,
        format_version=FORMAT_VERSION,
        data_offset=FIXED_DATA_OFFSET if disk_type == DISK_FIXED else FOOTER_SIZE,
        timestamp=vhd_timestamp() if timestamp is None else timestamp,
        creator_app=creator_app,
        creator_version=creator_version,
        creator_os=creator_os,
        original_size=size,
        current_size=size,
        cylinders=c,
        heads=h,
        sectors=s,
        disk_type=disk_type,
        checksum=0,
        unique_id=unique_id if unique_id is not None else uuid.uuid4().bytes,
        saved_state=0,
    )


# -- geometry and virtual size ----------------------------------------------------------------


def chs_geometry(size: int) -> tuple[int, int, int]:
    """The spec's CHS algorithm (appendix); rounds down, capped at 65535/16/255."""
    n = min(size // SECTOR, 65535 * 16 * 255)
    if n >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = n // spt
    else:
        spt = 17
        cth = n // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = n // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = n // spt
    return cth // heads, heads, spt


def size_rule_for(footer: Footer) -> str:
    """QEMU 10's rule: CHS only for ``vpc ``/``qemu`` creators without maximum geometry."""
    if footer.creator_app in CHS_CREATORS and (footer.cylinders, footer.heads, footer.sectors) != MAX_CHS:
        return "chs"
    return "current"


def virtual_size(footer: Footer, rule: str = "auto") -> tuple[int, str]:
    """(size in bytes, rule used). ``rule`` is "auto", "chs" or "current"."""
    if rule not in ("auto", "chs", "current"):
        raise FormatError(f"unknown size rule {rule!r} (use auto, chs or current)")
    used = size_rule_for(footer) if rule == "auto" else rule
    if used == "chs":
        return footer.chs_size, used
    return footer.current_size // SECTOR * SECTOR, used


# -- dynamic header -----------------------------------------------------------------------------


@dataclass
class Locator:
    """One parent locator entry (FORMATS.md §2.1)."""

    code: int
    data_space: int
    data_length: int
    reserved: int
    data_offset: int

    @property
    def name(self) -> str:
        return PLATFORM_NAMES.get(self.code, f"0x{self.code:08x}")

    def space_bytes(self) -> int | None:
        """blktap's rule: < 512 means sectors, a multiple of 512 means bytes, else invalid."""
        if self.data_space < SECTOR:
            return self.data_space * SECTOR
        if self.data_space % SECTOR == 0:
            return self.data_space
        return None

    def extent(self) -> tuple[int, int]:
        """File range the locator may occupy (reserved space or length, whichever is larger)."""
        space = self.space_bytes() or 0
        return self.data_offset, self.data_offset + max(space, self.data_length)


@dataclass
class DynamicHeader:
    """The 1024-byte ``cxsparse`` header of dynamic and differencing disks."""

    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_id: bytes
    parent_timestamp: int
    parent_name_raw: bytes
    locators: list[Locator] = field(default_factory=list)
    checksum_ok: bool = True

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        HEADER_STRUCT.pack_into(
            buf,
            0,
            HEADER_COOKIE,
            self.data_offset,
            self.table_offset,
            self.header_version,
            self.max_table_entries,
            self.block_size,
            0,
            self.parent_id,
            self.parent_timestamp,
            0,
            self.parent_name_raw.ljust(512, b"\0")[:512],
        )
        locs = list(self.locators) + [Locator(0, 0, 0, 0, 0)] * (LOCATOR_COUNT - len(self.locators))
        for i, loc in enumerate(locs[:LOCATOR_COUNT]):
            LOCATOR_STRUCT.pack_into(
                buf,
                LOCATOR_TABLE_OFFSET + 24 * i,
                loc.code,
                loc.data_space,
                loc.data_length,
                loc.reserved,
                loc.data_offset,
            )
        struct.pack_into(">I", buf, HEADER_CHECKSUM_OFFSET, checksum(buf, HEADER_CHECKSUM_OFFSET))
        return bytes(buf)

    @property
    def parent_name(self) -> str:
        return decode_utf16(self.parent_name_raw, "be")

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.block_size)


def parse_header(buf: bytes) -> DynamicHeader:
    """Decode and sanity-check a dynamic header before anything is allocated from it."""
    if len(buf) != HEADER_SIZE or buf[:8] != HEADER_COOKIE:
        raise FormatError("no dynamic disk header (cookie 'cxsparse' not found)")
    (_c, data_offset, table_offset, version, entries, block_size, stored, parent_id, parent_ts, _r, name) = (
        HEADER_STRUCT.unpack_from(buf, 0)
    )
    locators = [
        Locator(*LOCATOR_STRUCT.unpack_from(buf, LOCATOR_TABLE_OFFSET + 24 * i)) for i in range(LOCATOR_COUNT)
    ]
    check_block_size(block_size)
    if entries == 0:
        raise FormatError("dynamic header has max_table_entries 0")
    if table_offset % SECTOR:
        raise FormatError(f"BAT offset {table_offset} is not sector-aligned")
    fields = (data_offset, table_offset, version, entries, block_size, stored, parent_id, parent_ts, name)
    return DynamicHeader(*fields, locators, checksum_ok=stored == checksum(buf, HEADER_CHECKSUM_OFFSET))


def check_block_size(block_size: int) -> None:
    """Refuse block sizes that are not a power of two in [512, 2 GiB) (FORMATS.md §7)."""
    if block_size < SECTOR or block_size & (block_size - 1) or block_size >= 1 << 31:
        raise FormatError(f"block size {block_size} must be a power of two between 512 B and 1 GiB")


def bitmap_size(block_size: int) -> int:
    """Sector bitmap bytes in front of each block: ceil(B/4096) rounded up to 512."""
    bits_bytes = (block_size // SECTOR + 7) // 8
    return (bits_bytes + SECTOR - 1) // SECTOR * SECTOR


def bat_bytes(entries: int) -> int:
    """On-disk BAT length: 4 bytes per entry, padded to a sector."""
    return (entries * 4 + SECTOR - 1) // SECTOR * SECTOR


def decode_utf16(raw: bytes, order: str) -> str:
    """UTF-16 up to the first NUL code unit; unpaired surrogates survive, junk is replaced."""
    raw = bytes(raw[: len(raw) // 2 * 2])
    for i in range(0, len(raw), 2):
        if raw[i : i + 2] == b"\0\0":
            raw = raw[:i]
            break
    text = raw.decode(f"utf-16-{order}", errors="surrogatepass")
    # surrogatepass keeps lone surrogates, which os.fsencode cannot handle: swap them for U+FFFD
    return (
        text.encode("utf-8", errors="replace").decode("utf-8", errors="replace")
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
        else text
    )
