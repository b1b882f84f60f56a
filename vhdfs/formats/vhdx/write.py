"""Writing VHDX (fixed, dynamic, differencing): the ``VhdxImage`` write path, as a mixin.

Order (issue 10, FORMATS-VHDX.md "Writing crash-safely"), with the header and log mechanics in
``journal.py``:

1. writable open: header update with a new FileWriteGuid, log replayed on disk, a fresh log;
2. first change a reader can see (write or discard): a new DataWriteGuid (header update);
3. a new block: the file grows by whole 1 MiB-aligned blocks at its end (``ftruncate``, so the
   new space reads as zeros), the data is written, and the BAT page (and, in a differencing file,
   the sector-bitmap page) is changed *in memory only*: a dirty page in ``bat.py``'s cache;
4. group commit (``Image.commit``): one data sync, then one log entry with every dirty page,
   a flush, then the pages in place. A sequential write pays two syncs per commit, not per block;
5. clean close: flush, then a header update clearing LogGuid.

A crash before step 4 completes loses only writes nobody fsync'd: the pages never left memory,
so the old BAT shows (new blocks are leaked space, a differencing block's new sectors still read
the parent). A crash after the entry's flush replays it. Data is never pointed at before it is
durable, and a page is never torn in place (the log holds its whole copy).

Differencing writes are sector-exact: a NOT_PRESENT block becomes PARTIALLY_PRESENT with bits
only for the written sectors (a partly covered sector is completed with what the chain shows
there now); a write of the whole block makes it FULLY_PRESENT; ZERO/UNMAPPED/UNDEFINED blocks
become FULLY_PRESENT, zero padded. The chunk's 1 MiB bitmap block is allocated when first needed.
Discard: whole blocks become ZERO (offset 0) in dynamic and differencing files (a child then
reads zeros, not its parent); partial ranges and fixed files get zeros written.
"""

from __future__ import annotations

from typing import Any

from ...block.pending import COMMIT_BYTES
from ...errors import FormatError
from . import spec as S
from .bat import PAGE
from .bitmap import set_bits
from .journal import Journal

_ZEROABLE = (S.PAYLOAD_ZERO, S.PAYLOAD_UNMAPPED, S.PAYLOAD_UNMAPPED_V095, S.PAYLOAD_UNDEFINED)
COMMIT_PAGES = 128


class VhdxWriter:
    """Mixin for ``VhdxImage``: everything that changes the file."""

    journal: Journal | None
    _allocated: int | None

    def _init_writer(self: Any) -> None:
        self.journal = None
        self._guid_changed = False
        self._pending_bytes = 0
        self._file_end = 0

    def _begin_session(self: Any, journal: Journal) -> None:
        """After the journal started: find where new blocks go (past everything allocated)."""
        self.journal = journal
        end = self.file_size
        ratio = self.geometry.chunk_ratio
        for i, e in self.bat.scan():
            if (e & 7) in (S.PAYLOAD_FULLY_PRESENT, S.PAYLOAD_PARTIALLY_PRESENT) or (
                (i + 1) % (ratio + 1) == 0 and (e & 7) == S.SB_PRESENT
            ):
                size = S.BITMAP_BLOCK_SIZE if (i + 1) % (ratio + 1) == 0 else self.block_size
                end = max(end, S.bat_offset(e) + size)
        self._file_end = -(-end // S.MiB) * S.MiB

    # -- helpers ----------------------------------------------------------------------------------

    def _visible_change(self: Any) -> None:
        if not self._guid_changed:
            with self.meta_lock:
                if not self._guid_changed:
                    self.data_write_guid = self.journal.new_data_write_guid()
                    self._guid_changed = True

    def _grow(self: Any, size: int) -> int:
        """Space for ``size`` bytes at the 1 MiB-aligned end of the file (reads as zeros)."""
        at = self._file_end
        self._file_end = at + -(-size // S.MiB) * S.MiB
        self.file.truncate(self._file_end)
        self.file_size = self._file_end
        return at

    def _set_entry(self: Any, index: int, state: int, offset: int = 0) -> None:
        self.bat[index] = S.pack_bat_entry(state, offset)

    def _mark_bits(self: Any, block: int, s0: int, s1: int) -> None:
        """Set bitmap bits of sectors [s0, s1) of ``block`` in the cached pages (dirty)."""
        base = self.bitmap_location(block)
        first = base * 8 + s0  # absolute bit position in the file
        last = base * 8 + s1
        pos = first
        while pos < last:
            byte = pos // 8
            page_off = byte - byte % PAGE
            stop = min(last, (page_off + PAGE) * 8)
            page = bytearray(self.bitmaps.get(page_off))
            set_bits(page, pos - page_off * 8, stop - page_off * 8)
            self.bitmaps.put(page_off, page)
            pos = stop

    def _ensure_bitmap(self: Any, block: int) -> None:
        chunk = block // self.geometry.chunk_ratio
        index = self.geometry.bitmap_index(chunk)
        if S.bat_state(self.bat[index]) != S.SB_PRESENT:
            at = self._grow(S.BITMAP_BLOCK_SIZE)
            self._set_entry(index, S.SB_PRESENT, at)
            self._pending_bytes += S.BITMAP_BLOCK_SIZE

    def _sector_range(self: Any, bstart: int, pos: int, n: int) -> tuple[int, int]:
        SS = self.sector_size
        return (pos - bstart) // SS, -(-(pos + n - bstart) // SS)

    def _merged(self: Any, bstart: int, s0: int, s1: int, pos: int, chunk: memoryview | None) -> bytes:
        """The whole sectors [s0, s1): the new bytes, edges completed from the chain's view."""
        SS = self.sector_size
        a, e = bstart + s0 * SS, bstart + s1 * SS
        n = len(chunk) if chunk is not None else 0
        buf = bytearray(e - a)
        if pos > a:
            buf[:SS] = self.read(a, SS)
        if pos + n < e:
            buf[-SS:] = self.read(e - SS, SS)
        if chunk is not None:
            buf[pos - a : pos - a + n] = chunk
        return bytes(buf)

    # -- the Image write hooks ---------------------------------------------------------------------

    def write_is_in_place(self: Any, offset: int, length: int) -> bool:
        B, end, pos = self.block_size, min(offset + length, self.size), offset
        if not self._guid_changed:
            return False
        while pos < end:
            b = pos // B
            n = min((b + 1) * B, end) - pos
            if not self._in_place(b, pos, n):
                return False
            pos += n
        return True

    def _in_place(self: Any, b: int, pos: int, n: int) -> bool:
        entry = self.entry(b)
        state = entry & 7
        if state == S.PAYLOAD_FULLY_PRESENT:
            return True
        if state == S.PAYLOAD_PARTIALLY_PRESENT and self.differencing:
            s0, s1 = self._sector_range(b * self.block_size, pos, n)
            return self.block_bits(b, s0, s1) == (1 << (s1 - s0)) - 1
        return False

    def _write(self: Any, offset: int, data: memoryview) -> None:
        self._visible_change()
        B, done = self.block_size, 0
        while done < len(data):
            pos = offset + done
            b = pos // B
            n = min((b + 1) * B - pos, len(data) - done)
            chunk = data[done : done + n]
            if self._in_place(b, pos, n):
                entry = self.entry(b)
                self.file.pwrite(chunk, S.bat_offset(entry) + pos - b * B)
            else:
                with self.meta_lock:
                    self._write_block(b, pos, chunk)
            done += n

    def _write_block(self: Any, b: int, pos: int, chunk: memoryview) -> None:
        """A write inside block ``b`` that needs metadata (caller holds ``meta_lock``)."""
        B, n = self.block_size, len(chunk)
        bstart = b * B
        index = self.geometry.payload_index(b)
        entry = self.bat[index]
        state = entry & 7
        inside = min(B, self.size - bstart)
        if state == S.PAYLOAD_FULLY_PRESENT:
            self.file.pwrite(chunk, S.bat_offset(entry) + pos - bstart)
            return
        whole = pos == bstart and n >= inside
        if state == S.PAYLOAD_PARTIALLY_PRESENT and self.differencing:
            off = self._block_offset(b, entry, inside)
            s0, s1 = self._sector_range(bstart, pos, n)
            merged = self._merged(bstart, s0, s1, pos, chunk)
            self.file.pwrite(merged, off + s0 * self.sector_size)
            self._mark_bits(b, s0, s1)
            return
        if state not in _ZEROABLE and state != S.PAYLOAD_NOT_PRESENT:
            raise FormatError(f"BAT: block {b} has state {state}; refusing to write it", self.path)
        if self.differencing and state == S.PAYLOAD_NOT_PRESENT and not whole:
            # sector-exact: only the written sectors leave the parent
            self._ensure_bitmap(b)
            s0, s1 = self._sector_range(bstart, pos, n)
            merged = self._merged(bstart, s0, s1, pos, chunk)
            at = self._grow(B)
            self.file.pwrite(merged, at + s0 * self.sector_size)
            self._mark_bits(b, s0, s1)
            self._set_entry(index, S.PAYLOAD_PARTIALLY_PRESENT, at)
        else:
            # whole block, or a block that reads zeros anyway: FULLY_PRESENT, zero padded
            at = self._grow(B)
            self.file.pwrite(chunk, at + pos - bstart)
            self._set_entry(index, S.PAYLOAD_FULLY_PRESENT, at)
        self._pending_bytes += B
        if self._allocated is not None:
            self._allocated += 1

    def _discard(self: Any, offset: int, length: int) -> None:
        self._visible_change()
        B, pos, end = self.block_size, offset, offset + length
        with self.meta_lock:
            while pos < end:
                b = pos // B
                bstart = b * B
                n = min(bstart + B, end) - pos
                index = self.geometry.payload_index(b)
                state = self.bat[index] & 7
                whole = pos == bstart and pos + n == min(bstart + B, self.size)
                if whole and self.type != "fixed":
                    if (
                        state in (S.PAYLOAD_FULLY_PRESENT, S.PAYLOAD_PARTIALLY_PRESENT)
                        and self._allocated is not None
                    ):
                        self._allocated -= 1
                    if state != S.PAYLOAD_ZERO:
                        self._set_entry(index, S.PAYLOAD_ZERO, 0)
                elif state in _ZEROABLE or (state == S.PAYLOAD_NOT_PRESENT and not self.differencing):
                    pass  # reads zeros already
                else:
                    self._write_block(b, pos, memoryview(bytes(n)))
                pos += n

    # -- group commit -----------------------------------------------------------------------------

    def has_pending_metadata(self: Any) -> bool:
        return bool(self.bat.dirty or self.bitmaps.dirty)

    def commit_due(self: Any) -> bool:
        return (
            len(self.bat.dirty) + len(self.bitmaps.dirty) >= COMMIT_PAGES
            or self._pending_bytes >= COMMIT_BYTES
        )

    def _pending_snapshot(self: Any) -> object | None:
        if not self.has_pending_metadata():
            return None
        pages = {self.bat.page_offset(p): self.bat.page_bytes(p) for p in self.bat.dirty}
        pages.update({off: bytes(self.bitmaps.pages[off]) for off in self.bitmaps.dirty})
        self._pending_bytes = 0
        return pages

    def _write_snapshot(self: Any, snapshot: object, sync_failed: BaseException | None = None) -> None:
        """Log every snapshot page, then write them in place; pages changed since stay dirty."""
        pages: dict[int, bytes] = snapshot  # type: ignore[assignment]
        bat_pages = {self.bat.page_offset(p): p for p in self.bat.dirty}
        try:
            if sync_failed is not None:
                raise sync_failed
            for batch in self._commit_batches(pages):
                self.journal.log_pages(batch, self.file_size)
        except BaseException:
            for off in pages:  # back to what the file holds
                if off in bat_pages:
                    self.bat.drop(bat_pages[off])
                else:
                    self.bitmaps.drop(off)
            self._allocated = None
            raise
        for off, data in pages.items():
            if off in bat_pages:
                p = bat_pages[off]
                if self.bat.page_bytes(p) == data:
                    self.bat.dirty.discard(p)
            elif off in self.bitmaps.pages and bytes(self.bitmaps.pages[off]) == data:
                self.bitmaps.dirty.discard(off)

    def _commit_batches(self: Any, pages: dict[int, bytes]) -> list[dict[int, bytes]]:
        """Pages in log entries that are each safe to land alone, when one entry cannot hold all.

        Order: sector-bitmap pages, then BAT pages holding a bitmap entry, then the other BAT
        pages. A crash between entries then leaves bits without a PARTIALLY_PRESENT entry, or a
        bitmap entry without its blocks (harmless), never a PARTIALLY_PRESENT block whose chunk
        has no bitmap.
        """
        limit = max(1, self.journal.max_commit_pages)
        if len(pages) <= limit:
            return [pages]
        bat_lo, bat_hi = self.layout.bat_offset, self.layout.bat_offset + self.layout.bat_length
        ratio = self.geometry.chunk_ratio

        def rank(off: int) -> int:
            if not bat_lo <= off < bat_hi:
                return 0
            first = (off - bat_lo) // 8  # first entry on the page
            bm = -(-(first + 1) // (ratio + 1)) * (ratio + 1) - 1  # first bitmap index >= it
            return 1 if bm < first + PAGE // 8 else 2

        order = sorted(pages, key=lambda o: (rank(o), o))
        return [{o: pages[o] for o in order[i : i + limit]} for i in range(0, len(order), limit)]

    def close(self: Any) -> None:
        if self.closed:
            return
        if self.journal is not None and self._writable_file() is not None:
            try:
                self.flush()
                self.journal.close()
            except BaseException:
                self.closed = True
                self._close_files()
                if self.backing is not None:
                    self.backing.close()
                raise
        super().close()  # type: ignore[misc]


__all__ = ["VhdxWriter"]
