"""The BAT and the sector-bitmap blocks, loaded lazily one 4 KiB page at a time.

Why lazily: a 64 TiB dynamic VHDX with 1 MiB blocks has a 512 MiB BAT, and a mount must answer
its first read in well under a second with a small RSS. So nothing is read at open; a page is
read (through the log-replayed view, so a dirty file shows its replayed table) the first time an
entry on it is needed, decoded once into an ``array('Q')`` and kept in a bounded cache.

Why 4 KiB pages: that is the unit the log carries (§2.3), so a writer changes, logs and writes
back exactly the page it changed (QEMU #727 shifted a whole page by 8 bytes). Pages changed but
not yet committed are *dirty*: pinned in the cache until the group commit logs and writes them.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections.abc import Callable, Iterator

from ...errors import FormatError

PAGE = 4096
ENTRIES_PER_PAGE = PAGE // 8
_ZERO_PAGE = bytes(PAGE)
Pread = Callable[[int, int], bytes]


def _read_page(pread: Pread, offset: int, what: str) -> bytes:
    data = bytes(pread(PAGE, offset))
    if len(data) < PAGE:
        raise FormatError(f"{what} page at offset {offset} runs past the end of the file")
    return data


class PageCache:
    """Raw 4 KiB pages (sector bitmaps) by file offset: bounded, dirty pages pinned."""

    def __init__(self, pread: Pread, what: str, limit_bytes: int = 32 << 20) -> None:
        self.pread = pread
        self.what = what
        self.limit = max(1, limit_bytes // PAGE)
        self.pages: dict[int, bytearray] = {}
        self.dirty: set[int] = set()
        self.lock = threading.Lock()

    def get(self, offset: int) -> bytearray:
        page = self.pages.get(offset)
        if page is not None:
            return page
        page = bytearray(_read_page(self.pread, offset, self.what))
        with self.lock:
            got = self.pages.get(offset)
            if got is not None:
                return got
            if len(self.pages) >= self.limit:
                self._evict()
            self.pages[offset] = page
        return page

    def _evict(self) -> None:
        for off in list(self.pages)[: max(1, self.limit // 8)]:
            if off not in self.dirty:
                del self.pages[off]

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) assembled from pages (any alignment)."""
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            base = pos - pos % PAGE
            n = min(end, base + PAGE) - pos
            out += self.get(base)[pos - base : pos - base + n]
            pos += n
        return bytes(out)

    def put(self, offset: int, page: bytes | bytearray) -> None:
        """Install a page as it must be on disk once committed (marks it dirty)."""
        with self.lock:
            self.pages[offset] = bytearray(page)
            self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        with self.lock:
            self.pages.pop(offset, None)
            self.dirty.discard(offset)


class Bat:
    """BAT entries by index, decoded per page; ``set`` keeps a page dirty until committed."""

    def __init__(
        self,
        pread: Pread,
        bat_offset: int,
        entry_count: int,
        limit_bytes: int = 16 << 20,
        next_data: Callable[[int], int] | None = None,
    ) -> None:
        self.pread = pread
        # next_data(offset): where the file's next non-hole byte is (SEEK_DATA); given only when
        # ``pread`` reads the file itself, so a sparse 512 MiB BAT scans in milliseconds
        self.next_data = next_data
        self.offset = bat_offset
        self.count = entry_count
        self.limit = max(1, limit_bytes // PAGE)
        self.pages: dict[int, array] = {}
        self.dirty: set[int] = set()
        self.lock = threading.Lock()

    def _page(self, p: int) -> array:
        arr = self.pages.get(p)
        if arr is not None:
            return arr
        arr = array("Q", _read_page(self.pread, self.offset + p * PAGE, "BAT"))
        if sys.byteorder == "big":
            arr.byteswap()
        with self.lock:
            got = self.pages.get(p)
            if got is not None:
                return got
            if len(self.pages) >= self.limit:
                for q in list(self.pages)[: max(1, self.limit // 8)]:
                    if q not in self.dirty:
                        del self.pages[q]
            self.pages[p] = arr
        return arr

    def __getitem__(self, index: int) -> int:
        return self._page(index // ENTRIES_PER_PAGE)[index % ENTRIES_PER_PAGE]

    def __setitem__(self, index: int, entry: int) -> None:
        p = index // ENTRIES_PER_PAGE
        arr = self._page(p)
        with self.lock:
            arr[index % ENTRIES_PER_PAGE] = entry
            self.dirty.add(p)

    def page_bytes(self, p: int) -> bytes:
        arr = self._page(p)
        if sys.byteorder == "big":
            arr = array("Q", arr)
            arr.byteswap()
        return arr.tobytes()

    def page_offset(self, p: int) -> int:
        return self.offset + p * PAGE

    def drop(self, p: int) -> None:
        """Forget a page (a failed commit: reread what the file holds next time)."""
        with self.lock:
            self.pages.pop(p, None)
            self.dirty.discard(p)

    def scan(self, chunk_pages: int = 256) -> Iterator[tuple[int, int]]:
        """Every (index, entry) with a non-zero entry, reading big chunks without caching them
        (``check`` and ``allocated_bytes`` on a huge BAT must not fill the cache)."""
        total_pages = -(-self.count // ENTRIES_PER_PAGE)
        p0 = 0
        while p0 < total_pages:
            n = min(chunk_pages, total_pages - p0)
            if self.next_data is not None and not any(p in self.pages for p in range(p0, p0 + n)):
                at = self.next_data(self.offset + p0 * PAGE)
                if at >= self.offset + (p0 + n) * PAGE:  # the whole chunk is a hole
                    skip = (
                        (at - self.offset) // PAGE if at < self.offset + total_pages * PAGE else total_pages
                    )
                    cached = [p for p in self.pages if p0 <= p < skip]
                    p0 = min([skip] + cached)
                    continue
            chunk_start = p0
            p0 += n
            parts: list[bytes | None] = []
            for p in range(chunk_start, chunk_start + n):
                if p in self.pages:
                    parts.append(self.pages[p].tobytes() if sys.byteorder == "little" else self.page_bytes(p))
                else:
                    parts.append(None)
            if any(x is None for x in parts):
                raw = bytes(self.pread(n * PAGE, self.offset + chunk_start * PAGE))
                if len(raw) < n * PAGE:
                    raise FormatError(
                        f"BAT at offset {self.offset + chunk_start * PAGE} runs past the end of the file"
                    )
                parts = [
                    x if x is not None else raw[(i) * PAGE : (i + 1) * PAGE] for i, x in enumerate(parts)
                ]
            for q, page in enumerate(parts):
                if page is None or page == _ZERO_PAGE:
                    continue  # all NOT_PRESENT: the common case in a sparse BAT, decoded never
                arr = array("Q", page)
                if sys.byteorder == "big":
                    arr.byteswap()
                base = (chunk_start + q) * ENTRIES_PER_PAGE
                for i, e in enumerate(arr[: self.count - base]):
                    if e:
                        yield base + i, e
