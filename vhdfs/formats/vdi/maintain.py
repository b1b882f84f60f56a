"""``vhdfs resize``, ``compact`` and ``check --repair`` for VDI.

Resize: the block map grows in place into the room VirtualBox and QEMU leave before the data
area (QEMU: up to the next 4 KiB, VirtualBox: up to 1 MiB). When it does not fit, the first data
blocks would have to move and every index be renumbered together with ``offset_data``; no order
of writes makes that crash-safe, so it is refused by name (``vhdfs convert`` makes a new image).
Order: the last block's bytes past the old end zeroed; new entries (free, or the identity with
the file extended for a static image) synced; then the header fields in one sector. A shrink
frees the entries cut away first, then packs (as compact) so ``blocks_allocated`` stays exact.

Compact (``VBoxManage --compact``): blocks that read the same without them are released
(entries freed, synced); then the highest data blocks are copied into the lowest free indices,
each copy synced before its entry moves; ``blocks_allocated`` drops and the file is truncated
only at the end, so at every step every referenced index is below it and none is reused.

Repair: entries past the end of the file cleared (named, reading as zeros), ``blocks_allocated``
set to the blocks the map uses.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from functools import partial

from ...block.image import Image
from ...block.maintain import RepairSession, releasable
from ...block.rawfile import RawFile
from ...errors import FormatError, UnsupportedError
from . import spec as fmt
from .image import VdiImage

_U32 = struct.Struct("<I")
SECTOR_SIZE_OFFSET = 0x168
DISK_SIZE_OFFSET = 0x170  # disk size (8), block size, extra, blocks, blocks allocated


def _fields(f: RawFile, h: fmt.VdiHeader) -> None:
    """disk_size, blocks_in_image and blocks_allocated: one small write inside sector 0."""
    f.pwrite(
        struct.pack(
            "<QIIII", h.disk_size, h.block_size, h.block_extra, h.blocks_in_image, h.blocks_allocated
        ),
        DISK_SIZE_OFFSET,
    )


def resize(img: Image, requested: int, ensure_zero: Callable[[int], None]) -> list[str]:
    assert isinstance(img, VdiImage)
    h, f, bs = img.header, img.file, img.block_size  # a differencing one: tools/maintain.py refuses
    size = -(-requested // fmt.SECTOR) * fmt.SECTOR
    said = [f"rounded up to {size} bytes (whole sectors)"] if size != requested else []
    old = img.size
    if size == old:
        return [*said, "size unchanged"]
    img.commit()
    need, have = -(-size // bs), h.blocks_in_image
    static = img.type == "fixed"
    if size < old:
        ensure_zero(size)
        h.disk_size = size
        if need < have:
            cut = [b for b in range(need, have) if img.bmap[b] < fmt.BLOCK_ZERO]
            if not static:
                f.pwrite(fmt.pack_entries([fmt.BLOCK_FREE] * (have - need)), h.offset_bmap + 4 * need)
                f.sync()
            h.blocks_in_image = need
            if static:
                h.blocks_allocated = need
            _fields(f, h)
            f.sync()
            if static:
                f.truncate(h.offset_data + need * h.block_stride)
                f.sync()
            elif cut:
                del img.bmap[need:]
                said += [f"freed {len(cut)} block(s) past the new end", *_pack(img, lambda d, t: None)]
        else:
            _fields(f, h)
            f.sync()
        return [*said, f"disk size {old} → {size}"]
    room = (h.offset_data - h.offset_bmap) // 4
    if need > room:
        raise UnsupportedError(
            f"the block map has room for {room} entries before the data area at "
            f"{h.offset_data:#x}; {size} bytes need {need} blocks of {bs}. Making room means "
            "moving data blocks and renumbering the whole map, which cannot be done crash-safely "
            "in place: use vhdfs convert to a new image",
            img.path,
        )
    last, rel = (old - 1) // bs, old - ((old - 1) // bs) * bs
    if rel < bs and img.bmap[last] < fmt.BLOCK_ZERO:
        f.write_parts([bs - rel], img._data_offset(img.bmap[last]) + rel)
        f.sync()
    if need > have:
        if static:
            f.truncate(h.offset_data + need * h.block_stride)
            values = list(range(have, need))
        else:
            values = [fmt.BLOCK_FREE] * (need - have)
        f.pwrite(fmt.pack_entries(values), h.offset_bmap + 4 * have)
        f.sync()
        h.blocks_in_image = need
        if static:
            h.blocks_allocated = need
    h.disk_size = size
    _fields(f, h)
    f.sync()
    grown = f", block map {have} → {need} entries" if need > have else ""
    return [*said, f"disk size {old} → {size}{grown}"]


def compact(img: Image, progress: Callable[[int, int], None]) -> list[str]:
    assert isinstance(img, VdiImage)
    if img.type == "fixed":
        raise UnsupportedError(
            "a static VDI has no blocks to release (convert it to a dynamic one with vhdfs convert)", img.path
        )
    h, f, bs = img.header, img.file, img.block_size
    img.commit()
    used = [b for b in range(h.blocks_in_image) if img.bmap[b] < fmt.BLOCK_ZERO]
    if len({img.bmap[b] for b in used}) != len(used):
        raise FormatError(
            "several map entries share one data block; compact refuses to move them (see vhdfs check)",
            img.path,
        )
    freed: list[int] = []
    for n, b in enumerate(used, 1):
        if releasable(img, b * bs, min(bs, img.size - b * bs)):
            freed.append(b)
        progress(n, 2 * len(used))
    for b in freed:
        f.pwrite(_U32.pack(fmt.BLOCK_FREE), h.offset_bmap + 4 * b)
    if freed:
        f.sync()
    for b in freed:
        img.bmap[b] = fmt.BLOCK_FREE
    moved = _pack(img, lambda d, t: progress(len(used) + d, len(used) + t))
    return [f"released {len(freed)} block(s) that read the same without them", *moved]


def _pack(img: VdiImage, progress: Callable[[int, int], None]) -> list[str]:
    """Move the highest data blocks into the lowest free indices, then cut the file."""
    h, f = img.header, img.file
    owner = {img.bmap[b]: b for b in range(h.blocks_in_image) if img.bmap[b] < fmt.BLOCK_ZERO}
    count = len(owner)
    holes = [i for i in range(count) if i not in owner]
    movers = sorted((i for i in owner if i >= count), reverse=True)
    for n, (hole, src) in enumerate(zip(holes, movers, strict=True), 1):
        data = f.pread(h.block_stride, h.offset_data + src * h.block_stride)
        f.pwrite(data, h.offset_data + hole * h.block_stride)
        f.sync()  # the copy is durable before the entry moves
        block = owner.pop(src)
        f.pwrite(_U32.pack(hole), h.offset_bmap + 4 * block)
        f.sync()
        img.bmap[block] = hole
        owner[hole] = block
        progress(n, len(movers))
    end = h.offset_data + count * h.block_stride
    before = f.size()
    if h.blocks_allocated != count:
        h.blocks_allocated = count
        f.pwrite(_U32.pack(count), fmt.BLOCKS_ALLOCATED_OFFSET)
        f.sync()
    if before > end:
        f.truncate(end)
        f.sync()
    return [f"moved {len(movers)} block(s) down", f"file {before} → {max(end, min(before, end))} bytes"]


def repair(path: str, dry_run: bool, say: Callable[[str], None]) -> list[str]:
    f = RawFile(path, writable=not dry_run)
    session = RepairSession(f, dry_run, say)
    change, changes = session.change, session.changes
    try:
        size = f.size()
        h = fmt.parse_header(os.pread(f.fd, fmt.HEADER_READ_SIZE, 0), size)
        bmap = fmt.parse_map(f.pread(h.map_bytes, h.offset_bmap))
        if h.sector_size != fmt.SECTOR:
            change(
                f"sector size field {h.sector_size} → 512 (a VDI's data is addressed in 512-byte "
                "sectors; QEMU refuses any other value)",
                lambda: f.pwrite(_U32.pack(fmt.SECTOR), SECTOR_SIZE_OFFSET),
            )
        bs, marker = h.block_size, fmt.BLOCK_ZERO if h.is_diff else fmt.BLOCK_FREE
        reads = "as zeros"
        for b in range(min(h.blocks_in_image, -(-h.disk_size // bs))):
            e = bmap[b]
            if e >= fmt.BLOCK_ZERO:
                continue
            needed = min(bs, h.disk_size - b * bs)
            if h.offset_data + e * h.block_stride + h.block_extra + needed > size:
                lo, hi = b * bs, b * bs + needed
                change(
                    f"block map entry {b} points past the end of the file (block {e}): "
                    f"cleared; virtual bytes {lo}-{hi} now read {reads}",
                    partial(f.pwrite, _U32.pack(marker), h.offset_bmap + 4 * b),
                )
                bmap[b] = marker
        used = {e for e in bmap[: h.blocks_in_image] if e < fmt.BLOCK_ZERO}
        want = max(used) + 1 if used else 0
        if h.image_type != fmt.TYPE_FIXED and h.blocks_allocated != want:
            change(
                f"blocks_allocated {h.blocks_allocated} → {want} (the blocks the map uses)",
                lambda: f.pwrite(_U32.pack(want), fmt.BLOCKS_ALLOCATED_OFFSET),
            )
        if len(used) < want:
            say(
                f"note: {want - len(used)} data block(s) below the last are unused (leaked): "
                "vhdfs compact returns them"
            )
    finally:
        f.close()
    return changes
