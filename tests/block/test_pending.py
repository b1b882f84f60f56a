"""block/pending.py on its own: any entry width, runs, rollback, the journalled-driver seam.

The drivers' use of it is proven by test_conformance.py; this pins the rules a new driver
(VHDX's 64-bit BAT through its log) relies on without a format around them.
"""

from __future__ import annotations

import errno
import struct

import pytest
from vhdfs.block.pending import (
    PendingBlobs,
    PendingCounter,
    PendingGroup,
    PendingTable,
    TableWrite,
    commit_every,
)


class File:
    """A pwrite target that records writes and can fail the n-th one."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.fail_at = fail_at

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            self.fail_at = None
            raise OSError(errno.EIO, "injected")
        self.writes.append((offset, bytes(data)))


def _table(f: File, rolled: dict[int, int]) -> PendingTable:
    t = PendingTable("<Q", 4096, f, lambda i, old: rolled.__setitem__(i, old))
    for i in (3, 4, 5, 9):
        t.set(i, 1 << 40 | i, file_entry=0)
    return t


def test_64_bit_entries_are_written_one_pwrite_per_run() -> None:
    f, rolled = File(), {}
    t = _table(f, rolled)
    t.write_snapshot(t.snapshot())
    assert f.writes == [(4096 + 8 * 3, struct.pack("<3Q", 1 << 40 | 3, 1 << 40 | 4, 1 << 40 | 5)),
                        (4096 + 8 * 9, struct.pack("<Q", 1 << 40 | 9))]
    assert len(t) == 0 and rolled == {}


def test_a_failed_run_rolls_back_exactly_what_the_file_lacks() -> None:
    f, rolled = File(fail_at=1), {}
    t = _table(f, rolled)
    t.set(9, 7, file_entry=99)    # the first file_entry is kept: the file still holds 0
    with pytest.raises(OSError):
        t.write_snapshot(t.snapshot())
    assert [off for off, _ in f.writes] == [4096 + 24]
    assert rolled == {9: 0} and len(t) == 0


def test_an_entry_changed_since_the_snapshot_stays_pending() -> None:
    f, rolled = File(), {}
    t = _table(f, rolled)
    snap = t.snapshot()
    t.set(4, 12345, file_entry=0)
    t.set(20, 1, file_entry=0)
    t.write_snapshot(snap)
    assert [off for off, _ in f.writes] == [4096 + 24, 4096 + 40, 4096 + 72]
    assert t.get(4) == 12345 and 20 in t and len(t) == 2


def test_sync_failed_writes_nothing_and_rolls_back_all_due() -> None:
    f, rolled = File(), {}
    t = _table(f, rolled)
    with pytest.raises(OSError, match="sync"):
        t.write_snapshot(t.snapshot(), sync_failed=OSError(errno.EIO, "sync"))
    assert f.writes == [] and sorted(rolled) == [3, 4, 5, 9] and len(t) == 0


def test_write_runs_hands_every_run_over_at_once_and_a_failure_rolls_back_all() -> None:
    f, rolled = File(), {}
    t = _table(f, rolled)
    seen: list[TableWrite] = []

    def log_transaction(runs) -> None:
        seen.extend(runs)
        raise OSError(errno.EIO, "log full")

    with pytest.raises(OSError, match="log full"):
        t.write_snapshot(t.snapshot(), write_runs=log_transaction)
    assert [(w.offset, list(w.indices)) for w in seen] == [(4120, [3, 4, 5]), (4168, [9])]
    assert f.writes == [] and sorted(rolled) == [3, 4, 5, 9]


def test_a_group_rolls_back_every_later_part_once_one_fails() -> None:
    f, rolled, forgotten = File(fail_at=0), {}, []
    t = _table(f, rolled)
    blobs = PendingBlobs(f, lambda i: 512 * i, forgotten.append)
    blobs.set(3, b"\xff" * 512)
    counter = PendingCounter("<I", 0x180, f, lambda: 10, file_value=4)
    g = PendingGroup(counter, t, blobs)
    assert len(g) == 5       # the counter rides along, it is never a reason to commit
    snap = g.snapshot()
    assert snap is not None
    with pytest.raises(OSError, match="injected"):
        g.write_snapshot(snap)
    assert f.writes == [] and sorted(rolled) == [3, 4, 5, 9] and forgotten == [3]
    assert counter.file_value == 4 and len(g) == 0
    assert PendingGroup(counter).snapshot() is None


def test_a_replaced_blob_is_not_overwritten_by_its_older_copy() -> None:
    f, forgotten = File(), []
    blobs = PendingBlobs(f, lambda i: 512 * i, forgotten.append)
    blobs.set(1, b"old")
    snap = blobs.snapshot()
    blobs.set(1, b"new")
    blobs.write_snapshot(snap)
    assert f.writes == [] and blobs.get(1) == b"new"


def test_commit_every_bounds_pending_bytes() -> None:
    assert commit_every(1 << 20) == 256 and commit_every(1 << 30) == 1
