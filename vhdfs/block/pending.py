"""Writing a batch of table entries (VHD BAT, VDI block map) once the data they point at is durable.

Both sparse formats point at data through a table of 32-bit entries. An entry must never reach
the disk before its data, and an fdatasync per new block costs a third of sequential write
speed, so the drivers keep new entries pending and commit them together: one sync, then one
pwrite per run of adjacent entries (this module).
"""

from __future__ import annotations

import struct

from .rawfile import RawFile

# Commit at the latest once this many bytes of new blocks are pending: bounds the space a crash
# leaks (an unflushed write's block, written but never pointed at) and the entries held in memory.
COMMIT_BYTES = 256 * 1024 * 1024


def commit_every(block_size: int) -> int:
    """How many pending entries trigger a commit for blocks of ``block_size`` bytes."""
    return max(1, COMMIT_BYTES // block_size)


def write_entry_runs(f: RawFile, table_offset: int, byte_order: str, pending: dict[int, int]) -> None:
    """Write ``pending`` (index -> entry) into the table at ``table_offset``, one pwrite per run.

    Each entry leaves ``pending`` once its run is written, so after a failure ``pending`` holds
    exactly the entries the file does not have (the caller rolls those back in memory).
    """
    items = sorted(pending.items())
    while items:
        n = 1
        while n < len(items) and items[n][0] == items[0][0] + n:
            n += 1
        run, items = items[:n], items[n:]
        f.pwrite(struct.pack(f"{byte_order}{n}I", *(entry for _i, entry in run)),
                 table_offset + 4 * run[0][0])
        for i, _entry in run:
            del pending[i]
