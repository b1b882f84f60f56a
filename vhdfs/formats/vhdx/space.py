"""Where things are in a VHDX file, for ``resize`` and ``compact``: what holds space, and how
a maintenance step changes metadata pages crash-safely.

Both operations follow one rule (FORMATS-VHDX.md "Writing crash-safely"): data goes to space
nothing references and is made durable first; then every page that is live metadata (BAT,
metadata region, region tables) changes only through a log entry (``VhdxLog.commit``: sync,
entry, sync, pages in place); a file is cut only after a clean close of the log, because a log
entry names the file size it was written against (FlushedFileOffset) and replay refuses a
file shorter than that.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from ...block.rawfile import RawFile
from . import spec as S
from .bat import PAGE
from .image import VhdxImage

COPY_CHUNK = 4 * S.MiB


def file_of(img: VhdxImage) -> RawFile:
    """The open image's file (a maintenance hook only ever sees an open one)."""
    assert img.file is not None
    return img.file


def allocations(img: VhdxImage) -> list[tuple[int, int, int]]:
    """Every (file offset, length, BAT index) the BAT references: present payload blocks and
    present sector-bitmap blocks, in file order. Blocks past the disk's end are not counted."""
    ratio, B, G = img.geometry.chunk_ratio, img.block_size, img.geometry
    out = []
    for i, e in img.bat.scan():
        state, off = e & S.BAT_STATE_MASK, S.bat_offset(e)
        if (i + 1) % (ratio + 1) == 0:
            if state == S.SB_PRESENT:
                out.append((off, S.BITMAP_BLOCK_SIZE, i))
        elif state in (S.PAYLOAD_FULLY_PRESENT, S.PAYLOAD_PARTIALLY_PRESENT) and (
            i - i // (ratio + 1) < G.payload_blocks
        ):
            out.append((off, B, i))
    out.sort()
    return out


def used_end(img: VhdxImage, spans: list[tuple[int, int]]) -> int:
    """The 1 MiB-aligned end of the header area, regions, log and ``spans`` (allocations)."""
    ends = [e for _s, e, _n in img._reserved_spans()] + [o + n for o, n in spans]
    return -(-max(ends) // S.MiB) * S.MiB


def overlaps(lo: int, hi: int, spans: list[tuple[int, int]]) -> bool:
    return any(s < hi and e > lo for s, e in spans)


def copy(img: VhdxImage, src: int, dst: int, length: int) -> None:
    """Copy ``length`` bytes (those the file holds) from ``src`` to ``dst`` in bounded pieces."""
    f = file_of(img)
    end = min(src + length, f.size())
    pos = src
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        f.pwrite(f.pread(n, pos), dst + pos - src)
        pos += n


def patch(pages: dict[int, bytes], read: Callable[[int], bytes], offset: int, data: bytes) -> None:
    """Put ``data`` at file ``offset`` into the 4 KiB ``pages`` (missing ones read first)."""
    pos, end = offset, offset + len(data)
    while pos < end:
        base = pos - pos % PAGE
        page = bytearray(pages[base] if base in pages else read(base))
        n = min(end, base + PAGE) - pos
        page[pos - base : pos - base + n] = data[pos - offset : pos - offset + n]
        pages[base] = bytes(page)
        pos += n


def entries_bytes(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def write_changed(f: RawFile, pages: dict[int, bytes]) -> None:
    """Write the pages that differ from the file, contiguous ones in one pwrite (a new BAT
    region past the old end of the file already reads as the zeros most of it holds)."""
    run_at, run = 0, bytearray()
    for off in sorted(pages):
        same = pages[off] == f.pread(PAGE, off).ljust(PAGE, b"\0")
        if run and (same or off != run_at + len(run)):
            f.pwrite(bytes(run), run_at)
            run = bytearray()
        if not same:
            if not run:
                run_at = off
            run += pages[off]
    if run:
        f.pwrite(bytes(run), run_at)


def commit_pages(img: VhdxImage, pages: dict[int, bytes], read: Callable[[int], bytes]) -> None:
    """Log ``pages`` (unchanged ones dropped) in one entry, or in several when too many: each
    entry lands on its own, so a caller passes only pages whose order does not matter."""
    changed = {o: p for o, p in pages.items() if p != read(o)}
    if changed:
        assert img.journal is not None
        img.journal.log.commit(changed, split=True)


def close_and_cut(img: VhdxImage, end: int) -> bool:
    """Everything durable, the log closed clean, then the file cut at ``end`` (if shorter)."""
    f = file_of(img)
    if end >= f.size():
        return False
    img.flush()
    assert img.journal is not None
    img.journal.close()
    f.truncate(end)
    f.sync()
    img.file_size = end
    return True


def region_tables(
    img: VhdxImage, bat_off: int, bat_len: int, pages: dict[int, bytes], read: Callable[[int], bytes]
) -> None:
    """Both region tables naming the new BAT region, built on the valid copy's bytes."""
    L = img.layout
    regions = [
        dataclasses.replace(r, file_offset=bat_off, length=bat_len) if r.guid == S.BAT_REGION else r
        for r in L.regions
    ]
    good = S.REGION_TABLE1_OFFSET if L.region_table_slot == 1 else S.REGION_TABLE2_OFFSET
    raw = bytearray(file_of(img).pread(S.REGION_TABLE_SIZE, good))
    head = S.pack_region_table(regions)[: 16 + 32 * len(regions)]
    raw[: len(head)] = head
    struct.pack_into("<I", raw, 4, S.checksum_with_field_zeroed(bytes(raw), 4))
    for at in (S.REGION_TABLE1_OFFSET, S.REGION_TABLE2_OFFSET):
        patch(pages, read, at, bytes(raw[:PAGE]))
        if raw[PAGE:] != file_of(img).pread(S.REGION_TABLE_SIZE - PAGE, at + PAGE):
            patch(pages, read, at + PAGE, bytes(raw[PAGE:]))
