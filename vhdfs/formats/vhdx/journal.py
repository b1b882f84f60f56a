"""The small write-ahead interface the VHDX write path needs: header updates and logged pages.

``write.py`` talks only to the four operations below (``start``, ``new_data_write_guid``,
``log_pages``, ``close``) plus ``header``/``slot``. ``open_journal`` serves them from
``wal.VhdxLog`` (the project's write-ahead log, written alongside) through ``WalJournal``; the
self-contained ``MetadataJournal`` is the stand-in this driver was first written against, kept
for when ``wal.py`` is absent and as a second implementation the tests can run the write path
on (``USE_WAL = False``). The protocol, from [MS-VHDX] §2.2.2 and §2.3 and OpenVMM:

- ``update_header(**changes)``: headers are never logged. Build the new header with
  SequenceNumber+1 and write it to the *non-current* slot, then flush: only then is it current,
  so a torn write can never destroy the one good header (FATtools' bug).
- ``start(replay)``: on a writable open, before anything else in the file changes, a header
  update with a new FileWriteGuid (LogGuid unchanged, so a crash mid-replay replays again);
  then the dirty log is replayed on disk and flushed; then a fresh log (an empty entry with a
  new LogGuid, sequence 1, at log offset 0) and a header update naming it.
- ``log_pages(pages, file_size)``: the caller has made the data those pages point at durable.
  One entry carries every page (split when the log is too small), is flushed, and then the pages
  go to their place. Each entry's Tail is itself: the pages of earlier entries are already in
  place and were flushed by the data sync that precedes every commit.
- ``close()``: with everything flushed, a header update with a zero LogGuid (a clean file).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

from ...block.rawfile import RawFile
from ...errors import FormatError
from . import log as vlog
from . import spec
from .layout import VhdxLayout
from .logspec import descriptor_area_length

SECTOR = spec.LOG_SECTOR


def new_guid() -> uuid.UUID:
    return uuid.UUID(bytes=os.urandom(16), version=4)


class MetadataJournal:
    def __init__(self, f: RawFile, layout: VhdxLayout) -> None:
        self.f = f
        self.header = layout.header
        self.slot = layout.header_slot
        self.log_offset = layout.header.log_offset
        self.log_length = layout.header.log_length
        self.head = 0                  # log offset of the next entry
        self.sequence = 0              # of the last entry written
        if self.log_length < 2 * SECTOR:
            raise FormatError(f"log: {self.log_length} bytes is too small to write through")
        # pages per entry: descriptors and data sectors must fit the log
        n = (self.log_length - SECTOR) // SECTOR
        while n > 1 and descriptor_area_length(n) + n * SECTOR > self.log_length:
            n -= 1
        self.max_pages = n

    # -- headers --------------------------------------------------------------------------------

    def update_header(self, **changes: object) -> None:
        seq = self.header.sequence_number + 1
        if seq >= 1 << 64:
            raise FormatError("header: sequence number would overflow")
        new = replace(self.header, sequence_number=seq, **changes)  # type: ignore[arg-type]
        other = 3 - self.slot
        self.f.pwrite(spec.pack_header(new),
                      spec.HEADER1_OFFSET if other == 1 else spec.HEADER2_OFFSET)
        self.f.sync()
        self.header, self.slot = new, other

    # -- session --------------------------------------------------------------------------------

    def start(self, plan: vlog.ReplayPlan | None, file_size: int) -> int:
        """Header update, on-disk replay, fresh log; returns the file size after replay."""
        self.update_header(file_write_guid=new_guid())
        if plan is not None:
            plan.apply(self.f.pwrite)
            size = plan.new_file_size(file_size)
            if size > file_size:
                self.f.truncate(size)
            file_size = size
            self.f.sync()
        log_guid = new_guid()
        self.sequence, self.head = 0, 0
        self._write_entry(log_guid, {}, file_size)
        self.f.sync()
        self.update_header(log_guid=log_guid)
        return file_size

    def new_data_write_guid(self) -> uuid.UUID:
        guid = new_guid()
        self.update_header(data_write_guid=guid)
        return guid

    def log_pages(self, pages: dict[int, bytes], file_size: int) -> None:
        """Log ``pages`` (file offset -> 4 KiB), flush, write them in place (no final flush)."""
        items = sorted(pages.items())
        for i in range(0, len(items), self.max_pages):
            batch = dict(items[i:i + self.max_pages])
            if i:
                self.f.sync()           # the previous batch in place before its entry is dropped
            self._write_entry(self.header.log_guid, batch, file_size)
            self.f.sync()
            for off, page in batch.items():
                self.f.pwrite(page, off)

    def close(self) -> None:
        """The caller flushed everything: mark the file clean."""
        if self.header.log_guid != spec.NULL_GUID:
            self.update_header(log_guid=spec.NULL_GUID)

    @property
    def max_commit_pages(self) -> int:
        return self.max_pages

    def _write_entry(self, log_guid: uuid.UUID, pages: dict[int, bytes], file_size: int) -> None:
        self.sequence += 1
        raw = vlog.build_entry(log_guid, self.sequence, self.head, pages, file_size, file_size)
        at = self.head
        first = min(len(raw), self.log_length - at)
        self.f.pwrite(raw[:first], self.log_offset + at)
        if first < len(raw):            # circular: the rest wraps to the start of the log
            self.f.pwrite(raw[first:], self.log_offset)
        self.head = (at + len(raw)) % self.log_length


try:
    from .wal import VhdxLog
except ImportError:  # pragma: no cover - wal.py is written alongside; the stand-in serves
    VhdxLog = None  # type: ignore[assignment,misc]

USE_WAL = VhdxLog is not None


class WalJournal:
    """The journal operations on ``wal.VhdxLog``."""

    def __init__(self, f: RawFile, layout: VhdxLayout) -> None:
        assert VhdxLog is not None
        self.f = f
        self.log = VhdxLog(f, layout)

    @property
    def header(self) -> spec.Header:
        return self.log.header

    @property
    def slot(self) -> int:
        return int(getattr(self.log, "_slot", 0))

    @property
    def sequence(self) -> int:
        return self.log.sequence_number - 1

    @property
    def max_commit_pages(self) -> int:
        return self.log.max_commit_pages()

    def start(self, plan: vlog.ReplayPlan | None, file_size: int) -> int:
        self.log.open_writable(plan)
        return self.f.size()

    def new_data_write_guid(self) -> uuid.UUID:
        self.log.mark_data_changed()
        return self.log.header.data_write_guid

    def log_pages(self, pages: dict[int, bytes], file_size: int) -> None:
        # The caller's commit has just synced the data; the in-place pages become durable at
        # the next commit's sync or the flush that follows (``Image.flush``).
        self.log.commit(pages, flush_data=True, sync_in_place=False, split=True)

    def close(self) -> None:
        self.log.close()


def open_journal(f: RawFile, layout: VhdxLayout) -> MetadataJournal | WalJournal:
    return WalJournal(f, layout) if USE_WAL else MetadataJournal(f, layout)
