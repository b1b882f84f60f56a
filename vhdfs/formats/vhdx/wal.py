"""The VHDX write-ahead log and header protocol of a writable open ([MS-VHDX] §2.2.2, §2.3).

``VhdxLog`` owns every write to a writable VHDX file's headers and log; the image driver owns
the data blocks and hands each batch of metadata pages (BAT and sector-bitmap pages, any 4 KiB
page at or above 192 KiB outside the log) to :meth:`VhdxLog.commit`.

Header update (every change to a header): build the current header with sequence+1 and the
changed fields, write it to the NON-current slot, fdatasync -- it is now current; then write
the same header with sequence+2 to the other slot, fdatasync (the spec's SHOULD: both slots
fresh, so one torn header write can never leave no valid header). A sequence number that would
pass 2^64-1 is refused (UnsupportedError), never wrapped.

:meth:`VhdxLog.open_writable`, before anything else in the file changes:
  1. if the log is dirty: a header update with a new FileWriteGuid (LogGuid kept, so a crash
     here replays again); replay the active sequence on disk (``ReplayPlan.apply``);
     fdatasync; extend the file to ``plan.new_file_size``; fdatasync;
  2. a header update with the session's new FileWriteGuid and a new random LogGuid (from here
     on only entries of this session count: the old ones are dead before any is overwritten);
  3. the log initialised with an empty entry (sequence 1, at log offset 0); fdatasync.

:meth:`VhdxLog.mark_data_changed`: once per open, before the first change a reader of the
virtual disk can see, a header update with a new DataWriteGuid (a no-op after the first call).

:meth:`VhdxLog.commit` (``pages``: file offset -> 4096 bytes, ``zeros``: offset -> length):
  1. fdatasync (``flush_data=True``, the default): the data blocks the pages point at, and the
     file size, are durable before any entry names them (skip only if the caller just flushed);
  2. room: the entry must fit in the log without touching the protected entries -- those from
     the oldest entry whose in-place pages are not yet known durable, through the newest
     durable entry (overwriting the newest would let replay fall back to an older entry and
     revert pages). If it does not fit: fdatasync (the pending in-place pages become durable);
     if still not: an empty entry, fdatasync, so only that 4 KiB entry is protected;
  3. one entry with every page and zero run: Tail = the oldest pending entry (or itself),
     sequence = previous + 1, FlushedFileOffset = the file size, LastFileOffset = the end of
     the file or of the furthest page, whichever is larger; written circularly (it may wrap the
     log's end); fdatasync -- the commit is now durable, and replay would redo it;
  4. the zero runs, then the pages, written in place (page wins where both, as in replay);
  5. fdatasync (``sync_in_place=True``, the default): the entry is no longer needed, and the
     next entry's Tail moves past it. With ``sync_in_place=False`` this flush is left to the
     next commit's step 1 (two flushes per commit instead of three); the entry stays named by
     the next Tail until then.
A commit larger than one entry can hold (``max_commit_pages``) is refused with ValueError, or
with ``split=True`` committed as several entries, each atomic on its own: pages outside the
BAT region (sector bitmaps) in the first parts, BAT pages last.

:meth:`VhdxLog.close`: fdatasync, then a header update clearing LogGuid (a clean file).

A crash at any point leaves a file whose replay gives, for each commit, all of its pages or
none of them, and every commit whose step 3 flush returned.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid

from ...block.rawfile import RawFile
from ...errors import FormatError, UnsupportedError, VhdfsError
from . import log as vlog
from . import spec
from .layout import VhdxLayout
from .logspec import descriptor_area_length

SECTOR = spec.LOG_SECTOR
MAX_SEQUENCE = (1 << 64) - 1
EMPTY_ENTRY = SECTOR


class VhdxLog:
    """Headers and log of one VHDX file opened for writing (``f`` must be writable).

    ``layout`` is what ``layout.open_layout`` returned for this file (read through the replay
    overlay when the log was dirty). Not usable until :meth:`open_writable`.
    """

    def __init__(self, f: RawFile, layout: VhdxLayout) -> None:
        self.f = f
        self.layout = layout
        self._header = layout.header
        self._slot = layout.header_slot
        self._lock = threading.RLock()
        self._open = False
        self._data_changed = False
        self.replayed: vlog.ReplayPlan | None = None  # what open_writable replayed, if any
        self._log_offset = layout.header.log_offset
        self._log_length = layout.header.log_length
        self._seq = 1  # sequence number of the next entry
        self._head = 0  # log offset where the next entry goes
        self._latest = (0, 0)  # (log offset, length) of the newest durable entry
        self._pending: list[tuple[int, int]] = []  # entries whose pages may not be durable in place

    # --- state ---------------------------------------------------------------------------
    @property
    def header(self) -> spec.Header:
        """The current header as on disk."""
        return self._header

    @property
    def log_guid(self) -> uuid.UUID:
        return self._header.log_guid

    @property
    def sequence_number(self) -> int:
        """Sequence number the next log entry will carry."""
        return self._seq

    @property
    def tail(self) -> int:
        """Log offset of the oldest entry still needed (what the next entry's Tail says)."""
        return self._pending[0][0] if self._pending else self._head

    def max_commit_pages(self, zero_runs: int = 0) -> int:
        """Most pages one entry holds next to ``zero_runs`` zero runs (after a 4 KiB entry)."""
        room = self._log_length - EMPTY_ENTRY
        n = max(0, room // SECTOR - 1)
        while n > 0 and descriptor_area_length(n + zero_runs) + SECTOR * n > room:
            n -= 1
        return n

    # --- headers -------------------------------------------------------------------------
    def _write_header(self, slot: int, h: spec.Header) -> None:
        self.f.pwrite(spec.pack_header(h), spec.HEADER1_OFFSET if slot == 1 else spec.HEADER2_OFFSET)
        self.f.sync()

    def update_header(self, **changes: object) -> spec.Header:
        """Header update: sequence+1 to the non-current slot, flush; sequence+2 to the other."""
        with self._lock:
            cur = self._header
            if cur.sequence_number + 2 > MAX_SEQUENCE:
                raise UnsupportedError(
                    f"header sequence number {cur.sequence_number} would "
                    "overflow: refusing to update the headers",
                    self.f.path,
                )
            first = dataclasses.replace(cur, sequence_number=cur.sequence_number + 1, checksum=0, **changes)  # type: ignore[arg-type]  # Header fields by name
            self._write_header(3 - self._slot, first)
            self._header, self._slot = first, 3 - self._slot
            second = dataclasses.replace(first, sequence_number=first.sequence_number + 1)
            self._write_header(3 - self._slot, second)
            self._header, self._slot = second, 3 - self._slot
            return second

    # --- open / close --------------------------------------------------------------------
    def open_writable(self, plan: vlog.ReplayPlan | None = None) -> vlog.ReplayPlan | None:
        """Replay a dirty log on disk, start this session's log; returns what was replayed.

        ``plan`` is the one ``open_layout`` returned (computed again when None and dirty).
        """
        with self._lock:
            if self._open:
                return self.replayed
            f, h = self.f, self._header
            if not f.writable:
                raise VhdfsError("opened read-only: cannot start the VHDX log", f.path)
            if h.log_length < spec.MiB or h.log_offset < spec.HEADER_AREA_SIZE:
                raise UnsupportedError(
                    f"log region at {h.log_offset} length {h.log_length}: cannot write without a log", f.path
                )
            if f.size() < h.log_offset + h.log_length:
                raise FormatError(f"log region at {h.log_offset} runs past the end of the file", f.path)
            session_fwg = uuid.uuid4()
            if h.log_guid != spec.NULL_GUID:
                if plan is None:
                    plan = vlog.plan_replay(f.pread, h.log_guid, h.log_offset, h.log_length, f.size())
                self.update_header(file_write_guid=session_fwg)
                assert plan is not None
                plan.apply(f.pwrite)
                f.sync()
                size = plan.new_file_size(f.size())
                if size > f.size():
                    f.truncate(size)
                    f.sync()
                self.replayed = plan
            guid = uuid.uuid4()
            self.update_header(file_write_guid=session_fwg, log_guid=guid)
            self._seq, self._head, self._pending = 1, 0, []
            self._write_entry(vlog.build_empty_entry(guid, 1, 0, f.size(), f.size()))
            f.sync()
            self._durable_entry(0, EMPTY_ENTRY)
            self._open = True
            return self.replayed

    def mark_data_changed(self) -> bool:
        """New DataWriteGuid before the first guest-visible change; True when it updated."""
        with self._lock:
            self._need_open()
            if self._data_changed:
                return False
            self.update_header(data_write_guid=uuid.uuid4())
            self._data_changed = True
            return True

    def close(self) -> None:
        """Flush, then clear LogGuid (a clean close). Idempotent; the RawFile stays open."""
        with self._lock:
            if not self._open:
                return
            self.f.sync()
            self._pending = []
            self.update_header(log_guid=spec.NULL_GUID)
            self._open = False

    def _need_open(self) -> None:
        if not self._open:
            raise VhdfsError("the VHDX log is not open for writing (open_writable first)", self.f.path)

    # --- commit --------------------------------------------------------------------------
    def commit(
        self,
        pages: dict[int, bytes],
        zeros: dict[int, int] | None = None,
        *,
        flush_data: bool = True,
        sync_in_place: bool = True,
        split: bool = False,
    ) -> None:
        """Make ``pages`` (and zero runs) durable through the log, then write them in place."""
        zeros = dict(zeros or {})
        with self._lock:
            self._need_open()
            self._check(pages, zeros)
            if not pages and not zeros:
                return
            limit = self.max_commit_pages(len(zeros))
            if len(pages) > limit:
                if not split or limit == 0:
                    raise ValueError(
                        f"a commit of {len(pages)} pages and {len(zeros)} zero runs "
                        f"does not fit one entry of the {self._log_length}-byte log "
                        f"(at most {limit} pages; split=True commits it in parts)"
                    )
                # pages outside the BAT first (sector bitmaps, metadata), then the BAT pages
                # that may point at them: a cut between parts leaves no BAT entry ahead of its
                # bitmap
                bat = (self.layout.bat_offset, self.layout.bat_offset + self.layout.bat_length)
                keys = sorted(pages, key=lambda o: (bat[0] <= o < bat[1], o))
                first = True
                for i in range(0, len(keys), limit):
                    part = {k: pages[k] for k in keys[i : i + limit]}
                    self._commit_one(part, zeros if first else {}, flush_data and first, sync_in_place)
                    first = False
                    limit = self.max_commit_pages(0)
                return
            self._commit_one(pages, zeros, flush_data, sync_in_place)

    def _check(self, pages: dict[int, bytes], zeros: dict[int, int]) -> None:
        log_start, log_end = self._log_offset, self._log_offset + self._log_length
        spans = [(o, SECTOR) for o in pages] + list(zeros.items())
        for off, length in spans:
            if off % SECTOR or length <= 0 or length % SECTOR:
                raise ValueError(f"log write at {off} length {length} is not whole 4 KiB pages")
            if off < spec.LOGGABLE_OFFSET:
                raise ValueError(f"log write at {off}: headers (below 192 KiB) are never logged")
            if off < log_end and off + length > log_start:
                raise ValueError(f"log write at {off} length {length} overlaps the log")
        for off, page in pages.items():
            if len(page) != SECTOR:
                raise ValueError(f"page at {off} is {len(page)} bytes, not 4096")

    def _protected(self) -> int:
        """Bytes of log from the oldest needed entry through the newest durable one."""
        start = self._pending[0][0] if self._pending else self._latest[0]
        return (self._head - start) % self._log_length or self._log_length

    def _commit_one(
        self, pages: dict[int, bytes], zeros: dict[int, int], flush_data: bool, sync_in_place: bool
    ) -> None:
        f = self.f
        if flush_data:
            f.sync()
            self._pending = []
        length = descriptor_area_length(len(pages) + len(zeros)) + SECTOR * len(pages)
        if length > self._log_length - self._protected():
            if self._pending:
                f.sync()
                self._pending = []
            if length > self._log_length - self._protected():
                size = f.size()
                self._write_entry(vlog.build_empty_entry(self.log_guid, self._seq, self._head, size, size))
                f.sync()
                self._durable_entry(self._head, EMPTY_ENTRY)
        assert length <= self._log_length - self._protected()
        size = f.size()
        last = max([size] + [o + SECTOR for o in pages] + [o + n for o, n in zeros.items()])
        at = self._head
        entry = vlog.build_entry(self.log_guid, self._seq, self.tail, pages, size, last, zeros)
        assert len(entry) == length
        self._write_entry(entry)
        f.sync()
        self._durable_entry(at, length)
        self._pending.append((at, length))
        for off, n in sorted(zeros.items()):
            f.write_parts([n], off)
        run_start, run = 0, list[bytes]()
        for off in sorted(pages):
            if run and off != run_start + SECTOR * len(run):
                f.pwrite(b"".join(run), run_start)
                run = []
            if not run:
                run_start = off
            run.append(pages[off])
        if run:
            f.pwrite(b"".join(run), run_start)
        if sync_in_place:
            f.sync()
            self._pending = []

    def _write_entry(self, entry: bytes) -> None:
        """Write at the head, wrapping at the log's end (at most two pwrites)."""
        first = min(len(entry), self._log_length - self._head)
        self.f.pwrite(entry[:first], self._log_offset + self._head)
        if first < len(entry):
            self.f.pwrite(entry[first:], self._log_offset)

    def _durable_entry(self, at: int, length: int) -> None:
        self._latest = (at, length)
        self._head = (at + length) % self._log_length
        self._seq += 1
