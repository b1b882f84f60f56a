"""``vhdfs compact`` for dynamic and differencing VHDs (what Optimize-VHD does).

1. Release every block that changes nothing a reader sees (``block.maintain.releasable``: all
   zeros on a dynamic disk; on a differencing disk, the same bytes as the chain below, so an
   all-zero block over a non-zero parent stays). Its blktap batmap bit is cleared first, then
   the BAT entries, then one sync.
2. Pack the remaining blocks downwards in file order, each copied to free space and synced
   *before* its BAT entry moves (then synced): a kill leaves either copy in use, both intact.
   A block is never moved over itself, nor over a header, BAT, locator or batmap.
3. The footer written at the new end (free space), synced, then the file truncated after it.

A second run after a kill finishes the job: it only ever looks at what the file says.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ...block.image import Image
from ...block.maintain import releasable
from ...errors import UnsupportedError
from . import spec as fmt
from .sparse import SparseVhd

S = fmt.SECTOR


def compact(img: Image, progress: Callable[[int, int], None]) -> list[str]:
    if not isinstance(img, SparseVhd):
        raise UnsupportedError(
            "a fixed VHD has no blocks to release (convert it to a dynamic one with vhdfs convert)", img.path
        )
    img.commit()
    f, B = img.file, img.block_size
    live = [i for i, e in enumerate(img.bat) if e != fmt.UNUSED_BAT]
    total = len(live) * 2
    done = 0
    freed: list[int] = []
    for i in live:
        if i * B < img.size and releasable(img, i * B, min(B, img.size - i * B)):
            freed.append(i)
        done += 1
        progress(done, total)
    for i in freed:
        if img.batmap is not None:
            img.batmap.clear_bit(f, i)
    for i in freed:
        f.pwrite(struct.pack(">I", fmt.UNUSED_BAT), img.header.table_offset + 4 * i)
    if freed:
        f.sync()
    for i in freed:
        img.bat[i] = fmt.UNUSED_BAT
        img._forget(i)
    moved = _pack(img, lambda n: progress(min(total, done + n), total))
    end = _new_end(img)
    old_size = f.size()
    said = [f"released {len(freed)} block(s) that read the same without them", f"moved {moved} block(s) down"]
    if end + fmt.FOOTER_SIZE < old_size:
        f.pwrite(img.footer.pack(), end)
        f.sync()
        f.truncate(end + fmt.FOOTER_SIZE)
        f.sync()
        said.append(f"file {old_size} → {end + fmt.FOOTER_SIZE} bytes")
    progress(total, total)
    return said


def _aligned(img: SparseVhd, pos: int) -> int:
    pos = -(-pos // S) * S
    if img.block_size >= 4096:
        pos = (pos + img.bitmap_bytes + 4095) // 4096 * 4096 - img.bitmap_bytes
    return pos


def _metadata(img: SparseVhd) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _n in img.layout.regions]


def _pack(img: SparseVhd, tick: Callable[[int], None]) -> int:
    f, stride = img.file, img.bitmap_bytes + img.block_size
    regions = _metadata(img)
    size = f.size()
    blocks = sorted((e * S, i) for i, e in enumerate(img.bat) if e != fmt.UNUSED_BAT)
    pos = _aligned(img, 0)  # gaps between metadata are used too: nothing lives there
    moved = 0
    for off, i in blocks:
        while True:
            hit = [e for s, e in regions if s < pos + stride and e > pos]
            if not hit:
                break
            pos = _aligned(img, max(hit))
        if off - pos < stride:  # already low, or the copy would overlap its own source
            pos = _aligned(img, max(pos, off + stride))
            continue
        data = f.pread(min(stride, size - off), off)
        f.pwrite(data, pos)
        f.sync()  # the copy is durable before the entry moves
        f.pwrite(struct.pack(">I", pos // S), img.header.table_offset + 4 * i)
        f.sync()
        img.bat[i] = pos // S
        img._forget(i)
        moved += 1
        tick(moved)
        pos = _aligned(img, pos + stride)
    return moved


def _new_end(img: SparseVhd) -> int:
    stride = img.bitmap_bytes + img.block_size
    ends = [e for _s, e in _metadata(img)]
    ends += [e * S + stride for e in img.bat if e != fmt.UNUSED_BAT]
    return -(-max(ends) // S) * S
