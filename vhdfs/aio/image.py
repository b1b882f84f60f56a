"""The async image every front end shares: reads that never stall the trio loop, the write rule's
trio side, group commit on a timer, and the flush-error latch.

Why this shape:

* **Reads** map the range (no lock: the block layer keeps its in-memory maps consistent for
  readers) inline when every layer can map it from memory (``Image.maps_without_io``; else the
  whole read goes to a worker thread), and try ``preadv(..., RWF_NOWAIT)`` inline for every
  DATA extent. A page-cache hit
  costs no thread hop. A miss (``BlockingIOError``) or a short read of a small request
  (``INLINE_MAX``) is then read inline too, blocking: the hop to a worker thread and back
  costs a cold 4 KiB read as much CPU as the read itself (the daemon is CPU-bound on cold small
  reads: 330 -> 225 us of CPU per fio QD1 read, bench/README.md), and the only thing it buys,
  overlap with other requests, the daemon hardly ever had (1-2 reads in handlers at once).
  Larger misses (the kernel's 1 MiB readahead requests, several in flight) go to a worker
  thread, where they overlap and the hop is cheap against the copy.
* **Writes** that change metadata (allocate a block, set bitmap bits) go to a worker thread,
  hold the image's ``trio.Lock`` and are shielded from cancellation, so a half-done metadata
  change never happens. In-place writes (``Image.write_is_in_place``: no lock, only a copy into
  the image file's page cache) up to ``INLINE_MAX`` are written on the trio thread, like
  small read misses: the thread hop cost more than the copy (ext4 mkfs + untar on a loop
  device ~7 % faster); larger ones go to a worker thread without the lock. Consistency itself comes from
  the block layer's ``meta_lock`` (docs/concurrency.md), which a thread-based front end (NBD)
  gets the same way.
* No pyfuse3 here: errors are ``VhdfsError``/``OSError``, mapped by each front end.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..block.extent import Extent, Kind
from ..block.image import Image
from ..errors import ReadOnlyError

log = logging.getLogger(__name__)

_ZEROS = bytes(1 << 20)
# A read miss or an in-place write up to this size is done on the trio thread, blocking: below
# it the hop to a worker thread and back costs more CPU than the pread/pwrite itself.
INLINE_MAX = 128 << 10


@dataclass
class AsyncImage:
    """An open image for trio front ends: what every export of (part of) it shares.

    Raises ``VhdfsError``/``OSError`` only; each front end maps those to its own protocol.
    """

    image: Image
    writable: bool
    limiter: trio.CapacityLimiter
    lock: trio.Lock = field(default_factory=trio.Lock)
    nowait: bool = True  # RWF_NOWAIT works on this file system (until shown otherwise)
    allocated: int | None = None  # cached allocated bytes for st_blocks
    allocated_at: float = 0.0
    allocated_dirty: bool = True  # writes changed allocation since the last count or announcement
    temp_child: str | None = None  # snapshot child to delete at unmount
    commit_failed: Exception | None = None  # a background commit's error, for the next flush
    commit_wanted: trio.Event = field(default_factory=trio.Event)  # wakes the committer early
    # Called (in a worker thread) after a failed flush or commit rolled writes back: the
    # mount drops what the kernel page cache holds of this image's files (operations.py).
    on_rollback: Callable[[], None] | None = None
    # Called (in a worker thread) at most once a commit interval after writes changed what is
    # allocated: the mount lets the kernel ask for st_blocks again (it keeps attributes long).
    on_allocation_changed: Callable[[], None] | None = None

    async def allocated_bytes(self) -> int:
        """Allocated bytes of the whole chain (capped at size), recomputed at most once a second.

        Computed in a thread because a driver without a cheap ``allocated_bytes`` walks its map.
        """
        now = time.monotonic()
        if self.allocated is None or (self.allocated_dirty and now - self.allocated_at > 1.0):
            self.allocated_dirty = False
            self.allocated_at = now
            total = await trio.to_thread.run_sync(
                lambda: sum(layer.allocated_bytes() for layer in self.image.chain), limiter=self.limiter
            )
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
            except Exception as exc:
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
            except Exception as exc:
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
                await self.announce_allocation()
        finally:
            self.image.auto_commit = True

    async def announce_allocation(self) -> None:
        """Writes changed what is allocated and no ask has counted it since: count it afresh at the
        next ask, and tell the front end (whose kernel may hold the old ``st_blocks``)."""
        if not self.allocated_dirty:
            return
        self.allocated_dirty = False
        self.allocated = None
        if self.on_allocation_changed is not None:
            try:
                await trio.to_thread.run_sync(self.on_allocation_changed)
            except Exception as exc:
                log.debug("%s: st_blocks not re-announced: %s", self.image.path, exc)

    async def seek(self, base: int, end: int, hole: bool) -> int | None:
        """``Image.seek_extent`` in a worker thread: mapping may read tables, and a long hole
        takes a while to walk."""
        return await trio.to_thread.run_sync(self.image.seek_extent, base, end, hole, limiter=self.limiter)

    async def read(self, base: int, n: int) -> bytes | bytearray | memoryview:
        """``n`` bytes at virtual offset ``base`` (inside the disk): page-cache hits inline."""
        if not self.image.chain_maps_without_io(base, n):
            # a bitmap or table page must be read first: map (and read) in a worker thread
            return await trio.to_thread.run_sync(self.image.read, base, n, limiter=self.limiter)
        exts = list(self.image.extents(base, n))
        if len(exts) == 1 and exts[0].kind == Kind.ZERO:
            return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)
        buf = bytearray(n)
        view = memoryview(buf)
        misses: list[Extent] = []
        for ext in exts:
            if ext.kind != Kind.DATA:
                continue
            part = view[ext.offset - base : ext.end - base]
            got = self._try_nowait(ext, part)
            if got < ext.length:
                misses.append(
                    Extent(
                        ext.offset + got, ext.length - got, ext.kind, ext.fd, ext.file_offset + got, ext.layer
                    )
                )
        if misses and n <= INLINE_MAX:
            self.image.readinto_extents(misses, view, base)  # small: the thread hop costs more
        elif misses:
            await trio.to_thread.run_sync(
                self.image.readinto_extents, misses, view, base, limiter=self.limiter
            )
        return buf

    def _try_nowait(self, ext: Extent, part: memoryview) -> int:
        """Bytes served straight from the page cache (0 when the data is not cached)."""
        if not self.nowait:
            return 0
        try:
            return os.preadv(ext.fd, [part], ext.file_offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                log.info("%s: RWF_NOWAIT not supported here; reads use worker threads", self.image.path)
                self.nowait = False
                return 0
            raise

    async def write(self, base: int, view: memoryview) -> None:
        """Write ``view`` at virtual offset ``base`` (inside the disk) in a worker thread.

        The block layer's write rule (``Image.write``: allocating writes under ``meta_lock``)
        is what keeps the image consistent; the trio lock here only keeps allocating writes
        from tying up worker threads while they wait for it, and the shield keeps a cancelled
        client from abandoning one half-way.
        """
        if not self.writable:
            raise ReadOnlyError("image is open read-only", self.image.path)
        if self.image.write_is_in_place(base, len(view)):
            if len(view) <= INLINE_MAX:
                self.image.write(base, view)  # a copy into the page cache: the hop costs more
            else:
                await trio.to_thread.run_sync(self.image.write, base, view, limiter=self.limiter)
            return
        with trio.CancelScope(shield=True):
            async with self.lock:
                await trio.to_thread.run_sync(self.image.write, base, view, limiter=self.limiter)
        self.allocated_dirty = True
        if self.image.commit_due():
            self.commit_wanted.set()

    async def discard(self, base: int, n: int) -> None:
        """Make ``[base, base+n)`` read as zeros, under the image lock."""
        if not self.writable:
            raise ReadOnlyError("image is open read-only", self.image.path)
        with trio.CancelScope(shield=True):
            async with self.lock:
                await trio.to_thread.run_sync(self.image.discard, base, n, limiter=self.limiter)
        self.allocated_dirty = True
