"""Extents: where a run of virtual bytes lives (DATA in a file, ZERO, or BACKING: ask the parent).

The one vocabulary every driver answers in and every front end reads: FUSE issues its own
``preadv`` on DATA extents, NBD's block status reports ZERO and unallocated runs as holes.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import FormatError


class Kind(enum.IntEnum):
    DATA = 0
    ZERO = 1
    BACKING = 2


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of virtual bytes ``[offset, offset+length)`` and where they come from.

    For DATA, ``fd``/``file_offset`` say which open file holds them, so a caller (the FUSE layer)
    can issue its own non-blocking ``preadv`` without going through ``Image.read``.
    """

    offset: int
    length: int
    kind: Kind
    fd: int = -1
    file_offset: int = 0
    layer: int = 0  # 0 = the top image, 1 = its parent, ...

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_hole(self) -> bool:
        """Reads as zeros without stored data (ZERO, or unallocated down the chain): what NBD's
        block status calls hole|zero and ``SEEK_HOLE`` finds. A DATA run is data even if zero."""
        return self.kind != Kind.DATA


def run_end(first: int, last: int, key: Callable[[int], object]) -> int:
    """The index after the run of entries from ``first`` (up to ``last``) whose ``key`` equals
    ``key(first)``. A driver maps a run of unallocated blocks as one extent with it, so a seek
    or a map across a huge sparse disk costs a lookup per block, not an Extent per block."""
    want, i = key(first), first + 1
    while i <= last and key(i) == want:
        i += 1
    return i


def merge_extents(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Join neighbours that one I/O can serve (same kind, same file, contiguous)."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length <= 0:
            continue
        if (
            pending is not None
            and pending.end == ext.offset
            and pending.kind == ext.kind
            and (
                ext.kind != Kind.DATA
                or (pending.fd == ext.fd and pending.file_offset + pending.length == ext.file_offset)
            )
            and (ext.kind == Kind.ZERO or pending.layer == ext.layer)
        ):
            pending = Extent(
                pending.offset,
                pending.length + ext.length,
                pending.kind,
                pending.fd,
                pending.file_offset,
                pending.layer,
            )
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def preadinto_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; bytes past the end of the file are an error."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = path  # never a bare "Input/output error"
            raise
        if n == 0:
            raise FormatError(
                f"truncated: data expected at offset {offset + done} is past the end of the file", path
            )
        done += n


def pread_exact(fd: int, length: int, offset: int, path: str) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise
    if len(data) == length:
        return data
    buf = bytearray(length)
    preadinto_exact(fd, memoryview(buf), offset, path)
    return bytes(buf)
