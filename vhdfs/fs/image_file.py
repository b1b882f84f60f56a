"""One exposed file: a byte window onto an open image, served without stalling the trio loop.

Why this shape:

* **Reads** map the range (no lock: mapping never awaits, the block layer keeps its in-memory
  maps consistent for readers) and try ``preadv(..., RWF_NOWAIT)`` inline for every DATA extent.
  A page-cache hit costs no thread hop (~50-120 us each, DESIGN.md §3); only a miss
  (``BlockingIOError``) or a short read goes to a worker thread.
* **Writes** that change metadata (allocate a block, set bitmap bits) hold the image's
  ``trio.Lock`` across the worker-thread call, the counterpart of QEMU's per-image CoMutex, and
  are shielded from cancellation so a half-done metadata commit never happens. Writes of
  already-mapped ranges (``write_is_in_place``) skip the lock: they only touch data.
* A partition file is the same class with another window; it shares its image's lock and
  limiter, and writes are clipped to the window, so nothing ever lands outside the partition.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3
import trio

from ..block.base import Extent, Image, Kind

log = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)


@dataclass
class SharedImage:
    """An open image plus what every file exposing part of it shares."""

    image: Image
    writable: bool
    limiter: trio.CapacityLimiter
    lock: trio.Lock = field(default_factory=trio.Lock)
    nowait: bool = True               # RWF_NOWAIT works on this file system (until shown otherwise)
    allocated: int | None = None      # cached allocated bytes for st_blocks
    allocated_at: float = 0.0
    allocated_dirty: bool = True
    temp_child: str | None = None     # snapshot child to delete at unmount
    commit_failed: Exception | None = None   # a background commit's error, for the next flush
    commit_wanted: trio.Event = field(default_factory=trio.Event)   # wakes the committer early
    # Called (in a worker thread) after a failed flush or commit rolled writes back: the
    # mount drops what the kernel page cache holds of this image's files (operations.py).
    on_rollback: Callable[[], None] | None = None

    async def allocated_bytes(self) -> int:
        """Allocated bytes of the whole chain (capped at size), recomputed at most once a second.

        Computed in a thread because a driver without a cheap ``allocated_bytes`` walks its map.
        """
        now = time.monotonic()
        if self.allocated is None or (self.allocated_dirty and now - self.allocated_at > 1.0):
            self.allocated_dirty = False
            self.allocated_at = now
            total = await trio.to_thread.run_sync(
                lambda: sum(layer.allocated_bytes() for layer in self.image.chain), limiter=self.limiter)
            self.allocated = min(total, self.image.size)
        return self.allocated

    async def flush(self) -> None:
        """Make every acknowledged write durable (fdatasync and metadata) in a worker thread.

        A background commit that failed since the last flush is reported here, once, as EIO:
        its writes were rolled back, and the application must hear of it (as with a
        kernel's writeback error).
        """
        if self.writable:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.image.flush, limiter=self.limiter)
                except BaseException:
                    await self.rolled_back()
                    raise
            failed, self.commit_failed = self.commit_failed, None
            if failed is not None:
                raise OSError(errno.EIO, f"an earlier background commit failed: {failed}")

    async def commit_pending(self) -> None:
        """Write pending metadata (group commit) in a worker thread, if any is pending.

        Takes no trio lock: the block layer holds its own lock only around the snapshot and the
        entry writes, so writers go on during the sync. Never raises: a failure is logged and
        kept for the next ``flush`` to report.
        """
        if not (self.writable and self.image.has_pending_metadata()):
            return
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self.image.commit, limiter=self.limiter)
            except Exception as exc:  # noqa: BLE001 - reported at the next flush
                log.error("%s: background commit failed: %s", self.image.path, exc)
                self.commit_failed = exc
                await self.rolled_back()

    async def rolled_back(self) -> None:
        """Writes were rolled back: what the kernel caches of this image may now be stale.

        Runs ``on_rollback`` in a thread of trio's default limiter, never this image's own:
        invalidating waits for pages under read, and those reads may need the image's threads.
        """
        if self.on_rollback is not None:
            try:
                await trio.to_thread.run_sync(self.on_rollback)
            except Exception as exc:  # noqa: BLE001 - the write error is what gets reported
                log.error("%s: cannot drop the kernel's cached pages: %s", self.image.path, exc)

    async def run_committer(self, interval: float) -> None:
        """Commit every ``interval`` seconds, or at once when a write finds a commit due.

        The block layer then never commits inside a client's write (``auto_commit`` off), and a
        daemon killed before the application's next fsync loses at most about one interval of
        writes, as with a journaling file system's commit interval.
        """
        self.image.auto_commit = False
        try:
            while True:
                with trio.move_on_after(interval):
                    await self.commit_wanted.wait()
                self.commit_wanted = trio.Event()
                await self.commit_pending()
        finally:
            self.image.auto_commit = True

class ImageFile:
    """``[start, start+size)`` of a shared image, as one regular file of the mount."""

    def __init__(self, name: str, shared: SharedImage, start: int = 0, size: int | None = None) -> None:
        self.name = name
        self.shared = shared
        self.image = shared.image
        self.start = start
        self.size = shared.image.size - start if size is None else size

    @property
    def writable(self) -> bool:
        return self.shared.writable

    def _window(self, off: int, length: int) -> int:
        """Bytes of ``[off, off+length)`` inside the file."""
        if off < 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return max(0, min(length, self.size - off))

    async def read(self, off: int, length: int) -> bytes | bytearray | memoryview:
        """The file's bytes; short only at the end of the file."""
        n = self._window(off, length)
        if n == 0:
            return b""
        base = self.start + off
        exts = list(self.image.extents(base, n))
        if len(exts) == 1 and exts[0].kind == Kind.ZERO:
            return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
        buf = bytearray(n)
        view = memoryview(buf)
        misses: list[Extent] = []
        for ext in exts:
            if ext.kind != Kind.DATA:
                continue
            part = view[ext.offset - base:ext.end - base]
            got = self._try_nowait(ext, part)
            if got < ext.length:
                misses.append(Extent(ext.offset + got, ext.length - got, ext.kind, ext.fd,
                                     ext.file_offset + got, ext.layer))
        if misses:
            await trio.to_thread.run_sync(self.image.readinto_extents, misses, view, base,
                                          limiter=self.shared.limiter)
        return buf

    def _try_nowait(self, ext: Extent, part: memoryview) -> int:
        """Bytes served straight from the page cache (0 when the data is not cached)."""
        if not self.shared.nowait:
            return 0
        try:
            return os.preadv(ext.fd, [part], ext.file_offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                log.info("%s: RWF_NOWAIT not supported here; reads use worker threads", self.image.path)
                self.shared.nowait = False
                return 0
            raise

    async def write(self, off: int, data: bytes) -> int:
        """Write inside the window; a write starting past the end gets ENOSPC, one crossing it is short."""
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off >= self.size and len(data):
            raise pyfuse3.FUSEError(errno.ENOSPC)
        n = self._window(off, len(data))
        if n == 0:
            return 0
        view = memoryview(data)[:n]
        base = self.start + off
        shared = self.shared
        if self.image.write_is_in_place(base, n):
            await trio.to_thread.run_sync(self.image.write, base, view, limiter=shared.limiter)
            return n
        # Allocating or bitmap-changing: serialise per image, and never abandon it half-way.
        with trio.CancelScope(shield=True):
            async with shared.lock:
                await trio.to_thread.run_sync(self.image.write, base, view, limiter=shared.limiter)
        shared.allocated_dirty = True
        if self.image.commit_due():
            shared.commit_wanted.set()
        return n

    async def discard(self, off: int, length: int) -> None:
        """Zero a range (used by tests and future fallocate support), under the image lock."""
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        n = self._window(off, length)
        if n:
            with trio.CancelScope(shield=True):
                async with self.shared.lock:
                    await trio.to_thread.run_sync(self.image.discard, self.start + off, n,
                                                  limiter=self.shared.limiter)
            self.shared.allocated_dirty = True

    async def allocated_bytes(self) -> int:
        """What ``st_blocks`` reports: the chain's allocation, capped at this window's size."""
        return min(self.size, await self.shared.allocated_bytes())
