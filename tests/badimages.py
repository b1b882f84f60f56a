"""Hostile, broken and odd images, built independently of the drivers.

Everything here is written from FORMATS.md, not from ``vhdfs.format``: a tiny VHD/VDI writer
(``build_sparse_vhd``, ``build_fixed_vhd``, ``build_vdi``) whose expected raw content is known
byte for byte, struct patch helpers that fix checksums the way the spec says (one's complement
of the byte sum with the field zeroed), the table of named bad images used by
``test_bad_images.py``, and the mutators shared by ``test_fuzz.py`` and
``bench/fuzz_atheris.py``.

VHD integers are big-endian, VDI integers little-endian.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import random
import shutil
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

SECTOR = 512
MiB = 1024 * 1024

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


def set_fields(buf: bytearray, table: dict[str, tuple[int, str]], base: int = 0, **values) -> None:
    for name, value in values.items():
        off, code = table[name]
        if code.endswith("s") and isinstance(value, str):
            value = value.encode()
        struct.pack_into(code, buf, base + off, value)


def get_field(buf: bytes, table: dict[str, tuple[int, str]], name: str, base: int = 0):
    off, code = table[name]
    return struct.unpack_from(code, buf, base + off)[0]


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


def patch_bytes(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: str | os.PathLike[str], length: int) -> None:
    os.truncate(path, length)


# -- VDI structures -------------------------------------------------------------------------

VDI_SIGNATURE = 0xBEDA107F
VDI_FIELDS = {
    "signature": (0x40, "<I"), "version": (0x44, "<I"), "header_size": (0x48, "<I"),
    "image_type": (0x4C, "<I"), "flags": (0x50, "<I"), "offset_blocks": (0x154, "<I"),
    "offset_data": (0x158, "<I"), "cylinders": (0x15C, "<I"), "heads": (0x160, "<I"),
    "sectors": (0x164, "<I"), "sector_size": (0x168, "<I"), "disk_size": (0x170, "<Q"),
    "block_size": (0x178, "<I"), "block_extra": (0x17C, "<I"), "blocks": (0x180, "<I"),
    "blocks_allocated": (0x184, "<I"), "uuid_create": (0x188, "16s"),
    "uuid_modify": (0x198, "16s"), "uuid_link": (0x1A8, "16s"),
    "uuid_parent_modify": (0x1B8, "16s"),
}


@dataclass
class VdiInfo:
    path: Path
    size: int
    block_size: int
    offset_blocks: int
    offset_data: int
    blocks: int
    allocated: int
    block_extra: int
    file_size: int


def build_vdi(path: str | os.PathLike[str], raw: bytes, *, block_size: int = MiB,
              static: bool = False, block_extra: int = 0, header_size: int = 0x180,
              offset_blocks: int = 0x200, zero_marker: bool = False) -> VdiInfo:
    """A VDI 1.1 holding ``raw``: all-zero blocks stay free (or 0xFFFFFFFE with zero_marker)."""
    path = Path(path)
    size = len(raw)
    nblocks = (size + block_size - 1) // block_size
    offset_data = (offset_blocks + 4 * nblocks + 511) // 512 * 512
    bmap = []
    body = []
    for b in range(nblocks):
        chunk = raw[b * block_size:(b + 1) * block_size].ljust(block_size, b"\0")
        if static or chunk.count(0) != len(chunk):
            bmap.append(len(body))
            body.append(bytes(block_extra) + chunk)
        else:
            bmap.append(0xFFFFFFFE if zero_marker else 0xFFFFFFFF)
    hdr = bytearray(offset_blocks)
    hdr[:64] = b"<<< Oracle VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    set_fields(hdr, VDI_FIELDS, signature=VDI_SIGNATURE, version=0x00010001,
               header_size=header_size, image_type=2 if static else 1, flags=0,
               offset_blocks=offset_blocks, offset_data=offset_data, sector_size=512,
               disk_size=size, block_size=block_size, block_extra=block_extra, blocks=nblocks,
               blocks_allocated=len(body), uuid_create=uuidlib.uuid4().bytes,
               uuid_modify=uuidlib.uuid4().bytes, uuid_link=bytes(16),
               uuid_parent_modify=bytes(16))
    if header_size >= 0x190:
        struct.pack_into("<IIII", hdr, 0x1C8, 0, 0, 0, 512)
    with open(path, "wb") as f:
        f.write(hdr)
        f.write(b"".join(struct.pack("<I", e) for e in bmap))
        f.seek(offset_data)
        for blk in body:
            f.write(blk)
        f.truncate(offset_data + len(body) * (block_extra + block_size))
    return VdiInfo(path, size, block_size, offset_blocks, offset_data, nblocks, len(body),
                   block_extra, os.path.getsize(path))


def patch_vdi(path: str | os.PathLike[str], **values) -> None:
    with open(path, "r+b") as f:
        buf = bytearray(f.read(0x200))
        set_fields(buf, VDI_FIELDS, **values)
        f.seek(0)
        f.write(buf[:0x1C8])


def vdi_field(path: str | os.PathLike[str], name: str) -> int:
    with open(path, "rb") as f:
        return get_field(f.read(0x200), VDI_FIELDS, name)


def set_vdi_entry(path: str | os.PathLike[str], index: int, value: int) -> None:
    patch_bytes(path, vdi_field(path, "offset_blocks") + 4 * index, struct.pack("<I", value))


# -- content ---------------------------------------------------------------------------------

def pattern(size: int, seed: int = 1, holes: tuple[tuple[int, int], ...] = ()) -> bytes:
    """Random bytes of ``size`` with zero ``holes`` (start, length), reproducible."""
    buf = bytearray(random.Random(seed).randbytes(size))
    for start, length in holes:
        buf[start:start + length] = bytes(length)
    return bytes(buf)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unpack_corpus(corpus: Path, out: Path, wanted: Collection[str] | None = None,
                  read_only: bool = False) -> Path | None:
    """Decompress the corpus images (all, or those named in ``wanted``) into ``out``.

    Keeps the relative layout, so differencing images find their parents. None when the
    corpus (its manifest.json) is absent.
    """
    manifest = corpus / "manifest.json"
    if not manifest.is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    for entry in json.loads(manifest.read_text())["images"]:
        if wanted is not None and entry["image"] not in wanted:
            continue
        src, dst = corpus / entry["stored_as"], out / entry["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if entry.get("compression") == "xz":
            with lzma.open(src) as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            shutil.copyfile(src, dst)
        if read_only:
            dst.chmod(0o444)
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- the table of named bad images ------------------------------------------------------------

@dataclass
class Built:
    """A bad image on disk: the file to open, and (when tolerable) what it must read as."""

    path: Path
    expected_sha256: str | None = None
    expected_size: int | None = None


@dataclass
class Case:
    """One named bad image.

    ``error``: the ``VhdfsError`` subclass name expected from ``open_image`` + full read, with
    ``fragments`` that must all appear in its one-line message. ``error is None``: tolerable,
    the image must read as ``Built.expected_sha256`` and the ``warnings`` fragments must appear
    on stderr; ``writable_refused`` says a writable open must then be refused.
    ``check_finds``: fragments that ``Image.check()`` must report (tolerated cases).
    """

    name: str
    build: Callable[[Path, Path | None], Built]
    error: str | None = None
    fragments: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    writable_refused: bool = False
    check_finds: tuple[str, ...] = ()
    check_note: bool = False       # what check finds is harmless: a note, exit 0
    needs_corpus: bool = False
    fmt: str = "vhd"


# Synthetic images: 6 MiB dynamic, blocks 0 and 2 allocated (stored in reverse order), block 1
# unallocated; a 6 MiB fixed; a 3 MiB VDI with its middle block free.
DYN_SIZE = 6 * MiB
DYN_RAW = pattern(DYN_SIZE, seed=11, holes=((2 * MiB, 2 * MiB), (5 * MiB, 4096)))
FIXED_RAW = pattern(DYN_SIZE, seed=12, holes=((MiB, MiB),))
VDI_RAW = pattern(3 * MiB, seed=13, holes=((MiB, MiB),))


def _dyn(d: Path, name: str = "dyn.vhd", **kw) -> VhdInfo:
    return build_sparse_vhd(d / name, DYN_SIZE, sectors_of(DYN_RAW), reverse_blocks=True, **kw)


def _fixed(d: Path) -> Path:
    return build_fixed_vhd(d / "fixed.vhd", FIXED_RAW)


def _vdi(d: Path, **kw) -> VdiInfo:
    return build_vdi(d / "disk.vdi", VDI_RAW, **kw)


CHILD_RAW_SECTORS = {s: pattern(512, seed=1000 + s) for s in
                     (0, 1, 7, 4095, 4096, 4097, 9000, 12287)}


def _chain(d: Path, parent_size: int = DYN_SIZE, child_uid: bytes | None = None,
           locators: list[tuple[int, bytes]] | None = None, parent_name: str = "parent.vhd",
           child_name: str = "child.vhd") -> tuple[VhdInfo, VhdInfo, bytes]:
    """parent.vhd (dynamic, DYN_RAW) <- child.vhd (differencing, a few sectors)."""
    praw = DYN_RAW[:parent_size] if parent_size <= DYN_SIZE else DYN_RAW + bytes(parent_size - DYN_SIZE)
    parent = build_sparse_vhd(d / "parent.vhd", parent_size, sectors_of(praw))
    child = build_sparse_vhd(
        d / child_name, DYN_SIZE, CHILD_RAW_SECTORS, disk_type=4, uid=child_uid,
        parent_uid=parent.uid, parent_name=parent_name,
        locators=w2_locators(parent_name) if locators is None else locators)
    flat = bytearray(DYN_RAW)
    for s, data in CHILD_RAW_SECTORS.items():
        flat[s * 512:(s + 1) * 512] = data
    return parent, child, bytes(flat)


def _corpus(corpus: Path | None, d: Path, name: str) -> Path:
    assert corpus is not None
    dst = d / name
    shutil.copyfile(corpus / name, dst)
    dst.chmod(0o644)
    return dst


def _expected(name: str) -> str:
    from conftest import corpus_entries  # tests/ is on sys.path under pytest
    return next(e["expected_raw"]["sha256"] for e in corpus_entries() if e["image"] == name)


def _ok(path: Path, raw: bytes) -> Built:
    return Built(path, sha256(raw), len(raw))


def _err(path: Path) -> Built:
    return Built(path)


def _patched(make, patch, **fields):  # noqa: ANN001, ANN202 - a builder factory
    """A builder: a fresh image from ``make``, with ``patch`` applied to the given fields."""
    def build(d: Path, c: object) -> Built:
        info = make(d)
        patch(info.path, **fields)
        return _err(info.path)
    return build


def _b_zero(d, c):
    p = d / "empty.vhd"
    p.write_bytes(b"")
    return _err(p)


def _b_dyn_trunc_footer(d, c):
    i = _dyn(d)
    truncate(i.path, i.file_size - 100)
    return _ok(i.path, DYN_RAW)


def _b_dyn_trunc_header(d, c):
    i = _dyn(d)
    truncate(i.path, 512 + 300)
    return _err(i.path)


def _b_dyn_trunc_bat(d, c):
    i = _dyn(d)
    truncate(i.path, i.table_offset + 6)
    return _err(i.path)


def _b_dyn_trunc_bitmap(d, c):
    i = _dyn(d)
    last = max(i.blocks.values())
    truncate(i.path, last + 100)
    return _err(i.path)


def _b_dyn_trunc_block(d, c):
    i = _dyn(d)
    last = max(i.blocks.values())
    truncate(i.path, last + 512 + MiB + 4096)
    return _err(i.path)


def _b_corpus_trunc_block(d, c):
    p = _corpus(c, d, "dissect-win10-ntfs-dynamic.vhd")
    truncate(p, os.path.getsize(p) - 512 - MiB)
    return _err(p)


def _b_fixed_trunc_footer(d, c):
    p = _fixed(d)
    truncate(p, os.path.getsize(p) - 100)
    return _err(p)


def _b_fixed_trunc_data(d, c):
    p = _fixed(d)
    truncate(p, 3 * MiB)
    return _err(p)


def _b_tiny(d, c):
    i = _dyn(d)
    truncate(i.path, 300)
    return _err(i.path)


_b_dyn_cookie_both = _patched(_dyn, patch_vhd_footer, cookie=b"conectiX")


def _b_dyn_cookie_tail(d, c):
    i = _dyn(d)
    patch_vhd_footer(i.path, which="tail", cookie=b"conectiX")
    return _ok(i.path, DYN_RAW)


_b_dyn_header_cookie = _patched(_dyn, patch_vhd_header, cookie=b"cxsparsX")


def _b_fixed_cookie(d, c):
    p = _fixed(d)
    patch_vhd_footer(p, which="tail", cookie=b"conectiX")
    return _err(p)


def _b_dyn_csum_tail(d, c):
    i = _dyn(d)
    patch_vhd_footer(i.path, which="tail", fix=False, checksum=0x12345678)
    return _ok(i.path, DYN_RAW)


def _b_dyn_csum_both(d, c):
    i = _dyn(d)
    patch_vhd_footer(i.path, fix=False, checksum=0x12345678)
    return _ok(i.path, DYN_RAW)


def _b_corpus_csum_both(d, c):
    p = _corpus(c, d, "dfvfs-qemu-ext2-dynamic.vhd")
    patch_vhd_footer(p, fix=False, checksum=0)
    return Built(p, _expected("dfvfs-qemu-ext2-dynamic.vhd"))


def _b_fixed_csum(d, c):
    p = _fixed(d)
    patch_vhd_footer(p, which="tail", fix=False, checksum=0xDEADBEEF)
    return _ok(p, FIXED_RAW)


def _b_corpus_fixed_csum(d, c):
    p = _corpus(c, d, "qemu-fixed-mbr-fat16.vhd")
    patch_vhd_footer(p, which="tail", fix=False, checksum=1)
    return Built(p, _expected("qemu-fixed-mbr-fat16.vhd"))


def _b_dyn_header_csum(d, c):
    i = _dyn(d)
    patch_vhd_header(i.path, fix=False, checksum=0)
    return _ok(i.path, DYN_RAW)


def _b_bat_past_eof(d, c):
    i = _dyn(d)
    set_bat_entry(i.path, 2, (i.file_size + 8 * MiB) // 512)
    return _err(i.path)


def _b_bat_partly_past_eof(d, c):
    # The block starts inside the file but its data runs past the end.
    i = _dyn(d)
    set_bat_entry(i.path, 2, (i.file_size - 4096) // 512)
    return _err(i.path)


def _b_bat_duplicate(d, c):
    i = _dyn(d)
    table, bat = vhd_bat(i.path)
    set_bat_entry(i.path, 2, bat[0])
    flat = bytearray(DYN_RAW)
    flat[4 * MiB:6 * MiB] = DYN_RAW[0:2 * MiB]   # what the BAT now says block 2 holds
    return _ok(i.path, bytes(flat))


def _b_bat_into_header(d, c):
    # A block whose data would sit on top of the footer copy / header / BAT.
    i = _dyn(d)
    set_bat_entry(i.path, 1, 0)
    flat = bytearray(DYN_RAW)
    with open(i.path, "rb") as f:
        f.seek(512)  # bitmap = the first 512 bytes (the footer copy); data from offset 512
        flat[2 * MiB:4 * MiB] = f.read(2 * MiB)
    return Built(i.path)


_b_bat_2_32 = _patched(_dyn, patch_vhd_header, max_table_entries=0xFFFFFFFF)


def _b_corpus_bat_2_32(d, c):
    p = _corpus(c, d, "xo-base.vhd")
    patch_vhd_header(p, max_table_entries=0xFFFFFFFF)
    return _err(p)


_b_bat_too_few = _patched(_dyn, patch_vhd_header, max_table_entries=1)
_b_bat_zero = _patched(_dyn, patch_vhd_header, max_table_entries=0)
_b_block_2_31 = _patched(_dyn, patch_vhd_header, block_size=1 << 31)
_b_block_not_pow2 = _patched(_dyn, patch_vhd_header, block_size=3 * MiB)
_b_block_zero = _patched(_dyn, patch_vhd_header, block_size=0)
_b_header_offset_far = _patched(_dyn, patch_vhd_footer, data_offset=1 << 62)
_b_header_offset_max = _patched(_dyn, patch_vhd_footer, data_offset=0xFFFFFFFFFFFFFFFF)
_b_bat_offset_past_eof = _patched(_dyn, patch_vhd_header, table_offset=1 << 40)
_b_vsize_huge = _patched(_dyn, patch_vhd_footer, current_size=0xFFFFFFFFFFFFFE00)


def _b_fixed_vsize_larger(d, c):
    # A fixed footer claiming more data than the file holds.
    p = _fixed(d)
    patch_vhd_footer(p, which="tail", current_size=64 * MiB)
    return _err(p)


_b_disk_type_5 = _patched(_dyn, patch_vhd_footer, disk_type=5)


def _b_disk_type_0(d, c):
    p = _fixed(d)
    patch_vhd_footer(p, which="tail", disk_type=0)
    return _err(p)


def _b_diff_parent_missing(d, c):
    parent, child, _flat = _chain(d)
    parent.path.unlink()
    return _err(child.path)


def _b_corpus_parent_missing(d, c):
    p = _corpus(c, d, "xo-child2.vhd")
    _corpus(c, d, "xo-base.vhd")     # grandparent present, direct parent (xo-child1) missing
    return _err(p)


def _b_diff_uuid_mismatch(d, c):
    parent, child, _flat = _chain(d)
    patch_vhd_footer(parent.path, unique_id=uuidlib.UUID(int=0x1234).bytes)
    return _err(child.path)


def _b_corpus_uuid_mismatch(d, c):
    p = _corpus(c, d, "xo-child1.vhd")
    base = _corpus(c, d, "xo-base.vhd")
    patch_vhd_footer(base, unique_id=uuidlib.UUID(int=0xABCDEF).bytes)
    return _err(p)


def _b_diff_other_size(d, c):
    parent, child, _flat = _chain(d, parent_size=4 * MiB)
    return _err(child.path)


def retarget_locators(info: VhdInfo, name: str) -> None:
    """Point every W2ru/W2ku locator of ``info`` at ``name`` (lengths updated, sums fixed)."""
    for idx, (code, off, _length) in enumerate(info.locators):
        text = {W2RU: ".\\" + name, W2KU: "C:\\nowhere\\" + name}[code].encode("utf-16-le")
        assert len(text) <= 512
        patch_bytes(info.path, off, text.ljust(512, b"\0"))
        patch_vhd_header(info.path, **{f"loc{idx}_length": len(text)})


def _b_diff_loop(d, c):
    # parent <- a <- b, then a's parent id, name and locators patched to name b: a -> b -> a.
    parent, a, _flat = _chain(d, child_name="a.vhd")
    b = build_sparse_vhd(d / "b.vhd", DYN_SIZE, {3: pattern(512, 5)}, disk_type=4,
                         parent_uid=a.uid, parent_name="a.vhd", locators=w2_locators("a.vhd"))
    retarget_locators(a, "b.vhd")
    patch_vhd_header(a.path, parent_id=b.uid, parent_name="b.vhd".encode("utf-16-be"))
    return _err(a.path)


def _b_diff_self_loop(d, c):
    parent, child, _flat = _chain(d)
    retarget_locators(child, "child.vhd")
    patch_vhd_header(child.path, parent_id=child.uid,
                     parent_name="child.vhd".encode("utf-16-be"))
    return _err(child.path)


def _b_diff_locator_outside(d, c):
    # W2ru points past the end of the file; W2ku and the parent name still find the parent.
    parent, child, flat = _chain(d)
    patch_vhd_header(child.path, loc0_offset=child.file_size + 1 * MiB)
    return _ok(child.path, flat)


def _b_diff_locator_4g(d, c):
    parent, child, flat = _chain(d)
    patch_vhd_header(child.path, loc0_length=0xFFFFFFFF)
    return _ok(child.path, flat)


def _b_diff_locator_space_4g(d, c):
    parent, child, flat = _chain(d)
    patch_vhd_header(child.path, loc0_space=0xFFFFFFFF)
    return _ok(child.path, flat)


def _b_diff_all_locators_bad(d, c):
    # Every locator outside the file and no parent name: nothing names the parent.
    parent, child, _flat = _chain(d, parent_name="")
    patch_vhd_header(child.path, loc0_offset=1 << 50, loc1_offset=1 << 50)
    return _err(child.path)


def _b_diff_parent_is_vdi(d, c):
    parent, child, _flat = _chain(d)
    parent.path.unlink()
    build_vdi(parent.path, DYN_RAW)  # a VDI where the VHD parent should be
    return _err(child.path)


def _b_diff_parent_broken(d, c):
    parent, child, _flat = _chain(d)
    patch_vhd_header(parent.path, max_table_entries=0xFFFFFFFF)
    return _err(child.path)


_b_vdi_signature = _patched(_vdi, patch_vdi, signature=0xBEDA1070)


def _b_vdi_corpus_signature(d, c):
    p = _corpus(c, d, "qemu-static-mbr-fat12.vdi")
    patch_vdi(p, signature=0)
    return _err(p)


def _b_vdi_trunc_header(d, c):
    i = _vdi(d)
    truncate(i.path, 0x100)
    return _err(i.path)


def _b_vdi_trunc_map(d, c):
    i = _vdi(d)
    truncate(i.path, i.offset_blocks + 6)
    return _err(i.path)


def _b_vdi_trunc_data(d, c):
    i = _vdi(d)
    truncate(i.path, i.file_size - MiB // 2)
    return _err(i.path)


_b_vdi_map_past_eof = _patched(_vdi, patch_vdi, offset_blocks=0x7FFFFE00)
_b_vdi_data_past_eof = _patched(_vdi, patch_vdi, offset_data=0xFFFFFE00)
_b_vdi_blocks_absurd = _patched(_vdi, patch_vdi, blocks=0xFFFFFFFF)
_b_vdi_blocks_too_few = _patched(_vdi, patch_vdi, blocks=1)
_b_vdi_block_2_31 = _patched(_vdi, patch_vdi, block_size=1 << 31)
_b_vdi_block_zero = _patched(_vdi, patch_vdi, block_size=0)
_b_vdi_disk_huge = _patched(_vdi, patch_vdi, disk_size=1 << 62)


def _b_vdi_entry_past_eof(d, c):
    i = _vdi(d)
    patch_vdi(i.path, blocks_allocated=0xFFFFFFF0)
    set_vdi_entry(i.path, 2, 0xFFFFFF00)
    return _err(i.path)


def _b_vdi_entry_beyond_allocated(d, c):
    i = _vdi(d)
    set_vdi_entry(i.path, 2, 7)    # only 2 blocks allocated
    return _err(i.path)


def _b_vdi_duplicate_entries(d, c):
    i = _vdi(d)
    set_vdi_entry(i.path, 2, 0)
    flat = bytearray(VDI_RAW)
    flat[2 * MiB:3 * MiB] = VDI_RAW[0:MiB]
    return _ok(i.path, bytes(flat))


_b_vdi_version = _patched(_vdi, patch_vdi, version=0x00020000)


def _b_vdi_sector_size(d, c):
    i = _vdi(d)
    patch_vdi(i.path, sector_size=4096)
    return _ok(i.path, VDI_RAW)


_b_vdi_extra_huge = _patched(_vdi, patch_vdi, block_extra=0x80000000)
_b_vdi_image_type = _patched(_vdi, patch_vdi, image_type=9)


def _b_vdi_link_missing(d, c):
    # A diff VDI whose parent UUID matches nothing in its folder.
    i = _vdi(d)
    patch_vdi(i.path, image_type=4, uuid_link=uuidlib.uuid4().bytes,
              uuid_parent_modify=uuidlib.uuid4().bytes)
    return _err(i.path)


CASES: list[Case] = [
    # -- VHD: truncation ---------------------------------------------------------------------
    Case("zero-length", _b_zero, "NotAnImageError", ("empty file",)),
    Case("vhd-shorter-than-footer", _b_tiny, "NotAnImageError", ("not a VHD",)),
    Case("dyn-truncated-in-footer", _b_dyn_trunc_footer, None,
         warnings=("no footer at the end of the file; using the copy at offset 0",),
         writable_refused=True, check_finds=("no footer at the end",)),
    Case("dyn-truncated-in-header", _b_dyn_trunc_header, "FormatError",
         ("dynamic header offset 512 lies outside the file",)),
    Case("dyn-truncated-in-bat", _b_dyn_trunc_bat, "FormatError",
         ("BAT (3 entries at offset 1536) runs past the end of the file",)),
    Case("dyn-truncated-in-bitmap", _b_dyn_trunc_bitmap, "FormatError",
         ("BAT entry 0 points past the end of the file",)),
    Case("dyn-truncated-in-block", _b_dyn_trunc_block, "FormatError",
         ("BAT entry 0 points past the end of the file",)),
    Case("corpus-dyn-truncated-in-block", _b_corpus_trunc_block, "FormatError",
         ("points past the end of the file",), needs_corpus=True),
    Case("fixed-truncated-in-footer", _b_fixed_trunc_footer, "NotAnImageError",
         ("not a VHD",)),
    Case("fixed-truncated-in-data", _b_fixed_trunc_data, "NotAnImageError",
         ("not a VHD",)),
    # -- VHD: cookies and checksums ------------------------------------------------------------
    Case("dyn-wrong-cookie-both-footers", _b_dyn_cookie_both, "NotAnImageError",
         ("not a VHD",)),
    Case("dyn-wrong-cookie-tail-footer", _b_dyn_cookie_tail, None,
         warnings=("using the copy at offset 0",), writable_refused=True),
    Case("dyn-wrong-header-cookie", _b_dyn_header_cookie, "FormatError",
         ("no dynamic disk header (cookie 'cxsparse' not found)",)),
    Case("fixed-wrong-cookie", _b_fixed_cookie, "NotAnImageError", ("not a VHD",)),
    Case("dyn-bad-footer-checksum-tail", _b_dyn_csum_tail, None,
         warnings=("footer checksum mismatch (stored 0x12345678); using the copy at offset 0",),
         writable_refused=True, check_finds=("footer checksum mismatch",)),
    Case("dyn-bad-footer-checksum-both", _b_dyn_csum_both, None,
         warnings=("footer checksum mismatch (stored 0x12345678)",), writable_refused=True,
         check_finds=("footer checksum mismatch",)),
    Case("corpus-dyn-bad-footer-checksum", _b_corpus_csum_both, None,
         warnings=("footer checksum mismatch (stored 0x00000000)",), writable_refused=True,
         needs_corpus=True),
    Case("fixed-bad-footer-checksum", _b_fixed_csum, None,
         warnings=("footer checksum mismatch (stored 0xdeadbeef)",), writable_refused=True,
         check_finds=("footer checksum mismatch",)),
    Case("corpus-fixed-bad-footer-checksum", _b_corpus_fixed_csum, None,
         warnings=("footer checksum mismatch",), writable_refused=True, needs_corpus=True),
    Case("dyn-bad-header-checksum", _b_dyn_header_csum, None,
         warnings=("dynamic header checksum mismatch (stored 0x00000000)",),
         writable_refused=True, check_finds=("dynamic header checksum mismatch",)),
    # -- VHD: BAT -------------------------------------------------------------------------------
    Case("bat-entry-past-eof", _b_bat_past_eof, "FormatError",
         ("BAT entry 2 points past the end of the file",)),
    Case("bat-entry-partly-past-eof", _b_bat_partly_past_eof, "FormatError",
         ("BAT entry 2 points past the end of the file",)),
    Case("bat-two-entries-one-block", _b_bat_duplicate, None,
         warnings=("BAT entries 0 and 2 overlap",), writable_refused=True,
         check_finds=("BAT entries 0 and 2 overlap",)),
    Case("bat-entry-on-metadata", _b_bat_into_header, None,
         warnings=("BAT entry 1 (block at 0) overlaps the",), writable_refused=True,
         check_finds=("overlaps the",)),
    Case("bat-claims-2^32-entries", _b_bat_2_32, "FormatError",
         ("BAT (4294967295 entries at offset 1536) runs past the end of the file",)),
    Case("corpus-bat-claims-2^32-entries", _b_corpus_bat_2_32, "FormatError",
         ("BAT (4294967295 entries", "runs past the end of the file"), needs_corpus=True),
    Case("bat-too-few-entries", _b_bat_too_few, "FormatError",
         ("BAT has 1 entries of 2097152 bytes, too few for the virtual size 6291456",)),
    Case("bat-zero-entries", _b_bat_zero, "FormatError", ("max_table_entries 0",)),
    Case("block-size-2^31", _b_block_2_31, "FormatError", ("block size 2147483648",)),
    Case("block-size-3MiB", _b_block_not_pow2, "FormatError",
         ("block size 3145728 must be a power of two",)),
    Case("block-size-0", _b_block_zero, "FormatError", ("block size 0",)),
    Case("header-offset-2^62", _b_header_offset_far, "FormatError",
         ("dynamic header offset 4611686018427387904 lies outside the file",)),
    Case("header-offset-all-ones", _b_header_offset_max, "FormatError",
         ("dynamic header offset 18446744073709551615 lies outside the file",)),
    Case("bat-offset-past-eof", _b_bat_offset_past_eof, "FormatError",
         ("runs past the end of the file",)),
    Case("virtual-size-2^64", _b_vsize_huge, "FormatError",
         ("exceeds the VHD maximum of 2040 GiB",)),
    # DESIGN.md §5: "impossible sizes" are FormatErrors; at the very least the open must warn.
    Case("fixed-size-larger-than-file", _b_fixed_vsize_larger, "FormatError",
         ("fixed VHD claims 67108864 bytes but holds only 6291456 bytes of data (truncated?)",)),
    Case("disk-type-5", _b_disk_type_5, "UnsupportedError",
         ("VHD disk type 5 is not supported",)),
    Case("disk-type-0", _b_disk_type_0, "UnsupportedError",
         ("VHD disk type 0 is not supported",)),
    # -- VHD: chains ----------------------------------------------------------------------------
    Case("diff-parent-missing", _b_diff_parent_missing, "ChainError",
         ("parent parent.vhd not found (tried", "use --parent-dir DIR")),
    Case("corpus-diff-parent-missing", _b_corpus_parent_missing, "ChainError",
         ("parent xo-child1.vhd not found",), needs_corpus=True),
    Case("diff-uuid-mismatch", _b_diff_uuid_mismatch, "ChainError",
         ("not found with id", "has id 00000000-0000-0000-0000-000000001234",
          "--ignore-parent-id")),
    Case("corpus-diff-uuid-mismatch", _b_corpus_uuid_mismatch, "ChainError",
         ("parent xo-base.vhd not found with id", "--ignore-parent-id"), needs_corpus=True),
    Case("diff-parent-other-size", _b_diff_other_size, "ChainError",
         ("is 4194304 bytes but the child expects 6291456",)),
    Case("diff-chain-loops", _b_diff_loop, "ChainError", ("chain loops",)),
    Case("diff-parent-is-itself", _b_diff_self_loop, "ChainError", ("chain loops",)),
    Case("diff-locator-outside-file", _b_diff_locator_outside, None,
         warnings=("parent locator 0 (W2ru) data at", "lies outside the file"),
         writable_refused=True, check_finds=("lies outside the file",), check_note=True),
    Case("diff-locator-length-4GiB", _b_diff_locator_4g, None,
         warnings=("parent locator 0 (W2ru) data at 2048 (+4294967295) lies outside the file",),
         writable_refused=True),
    Case("diff-locator-space-4GiB", _b_diff_locator_space_4g, None,
         warnings=("parent locator 0 (W2ru) has an invalid data space 4294967295",),
         writable_refused=True),
    Case("diff-no-usable-locator", _b_diff_all_locators_bad, "ChainError",
         ("parent (unnamed parent) not found (tried no candidate paths; use --parent-dir DIR)",)),
    Case("diff-parent-is-a-vdi", _b_diff_parent_is_vdi, "ChainError",
         ("parent parent.vhd cannot be opened", "is a vdi image; a vhd child needs a vhd parent")),
    Case("diff-parent-broken", _b_diff_parent_broken, "ChainError",
         ("cannot be opened", "runs past the end of the file")),
    # -- VDI ------------------------------------------------------------------------------------
    Case("vdi-bad-signature", _b_vdi_signature, "NotAnImageError", ("not a VHD",),
         fmt="vdi"),
    Case("corpus-vdi-bad-signature", _b_vdi_corpus_signature, "NotAnImageError",
         ("not a VHD",), needs_corpus=True, fmt="vdi"),
    Case("vdi-truncated-in-header", _b_vdi_trunc_header, "FormatError",
         ("truncated: the VDI header needs 456 bytes, file has 256",), fmt="vdi"),
    Case("vdi-truncated-in-map", _b_vdi_trunc_map, "FormatError",
         ("VDI block map (3 entries at 0x200) runs past the end of the file (518)",), fmt="vdi"),
    Case("vdi-truncated-in-data", _b_vdi_trunc_data, "FormatError",
         ("block map entry 2 points to data at 1049600-2098176, past the end of the file (1573888)",),
         fmt="vdi"),
    Case("vdi-map-past-eof", _b_vdi_map_past_eof, "FormatError",
         ("VDI block map (3 entries at 0x7ffffe00) runs past the end of the file",), fmt="vdi"),
    Case("vdi-data-offset-past-eof", _b_vdi_data_past_eof, "FormatError",
         ("block map entry 2 points to data at 4296015360-", "past the end of the file",),
         fmt="vdi"),
    Case("vdi-absurd-block-count", _b_vdi_blocks_absurd, "FormatError",
         ("VDI block count 4294967295 is absurd",), fmt="vdi"),
    Case("vdi-too-few-blocks", _b_vdi_blocks_too_few, "FormatError",
         ("VDI disk size 3145728 needs more than the 1 blocks of 1048576 bytes",), fmt="vdi"),
    Case("vdi-block-size-2^31", _b_vdi_block_2_31, "FormatError",
         ("VDI block size 2147483648 must be a power of two between 512 and 128 MiB",), fmt="vdi"),
    Case("vdi-block-size-0", _b_vdi_block_zero, "FormatError",
         ("VDI block size 0 must be a power of two",), fmt="vdi"),
    Case("vdi-disk-size-2^62", _b_vdi_disk_huge, "FormatError",
         ("VDI disk size 4611686018427387904 needs more than the 3 blocks",), fmt="vdi"),
    Case("vdi-map-entry-past-eof", _b_vdi_entry_past_eof, "FormatError",
         ("block map entry 2 points to data at", "past the end of the file"), fmt="vdi"),
    Case("vdi-map-entry-beyond-allocated", _b_vdi_entry_beyond_allocated, "FormatError",
         ("block map entry 2 points to data at 7341056-", "past the end of the file",), fmt="vdi"),
    Case("vdi-two-entries-one-block", _b_vdi_duplicate_entries, None, writable_refused=True,
         check_finds=("1 data blocks are used by more than one map entry (first: block 0)",),
         fmt="vdi"),
    Case("vdi-unknown-version", _b_vdi_version, "UnsupportedError",
         ("VDI header version 2.0 is not supported (only 1.x)",), fmt="vdi"),
    Case("vdi-sector-size-4096", _b_vdi_sector_size, None,
         warnings=("VDI sector size field is 4096, not 512 (ignored)",), fmt="vdi"),
    Case("vdi-block-extra-2^31", _b_vdi_extra_huge, "FormatError",
         ("VDI block extra 2147483648 is absurd (more than 128 MiB)",), fmt="vdi"),
    Case("vdi-unknown-image-type", _b_vdi_image_type, "UnsupportedError",
         ("VDI image type 9 is not supported",), fmt="vdi"),
    Case("vdi-diff-parent-missing", _b_vdi_link_missing, "ChainError",
         ("not found", "use --parent-dir DIR"), fmt="vdi"),
]


# -- fuzz mutators ---------------------------------------------------------------------------

BOUNDARY_U32 = (0, 1, 2, 511, 512, 513, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
BOUNDARY_U64 = (0, 1, 512, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF,
                1 << 32, (1 << 41) - 512)


@dataclass
class Region:
    """A mutable part of a base image: absolute offset, length, named fields, checksum to fix."""

    name: str
    offset: int
    length: int
    fields: dict[str, tuple[int, str]] = field(default_factory=dict)  # relative offsets
    checksum: tuple[int, int, int] | None = None  # (region-relative start, length, csum offset)


@dataclass
class Target:
    """A base image (bytes) and the regions of it worth mutating."""

    name: str
    data: bytes
    fmt: str
    regions: list[Region]
    expected_sha256: str          # of the raw disk, when nothing meaningful was changed
    parent: tuple[str, bytes] | None = None   # (file name, bytes) written next to it


def _vhd_regions(data: bytes, with_header: bool) -> list[Region]:
    size = len(data)
    regions = [Region("tail-footer", size - 512, 512, FOOTER_FIELDS, (0, 512, FOOTER_CSUM))]
    if not with_header:
        return regions
    regions.append(Region("head-footer", 0, 512, FOOTER_FIELDS, (0, 512, FOOTER_CSUM)))
    hoff = get_field(data[-512:], FOOTER_FIELDS, "data_offset")
    regions.append(Region("dyn-header", hoff, 1024, HEADER_FIELDS, (0, 1024, HEADER_CSUM)))
    h = data[hoff:hoff + 1024]
    table = get_field(h, HEADER_FIELDS, "table_offset")
    n = get_field(h, HEADER_FIELDS, "max_table_entries")
    bat_fields = {f"bat{i}": (4 * i, ">I") for i in range(n)}
    regions.append(Region("bat", table, 4 * n, bat_fields))
    bat = struct.unpack_from(f">{n}I", data, table)
    bsize = get_field(h, HEADER_FIELDS, "block_size")
    bm_len = bitmap_bytes(bsize)
    for i, e in enumerate(bat):
        if e != UNUSED:
            regions.append(Region(f"bitmap{i}", e * 512, bm_len))
            if len([r for r in regions if r.name.startswith("bitmap")]) >= 3:
                break
    for i in range(8):
        code = get_field(h, HEADER_FIELDS, f"loc{i}_code")
        if code:
            off = get_field(h, HEADER_FIELDS, f"loc{i}_offset")
            ln = get_field(h, HEADER_FIELDS, f"loc{i}_length")
            regions.append(Region(f"locator{i}-data", off, min(ln, 512)))
    return regions


def _vdi_regions(data: bytes) -> list[Region]:
    nblocks = get_field(data, VDI_FIELDS, "blocks")
    moff = get_field(data, VDI_FIELDS, "offset_blocks")
    return [Region("vdi-header", 0, 0x200, VDI_FIELDS),
            Region("vdi-map", moff, 4 * nblocks,
                   {f"map{i}": (4 * i, "<I") for i in range(nblocks)})]


def fuzz_targets(corpus: Path | None, workdir: Path) -> list[Target]:
    """Base images: synthetic dynamic/differencing/fixed VHD and VDI, plus corpus ones."""
    out: list[Target] = []
    d = workdir / "fuzz-bases"
    d.mkdir(parents=True, exist_ok=True)
    i = _dyn(d)
    out.append(Target("synthetic-dynamic", i.path.read_bytes(), "vhd",
                      _vhd_regions(i.path.read_bytes(), True), sha256(DYN_RAW)))
    parent, child, flat = _chain(d)
    cdata = child.path.read_bytes()
    out.append(Target("synthetic-differencing", cdata, "vhd", _vhd_regions(cdata, True),
                      sha256(flat), ("parent.vhd", parent.path.read_bytes())))
    p = _fixed(d)
    out.append(Target("synthetic-fixed", p.read_bytes(), "vhd",
                      _vhd_regions(p.read_bytes(), False), sha256(FIXED_RAW)))
    v = _vdi(d)
    out.append(Target("synthetic-vdi", v.path.read_bytes(), "vdi", _vdi_regions(v.path.read_bytes()),
                      sha256(VDI_RAW)))
    if corpus is not None:
        for name, fmt in (("dfvfs-qemu-ext2-dynamic.vhd", "vhd"), ("dissect-qemu-pattern.vdi", "vdi"),
                          ("mkimg-63x255-512-mbr-dynamic.vhd", "vhd")):
            if (corpus / name).is_file():
                data = (corpus / name).read_bytes()
                regs = _vhd_regions(data, True) if fmt == "vhd" else _vdi_regions(data)
                out.append(Target(f"corpus:{name}", data, fmt, regs, _expected(name)))
    return out


@dataclass
class Mutation:
    """What to do to a target: ``kind`` "flip" | "field" | "bytes" | "truncate"."""

    region: int
    kind: str
    where: int = 0        # byte offset inside the region / field index
    value: int = 0        # xor mask, field value, or truncation delta
    fix_checksum: bool = True
    blob: bytes = b""

    def describe(self, target: Target) -> str:
        r = target.regions[self.region % len(target.regions)]
        if self.kind == "field" and r.fields:
            name = list(r.fields)[self.where % len(r.fields)]
            return f"{target.name}/{r.name}.{name}={self.value:#x} fix={self.fix_checksum}"
        return (f"{target.name}/{r.name} {self.kind} at {self.where} value={self.value:#x} "
                f"blob={self.blob.hex()} fix={self.fix_checksum}")


def apply_mutation(target: Target, m: Mutation, data: bytes | None = None) -> tuple[bytes, bool]:
    """(mutated bytes, whether the virtual disk must still read exactly as the base).

    ``data`` (default: the target's bytes) lets several mutations stack; offsets come from the
    base image's regions, and a mutation past the (possibly truncated) end is a no-op.
    """
    base = target.data if data is None else data
    buf = bytearray(base)
    r = target.regions[m.region % len(target.regions)]
    if r.length == 0 or r.offset >= len(buf):
        return bytes(buf), bytes(buf) == target.data
    benign = False
    if m.kind == "flip":
        pos = r.offset + m.where % r.length
        if pos < len(buf):
            buf[pos] ^= (m.value % 255) + 1
    elif m.kind == "field" and r.fields:
        name = list(r.fields)[m.where % len(r.fields)]
        off, code = r.fields[name]
        width = struct.calcsize(code)
        if r.offset + off + width > len(buf):
            return bytes(buf), bytes(buf) == target.data
        if code.endswith("s"):
            n = min(width, 8)
            value = (m.value % (1 << (8 * n))).to_bytes(n, "big").ljust(width, b"\0")
        else:
            value = m.value % (1 << (8 * width))
        struct.pack_into(code, buf, r.offset + off, value)
        benign = name == "checksum"
    elif m.kind in ("bytes", "field"):
        pos = r.offset + m.where % r.length
        blob = m.blob or bytes([m.value & 0xFF])
        buf[pos:pos + len(blob)] = blob
        del buf[len(base):]
    elif m.kind == "truncate":
        cut = r.offset + m.where % max(1, r.length)
        del buf[cut:]
    if m.fix_checksum and r.checksum is not None and m.kind != "truncate" and not benign:
        start, length, csum = r.checksum
        block = bytearray(buf[r.offset + start:r.offset + start + length])
        if len(block) == length:
            fix_vhd_checksum(block, csum)
            buf[r.offset + start:r.offset + start + length] = block
    same = bytes(buf) == target.data
    # A rewritten checksum field leaves every other byte as it was: the disk must read the same.
    return bytes(buf), same or (benign and len(buf) == len(target.data)
                               and (data is None or data == target.data))


# -- running one hostile image ----------------------------------------------------------------

FULL_READ_LIMIT = 64 * MiB


def sparse_read(img, budget: int = 256 * MiB) -> None:
    """Read a (mutated) disk too large to read whole: every extent's first and last MiB.

    A hostile header can legitimately describe a 2 TB sparse disk in a 6 MB file; reading all
    of its zeros would only measure Python's speed. Every byte that lives in a file is still
    visited as long as the total stays within ``budget``.
    """
    from vhdfs.block.image import Kind

    spent = 0
    for ext in img.extents(0, img.size):
        if ext.kind == Kind.DATA and spent + ext.length <= budget:
            spots = range(ext.offset, ext.end, MiB)
        else:
            spots = sorted({ext.offset, max(ext.offset, ext.end - MiB)})
        for pos in spots:
            n = min(MiB, ext.end - pos)
            got = img.read(pos, n)
            if len(got) != n:
                raise AssertionError(f"short read at {pos}: {len(got)} of {n}")
            spent += n


class Hang(BaseException):
    """Raised in the main thread when one case runs past its time bound."""


@dataclass
class Outcome:
    status: str                  # "ok" | "error" | "FAIL"
    detail: str = ""


def run_hostile(path: Path, expected_sha256: str | None, must_match: bool, *,
                time_limit: float = 10.0, mem_limit: int = 256 * MiB, cli: bool = True) -> Outcome:
    """open_image, describe, check, a full chunked read, and (in-process) ``info``/``check``.

    Allowed: correct data, or a one-line ``VhdfsError``. FAIL: any other exception, a case
    slower than ``time_limit`` seconds, more than ``mem_limit`` bytes allocated (tracemalloc
    peak, with RLIMIT_AS as a safety net), a changed file, or wrong data where the mutation
    could not have changed it.
    """
    import contextlib
    import io
    import resource
    import signal
    import threading
    import tracemalloc
    import traceback

    from vhdfs import errors
    from vhdfs.block import open_image

    folder_before = {p: sha256_file(p) for p in path.parent.iterdir() if p.is_file()}
    main = threading.get_ident()

    def on_alarm(_sig, _frame):
        raise Hang()

    old_handler = signal.signal(signal.SIGUSR1, on_alarm)
    timer = threading.Timer(time_limit, lambda: signal.pthread_kill(main, signal.SIGUSR1))
    timer.daemon = True
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    outcome = Outcome("ok")
    tracemalloc.start()
    timer.start()
    try:
        with open("/proc/self/statm") as f:
            vm_now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft = vm_now + 4 * mem_limit
        if old_as[1] == resource.RLIM_INFINITY or soft < old_as[1]:
            resource.setrlimit(resource.RLIMIT_AS, (soft, old_as[1]))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                with open_image(path) as img:
                    img.describe()
                    img.check()
                    img.allocated_bytes()
                    if img.size <= FULL_READ_LIMIT:
                        h = hashlib.sha256()
                        pos = 0
                        while pos < img.size:
                            chunk = img.read(pos, MiB)
                            if not chunk:
                                return Outcome("FAIL", f"short read at {pos} of {img.size}")
                            h.update(chunk)
                            pos += len(chunk)
                        if must_match and expected_sha256 and h.hexdigest() != expected_sha256:
                            outcome = Outcome("FAIL", "wrong data although the mutation kept the disk")
                    else:
                        sparse_read(img)
            except errors.VhdfsError as exc:
                msg = str(exc)
                if "\n" in msg or "MemoryError" in msg or "RecursionError" in msg:
                    outcome = Outcome("FAIL", f"bad error message: {msg!r}")
                else:
                    outcome = Outcome("error", f"{type(exc).__name__}: {msg}")
            if cli and outcome.status != "FAIL":
                from vhdfs.cli import main as cli_main
                for cmd in ("info", "check"):
                    out, cerr = io.StringIO(), io.StringIO()
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(cerr):
                        rc = cli_main([cmd, str(path)])
                    lines = [ln for ln in cerr.getvalue().splitlines()
                             if not ln.startswith("vhdfs: warning: ")]
                    if rc not in (0, 1) and (len(lines) != 1 or not lines[0].startswith("vhdfs: ")):
                        outcome = Outcome("FAIL", f"vhdfs {cmd} exit {rc}, stderr {cerr.getvalue()!r}")
                    if outcome.status == "error" and rc == 0:
                        outcome = Outcome("FAIL", f"vhdfs {cmd} exit 0 for an image open_image refuses")
        _cur, peak = tracemalloc.get_traced_memory()
        if peak > mem_limit:
            outcome = Outcome("FAIL", f"allocated {peak} bytes (limit {mem_limit})")
    except Hang:
        outcome = Outcome("FAIL", f"no answer within {time_limit} s (hang)")
    except BaseException as exc:  # noqa: BLE001 - anything else is the bug we look for
        if isinstance(exc, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = Outcome("FAIL", f"{type(exc).__name__}: {exc} at {tb.filename}:{tb.lineno} "
                                  f"({tb.name})")
    finally:
        timer.cancel()
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, old_as)
        signal.signal(signal.SIGUSR1, old_handler)
    after = {p: sha256_file(p) for p in path.parent.iterdir() if p.is_file()}
    if after != folder_before:
        outcome = Outcome("FAIL", "a file changed")
    return outcome


def write_case(target: Target, data: bytes, folder: Path) -> Path:
    """The mutated image (and an untouched parent next to it) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        p.unlink()
    name = "image.vdi" if target.fmt == "vdi" else (
        "child.vhd" if target.parent else "image.vhd")
    path = folder / name
    path.write_bytes(data)
    if target.parent:
        (folder / target.parent[0]).write_bytes(target.parent[1])
    return path
