"""The named bad VHDX images: one builder each, and ``VHDX_CASES`` (see ``synthetic.Case``).

Every image comes from the independent writer (``vhdx_writer``), never from vhdfs's own VHDX
code, so a misreading shared by the driver and its fixtures cannot hide a case. The base is a
6 MiB dynamic VHDX with 1 MiB blocks, blocks 0, 2 and 5 present (``VHDX_RAW``); the chain is
that image as ``parent.vhdx`` under a differencing ``child.vhdx`` holding block 1.

Metadata items are stored in table order from 64 KiB into the metadata region: file parameters
(+0), virtual disk size (+8), page 83 (+16), logical sector size (+32), physical (+40), then
the parent locator (+48); the builders below patch them there.
"""

from __future__ import annotations

import struct
import uuid

from . import vhdx_writer as vw
from .content import MiB, pattern
from .synthetic import Case, err, ok

VHDX_SIZE = 6 * MiB
_BLOCKS = {0: pattern(MiB, seed=21), 2: pattern(MiB, seed=22, holes=((4096, 8192),)),
           5: pattern(MiB, seed=25)}
VHDX_RAW = vw.build_vhdx(VHDX_SIZE, blocks=_BLOCKS).raw_content()
CHILD_BLOCK = pattern(MiB, seed=31)
DATA_WRITE_GUID = uuid.UUID(int=0x2222)          # the writer's default DataWriteGuid

ITEMS = vw.METADATA_OFFSET + 64 * 1024
FILE_PARAMS_AT, VIRTUAL_SIZE_AT, LOGICAL_AT, LOCATOR_AT = ITEMS, ITEMS + 8, ITEMS + 32, ITEMS + 48


def _built(**kw) -> vw.Built:
    kw.setdefault("blocks", dict(_BLOCKS))
    return vw.build_vhdx(VHDX_SIZE, **kw)


def _save(b: vw.Built, path) -> None:
    path.write_bytes(bytes(b.data))


def _locator(**over: str | None) -> dict[str, str]:
    keys = {"parent_linkage": "{" + str(DATA_WRITE_GUID) + "}", "relative_path": ".\\parent.vhdx",
            "absolute_win32_path": "C:\\nowhere\\parent.vhdx"}
    for k, v in over.items():
        if v is None:
            keys.pop(k)
        else:
            keys[k] = v
    return keys


def _chain(d, locator: dict[str, str] | None = None, parent_guid: uuid.UUID = DATA_WRITE_GUID
           ) -> tuple[vw.Built, bytes]:
    """parent.vhdx (VHDX_RAW) <- child.vhdx (block 1 FULLY_PRESENT); returns (child, flat)."""
    parent = _built()
    parent.set_headers(data_write_guid=parent_guid)
    _save(parent, d / "parent.vhdx")
    child = vw.build_vhdx(VHDX_SIZE, kind="differencing", blocks={1: CHILD_BLOCK},
                          parent_locator=_locator() if locator is None else locator)
    _save(child, d / "child.vhdx")
    flat = bytearray(VHDX_RAW)
    flat[MiB:2 * MiB] = CHILD_BLOCK
    return child, bytes(flat)


def _patched_item(at: int, fmt: str, value: int):
    def build(d, c):
        b = _built()
        struct.pack_into(fmt, b.data, at, value)
        _save(b, d / "disk.vhdx")
        return err(d / "disk.vhdx")
    return build


def _b_headers_both_bad(d, c):
    b = _built()
    for off in vw.HEADER_OFFSETS:
        b.data[off + 100] ^= 0xFF
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _b_header_current_bad(d, c):
    b = _built()                              # header 2 (sequence 2) is the current one
    b.data[vw.HEADER_OFFSETS[1] + 100] ^= 0xFF
    _save(b, d / "disk.vhdx")
    return ok(d / "disk.vhdx", VHDX_RAW)


def _b_headers_equal_seq_differing(d, c):
    b = _built()
    b.data[vw.HEADER_OFFSETS[0]:vw.HEADER_OFFSETS[0] + 4096] = vw.header_bytes(2)
    b.data[vw.HEADER_OFFSETS[1]:vw.HEADER_OFFSETS[1] + 4096] = vw.header_bytes(
        2, file_write_guid=uuid.UUID(int=0x3333))
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _b_headers_equal_seq_identical(d, c):   # Disk2vhd writes these: fine
    b = _built(seqs=(7, 7))
    _save(b, d / "disk.vhdx")
    return ok(d / "disk.vhdx", VHDX_RAW)


def _b_region_table_1_bad(d, c):
    b = _built()
    b.data[vw.REGION_OFFSETS[0] + 20] ^= 0xFF
    _save(b, d / "disk.vhdx")
    return ok(d / "disk.vhdx", VHDX_RAW)


def _b_unknown_required_region(d, c):
    b = _built(extra_regions=[(uuid.UUID(int=0xDEAD), 4 * MiB, MiB, True)])
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _b_unknown_required_item(d, c):
    b = _built(extra_items=[(uuid.UUID(int=0xBEEF), b"whatever", 4)])
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _b_unknown_optional_item(d, c):
    b = _built(extra_items=[(uuid.UUID(int=0xBEEF), b"whatever", 0)])
    _save(b, d / "disk.vhdx")
    return ok(d / "disk.vhdx", VHDX_RAW)


_b_block_size_3m = _patched_item(FILE_PARAMS_AT, "<I", 3 * MiB)
_b_block_size_512m = _patched_item(FILE_PARAMS_AT, "<I", 512 * MiB)
_b_sector_1024 = _patched_item(LOGICAL_AT, "<I", 1024)
_b_virtual_size_odd = _patched_item(VIRTUAL_SIZE_AT, "<Q", VHDX_SIZE + 100)
_b_bat_too_small = _patched_item(VIRTUAL_SIZE_AT, "<Q", 256 * 1024 * MiB)   # 1 MiB BAT: 128 GiB


def _b_bat_entry_past_eof(d, c):
    b = _built()
    struct.pack_into("<Q", b.data, vw.BAT_OFFSET + 8 * 1, (1 << 30) | vw.FULLY_PRESENT)  # 1 GiB
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _b_partial_in_dynamic(d, c):
    b = _built(blocks={**_BLOCKS, 1: (vw.PARTIALLY_PRESENT, pattern(MiB, seed=29))})
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _dirty(flushed: int | None = None, bad_crc: bool = False) -> vw.Built:
    """A log entry that maps block 1 (data already in the file) by rewriting BAT page 0."""
    b = _built()
    at = len(b.data)
    b.data += pattern(MiB, seed=41)
    page = bytearray(b.bat_page(0))
    struct.pack_into("<Q", page, 8, at | vw.FULLY_PRESENT)
    b.add_log(uuid.UUID(int=0x10C), [vw.Entry(1, pages={vw.BAT_OFFSET: bytes(page)},
                                                flushed=flushed, bad_crc=bad_crc)])
    return b


def _b_log_entry_bad_crc(d, c):
    _save(_dirty(bad_crc=True), d / "disk.vhdx")   # torn entry: never complete, so not replayed
    return ok(d / "disk.vhdx", VHDX_RAW)


def _b_log_replayed_in_memory(d, c):
    _save(_dirty(), d / "disk.vhdx")
    flat = bytearray(VHDX_RAW)
    flat[MiB:2 * MiB] = pattern(MiB, seed=41)
    return ok(d / "disk.vhdx", bytes(flat))


def _b_truncated_below_flushed(d, c):
    size = len(_dirty().data)
    b = _dirty(flushed=size + MiB)      # the log says the file was once 1 MiB longer
    _save(b, d / "disk.vhdx")
    return err(d / "disk.vhdx")


def _b_fixed_cut_in_bat(d, c):
    b = vw.build_vhdx(VHDX_SIZE, kind="fixed")
    (d / "disk.vhdx").write_bytes(bytes(b.data[:vw.BAT_OFFSET + 4096]))  # cut inside the BAT
    return err(d / "disk.vhdx")


def _b_dynamic_cut_in_bat(d, c):
    (d / "disk.vhdx").write_bytes(bytes(_built().data[:vw.BAT_OFFSET + 100]))
    return err(d / "disk.vhdx")


def _b_locator_no_linkage(d, c):
    _chain(d, _locator(parent_linkage=None))
    return err(d / "child.vhdx")


def _b_locator_no_path(d, c):
    _chain(d, _locator(relative_path=None, absolute_win32_path=None))
    return err(d / "child.vhdx")


def _b_locator_not_utf16(d, c):
    child, _ = _chain(d)
    raw = bytes(child.data)
    value = ".\\parent.vhdx".encode("utf-16-le")
    pos = raw.index(value, vw.METADATA_OFFSET)
    data = bytearray(raw)
    data[pos:pos + 2] = b"\x00\xd8"          # a lone high surrogate: not UTF-16
    (d / "child.vhdx").write_bytes(bytes(data))
    return err(d / "child.vhdx")


def _b_chain_ok(d, c):
    _, flat = _chain(d)
    return ok(d / "child.vhdx", flat)


def _b_parent_wrong_linkage(d, c):
    _chain(d, parent_guid=uuid.UUID(int=0x9999))
    return err(d / "child.vhdx")


def _x(name, build, error, fragments=(), **kw) -> Case:
    return Case(f"vhdx-{name}", build, error, fragments, fmt="vhdx", **kw)


VHDX_CASES: list[Case] = [
    _x("headers-both-bad", _b_headers_both_bad, "FormatError",
       ("headers: no valid header (header 1: bad checksum; header 2: bad checksum)",)),
    _x("header-current-bad", _b_header_current_bad, None, check_note=True,
       check_finds=("header 2: bad checksum; using header 1",)),
    _x("headers-equal-seq-differing", _b_headers_equal_seq_differing, "FormatError",
       ("headers: both have sequence number 2 but differ",)),
    _x("headers-equal-seq-identical", _b_headers_equal_seq_identical, None, check_note=True,
       check_finds=("headers: identical with equal sequence number 7",)),
    _x("region-table-1-bad", _b_region_table_1_bad, None, check_note=True,
       check_finds=("region table 1: bad checksum; using region table 2",)),
    _x("unknown-required-region", _b_unknown_required_region, "UnsupportedError",
       ("region table: unknown required region",)),
    _x("unknown-required-metadata-item", _b_unknown_required_item, "UnsupportedError",
       ("metadata: unknown required item",)),
    _x("unknown-optional-metadata-item", _b_unknown_optional_item, None, check_note=True,
       check_finds=("metadata: unknown optional item 00000000-0000-0000-0000-00000000beef ignored",)),
    _x("block-size-3m", _b_block_size_3m, "FormatError",
       ("metadata: block size 3145728 is not a power of two from 1 to 256 MiB",)),
    _x("block-size-512m", _b_block_size_512m, "FormatError",
       ("metadata: block size 536870912 is not a power of two from 1 to 256 MiB",)),
    _x("sector-size-1024", _b_sector_1024, "FormatError",
       ("metadata: logical sector size 1024 (must be 512 or 4096)",)),
    _x("virtual-size-not-sector-multiple", _b_virtual_size_odd, "FormatError",
       ("metadata: virtual disk size 6291556 is not a positive multiple of the logical sector"
        " size 512",)),
    _x("bat-smaller-than-needed", _b_bat_too_small, "FormatError",
       ("region table: BAT region of 1048576 bytes holds fewer than the 262207 entries needed",)),
    _x("bat-entry-past-eof", _b_bat_entry_past_eof, "FormatError",
       ("BAT: block 1 at offset 1073741824 has data past the end of the file (7340032 bytes)",),
       lazy=True),
    _x("partially-present-in-dynamic", _b_partial_in_dynamic, "FormatError",
       ("BAT: block 1 has PARTIALLY_PRESENT, invalid in a dynamic file",), lazy=True),
    # A torn entry (bad CRC) is not part of the log: the disk reads as before it, and says so.
    _x("log-entry-bad-crc", _b_log_entry_bad_crc, None, check_note=True,
       check_finds=("log: LogGuid is set but no valid entry carries it; nothing to replay",)),
    _x("log-replayed-in-memory", _b_log_replayed_in_memory, None, check_note=True,
       check_finds=("log: replayed in memory: 1 entries, sequence 1..1",)),
    _x("truncated-below-flushed-offset", _b_truncated_below_flushed, "FormatError",
       ("log entry at offset 0: file is 8388608 bytes, less than FlushedFileOffset 9437184 (truncated)",)),
    # A BAT region past the end of the file is refused at open, naming the region (not left to
    # the lazy BAT read, which made a mount start and then fail with no reason shown).
    _x("fixed-cut-in-bat", _b_fixed_cut_in_bat, "FormatError",
       ("region table: BAT region at 3145728 length 1048576 ends past the end of the file "
        "(3149824 bytes; truncated?)",)),
    _x("dynamic-cut-in-bat", _b_dynamic_cut_in_bat, "FormatError",
       ("region table: BAT region at 3145728 length 1048576 ends past the end of the file "
        "(3145828 bytes; truncated?)",)),
    _x("chain-ok", _b_chain_ok, None),
    # parent_linkage is a required key; the driver refuses the parent by id, naming the key, and
    # offers the override (a FormatError naming the locator would be as good).
    _x("locator-no-parent-linkage", _b_locator_no_linkage, "ChainError",
       ("not found with id (no parent_linkage)", "--ignore-parent-id")),
    _x("locator-no-path", _b_locator_no_path, "ChainError",
       ("parent (unnamed parent) not found (tried no candidate paths; use --parent-dir DIR)",)),
    _x("locator-not-utf16", _b_locator_not_utf16, "FormatError",
       ("metadata: parent locator: entry 1 is not UTF-16LE",)),
    _x("parent-wrong-linkage", _b_parent_wrong_linkage, "ChainError",
       ("not found with id 00000000-0000-0000-0000-000000002222",
        "has id 00000000-0000-0000-0000-000000009999", "--ignore-parent-id")),
]
