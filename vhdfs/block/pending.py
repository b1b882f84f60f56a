"""Group commit of metadata that points at data: written once here, for every format.

A sparse format points at its data through metadata (VHD's BAT and differencing bitmaps, VDI's
block map and ``blocks_allocated``, VHDX's 64-bit BAT). That metadata must never reach the disk
before the data it points at, and an fdatasync per new block costs a third of sequential write
speed, so a driver keeps it *pending* in memory (already published to its own readers) and the
``Image.commit`` template writes it in groups: snapshot under ``meta_lock`` → one sync without
the lock → write what is still due. The rule for that last step lives here, once:

- **due** is what the snapshot holds and is *still pending unchanged*; anything changed since
  the snapshot may point at data the sync did not cover, so it waits for the next commit (and an
  older value never overwrites a newer one on disk);
- a **failure** (the commit's sync, or a write here) rolls back in memory exactly what the file
  lacks, through the driver's rollback callback, then propagates: the open image never claims
  what the file does not hold;
- in every case what was due leaves the pending set (written, or rolled back).

The pieces, each a :class:`Pending` part: :class:`PendingTable` (an array of fixed-width entries
of any width and byte order, written as one write per run of adjacent entries),
:class:`PendingBlobs` (whole per-block blobs, e.g. VHD differencing bitmaps) and
:class:`PendingCounter` (a file field that only grows, e.g. VDI's ``blocks_allocated``).
:class:`PendingGroup` writes several parts in order; once one fails, every later part rolls
back all it had due, so nothing written after a failure can point at what was rolled back.

**The seam for a journalled format.** Parts write through ``target.pwrite(data, offset)``
(a ``RawFile``, looked up at each call). A driver that must route its metadata through a log
(VHDX) either passes a target that stages each write into its log, or calls
``PendingTable.write_snapshot(..., write_runs=...)``: the table then hands over every due run
as :class:`TableWrite` ``(offset, data)`` pairs in one call, and a failure of that call rolls
back all of them (a log transaction lands whole or not at all). ``TableWrite.indices`` says
which entries a run carries, for a driver that rewrites whole pages rather than runs.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

# Commit at the latest once this many bytes of new blocks are pending: bounds the space a crash
# leaks (an unflushed write's block, written but never pointed at) and the entries held in memory.
COMMIT_BYTES = 256 * 1024 * 1024


def commit_every(block_size: int) -> int:
    """How many pending entries trigger a commit for blocks of ``block_size`` bytes."""
    return max(1, COMMIT_BYTES // block_size)


class PwriteTarget(Protocol):
    """Where a part's bytes go: a ``RawFile``, or a driver's log staging area."""

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...


S = TypeVar("S")


class Pending(abc.ABC, Generic[S]):
    """One kind of pending metadata. All methods are called with the image's ``meta_lock`` held."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many items are pending (what ``commit_due`` counts)."""

    @abc.abstractmethod
    def snapshot(self) -> S | None:
        """A copy of what is pending now; None when nothing is."""

    @abc.abstractmethod
    def write_snapshot(self, snapshot: S, sync_failed: BaseException | None = None) -> None:
        """Write what of ``snapshot`` is still pending unchanged; on failure roll back and raise.

        ``sync_failed`` (the sync before this write failed) writes nothing, rolls back all that
        is due and re-raises it.
        """


@dataclass(frozen=True)
class TableWrite:
    """One run of adjacent table entries, ready to write: ``data`` at file ``offset``."""

    offset: int
    data: bytes
    indices: range


class PendingTable(Pending[dict[int, int]]):
    """New entries of one on-disk table of fixed-width entries, and what the file holds for each.

    ``entry_format`` is a one-entry ``struct`` format: ``">I"`` (VHD), ``"<I"`` (VDI), ``"<Q"``
    (VHDX). Entry ``i`` lives at ``table_offset + i * entry size``. ``rollback(i, file_entry)``
    puts the driver's in-memory view of entry ``i`` back to what the file holds.
    """

    def __init__(
        self, entry_format: str, table_offset: int, target: PwriteTarget, rollback: Callable[[int, int], None]
    ) -> None:
        self.entry = struct.Struct(entry_format)
        if len(self.entry.unpack(bytes(self.entry.size))) != 1:
            raise ValueError(f"{entry_format!r} is not a one-entry struct format")
        self.table_offset = table_offset
        self.target = target
        self.rollback = rollback
        self._new: dict[int, int] = {}
        self._file: dict[int, int] = {}  # index -> the entry the file holds (for a rollback)

    def __len__(self) -> int:
        return len(self._new)

    def __contains__(self, index: object) -> bool:
        return index in self._new

    def get(self, index: int) -> int | None:
        return self._new.get(index)

    def set(self, index: int, entry: int, file_entry: int) -> None:
        """Entry ``index`` becomes ``entry`` at the next commit; the file holds ``file_entry``.

        Setting an index already pending keeps the first ``file_entry`` (the file still holds it).
        """
        self._file.setdefault(index, file_entry)
        self._new[index] = entry

    def snapshot(self) -> dict[int, int] | None:
        return dict(self._new) if self._new else None

    def due(self, snapshot: Mapping[int, int]) -> dict[int, int]:
        """The entries of ``snapshot`` still pending unchanged."""
        return {i: e for i, e in snapshot.items() if self._new.get(i) == e}

    def runs(self, entries: Mapping[int, int]) -> list[TableWrite]:
        """``entries`` as one write per run of adjacent indices, in index order."""
        out: list[TableWrite] = []
        items = sorted(entries.items())
        size = self.entry.size
        while items:
            n = 1
            while n < len(items) and items[n][0] == items[0][0] + n:
                n += 1
            run, items = items[:n], items[n:]
            first = run[0][0]
            data = b"".join(self.entry.pack(e) for _i, e in run)
            out.append(TableWrite(self.table_offset + size * first, data, range(first, first + n)))
        return out

    def write_snapshot(
        self,
        snapshot: dict[int, int],
        sync_failed: BaseException | None = None,
        write_runs: Callable[[Sequence[TableWrite]], None] | None = None,
    ) -> None:
        """Write the due entries, one ``target.pwrite`` per run (or all at once via ``write_runs``).

        After a failure, the entries of every run not (known to be) written are rolled back.
        """
        due = self.due(snapshot)
        runs = self.runs(due)
        written = 0
        try:
            if sync_failed is not None:
                raise sync_failed
            if write_runs is not None:
                write_runs(runs)
                written = len(runs)
            else:
                for run in runs:
                    self.target.pwrite(run.data, run.offset)
                    written += 1
        except BaseException:
            for run in runs[written:]:
                for i in run.indices:
                    self.rollback(i, self._file[i])
            raise
        finally:
            for i in due:
                del self._new[i]
                del self._file[i]


class PendingBlobs(Pending[dict[int, bytes]]):
    """Whole per-block blobs that replace what the file holds (VHD differencing bitmaps).

    A blob is due only while the very object the snapshot took is still pending (``is``): one
    replaced since may cover data the sync did not include, and writing the older one after a
    newer one would lose bits. ``locate(i)`` gives blob ``i``'s file offset at write time;
    ``rollback(i)`` makes the driver forget the pending blob (it reads the file's again).
    """

    def __init__(
        self, target: PwriteTarget, locate: Callable[[int], int], rollback: Callable[[int], None]
    ) -> None:
        self.target = target
        self.locate = locate
        self.rollback = rollback
        self._new: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._new)

    def __contains__(self, index: object) -> bool:
        return index in self._new

    def get(self, index: int) -> bytes | None:
        return self._new.get(index)

    def set(self, index: int, blob: bytes) -> None:
        self._new[index] = blob

    def drop(self, index: int) -> None:
        """Forget a pending blob (its block was rolled back: the file never had it)."""
        self._new.pop(index, None)

    def snapshot(self) -> dict[int, bytes] | None:
        return dict(self._new) if self._new else None

    def write_snapshot(self, snapshot: dict[int, bytes], sync_failed: BaseException | None = None) -> None:
        due = [i for i, blob in sorted(snapshot.items()) if self._new.get(i) is blob]
        written = 0
        try:
            if sync_failed is not None:
                raise sync_failed
            for i in due:
                self.target.pwrite(self._new[i], self.locate(i))
                del self._new[i]
                written += 1
        except BaseException:
            for i in due[written:]:  # what the file lacks: back to what it holds
                self._new.pop(i, None)
                self.rollback(i)
            raise


class PendingCounter(Pending[int]):
    """A file field that only grows (VDI's ``blocks_allocated``), written when above the file's.

    It rides along with the entries that need it: it counts as no pending item (never a reason
    to commit on its own), and its snapshot is the value ``current()`` gives at snapshot time,
    written even if it grew since (a larger value lands at the next commit). A failed write
    leaves memory as it is: a count above the blocks in use only leaks space.
    """

    def __init__(
        self,
        field_format: str,
        offset: int,
        target: PwriteTarget,
        current: Callable[[], int],
        file_value: int,
    ) -> None:
        self.field = struct.Struct(field_format)
        self.offset = offset
        self.target = target
        self.current = current
        self.file_value = file_value

    def __len__(self) -> int:
        return 0

    def snapshot(self) -> int | None:
        value = self.current()
        return value if value > self.file_value else None

    def write_snapshot(self, snapshot: int, sync_failed: BaseException | None = None) -> None:
        if sync_failed is not None:
            raise sync_failed
        if snapshot > self.file_value:
            self.target.pwrite(self.field.pack(snapshot), self.offset)
            self.file_value = snapshot


@dataclass(frozen=True)
class CommitSnapshot:
    """What one commit writes: each part's snapshot, in the group's order (opaque to callers)."""

    parts: tuple[tuple[Pending[Any], Any], ...]


class PendingGroup:
    """An image's pending metadata: parts written in order at each commit.

    Order is the crash order: a part may point at what an earlier part wrote (VDI: the map
    entries after ``blocks_allocated``; VHD: a new block's BAT entry before its bitmap). Written
    order alone does not survive a power cut (the disk may reorder writes between syncs), so a
    group whose later parts must never reach the disk before an earlier one passes ``barrier``
    (the file's sync): it runs between two parts that both write. Once a part fails, every later
    part gets the failure as ``sync_failed`` and rolls back all it had due; the first failure
    propagates.
    """

    def __init__(self, *parts: Pending[Any], barrier: Callable[[], None] | None = None) -> None:
        self.parts = parts
        self.barrier = barrier

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def snapshot(self) -> CommitSnapshot | None:
        """None when nothing is pending (a part that counts no items never commits alone)."""
        if not len(self):
            return None
        taken = tuple((p, s) for p in self.parts if (s := p.snapshot()) is not None)
        return CommitSnapshot(taken)

    def write_snapshot(self, snapshot: CommitSnapshot, sync_failed: BaseException | None = None) -> None:
        failure = sync_failed
        for i, (part, snap) in enumerate(snapshot.parts):
            try:
                if i and self.barrier is not None and failure is None:
                    self.barrier()  # the earlier parts are durable before this one is written
                part.write_snapshot(snap, failure)
            except BaseException as exc:  # kept: later parts roll back, then it is raised
                if failure is None:
                    failure = exc
        if failure is not None:
            raise failure
