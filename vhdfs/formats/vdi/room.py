"""Room for a longer VDI block map when the data area starts right after it (``vhdfs resize``).

QEMU writes the map directly followed by the first data block (VirtualBox leaves up to 1 MiB),
so growing such an image needs the space of the first data block(s). VirtualBox moves those
blocks to the end of the file and renumbers the map in place; a kill halfway leaves a map that
is half renumbered. Here the renumbered map is written *beside* the old one, into the space the
moved blocks leave, and one header write inside sector 0 switches ``offset_bmap``,
``offset_data`` and ``blocks_allocated`` together. Order (each step synced; a kill anywhere
leaves the image reading the same, at its old size):

1. the first ``k`` data blocks copied past every block the file holds (unreferenced: harmless);
2. ``blocks_allocated`` raised over the copies (so no writer reuses their indices);
3. each map entry of a moved block pointed at its copy (the same bytes either way);
4. the renumbered map (indices minus ``k``) written where blocks ``0..k-1`` were, now unused;
5. the header: map at the old data offset, data ``k`` blocks further, ``blocks_allocated - k``.

The old map's space is left unused (a few KiB at most). The map then has room for ``need``
entries and the ordinary in-place growth (``maintain.resize``) follows. A static image keeps an
identity map (VirtualBox expects it), which moving blocks would break: it is refused by name.
"""

from __future__ import annotations

import struct
from array import array

from ...errors import UnsupportedError
from . import spec as fmt
from .image import VdiImage

# 0x154 map offset, 0x158 data offset ... 0x184 blocks allocated: one write inside sector 0.
_FLIP_START = 0x154
_FLIP_END = fmt.BLOCKS_ALLOCATED_OFFSET + 4
_U32 = struct.Struct("<I")


def room(img: VdiImage) -> int:
    """Map entries that fit before the data area."""
    return (img.header.offset_data - img.header.offset_bmap) // 4


def make_room(img: VdiImage, need: int) -> str:
    """Move the first data blocks away so that a map of ``need`` entries fits; what was done.

    The image's pending metadata must be committed first; afterwards it must be closed and
    opened again before any write (its pending tables still name the old map offset).
    """
    h, f = img.header, img.file
    if img.type == "fixed":
        raise UnsupportedError(
            f"the block map has room for {room(img)} entries before the data area at "
            f"{h.offset_data:#x} and {need} are needed; a static VDI keeps its blocks in map "
            "order, so they cannot move to make room: use vhdfs convert to a new image",
            img.path,
        )
    stride, have = h.block_stride, h.blocks_in_image
    map_bytes = -(-4 * need // fmt.SECTOR) * fmt.SECTOR
    k = -(-map_bytes // stride)  # data blocks the new map takes the place of
    owners: dict[int, list[int]] = {}
    for b in range(have):
        if img.bmap[b] < k:
            owners.setdefault(img.bmap[b], []).append(b)
    moves = sorted(owners)
    base = max(img._next_index, k)  # past anything the file holds, and past the new map
    if base + len(moves) > fmt.MAX_BLOCK_INDEX:
        raise UnsupportedError("the image has no free block indices left to move blocks to", img.path)

    def at(index: int) -> int:
        return h.offset_data + index * stride

    for i, src in enumerate(moves):  # 1) the copies
        f.pwrite(f.pread(stride, at(src)), at(base + i))
    if moves:
        f.sync()
    allocated = max(h.blocks_allocated, base + len(moves)) if moves else h.blocks_allocated
    if allocated != h.blocks_allocated:  # 2) no writer hands those indices out again
        f.pwrite(_U32.pack(allocated), fmt.BLOCKS_ALLOCATED_OFFSET)
        f.sync()
        h.blocks_allocated = allocated
    for i, src in enumerate(moves):  # 3) the entries, one 4-byte write each
        for b in owners[src]:
            f.pwrite(_U32.pack(base + i), h.offset_bmap + 4 * b)
            img.bmap[b] = base + i
    if moves:
        f.sync()
    renumbered = array(img.bmap.typecode, (e - k if e < fmt.BLOCK_ZERO else e for e in img.bmap[:have]))
    new_bmap, new_data = h.offset_data, h.offset_data + k * stride
    f.pwrite(fmt.pack_entries(renumbered), new_bmap)  # 4) into the freed space
    f.sync()
    sector0 = bytearray(f.pread(_FLIP_END - _FLIP_START, _FLIP_START))
    struct.pack_into("<II", sector0, 0, new_bmap, new_data)
    left = max(0, allocated - k)
    _U32.pack_into(sector0, fmt.BLOCKS_ALLOCATED_OFFSET - _FLIP_START, left)
    f.pwrite(bytes(sector0), _FLIP_START)  # 5) the switch
    f.sync()
    old_bmap = h.offset_bmap
    h.offset_bmap, h.offset_data, h.blocks_allocated = new_bmap, new_data, left
    img.bmap[:have] = renumbered
    img._next_index = max(left, img._next_index - k)
    return (
        f"moved {len(moves)} data block(s) to the end of the file to make room for {need} map "
        f"entries: block map {old_bmap:#x} → {new_bmap:#x}, data {new_bmap:#x} → {new_data:#x}"
    )
