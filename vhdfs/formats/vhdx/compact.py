"""``vhdfs compact`` for dynamic and differencing VHDX (what Optimize-VHD does).

1. Release every payload block that changes nothing a reader sees (``block.maintain.releasable``:
   all zeros in a dynamic file; in a differencing file the same bytes as the chain below, so an
   all-zero block over parent data stays): its entry becomes NOT_PRESENT (zeros in a dynamic
   file, the parent in a differencing one -- the one state every reader agrees on; libvhdi sends
   ZERO to the parent too). One commit through the log; in a differencing file a second one
   clears the released blocks' sector-bitmap bits (libvhdi 20260901 reads a NOT_PRESENT block
   by its bits, from offset 0). Sector-bitmap blocks stay, even unused ones: libvhdi reads the
   NOT_PRESENT blocks of a chunk without a bitmap as zeros after their first sector.
2. Pack what is left downwards in file order, 1 MiB aligned, into space that is neither the
   header area, a region nor the log, never over the block's own source: each copy is synced
   *before* its BAT entry moves through the log (``Image.commit``: sync, entry, pages), so a
   kill leaves either copy in use, both intact.
3. The BAT region moved down the same way when free space below it holds it (a grow may have
   put it at the end of the file): copied, synced, then both region tables in one log entry.
4. A clean log close, then the file cut after the last thing in use.

A second run after a kill finishes the job: it only ever looks at what the file says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...block.image import Image
from ...block.maintain import releasable
from ...errors import UnsupportedError
from . import space
from . import spec as S
from .bat import PAGE
from .image import VhdxImage


def compact(img: Image, progress: Callable[[int, int], None]) -> list[str]:
    assert isinstance(img, VhdxImage)
    if img.type == "fixed":
        raise UnsupportedError(
            "a fixed VHDX has no blocks to release (convert it to a dynamic one with vhdfs convert)", img.path
        )
    img.commit()
    blocks = [a for a in space.allocations(img) if not _is_bitmap(img, a[2])]
    total, done = 2 * len(blocks), 0
    released: list[int] = []
    ratio, B = img.geometry.chunk_ratio, img.block_size
    for _off, _n, i in blocks:
        b = i - i // (ratio + 1)
        if releasable(img, b * B, min(B, img.size - b * B)):
            img.bat[i] = 0
            released.append(i)
        done += 1
        progress(done, total)
    img.commit()
    if img.differencing:  # second: the bits go only once no entry needs them
        for i in released:
            _clear_bits(img, i - i // (ratio + 1))
        img.commit()
    said = [f"released {len(released)} block(s) that read the same without them"]
    moved = _pack(img, lambda n: progress(min(total, done + n), total))
    said.append(f"moved {moved} block(s) down")
    bat = _move_bat_down(img)
    if bat:
        said.append(bat)
    before = space.file_of(img).size()
    end = space.used_end(img, [(o, n) for o, n, _i in space.allocations(img)])
    if space.close_and_cut(img, end):
        said.append(f"file {before} → {end} bytes")
    progress(total, total)
    return said


def _move_bat_down(img: VhdxImage) -> str:
    """The BAT region into the lowest free space below it (a grow put it at the end of the
    file): copied and synced, then both region tables switch in one log entry."""
    L, f = img.layout, space.file_of(img)
    old, length = L.bat_offset, L.bat_length
    taken = [(s, e) for s, e, n in img._reserved_spans() if n != "BAT region"]
    taken += [(o, o + n) for o, n, _i in space.allocations(img)]
    at = S.HEADER_AREA_SIZE
    while at + length <= old and space.overlaps(at, at + length, taken):
        at = -(-max(e for s, e in taken if s < at + length and e > at) // S.MiB) * S.MiB
    if at + length > old:
        return ""
    space.copy(img, old, at, length)
    pages: dict[int, bytes] = {}

    def read(off: int) -> bytes:
        return f.pread(PAGE, off)

    space.region_tables(img, at, length, pages, read)
    space.commit_pages(img, pages, read)  # synced first: the copy is durable
    L.regions = [dataclasses.replace(r, file_offset=at) if r.guid == S.BAT_REGION else r for r in L.regions]
    L.bat_offset = img.bat.offset = at
    return f"BAT region moved down from {old} to {at}"


def _clear_bits(img: VhdxImage, block: int) -> None:
    """Clear a released block's sector-bitmap bits (libvhdi reads set bits of a NOT_PRESENT
    block from offset 0, the file header). A block's bits are whole bytes (>= 256 sectors)."""
    if img.bat[img.geometry.bitmap_index(block // img.geometry.chunk_ratio)] & 7 != S.SB_PRESENT:
        return
    start = img.bitmap_location(block)
    end = start + img.sectors_per_block // 8
    while start < end:
        page_off = start - start % PAGE
        page = bytearray(img.bitmaps.get(page_off))
        stop = min(end, page_off + PAGE)
        if any(page[start - page_off : stop - page_off]):
            page[start - page_off : stop - page_off] = bytes(stop - start)
            img.bitmaps.put(page_off, page)
        start = stop


def _is_bitmap(img: VhdxImage, index: int) -> bool:
    return (index + 1) % (img.geometry.chunk_ratio + 1) == 0


def _pack(img: VhdxImage, tick: Callable[[int], None]) -> int:
    reserved = [(s, e) for s, e, _n in img._reserved_spans()]
    pos, moved = S.HEADER_AREA_SIZE, 0
    for off, length, i in space.allocations(img):
        stride = -(-length // S.MiB) * S.MiB
        while True:
            hit = [e for s, e in reserved if s < pos + stride and e > pos]
            if not hit:
                break
            pos = -(-max(hit) // S.MiB) * S.MiB
        if off - pos < stride:  # already low, or the copy would overlap its own source
            pos = max(pos, off + stride)
            continue
        space.copy(img, off, pos, length)
        if _is_bitmap(img, i):  # cached bitmap pages are keyed by file offset
            for page in range(off, off + length, S.LOG_SECTOR):
                img.bitmaps.drop(page)
        img.bat[i] = S.pack_bat_entry(img.bat[i] & S.BAT_STATE_MASK, pos)
        img.commit()  # the copy is synced before the entry that names it is logged
        moved += 1
        tick(moved)
        pos += stride
    return moved
