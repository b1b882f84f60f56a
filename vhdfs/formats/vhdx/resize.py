"""``vhdfs resize`` for fixed and dynamic VHDX ([MS-VHDX] §2.5, §2.6.2.2).

The size is rounded up to whole logical sectors. The BAT's entry count follows from the size
(``spec.bat_geometry``: a payload entry per block, a sector-bitmap entry every chunk ratio),
and an entry's index does not depend on the size, so growing only appends entries. A
differencing file is refused before anything is written (``tools/maintain.py``, for every
format): it has its parent's size, and vhdfs refuses a chain whose sizes differ.

Crash order (every prefix opens with the old or the new size and the same content):

1. growing: the old last block's bytes past the old end zeroed (they become visible), synced;
2. growing past the BAT region: a longer region is prepared where nothing lives -- in place
   when the space after the BAT is free, else a copy of the whole BAT at the end of the file;
   a fixed file's new blocks are allocated past everything (FULLY_PRESENT, reading zeros);
   entries in pages that are not live yet are written directly;
3. entries in live BAT pages (new blocks of a fixed file, entries cleared past a smaller disk):
   logged -- harmless alone, since the old size never reads past its own entry count;
4. one log entry: VirtualDiskSize, and both region tables when the BAT region changed;
5. shrinking: the file is cut after a clean log close when its tail is no longer used.
"""

from __future__ import annotations

from collections.abc import Callable

from ...block.image import Image
from ...errors import UsageError
from . import space
from . import spec as S
from .bat import PAGE
from .image import VhdxImage


def resize(img: Image, requested: int, ensure_zero: Callable[[int], None]) -> list[str]:
    assert isinstance(img, VhdxImage)
    SS = img.sector_size
    size = -(-requested // SS) * SS
    said = [f"rounded up to {size} bytes (whole {SS}-byte sectors)"] if size != requested else []
    if size > S.MAX_VIRTUAL_SIZE:
        raise UsageError(f"{size} bytes is more than a VHDX holds (64 TiB)", img.path)
    old = img.size
    if size == old:
        return [*said, "size unchanged"]
    img.commit()
    f, L, B = space.file_of(img), img.layout, img.block_size
    G = S.bat_geometry(size, B, SS, img.differencing)
    fixed = img.type == "fixed"

    def read(off: int) -> bytes:
        return f.pread(PAGE, off)

    if size < old:
        ensure_zero(size)
    else:
        _zero_old_tail(img)
    bat_off, bat_len, moved = L.bat_offset, L.bat_length, ""
    need_len = -(-G.entry_count * 8 // S.MiB) * S.MiB
    blocks = space.allocations(img)
    if need_len > bat_len:
        bat_off, moved = _new_bat_region(img, need_len, blocks)
        said.append(moved)
    live = (bat_off, bat_off + bat_len) if bat_off == L.bat_offset else (0, 0)
    old_count = img.geometry.entry_count
    if size > old:
        first = old_count
        free = max(space.used_end(img, [(o, n) for o, n, _i in blocks]), -(-f.size() // S.MiB) * S.MiB)
        values = _new_entries(img, G, old_count, fixed, free)
    else:
        first = G.payload_blocks + G.payload_blocks // G.chunk_ratio  # the first block cut away
        values = [img.bat[i] if _kept(G, img.differencing, i) else 0 for i in range(first, old_count)]
        cut = sum(not _kept(G, img.differencing, i) for _o, _n, i in blocks)
        if cut:
            said.append(f"released {cut} block(s) past the new end")
    logged: dict[int, bytes] = {}
    if values:
        space.patch(
            logged, lambda o: read(o).ljust(PAGE, b"\0"), bat_off + 8 * first, space.entries_bytes(values)
        )
        direct = {o: logged.pop(o) for o in sorted(logged) if not live[0] <= o < live[1]}
        space.write_changed(f, direct)  # not live yet: straight to the file
        if fixed and size > old:
            f.truncate(max(f.size(), S.bat_offset(values[-1]) + B))
            said.append(f"{G.payload_blocks - img.geometry.payload_blocks} new block(s) allocated")
    space.commit_pages(img, logged, read)  # synced first: the new region and blocks are durable
    final: dict[int, bytes] = {}
    item = next(e for e in L.metadata_entries if e.item_id == S.VIRTUAL_DISK_SIZE)
    space.patch(final, read, L.metadata_offset + item.offset, S.pack_u64(size))
    if moved:
        space.region_tables(img, bat_off, need_len, final, read)
    space.commit_pages(img, final, read)
    if size < old:
        left = [(o, n) for o, n, i in blocks if _kept(G, img.differencing, i)]
        if space.close_and_cut(img, space.used_end(img, left)):
            said.append(f"file cut to {f.size()} bytes")
    return said


def _kept(G: S.BatGeometry, differencing: bool, index: int) -> bool:
    """BAT entry ``index`` still serves a disk of geometry ``G``: a payload entry of one of its
    blocks, or (differencing) the sector-bitmap entry of one of its chunks -- the last chunk's
    bitmap entry lies past its blocks' entries, so a shrink must not clear it."""
    ratio = G.chunk_ratio
    if (index + 1) % (ratio + 1) == 0:
        return differencing and index // (ratio + 1) < G.bitmap_blocks
    return index - index // (ratio + 1) < G.payload_blocks


def _zero_old_tail(img: VhdxImage) -> None:
    """Bytes of the old last block past the old end: zeros before they become visible."""
    B, old = img.block_size, img.size
    last = (old - 1) // B
    rel = old - last * B
    entry = img.entry(last)
    if rel < B and entry & S.BAT_STATE_MASK == S.PAYLOAD_FULLY_PRESENT:
        at = S.bat_offset(entry) + rel
        space.file_of(img).write_parts([max(0, min(B - rel, space.file_of(img).size() - at))], at)
        space.file_of(img).sync()


def _new_entries(img: VhdxImage, G: S.BatGeometry, old_count: int, fixed: bool, free: int) -> list[int]:
    """Entries [old_count, G.entry_count): NOT_PRESENT, or for a fixed file FULLY_PRESENT at
    consecutive blocks from ``free`` (past everything the file holds)."""
    if G.entry_count <= old_count:
        return []
    if not fixed:
        return [0] * (G.entry_count - old_count)
    ratio, out, at = G.chunk_ratio, [], -(-free // S.MiB) * S.MiB
    for i in range(old_count, G.entry_count):
        if (i + 1) % (ratio + 1) == 0:
            out.append(0)
        else:
            out.append(S.pack_bat_entry(S.PAYLOAD_FULLY_PRESENT, at))
            at += img.block_size
    return out


def _new_bat_region(img: VhdxImage, need_len: int, blocks: list[tuple[int, int, int]]) -> tuple[int, str]:
    """A BAT region of ``need_len`` bytes holding the current entries, not yet live."""
    f, L = space.file_of(img), img.layout
    others = [(s, e) for s, e, name in img._reserved_spans() if name != "BAT region"]
    taken = others + [(o, o + n) for o, n, _i in blocks]
    lo, hi = L.bat_offset + L.bat_length, L.bat_offset + need_len
    if not space.overlaps(lo, hi, taken):
        if hi > f.size():
            f.truncate(hi)
        f.write_parts([min(hi, f.size()) - lo], lo)  # free space may hold old copies
        return L.bat_offset, f"BAT region extended in place at {L.bat_offset} to {need_len} bytes"
    target = max(space.used_end(img, [(o, n) for o, n, _i in blocks]), -(-f.size() // S.MiB) * S.MiB)
    f.truncate(target + need_len)
    space.copy(img, L.bat_offset, target, L.bat_length)
    return target, f"BAT region moved from {L.bat_offset} to {target} ({need_len} bytes)"
