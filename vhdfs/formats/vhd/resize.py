"""``vhdfs resize`` for VHD: fixed (footer moved) and dynamic (BAT grown in place or moved).

Size rules (FORMATS.md §1.5, §5): the size is rounded up to whole sectors; a fixed image made by
Azure (creator ``wa``) stays a whole number of MiB; an image read by CHS (creator ``vpc ``/``qemu``
with non-maximum geometry) is rounded up until C·H·S·512 covers it and that becomes its size, as
QEMU's create does; so is one whose writer made C·H·S·512 equal current_size (mkimg, Xen
Orchestra), so CHS readers keep agreeing; maximum geometry (the "use current_size" marker) is
kept; any other image gets the exact size as current_size and the spec geometry. The rule
applied is reported.

Crash order (every prefix reads as the old or the new size, same content):

- fixed, growing: a copy of the *old* footer at the new end (EOF always holds a footer), the old
  footer sector zeroed (it becomes data), then the new footer over the copy. Shrinking: the new
  footer at the new end, then the truncate. (The one window: between those two, the old-size
  image shows the new footer in the sector being cut away, which had to read as zeros.)
- dynamic: entries past the disk's end cleared; the last block's bytes past the old end zeroed;
  a longer BAT written (extended in place when only free space follows it, else a full copy past
  everything, never over a block, locator or batmap), the footer moved first when the table
  reaches it; synced before the header points at it; then the footers (tail, then head copy).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from ...block.image import Image
from ...errors import UnsupportedError, UsageError
from . import spec as fmt
from .fixed import FixedVhd
from .sparse import SparseVhd

MiB = 1024 * 1024
S = fmt.SECTOR


def plan_size(
    footer: fmt.Footer, requested: int, fixed: bool, rule: str
) -> tuple[int, tuple[int, int, int], list[str]]:
    """(size, geometry, what was applied) for ``requested`` bytes."""
    said: list[str] = []
    size = -(-requested // S) * S
    if size != requested:
        said.append(f"rounded up to {size} bytes (whole 512-byte sectors)")
    if fixed and footer.creator_app == b"wa\0\0":
        mib = -(-size // MiB) * MiB
        said.append(
            "size rule: Azure (creator 'wa'), a fixed image is a whole number of MiB"
            + (f": rounded up to {mib}" if mib != size else "")
        )
        size = mib
    geometry = (footer.cylinders, footer.heads, footer.sectors)
    exact = rule != "chs" and footer.chs_size == footer.current_size and geometry != fmt.MAX_CHS
    if geometry == fmt.MAX_CHS and rule != "chs":
        said.append(
            f"size rule: current_size {size} exact, maximum geometry kept (it tells "
            "every reader to use current_size)"
        )
        return size, fmt.MAX_CHS, said
    if rule == "chs" or exact:
        if exact:
            said.append(
                "the writer made C·H·S·512 equal the size, so CHS readers (Virtual PC, "
                "QEMU before 10) agree; kept so"
            )
        total = size // S
        geom = fmt.chs_geometry(total * S)
        if total > fmt.MAX_CHS[0] * fmt.MAX_CHS[1] * fmt.MAX_CHS[2]:
            geom = fmt.MAX_CHS
            said.append(
                "size rule: beyond what CHS can describe, so maximum geometry and the "
                "exact size (every reader then uses current_size)"
            )
        else:
            i = 0
            while geom[0] * geom[1] * geom[2] < total:
                i += 1
                geom = fmt.chs_geometry((total + i) * S)
            chs = geom[0] * geom[1] * geom[2] * S
            said.append(
                f"size rule: CHS (creator '{fmt.fourcc(footer.creator_app)}'"
                f"{', CHS-exact' if exact else ''}): geometry "
                f"{geom[0]}/{geom[1]}/{geom[2]}, size C·H·S·512 = {chs}"
                + (f" (rounded up from {size})" if chs != size else "")
            )
            size = chs
    else:
        geom = fmt.chs_geometry(size)
        said.append(f"size rule: current_size {size} exact, geometry {geom[0]}/{geom[1]}/{geom[2]}")
    return size, geom, said


def _new_footer(footer: fmt.Footer, size: int, geom: tuple[int, int, int]) -> fmt.Footer:
    return dataclasses.replace(
        footer, current_size=size, cylinders=geom[0], heads=geom[1], sectors=geom[2], checksum_ok=True
    )


def resize(img: Image, requested: int, ensure_zero: Callable[[int], None]) -> list[str]:
    if isinstance(img, FixedVhd):
        return _resize_fixed(img, requested, ensure_zero)
    assert isinstance(img, SparseVhd)  # a differencing one: refused by tools/maintain.py
    return _resize_sparse(img, requested, ensure_zero)


def _resize_fixed(img: FixedVhd, requested: int, ensure_zero: Callable[[int], None]) -> list[str]:
    if img.data_size < img.size:
        raise UnsupportedError(
            "this fixed VHD's CHS size exceeds its data area; convert it to a new image instead", img.path
        )
    size, geom, said = plan_size(img.footer, requested, True, img.size_rule)
    old, f = img.size, img.file
    if size > fmt.MAX_VIRTUAL_SIZE:
        raise UsageError(f"{size} bytes is more than a VHD holds (2040 GiB)", img.path)
    if size == old:
        return [*said, "size unchanged"]
    new = _new_footer(img.footer, size, geom).pack()
    if size > old:
        f.pwrite(img.footer.pack(), size)  # 1) EOF keeps a footer: the old one, moved
        f.sync()
        f.write_parts([fmt.FOOTER_SIZE], img.footer_offset)  # 2) old footer → zero data
        f.sync()
        f.pwrite(new, size)  # 3) the new size
        f.sync()
        f.truncate(size + fmt.FOOTER_SIZE)  # (a 511-byte footer or padding: now exact)
    else:
        ensure_zero(size)
        f.pwrite(new, size)
        f.sync()
        f.truncate(size + fmt.FOOTER_SIZE)
    f.sync()
    return [*said, f"data area {old} → {size} bytes, footer at {size}"]


def _write_entries(img: SparseVhd, first: int, values: list[int]) -> None:
    if values:
        img.file.pwrite(struct.pack(f">{len(values)}I", *values), img.header.table_offset + 4 * first)


def _resize_sparse(img: SparseVhd, requested: int, ensure_zero: Callable[[int], None]) -> list[str]:
    size, geom, said = plan_size(img.footer, requested, False, img.size_rule)
    if size > fmt.MAX_VIRTUAL_SIZE:
        raise UsageError(f"{size} bytes is more than a VHD holds (2040 GiB)", img.path)
    old, f, B = img.size, img.file, img.block_size
    if size == old:
        return [*said, "size unchanged"]
    img.commit()
    need = -(-size // B)
    if size < old:
        ensure_zero(size)
    # entries past the (smaller) disk end: they read as zeros now and must stay so
    keep = min(need, -(-old // B))
    cut = [i for i in range(keep, len(img.bat)) if img.bat[i] != fmt.UNUSED_BAT]
    if cut:
        _write_entries(img, keep, [fmt.UNUSED_BAT] * (len(img.bat) - keep))
        f.sync()
        for i in cut:
            img.bat[i] = fmt.UNUSED_BAT
        said.append(f"released {len(cut)} block(s) past the new end")
    if size > old:
        last = (old - 1) // B
        rel = old - last * B
        if rel < B and img.bat[last] != fmt.UNUSED_BAT:  # the old end inside a block: zero the rest
            f.write_parts([B - rel], img.bat[last] * S + img.bitmap_bytes + rel)
            f.sync()
        if need > img.header.max_table_entries:
            said.append(_grow_bat(img, need))
    new = _new_footer(img.footer, size, geom).pack()
    f.pwrite(new, img.footer_offset)
    f.sync()
    f.pwrite(new, 0)
    f.sync()
    if need < img.header.max_table_entries:  # exact BAT length (Azure wants it)
        img.header.max_table_entries = need
        f.pwrite(img.header.pack(), img.footer.data_offset)
        f.sync()
        said.append(f"BAT now {need} entries")
    return said


def _grow_bat(img: SparseVhd, entries: int) -> str:
    h, f = img.header, img.file
    old_off, old_n = h.table_offset, h.max_table_entries
    new_len = fmt.bat_bytes(entries)
    stride = img.bitmap_bytes + img.block_size
    obstacles = [(s, e, name) for s, e, name in img.layout.regions if name != "BAT"]
    obstacles += [(b * S, b * S + stride, "block") for b in img.bat if b != fmt.UNUSED_BAT]
    lo, hi = old_off + 4 * old_n, old_off + new_len
    in_place = not any(s < hi and e > lo for s, e, _n in obstacles)
    target = old_off if in_place else -(-max(img.floor, img.footer_offset + fmt.FOOTER_SIZE) // S) * S
    end = target + new_len
    table = bytearray(b"\xff" * new_len)
    table[: 4 * old_n] = struct.pack(f">{old_n}I", *img.bat)
    old_footer = img.footer_offset
    if end > old_footer:  # the table reaches the footer: move the footer first
        f.pwrite(img.footer.pack(), end)
        f.sync()
        img.footer_offset = end
    if in_place:
        f.pwrite(table[4 * old_n :], lo)
    else:
        f.pwrite(table, target)
    f.sync()
    h.table_offset, h.max_table_entries = target, entries
    f.pwrite(h.pack(), img.footer.data_offset)
    f.sync()
    if old_footer != img.footer_offset and not (target <= old_footer < end):
        f.write_parts([fmt.FOOTER_SIZE], old_footer)  # the stale footer copy in the middle
    where = f"extended in place at {old_off}" if in_place else f"moved from {old_off} to {target}"
    return f"BAT {old_n} → {entries} entries, {where}"
