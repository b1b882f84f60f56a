"""The small interface the VHDX write path needs from the write-ahead log (``wal.VhdxLog``).

``write.py`` talks only to ``start``, ``new_data_write_guid``, ``log_pages``, ``close`` and
``header``/``slot``/``sequence``/``max_commit_pages``; the protocol itself (header updates to the
non-current slot first, on-disk replay, a fresh LogGuid, entries, Tail, flushes) is written
once, in ``wal.py``, whose docstring states the commit order.
"""

from __future__ import annotations

import uuid

from ...block.rawfile import RawFile
from . import log as vlog
from . import spec
from .layout import VhdxLayout
from .wal import VhdxLog


class Journal:
    """The journal operations on ``wal.VhdxLog``."""

    def __init__(self, f: RawFile, layout: VhdxLayout) -> None:
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
        # The caller's commit has just synced the data (so no second data flush); the in-place
        # pages become durable at the next commit's sync or the flush after it (Image.flush).
        self.log.commit(pages, flush_data=False, sync_in_place=False, split=True)

    def close(self) -> None:
        self.log.close()
