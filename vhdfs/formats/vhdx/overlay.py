"""A dirty log replayed *in memory* for a read-only open, as an fd the front ends can preadv.

A read-only open (mount, info, check, convert) must leave the file byte-identical, yet a dirty
file's payload pages may be newer in the log than in place. Metadata is read through
``ReplayPlan.overlay`` (a pread), but DATA extents carry an fd that FUSE and NBD read themselves,
so the replayed bytes must live in a file too: an anonymous ``memfd`` as large as the replayed
file, holding only the replayed pages (the rest is a hole), plus the sorted list of replaced
ranges. ``split`` cuts a DATA run of the image file into pieces served by the image fd and
pieces served by the memfd, at the same file offsets (the memfd mirrors the file's layout).
Zero runs of the log and the growth up to LastFileOffset are replaced ranges left as holes.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator

from . import log as vlog
from .bat import PAGE


class ReplayOverlay:
    def __init__(self, plan: vlog.ReplayPlan, file_size: int) -> None:
        pages: dict[int, bytes] = {}
        spans: list[tuple[int, int]] = []
        for w in plan.writes:  # later writes win, as in ReplayPlan.apply
            if w.data is None:
                end = w.file_offset + w.length
                for p in [p for p in pages if w.file_offset <= p < end]:
                    del pages[p]
                spans.append((w.file_offset, end))
            else:
                pages[w.file_offset] = w.data
                spans.append((w.file_offset, w.file_offset + PAGE))
        size = plan.new_file_size(file_size)
        if size > file_size:
            spans.append((file_size, size))
        self.size = max([size] + [e for _s, e in spans])
        self.fd = os.memfd_create("vhdfs-vhdx-replay", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            for off, data in pages.items():
                os.pwrite(self.fd, data, off)
        except BaseException:
            os.close(self.fd)
            raise
        merged: list[list[int]] = []
        for s, e in sorted(spans):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.starts = [s for s, _e in merged]
        self.ends = [e for _s, e in merged]
        self.page_count = len(pages)

    def split(self, fd: int, file_offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(fd, file_offset, length) pieces of ``[file_offset, +length)``, replayed ones from the memfd."""
        pos, end = file_offset, file_offset + length
        i = bisect.bisect_right(self.ends, pos)
        while pos < end:
            if i < len(self.starts) and self.starts[i] <= pos:
                stop = min(end, self.ends[i])
                yield self.fd, pos, stop - pos
                i += 1
            else:
                stop = min(end, self.starts[i]) if i < len(self.starts) else end
                yield fd, pos, stop - pos
            pos = stop

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
