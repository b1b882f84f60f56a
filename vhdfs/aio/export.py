"""Exports: the byte windows front ends serve (a whole disk, or one of its partitions).

A partition export shares its disk's ``AsyncImage`` (lock, limiter, committer) and clips every
request to its window, so nothing ever lands outside the partition. Names follow one rule for
every front end (``block.exports``): ``<stem>.raw`` for the disk, ``<stem>-p<N>.raw`` for
partition N. Each export's owner and mode come from the image the user named
(``aio/access.py``), decided here once for all of a disk's exports.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

import trio

from ..block.exports import Exposed, plan_exports
from ..errors import ReadOnlyError
from .access import Access, exposed_access, private
from .image import AsyncImage

__all__ = ["Export", "Exposed", "build_exports"]


class Export:
    """``[start, start+size)`` of a shared async image, served as one file or export.

    ``access`` is its owner, group and mode (a chmod/chown replaces it for the export's life);
    without one, only the daemon's user may use it.
    """

    def __init__(
        self,
        name: str,
        shared: AsyncImage,
        start: int = 0,
        size: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.name = name
        self.shared = shared
        self.image = shared.image
        self.start = start
        self.size = shared.image.size - start if size is None else size
        self.access = access if access is not None else private(shared.writable)

    @property
    def writable(self) -> bool:
        return self.shared.writable

    def _window(self, off: int, length: int) -> int:
        """Bytes of ``[off, off+length)`` inside the window."""
        if off < 0:
            raise OSError(errno.EINVAL, "negative offset")
        return max(0, min(length, self.size - off))

    async def read(self, off: int, length: int) -> bytes | bytearray | memoryview:
        """The window's bytes; short only at its end."""
        n = self._window(off, length)
        if n == 0:
            return b""
        return await self.shared.read(self.start + off, n)

    async def seek(self, off: int, hole: bool) -> int | None:
        """``lseek`` ``SEEK_HOLE`` (``hole``) or ``SEEK_DATA`` from ``off`` inside the window.

        None means ENXIO: ``off`` at or past the end, or no data after it. The end of the
        window is a hole (as on every file system), so ``SEEK_HOLE`` always finds one.
        """
        if off < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if off >= self.size:
            return None
        found = await self.shared.seek(self.start + off, self.start + self.size, hole)
        if found is None:
            return self.size if hole else None
        return found - self.start

    async def write(self, off: int, data: bytes) -> int:
        """Write inside the window; a write starting past the end gets ENOSPC, one crossing it is short."""
        if not self.writable:
            raise ReadOnlyError("image is open read-only", self.image.path)
        if off >= self.size and len(data):
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        n = self._window(off, len(data))
        if n:
            await self.shared.write(self.start + off, memoryview(data)[:n])
        return n

    async def discard(self, off: int, length: int) -> None:
        """Zero a range of the window (trim), releasing blocks where the format allows."""
        n = self._window(off, length)
        if n:
            await self.shared.discard(self.start + off, n)
        elif not self.writable:
            raise ReadOnlyError("image is open read-only", self.image.path)

    async def allocated_bytes(self) -> int:
        """What ``st_blocks`` reports: the chain's allocation, capped at this window's size."""
        return min(self.size, await self.shared.allocated_bytes())


def build_exports(
    exposed: Iterable[Exposed], partitions: bool = True, limiter: trio.CapacityLimiter | None = None
) -> list[Export]:
    """Every file (``block.exports.plan_exports`` with the ``.raw`` suffix); the windows of one
    image share one ``AsyncImage``."""
    limiter = limiter or trio.CapacityLimiter(8)
    shared: dict[int, AsyncImage] = {}
    out: list[Export] = []
    access: dict[int, Access] = {}
    for w in plan_exports(exposed, partitions, suffix=".raw"):
        ex = w.exposed
        if id(ex) not in shared:
            shared[id(ex)] = AsyncImage(ex.image, ex.writable, limiter, temp_child=ex.temp_child)
            access[id(ex)] = image_access(ex)
        out.append(Export(w.name, shared[id(ex)], w.start, w.size, access=access[id(ex)]))
    return out


def image_access(ex: Exposed) -> Access:
    """The access every export of ``ex`` starts with: that of the file the user named (the top
    of the chain; for a snapshot the child's parent, never the child), read from the open fd."""
    named = ex.image.backing if ex.snapshot and ex.image.backing is not None else ex.image
    source = named.file.fd if named.file is not None else named.path
    return exposed_access(source, ex.writable)
