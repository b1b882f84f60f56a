"""``VhdxImage``: one VHDX layer (fixed, dynamic or differencing) as an ``Image``.

Reading answers ``map_layer`` from the BAT (``bat.py``, loaded lazily) and, for
PARTIALLY_PRESENT blocks, the sector bitmap (``bitmap.py``, LSB-first). What a payload state
means (§2.5.1.1), following OpenVMM's ``io.rs`` and dissect:

- FULLY_PRESENT: DATA at the entry's offset;
- NOT_PRESENT: zeros in a fixed or dynamic file, the parent (BACKING) in a differencing file;
- ZERO, UNMAPPED (3, and QEMU's v0.95 value 5) and UNDEFINED: zeros, *even in a differencing
  file*. libvhdi differs: it sends every state below FULLY_PRESENT to the parent;
- PARTIALLY_PRESENT (differencing only): set bits DATA, clear bits BACKING.

An unallocated entry's offset is never read (libvhdi #17 returned the ``vhdxfile`` header as
disk data). A block whose data lies past the end of the file is a FormatError when read, and an
error in ``check``. A dirty log opened read-only is replayed in memory (``overlay.py``); writing
lives in ``write.py`` (a mixin), so that this module stays about reading.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from typing import Any

from ...block.driver import Finding, error, note
from ...block.extent import Extent, Kind, run_end
from ...block.image import Image
from ...block.rawfile import RawFile
from ...errors import FormatError
from . import spec
from .bat import ENTRIES_PER_PAGE, PAGE, Bat, PageCache
from .bitmap import runs_of
from .layout import VhdxLayout
from .log import ReplayPlan
from .overlay import ReplayOverlay
from .write import VhdxWriter

S = spec
_ZERO_STATES = (S.PAYLOAD_ZERO, S.PAYLOAD_UNMAPPED, S.PAYLOAD_UNMAPPED_V095, S.PAYLOAD_UNDEFINED)
MAX_FINDINGS = 50


# VHDX keeps its own pending pages (BAT and bitmap pages, logged whole) rather than
# block/pending.py's tables, so its commit hooks are typed by the mixin.
class VhdxImage(VhdxWriter, Image):  # type: ignore[misc]
    format = "vhdx"

    def __init__(
        self,
        path: str,
        f: RawFile,
        layout: VhdxLayout,
        view: Any,
        file_size: int,
        plan: ReplayPlan | None = None,
        overlay: ReplayOverlay | None = None,
        log_state: str = "clean",
    ) -> None:
        super().__init__(path, layout.virtual_size, f.writable)
        self.file = f
        self.layout = layout
        self.view = view  # pread through the replayed log (metadata)
        self.file_size = file_size  # as replayed: includes growth to LastFileOffset
        self.plan = plan
        self.overlay = overlay
        self.log_state = log_state  # "clean" | "replayed in memory" | "replayed on disk"
        self.differencing = layout.has_parent
        self.type = (
            "differencing" if layout.has_parent else "fixed" if layout.leave_block_allocated else "dynamic"
        )
        self.block_size = self.allocation_unit = layout.block_size
        self.sector_size = layout.logical_sector_size
        self.geometry = layout.geometry
        self.sectors_per_block = self.block_size // self.sector_size
        direct = plan is None or log_state != "replayed in memory"  # view == the file itself
        self.bat = Bat(
            view,
            layout.bat_offset,
            layout.geometry.entry_count,
            next_data=self._next_data if direct else None,
        )
        self.bitmaps = PageCache(view, "sector bitmap")
        self._hole = Kind.BACKING if self.differencing else Kind.ZERO
        self._allocated: int | None = None  # allocated block count, once scanned
        self.data_write_guid = layout.header.data_write_guid
        self._init_writer()

    def _next_data(self, offset: int) -> int:
        """The next offset at or after ``offset`` that is not a hole (SEEK_DATA)."""
        try:
            return os.lseek(self.file.fd, offset, os.SEEK_DATA)  # type: ignore[union-attr]
        except OSError as exc:  # ENXIO: only holes from here to the end
            return 1 << 62 if exc.errno == errno.ENXIO else offset

    # -- reading ------------------------------------------------------------------------------

    def entry(self, block: int) -> int:
        return self.bat[self.geometry.payload_index(block)]

    def _block_offset(self, block: int, entry: int, need: int) -> int:
        """The file offset of a present block, refusing offsets no writer makes."""
        off = S.bat_offset(entry)
        if off < S.HEADER_AREA_SIZE:
            raise FormatError(f"BAT: block {block} is at offset {off}, inside the header area", self.path)
        if off + need > self.file_size:
            raise FormatError(
                f"BAT: block {block} at offset {off} has data past the end of "
                f"the file ({self.file_size} bytes)",
                self.path,
            )
        return off

    def _data(self, pos: int, n: int, file_offset: int, layer_fd: int) -> Iterator[Extent]:
        if self.overlay is None:
            yield Extent(pos, n, Kind.DATA, layer_fd, file_offset)
            return
        for fd, fo, length in self.overlay.split(layer_fd, file_offset, n):
            yield Extent(pos + fo - file_offset, length, Kind.DATA, fd, fo)

    def bitmap_location(self, block: int) -> int:
        """File offset of the first bitmap byte of ``block`` (its chunk's bitmap must exist)."""
        chunk = block // self.geometry.chunk_ratio
        bm = self.bat[self.geometry.bitmap_index(chunk)]
        if S.bat_state(bm) != S.SB_PRESENT:
            raise FormatError(
                f"BAT: block {block} is PARTIALLY_PRESENT but chunk {chunk} has "
                f"no sector bitmap (state {S.bat_state(bm)})",
                self.path,
            )
        off = S.bat_offset(bm)
        if off < S.HEADER_AREA_SIZE or off + S.BITMAP_BLOCK_SIZE > self.file_size:
            raise FormatError(
                f"BAT: sector bitmap of chunk {chunk} at offset {off} lies outside the file", self.path
            )
        first = (block % self.geometry.chunk_ratio) * self.sectors_per_block
        return off + first // 8

    def block_bits(self, block: int, s0: int, s1: int) -> int:
        """Bitmap bits of sectors [s0, s1) of ``block``; bit 0 is sector s0 (LSB-first)."""
        base = self.bitmap_location(block)
        b0, b1 = s0 >> 3, (s1 + 7) >> 3
        raw = self.bitmaps.read(base + b0, b1 - b0)
        return (int.from_bytes(raw, "little") >> (s0 & 7)) & ((1 << (s1 - s0)) - 1)

    def maps_without_io(self, offset: int, length: int) -> bool:
        """Every BAT page the range needs is cached, and so is every sector-bitmap page of a
        PARTIALLY_PRESENT block in it: else a trio front end maps in a worker thread, so a cold
        BAT or bitmap page never blocks the event loop (and every other request) on a read."""
        B, G, cached = self.block_size, self.geometry, self.bat.pages
        b, last = offset // B, (offset + max(length, 1) - 1) // B
        while b <= last:
            index = G.payload_index(b)
            page = cached.get(index // ENTRIES_PER_PAGE)
            if page is None:
                return False
            state = page[index % ENTRIES_PER_PAGE] & S.BAT_STATE_MASK
            if self.differencing and state == S.PAYLOAD_PARTIALLY_PRESENT:
                if G.bitmap_index(b // G.chunk_ratio) // ENTRIES_PER_PAGE not in cached:
                    return False
                try:
                    base = self.bitmap_location(b)
                except FormatError:
                    return True  # map_layer raises the same error, without reading
                bstart = b * B
                s0 = (max(offset, bstart) - bstart) // self.sector_size
                s1 = -(-(min(offset + length, bstart + B) - bstart) // self.sector_size)
                first, end = base + (s0 >> 3), base + ((s1 + 7) >> 3)
                pages = self.bitmaps.pages
                if any(p not in pages for p in range(first - first % PAGE, end, PAGE)):
                    return False
            b += 1
        return True

    def _state(self, b: int) -> int:
        return self.entry(b) & S.BAT_STATE_MASK

    def map_layer(self, offset: int, length: int) -> Iterator[Extent]:
        assert self.file is not None
        B, end, pos, fd = self.block_size, offset + length, offset, self.file.fd
        SS = self.sector_size
        while pos < end:
            b = pos // B
            bstart = b * B
            bend = min(bstart + B, end)
            entry = self.entry(b)
            state = entry & S.BAT_STATE_MASK
            if state == S.PAYLOAD_FULLY_PRESENT:
                off = self._block_offset(b, entry, bend - bstart)
                yield from self._data(pos, bend - pos, off + pos - bstart, fd)
            elif state == S.PAYLOAD_NOT_PRESENT:  # a run of them is one extent
                bend = min(run_end(b, (end - 1) // B, self._state) * B, end)
                yield Extent(pos, bend - pos, self._hole)
            elif state in _ZERO_STATES:
                yield Extent(pos, bend - pos, Kind.ZERO)
            elif state == S.PAYLOAD_PARTIALLY_PRESENT and self.differencing:
                off = self._block_offset(b, entry, bend - bstart)
                s0, s1 = (pos - bstart) // SS, -(-(bend - bstart) // SS)
                for a, z, is_set in runs_of(self.block_bits(b, s0, s1), s1 - s0):
                    lo = max(pos, bstart + (s0 + a) * SS)
                    hi = min(bend, bstart + (s0 + z) * SS)
                    if is_set:
                        yield from self._data(lo, hi - lo, off + lo - bstart, fd)
                    else:
                        yield Extent(lo, hi - lo, Kind.BACKING)
            else:
                what = S.PAYLOAD_STATES.get(state, f"reserved state {state}")
                raise FormatError(f"BAT: block {b} has {what}, invalid in a {self.type} file", self.path)
            pos = bend

    # -- facts --------------------------------------------------------------------------------

    def identity(self) -> str:
        return str(self.data_write_guid)

    def allocated_blocks(self) -> int:
        if self._allocated is None:
            ratio, n = self.geometry.chunk_ratio, 0
            for i, e in self.bat.scan():
                if (i + 1) % (ratio + 1) and (e & 7) in (
                    S.PAYLOAD_FULLY_PRESENT,
                    S.PAYLOAD_PARTIALLY_PRESENT,
                ):
                    n += 1
            self._allocated = n
        return self._allocated

    def allocated_bytes(self) -> int:
        """Allocated blocks times the block size (capped): no bitmap walk, no full map."""
        return min(self.size, self.allocated_blocks() * self.block_size)

    def _log_text(self) -> str:
        p = self.plan
        if p is None:
            return "clean"
        if not p.entry_count:
            return f"{self.log_state} (LogGuid set, no valid entry: nothing to replay)"
        return f"{self.log_state}: {p.entry_count} entries, sequence {p.first_sequence}..{p.last_sequence}"

    def describe(self) -> dict[str, Any]:
        L = self.layout
        h = self.journal.header if self.journal is not None else L.header
        out: dict[str, Any] = {
            "format": "vhdx",
            "type": self.type,
            "block_size": self.block_size,
            "logical_sector_size": L.logical_sector_size,
            "physical_sector_size": L.physical_sector_size,
            "creator": L.creator,
            "file_write_guid": str(h.file_write_guid),
            "data_write_guid": str(self.data_write_guid),
            "log_guid": str(h.log_guid),
            "page83": str(L.page83),
            "header_sequence": h.sequence_number,
            "header_slot": self.journal.slot if self.journal is not None else L.header_slot,
            "region_table": L.region_table_slot,
            "log": self._log_text(),
            "log_offset": h.log_offset,
            "log_length": h.log_length,
            "bat_offset": L.bat_offset,
            "bat_entries": L.geometry.entry_count,
            "chunk_ratio": L.geometry.chunk_ratio,
            "total_blocks": L.geometry.payload_blocks,
            "allocated_blocks": self.allocated_blocks(),
        }
        if L.parent_locator is not None:
            out["parent_locator"] = dict(L.parent_locator)
            out["parent_locator_keys"] = sorted(L.parent_locator)
        return out

    def check(self) -> list[Finding]:
        """Layout findings, the log replay, and every BAT entry against the file and the spec."""
        out: list[Finding] = []
        for f in self.layout.findings:
            if f.startswith("log: dirty"):
                continue  # said once below, with what was done
            out.append(error(f) if "past the end" in f else note(f))
        if self.plan is not None:
            out.append(note(f"log: {self._log_text()}"))
        out += self._check_bat()
        return out[: MAX_FINDINGS + len(self.layout.findings) + 1]

    def _reserved_spans(self) -> list[tuple[int, int, str]]:
        L = self.layout
        spans = [(0, S.HEADER_AREA_SIZE, "the header area")]
        spans += [
            (r.file_offset, r.file_offset + r.length, S.REGION_NAMES.get(r.guid, "a region") + " region")
            for r in L.regions
        ]
        if L.log_length:
            spans.append((L.log_offset, L.log_offset + L.log_length, "the log"))
        return spans

    def _check_bat(self) -> list[Finding]:
        out: list[Finding] = []
        ratio, B, G = self.geometry.chunk_ratio, self.block_size, self.geometry
        spans = self._reserved_spans()
        used: dict[int, int] = {}
        partial_chunks: set[int] = set()
        present_chunks: set[int] = set()

        def add(f: Finding) -> None:
            if len(out) < MAX_FINDINGS:
                out.append(f)

        try:
            entries = list(self.bat.scan())
        except FormatError as exc:
            return [error(exc.message)]
        for i, e in entries:
            state, off = e & 7, S.bat_offset(e)
            if (i + 1) % (ratio + 1) == 0:  # a sector bitmap entry
                c = i // (ratio + 1)
                if state == S.SB_NOT_PRESENT:
                    continue
                if state != S.SB_PRESENT:
                    add(error(f"BAT: sector bitmap {c} has invalid state {state}"))
                    continue
                if not self.differencing:
                    add(note(f"BAT: sector bitmap {c} marked present in a {self.type} file (ignored)"))
                    continue
                present_chunks.add(c)
                length, what = S.BITMAP_BLOCK_SIZE, f"sector bitmap {c}"
            else:
                b = i - i // (ratio + 1)
                if b >= G.payload_blocks:
                    continue
                if state in _ZERO_STATES or state == S.PAYLOAD_NOT_PRESENT:
                    if off and state == S.PAYLOAD_ZERO:
                        add(note(f"BAT: ZERO block {b} has a non-zero offset {off} (Hyper-V rejects that)"))
                    continue
                if state == S.PAYLOAD_PARTIALLY_PRESENT and self.differencing:
                    partial_chunks.add(b // ratio)
                elif state != S.PAYLOAD_FULLY_PRESENT:
                    add(
                        error(
                            f"BAT: block {b} has "
                            f"{S.PAYLOAD_STATES.get(state, f'reserved state {state}')}, "
                            f"invalid in a {self.type} file"
                        )
                    )
                    continue
                length, what = min(B, self.size - b * B), f"block {b}"
            if off + length > self.file_size:
                add(
                    error(
                        f"BAT: {what} at offset {off} has data past the end of the file "
                        f"({self.file_size} bytes)"
                    )
                )
            for s, t, name in spans:
                if off < t and off + length > s:
                    add(error(f"BAT: {what} at offset {off} overlaps {name}"))
                    break
            mb = off >> 20
            if mb in used:
                add(error(f"BAT: {what} at offset {off} shares its space with another entry"))
            used[mb] = i
        for c in sorted(partial_chunks - present_chunks):
            add(error(f"BAT: chunk {c} has PARTIALLY_PRESENT blocks but no sector bitmap"))
        return out

    def _close_files(self) -> None:
        try:
            super()._close_files()
        finally:
            if self.overlay is not None:
                self.overlay.close()


def new_guid() -> uuid.UUID:
    return uuid.UUID(bytes=os.urandom(16), version=4)
