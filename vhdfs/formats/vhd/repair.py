"""``vhdfs check --repair`` for VHD: what blktap's ``vhd-util repair`` fixes, and no more.

Runs on the file itself before any driver opens it (an entry past the end of the file makes a
normal open refuse), with the exclusive lock, so an image in use is refused; a parent is never
opened. Each change is announced (``say``) before it is made; with ``dry_run`` only announced.

- the tail footer missing or damaged: restored from the head copy (and the reverse), a fixed
  footer's checksum recomputed (its fields are all there is);
- the dynamic header's checksum recomputed when its cookie and fields are sane (it parsed);
- BAT entries whose block lies past the end of the file: cleared, naming the virtual range that
  now reads as zeros (dynamic) or from the parent (differencing);
- a blktap batmap whose checksum fails: rewritten all-clear (no block claims "full").

Left alone: bitmap bits past the disk's end (a habit of real writers), overlapping blocks
(which copy is right is unknowable), trailing padding after the footer.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable
from functools import partial

from ...block.maintain import RepairSession
from ...block.rawfile import RawFile
from . import spec as fmt
from .footer import read_footer
from .layout import _load_batmap

S = fmt.SECTOR


def repair(path: str, dry_run: bool, say: Callable[[str], None]) -> list[str]:
    f = RawFile(path, writable=not dry_run)
    session = RepairSession(f, dry_run, say)
    change, changes = session.change, session.changes
    try:
        size = f.size()
        footer, fo, where, _findings = read_footer(f, size)
        if footer.disk_type == fmt.DISK_FIXED:
            if not footer.checksum_ok:
                change(
                    f"footer at {fo}: checksum 0x{footer.checksum:08x} → recomputed",
                    lambda: f.pwrite(footer.pack(), fo),
                )
            return changes
        good = footer.pack()
        if where == "head":
            at = fo if fo < size else size - size % S
            what = "missing" if fo >= size else "damaged"
            change(
                f"tail footer {what}: written at {at} from the copy at offset 0", lambda: f.pwrite(good, at)
            )
        elif not footer.checksum_ok:
            change(
                f"footer at {fo}: checksum 0x{footer.checksum:08x} → recomputed", lambda: f.pwrite(good, fo)
            )
        head_raw = f.pread(S, 0)
        head = fmt.parse_footer(head_raw) if head_raw[:8] == fmt.FOOTER_COOKIE else None
        if head is None or not head.checksum_ok or head.pack() != good:
            change(
                "footer copy at offset 0 missing, damaged or different: rewritten from the footer at the end",
                lambda: f.pwrite(good, 0),
            )
        hoff = footer.data_offset
        raw = bytearray(f.pread(fmt.HEADER_SIZE, hoff))
        header = fmt.parse_header(bytes(raw))
        if not header.checksum_ok:
            struct.pack_into(">I", raw, fmt.HEADER_CHECKSUM_OFFSET, 0)
            struct.pack_into(
                ">I", raw, fmt.HEADER_CHECKSUM_OFFSET, fmt.checksum(raw, fmt.HEADER_CHECKSUM_OFFSET)
            )
            change(
                f"dynamic header at {hoff}: checksum 0x{header.checksum:08x} → recomputed",
                lambda: f.pwrite(raw, hoff),
            )
        _clear_past_eof(f, footer, header, change)
        batmap = _load_batmap(f, footer, header, f.size(), [], [])
        if batmap is not None and batmap.data and not batmap.valid:
            change(
                f"batmap at {batmap.header.map_offset}: checksum fails; rewritten all clear",
                lambda: batmap.clear_bit(f, 0),
            )
    finally:
        f.close()
    return changes


def _clear_past_eof(
    f: RawFile,
    footer: fmt.Footer,
    header: fmt.DynamicHeader,
    change: Callable[[str, Callable[[], object]], None],
) -> None:
    vsize, _rule = fmt.virtual_size(footer)
    n, B = header.max_table_entries, header.block_size
    if header.table_offset + 4 * n > f.size():
        return  # the BAT itself is cut short: nothing sane to repair
    bat = array("I")
    bat.frombytes(f.pread(4 * n, header.table_offset))
    if sys.byteorder == "little":
        bat.byteswap()
    bm, size = fmt.bitmap_size(B), f.size()
    reads = "from the parent" if footer.disk_type == fmt.DISK_DIFFERENCING else "as zeros"
    for i, entry in enumerate(bat):
        if entry == fmt.UNUSED_BAT:
            continue
        readable = bm + max(0, min(B, vsize - i * B))
        if entry * S + readable > size:
            lo, hi = i * B, min(vsize, (i + 1) * B)
            at = header.table_offset + 4 * i
            change(
                f"BAT entry {i} points past the end of the file (block at {entry * S}): "
                f"cleared; virtual bytes {lo}-{hi} now read {reads}",
                partial(f.pwrite, struct.pack(">I", fmt.UNUSED_BAT), at),
            )
