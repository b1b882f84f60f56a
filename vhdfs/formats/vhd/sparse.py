"""Dynamic and differencing VHD layers: BAT + per-block sector bitmaps.

The two types differ only in what an unallocated block or a clear bit means: zeros for a
dynamic disk, "ask the parent" for a differencing disk (FORMATS.md §3.1). Everything else, from
the extent map to crash-safe allocation, is shared.

Locking: ``map_layer`` and in-place data writes take no lock; anything that allocates a block,
changes a bitmap, the BAT or the batmap holds ``self.meta_lock`` across plan → write → publish.

Group commit: new BAT entries and differencing bitmap bits wait in ``self.pending`` and reach
the disk after one fdatasync for the data they point at (``Image.commit``; docs/concurrency.md).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any

from ...block.driver import Finding, note
from ...block.extent import run_end
from ...block.image import Extent, Image, Kind
from ...block.pending import PendingBlobs, PendingGroup, PendingTable
from ...block.rawfile import RawFile
from ...errors import FormatError
from . import spec as fmt
from .bitmap import all_set, count_set, runs, set_bits
from .findings import classify
from .layout import SparseLayout, count_unused

_FULL = None  # bitmap cache value for "every sector present"
BITMAP_CACHE_BYTES = 64 * 1024 * 1024


class SparseVhd(Image):
    """A dynamic (type 3) or differencing (type 4) VHD layer."""

    file: RawFile  # always open (narrows Image.file)

    format = "vhd"

    def __init__(
        self,
        path: str,
        f: RawFile,
        footer: fmt.Footer,
        footer_offset: int,
        file_size: int,
        layout: SparseLayout,
        size: int,
        size_rule: str,
        findings: list[str],
        footer_where: str,
        repair_footer: bool = False,
    ) -> None:
        super().__init__(path, size, f.writable)
        self.file = f
        self.footer = footer
        self.layout = layout
        self.header = layout.header
        self.differencing = footer.disk_type == fmt.DISK_DIFFERENCING
        self.type = "differencing" if self.differencing else "dynamic"
        self.size_rule = size_rule
        self.findings = findings
        self.footer_where = footer_where
        self.block_size = self.allocation_unit = layout.header.block_size
        self.bitmap_bytes = layout.bitmap_bytes
        self.bat = layout.bat
        self.batmap = layout.batmap
        self.footer_offset = footer_offset  # where the authoritative footer sits now
        self.file_size = file_size
        self.floor = layout.floor  # first byte a new block may use
        self._hole = Kind.BACKING if self.differencing else Kind.ZERO
        self._bitmaps: dict[int, bytes | None] = {}
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._repair_footer = repair_footer and f.writable  # forced open of a damaged footer
        # Group commit (see the module docstring): written at the next commit, after a sync.
        # New blocks' BAT entries first, then whole differencing bitmaps of blocks the file
        # already points at (a bitmap replaced since a snapshot stays pending).
        self._pending_bat = PendingTable(">I", layout.header.table_offset, f, self._unallocate)
        self._pending_bitmaps = PendingBlobs(f, lambda i: self.bat[i] * fmt.SECTOR, self._forget)
        self.pending = PendingGroup(self._pending_bat, self._pending_bitmaps)

    # -- reading ------------------------------------------------------------------------------

    def _bitmap(self, block: int, entry: int | None = None) -> bytes | None:
        """The block's sector bitmap, or None when every sector is present (cached).

        ``entry`` is the BAT value the caller already read, so a concurrent discard that
        frees the block cannot make us read a bitmap at sector 0xFFFFFFFF.
        """
        try:
            return self._bitmaps[block]
        except KeyError:
            pass
        pending = self._pending_bitmaps.get(block)  # evicted from the cache, not yet on disk
        if pending is not None:
            return None if all_set(pending, 0, self.block_size // fmt.SECTOR) else pending
        if self.batmap is not None and self.batmap.is_full(block):
            bm = None
        else:
            raw = self.file.pread(
                self.bitmap_bytes, (self.bat[block] if entry is None else entry) * fmt.SECTOR
            )
            spb = self.block_size // fmt.SECTOR
            bm = None if all_set(raw, 0, spb) else raw
        self._remember(block, bm)
        return bm

    def _remember(self, block: int, bm: bytes | None) -> None:
        with self._cache_lock:
            old = self._bitmaps.pop(block, _FULL)
            self._cache_bytes -= len(old) if old is not None else 0
            while self._bitmaps and self._cache_bytes + (len(bm) if bm else 0) > BITMAP_CACHE_BYTES:
                victim = self._bitmaps.pop(next(iter(self._bitmaps)))
                self._cache_bytes -= len(victim) if victim is not None else 0
            self._bitmaps[block] = bm
            self._cache_bytes += len(bm) if bm is not None else 0

    def _forget(self, block: int) -> None:
        with self._cache_lock:
            old = self._bitmaps.pop(block, _FULL)
            self._cache_bytes -= len(old) if old is not None else 0

    def maps_without_io(self, offset: int, length: int) -> bool:
        """Every allocated block the range touches has its bitmap cached (or pending)."""
        B, bat, cached = self.block_size, self.bat, self._bitmaps
        i, last = offset // B, (offset + max(length, 1) - 1) // B
        while i <= last:
            if (
                i not in cached
                and bat[i] != fmt.UNUSED_BAT
                and i not in self._pending_bitmaps
                and not (self.batmap is not None and self.batmap.is_full(i))
            ):
                return False
            i += 1
        return True

    def map_layer(self, offset: int, length: int) -> Iterator[Extent]:
        B, fd, end, pos = self.block_size, self.file.fd, offset + length, offset
        while pos < end:
            i = pos // B
            bstart, bend = i * B, min(i * B + B, end)
            entry = self.bat[i]
            if entry == fmt.UNUSED_BAT:
                hend = min(run_end(i, (end - 1) // B, self.bat.__getitem__) * B, end)
                yield Extent(pos, hend - pos, self._hole)
                pos = hend
                continue
            base = entry * fmt.SECTOR + self.bitmap_bytes - bstart  # file offset - virtual offset
            bm = self._bitmap(i, entry)
            if bm is None:
                yield Extent(pos, bend - pos, Kind.DATA, fd, base + pos)
            else:
                s0, s1 = (pos - bstart) // fmt.SECTOR, (bend - bstart + fmt.SECTOR - 1) // fmt.SECTOR
                for a, b, is_set in runs(bm, s0, s1):
                    lo, hi = max(pos, bstart + a * fmt.SECTOR), min(bend, bstart + b * fmt.SECTOR)
                    if is_set:
                        yield Extent(lo, hi - lo, Kind.DATA, fd, base + lo)
                    else:
                        yield Extent(lo, hi - lo, self._hole)
            pos = bend

    # -- writing ------------------------------------------------------------------------------

    def _sectors(self, i: int, pos: int, n: int) -> tuple[int, int]:
        bstart = i * self.block_size
        return (pos - bstart) // fmt.SECTOR, (pos + n - bstart + fmt.SECTOR - 1) // fmt.SECTOR

    def _in_place(self, i: int, pos: int, n: int) -> bool:
        entry = self.bat[i]
        if entry == fmt.UNUSED_BAT:
            return False
        bm = self._bitmap(i, entry)
        return bm is None or all_set(bm, *self._sectors(i, pos, n))

    def _data_offset(self, i: int, pos: int) -> int:
        return self.bat[i] * fmt.SECTOR + self.bitmap_bytes + pos - i * self.block_size

    def write_is_in_place(self, offset: int, length: int) -> bool:
        B, end, pos = self.block_size, min(offset + length, self.size), offset
        while pos < end:
            n = min((pos // B + 1) * B, end) - pos
            if not self._in_place(pos // B, pos, n):
                return False
            pos += n
        return not self._repair_footer  # a forced open rewrites its footers first

    def _ensure_footer(self) -> None:
        """Before the first change to a force-opened image, rewrite both footers correctly."""
        if not self._repair_footer:
            return
        with self.meta_lock:
            if not self._repair_footer:
                return
            raw = self.footer.pack()
            if self.footer_offset >= self.file_size:  # no footer at the end at all
                self.footer_offset = max(self.floor, self.file_size)
            self.file.pwrite(raw, self.footer_offset)
            self.file.pwrite(raw, 0)
            self.file.sync()
            self.file_size = max(self.file_size, self.footer_offset + fmt.FOOTER_SIZE)
            self.floor = max(self.floor, self.footer_offset)
            self._repair_footer = False

    def _write(self, offset: int, data: memoryview) -> None:
        self._ensure_footer()
        B, done = self.block_size, 0
        while done < len(data):
            pos = offset + done
            i = pos // B
            n = min((i + 1) * B - pos, len(data) - done)
            chunk = data[done : done + n]
            if self._in_place(i, pos, n):
                self.file.pwrite(chunk, self._data_offset(i, pos))
            else:
                with self.meta_lock:
                    self._write_block(i, pos, n, chunk)
            done += n

    def _write_block(self, i: int, pos: int, n: int, chunk: memoryview | None) -> None:
        """Write ``n`` bytes (``None`` = zeros) inside block ``i``; caller holds meta_lock."""
        if self._in_place(i, pos, n):  # re-check under the lock
            self.file.write_parts([chunk if chunk is not None else n], self._data_offset(i, pos))
            return
        bstart = i * self.block_size
        s0, s1 = self._sectors(i, pos, n)
        a, e = bstart + s0 * fmt.SECTOR, bstart + s1 * fmt.SECTOR
        head, mid, mid_len, tail = self._merge_edges(a, e, pos, n, chunk)
        entry = self.bat[i]
        if entry == fmt.UNUSED_BAT:
            self._allocate(i, s0, s1, a - bstart, head, mid, mid_len, tail)
            return
        parts = [head, mid_len if mid is None else mid, tail]
        bm = bytearray(self._bitmap(i) or b"\xff" * self.bitmap_bytes)
        b0, b1 = set_bits(bm, s0, s1)
        if self.differencing:
            # Data now, bits at the next commit (after the sync that makes the data durable):
            # a crash in between leaves the bits clear and the parent's old data showing.
            self.file.write_parts(parts, self._data_offset(i, a))
            self._pending_bitmaps.set(i, bytes(bm))
        else:
            # Bits, then data: under a clear bit a dynamic disk holds zeros (the spec requires
            # it, and QEMU reads the data area whatever the bitmap says). Setting the bit first
            # keeps that true across a crash: the sector then shows its old content, zeros.
            self.file.pwrite(bm[b0:b1], entry * fmt.SECTOR + b0)
            self.file.sync()
            self.file.write_parts(parts, self._data_offset(i, a))
        self._remember(i, None if all_set(bm, 0, self.block_size // fmt.SECTOR) else bytes(bm))

    def _merge_edges(
        self, a: int, e: int, pos: int, n: int, chunk: memoryview | None
    ) -> tuple[bytes, memoryview | None, int, bytes]:
        """Split a write into (head sector, middle, middle length, tail sector).

        A partially covered sector is completed with what the chain shows there now: the
        file's bytes when its bit is set, zeros (dynamic) or the parent's bytes (differencing)
        when clear. Only those at most two sectors are read.
        """
        S = fmt.SECTOR
        piece = (lambda lo, hi: bytes(chunk[lo:hi])) if chunk is not None else (lambda lo, hi: bytes(hi - lo))
        if e - a == S and (pos != a or pos + n != e):
            buf = bytearray(self.read(a, S))
            buf[pos - a : pos - a + n] = piece(0, n)
            return bytes(buf), None, 0, b""
        hk = a + S - pos if pos != a else 0
        tk = pos + n - (e - S) if pos + n != e else 0
        head = tail = b""
        if hk:
            buf = bytearray(self.read(a, S))
            buf[pos - a :] = piece(0, hk)
            head = bytes(buf)
        if tk:
            buf = bytearray(self.read(e - S, S))
            buf[:tk] = piece(n - tk, n)
            tail = bytes(buf)
        mid = chunk[hk : n - tk] if chunk is not None else None
        return head, mid, n - hk - tk, tail

    def _alloc_position(self) -> int:
        """Past everything in the file; data 4 KiB-aligned when blocks are that large."""
        pos = self.floor
        if self.block_size >= 4096:
            pos = (pos + self.bitmap_bytes + 4095) // 4096 * 4096 - self.bitmap_bytes
        return pos

    def _allocate(
        self,
        i: int,
        s0: int,
        s1: int,
        rel: int,
        head: bytes,
        mid: memoryview | None,
        mid_len: int,
        tail: bytes,
    ) -> None:
        """Crash-safe allocation (FORMATS.md §3.3): footer, bitmap+data now; BAT entry at commit.

        The BAT entry is written only after the commit's sync made the block durable, so
        whatever reaches the disk first, no entry ever points at unwritten space.
        """
        pos = self._alloc_position()
        new_footer = pos + self.bitmap_bytes + self.block_size
        if pos // fmt.SECTOR > fmt.MAX_BAT_SECTOR:
            raise FormatError("image file would grow past 2 TiB (VHD sector numbers are 32-bit)", self.path)
        self._clear_batmap_bit(i)
        if self.differencing:
            bitmap = bytearray(self.bitmap_bytes)  # only written sectors hide the parent
            set_bits(bitmap, s0, s1)
        else:
            # The whole block is zeros on disk (a hole past the old EOF, old bytes zeroed
            # below), so every bit can be set now, as QEMU does: later writes into this block
            # are then in place, with no bitmap update and no lock.
            bitmap = bytearray(self.bitmap_bytes)
            inside = min(self.block_size, self.size - i * self.block_size)  # last block: partial
            set_bits(bitmap, 0, -(-inside // fmt.SECTOR))
        # 1) a valid footer at the new end of file, so EOF always holds one
        self.file.pwrite(self.footer.pack(), new_footer)
        # 2) bitmap + data. Space past the old EOF is a hole (reads zeros); old bytes inside the
        #    new block or the alignment gap (the previous footer) are zeroed explicitly.
        old_end = self.file_size
        if self.footer_offset < min(pos, old_end):
            self.file.write_parts([min(pos, old_end) - self.footer_offset], self.footer_offset)
        if old_end > pos + self.bitmap_bytes:
            self.file.write_parts([old_end - pos - self.bitmap_bytes], pos + self.bitmap_bytes)
        data_at = pos + self.bitmap_bytes + rel
        if mid is None:  # zeros in the middle: already zero, write only the merged edges
            self.file.write_parts([bitmap], pos)
            if head:
                self.file.write_parts([head], data_at)
            if tail:
                self.file.write_parts([tail], data_at + len(head) + mid_len)
        elif rel == 0:
            self.file.write_parts([bitmap, head, mid, tail], pos)
        else:
            self.file.write_parts([bitmap], pos)
            self.file.write_parts([head, mid, tail], data_at)
        # 3) publish; the BAT entry goes out at the next commit, once the block is durable
        self._remember(i, None if all_set(bitmap, 0, self.block_size // fmt.SECTOR) else bytes(bitmap))
        self.bat[i] = pos // fmt.SECTOR
        self._pending_bat.set(i, pos // fmt.SECTOR, file_entry=fmt.UNUSED_BAT)
        self.footer_offset = new_footer
        self.file_size = max(old_end, new_footer + fmt.FOOTER_SIZE)
        self.floor = new_footer

    # -- group commit -------------------------------------------------------------------------

    def _unallocate(self, i: int, file_entry: int) -> None:
        """Roll back a BAT entry the file lacks: the block was never there, nor its bits."""
        self.bat[i] = file_entry
        self._pending_bitmaps.drop(i)
        self._forget(i)

    def _clear_batmap_bit(self, i: int) -> None:
        """Never leave a "fully populated" bit set for a block we are about to change."""
        if self.batmap is not None and self.batmap.clear_bit(self.file, i):
            self._forget(i)

    # -- discard, flush, describe -------------------------------------------------------------------

    def _discard(self, offset: int, length: int) -> None:
        """Make the range read as zeros; whole dynamic blocks are released from the BAT."""
        self._ensure_footer()
        B, pos, end = self.block_size, offset, offset + length
        with self.meta_lock:
            self.commit()  # a freed entry must not be overwritten by a pending one later
            while pos < end:
                i = pos // B
                n = min((i + 1) * B, end) - pos
                whole = pos == i * B and pos + n == min((i + 1) * B, self.size)
                if self.differencing:
                    self._write_block(i, pos, n, None)
                elif self.bat[i] != fmt.UNUSED_BAT:
                    if whole:
                        self._free_block(i)
                    else:
                        self.file.write_parts([n], self._data_offset(i, pos))
                pos += n

    def _free_block(self, i: int) -> None:
        self._clear_batmap_bit(i)
        self.file.pwrite(struct.pack(">I", fmt.UNUSED_BAT), self.header.table_offset + 4 * i)
        self.file.sync()
        self.bat[i] = fmt.UNUSED_BAT
        self._forget(i)

    def identity(self) -> str:
        return fmt.uuid_str(self.footer.unique_id)

    def allocated_blocks(self) -> int:
        return len(self.bat) - count_unused(self.bat, fmt.UNUSED_BAT)

    def allocated_bytes(self) -> int:
        """Allocated blocks times the block size (capped): O(1)-ish, so a 2 TiB image mounts fast."""
        return min(self.size, self.allocated_blocks() * self.block_size)

    def describe(self) -> dict[str, Any]:
        from .fixed import describe_footer

        h = self.header
        out = describe_footer(self.footer, self.size_rule, self.footer_where)
        out.update(
            {
                "type": self.type,
                "block_size": self.block_size,
                "max_table_entries": h.max_table_entries,
                "allocated_blocks": self.allocated_blocks(),
                "bat_offset": h.table_offset,
                "header_checksum_ok": h.checksum_ok,
                "batmap": self.batmap is not None,
            }
        )
        if self.differencing:
            out.update(
                {
                    "parent_name": h.parent_name,
                    "parent_uuid": fmt.uuid_str(h.parent_id),
                    "parent_timestamp": fmt.unix_time(h.parent_timestamp),
                    "parent_locators": [
                        {
                            "index": i,
                            "platform": loc.name,
                            "offset": loc.data_offset,
                            "space": loc.data_space,
                            "length": loc.data_length,
                            "path": v,
                        }
                        for i, loc, v in self.layout.locators
                    ],
                }
            )
        return out

    def check(self) -> list[Finding]:
        out = [classify(f) for f in self.findings]
        last = (self.size - 1) // self.block_size if self.size else -1
        tail_sectors = (self.size - last * self.block_size) // fmt.SECTOR if last >= 0 else 0
        spb = self.block_size // fmt.SECTOR
        if 0 <= last < len(self.bat) and self.bat[last] != fmt.UNUSED_BAT and tail_sectors < spb:
            raw = self.file.pread(self.bitmap_bytes, self.bat[last] * fmt.SECTOR)
            extra = count_set(raw, tail_sectors, spb)
            if extra:
                # Disk2vhd, mkimg, blktap and Xen Orchestra set whole-block bitmaps when the disk
                # ends inside a block; every reader reads them: a habit, not damage.
                out.append(note(f"block {last}: {extra} bitmap bits set past the virtual end of the disk"))
        return out
