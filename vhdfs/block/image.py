"""The Image protocol every block driver implements, and the generic read path on top of it.

A driver only answers one question about its own file: *where do these virtual bytes live?*
(``map_layer``). It yields extents that are either DATA in its file, ZERO, or BACKING (ask the
image below: a differencing parent, or zeros when there is none). Reading, chain resolution and
extent merging are done once, here, so that a 1 MiB read of allocated data is one ``pread`` and a
driver never loops over sectors.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import FormatError, ReadOnlyError, UnsupportedError
from .driver import Finding
from .extent import Extent, Kind, merge_extents, pread_exact, preadinto_exact
from .pending import CommitSnapshot, PendingGroup, commit_every
from .rawfile import RawFile

SEEK_SPAN = 1 << 30  # bytes mapped per step of seek_extent


@dataclass(frozen=True)
class OpenOptions:
    """How to open an image: passed from the CLI/daemon down to every driver and parent."""

    writable: bool = False
    force: bool = False  # accept a bad checksum on a writable open
    parent_dirs: tuple[str, ...] = ()
    ignore_parent_id: bool = False  # accept a parent whose UUID differs (forensics)
    # Options only one format has, by ``DriverOption.name`` (VHD: size_rule).
    extra: Mapping[str, str] = field(default_factory=dict)

    def for_parent(self) -> OpenOptions:
        """Parents are always opened read-only, with the same search and override options."""
        return replace(self, writable=False)


@dataclass
class ParentRef:
    """What a differencing layer says about its parent; ``chain.open_image`` resolves it.

    ``candidates`` are tried in order (locators, stored name, extra folders); the first that
    exists and whose identity ``matches`` becomes the backing image. With ``scan`` (VDI finds
    its parent by UUID among every image in some folders) a candidate that cannot be opened or
    does not match is skipped quietly, since most candidates are expected not to be the parent.
    """

    name: str  # what to call the parent in messages
    expected_id: str  # the UUID the child expects, printable
    candidates: list[str] = field(default_factory=list)
    search_names: list[str] = field(default_factory=list)  # basenames to try in --parent-dir
    format: str = "vhd"  # which driver opens the parent
    scan: bool = False

    def matches(self, parent: Image) -> bool:
        return parent.identity() == self.expected_id


class Image(abc.ABC):
    """One open image layer (and, through ``backing``, the chain below it).

    Thread-safety: reads are safe from many threads. Writes that allocate or change metadata
    take ``self.meta_lock``; the FUSE layer adds its own ``trio.Lock`` above it. Data writes to
    ranges that are already mapped (``write_is_in_place``) need no lock.
    """

    format: str = "?"
    type: str = "?"
    sector_size: int = 512  # logical sector: what partition tables count in
    allocation_unit: int = 0  # bytes a table entry maps (a block); 0: no blocks (fixed, raw)
    file: RawFile | None = None  # the layer's one image file, for the default flush/close
    pending: PendingGroup | None = None  # metadata awaiting the next commit (block/pending.py)

    def __init__(self, path: str, size: int, writable: bool) -> None:
        self.path = os.path.abspath(path)
        self.size = size
        self.writable = writable
        self.backing: Image | None = None
        self.parent_ref: ParentRef | None = None
        self.meta_lock = threading.RLock()
        self.closed = False
        # Commit pending metadata from ``write`` once ``commit_due``; a daemon with a committer
        # of its own turns this off so that no client's write waits for a sync.
        self.auto_commit = True

    # -- what drivers implement ---------------------------------------------------------

    @abc.abstractmethod
    def map_layer(self, offset: int, length: int) -> Iterator[Extent]:
        """Extents of this layer only, covering exactly ``[offset, offset+length)``.

        Called with a range inside ``[0, size)``. Yields DATA, ZERO, or BACKING.
        """

    @abc.abstractmethod
    def _write(self, offset: int, data: memoryview) -> None:
        """Write a range inside ``[0, size)``; the caller checked writability and bounds."""

    @abc.abstractmethod
    def identity(self) -> str:
        """The UUID children use to name this image (printable form)."""

    def _close_files(self) -> None:
        """Close this layer's files (not the backing image)."""
        if self.file is not None:
            self.file.close()

    def flush(self) -> None:
        """Make everything written so far durable in the image file, pending metadata included."""
        f = self._writable_file()
        if f is not None:
            self.commit()
            f.sync()

    def commit(self) -> None:
        """Write pending metadata now, after one sync for the data it points at (no final sync).

        Group commit (block/pending.py): the sync runs without ``meta_lock``, so other writers,
        allocating ones included, go on meanwhile; only entries taken before the sync are
        written after it. A daemon calls this soon after writes, so that its own crash loses
        little of what was written but not yet flushed. Called with ``meta_lock`` already held
        (an RLock), the lock simply stays held across the sync.
        """
        f = self._writable_file()
        if f is None:
            return
        with self.meta_lock:
            snapshot = self._pending_snapshot()
        if snapshot is None:
            return
        try:
            f.sync()
        except BaseException as exc:
            with self.meta_lock:
                self._write_snapshot(snapshot, sync_failed=exc)  # rolls back and re-raises
        with self.meta_lock:
            self._write_snapshot(snapshot)

    def commit_due(self) -> bool:
        """True once enough metadata is pending that a commit should not wait any longer."""
        return self.pending is not None and len(self.pending) >= commit_every(self.allocation_unit or 1)

    def has_pending_metadata(self) -> bool:
        """True when written data is not yet pointed at in the file (a commit is due)."""
        return self.pending is not None and len(self.pending) > 0

    def _writable_file(self) -> RawFile | None:
        """The layer's file while it is open for writing, else None."""
        f = self.file
        return f if self.writable and f is not None and f.fd >= 0 else None

    def _pending_snapshot(self) -> CommitSnapshot | None:
        """A copy of the pending metadata (caller holds ``meta_lock``); None when there is none."""
        return None if self.pending is None else self.pending.snapshot()

    def _write_snapshot(self, snapshot: CommitSnapshot, sync_failed: BaseException | None = None) -> None:
        """Write the entries of ``snapshot`` that are still pending unchanged (``meta_lock`` held).

        On failure, what did not reach the file is rolled back in memory, then the error
        propagates: the open image never claims what the file does not hold. ``sync_failed``
        (the commit's sync failed) writes nothing and rolls back everything due. A driver with
        pending metadata sets ``self.pending``; one that writes through a log may override this.
        """
        assert self.pending is not None
        self.pending.write_snapshot(snapshot, sync_failed)

    def describe(self) -> dict[str, Any]:
        """Format details for ``vhdfs info`` (this layer only)."""
        return {}

    def check(self) -> list[Finding]:
        """Structural problems found in this layer (empty when clean), each with its severity."""
        return []

    def allocated_bytes(self) -> int:
        """Bytes of virtual disk this layer stores (for ``st_blocks`` and ``info``)."""
        return sum(e.length for e in self.map_layer(0, self.size) if e.kind == Kind.DATA) if self.size else 0

    def maps_without_io(self, offset: int, length: int) -> bool:
        """True when ``map_layer`` over this range needs no file read (all it needs is cached).

        A trio front end maps inline on its event loop only then; otherwise it maps in a worker
        thread, so a cache miss never stalls every other request. Drivers whose maps live
        wholly in memory keep the default.
        """
        return True

    def chain_maps_without_io(self, offset: int, length: int) -> bool:
        """``maps_without_io`` for every layer a read of this range can fall through to, each
        asked only about the part inside its own size (a smaller parent: nothing past its end),
        as ``_resolve`` clips the read itself."""
        img: Image | None = self
        while img is not None and offset < img.size:
            length = min(length, img.size - offset)
            if not img.maps_without_io(offset, length):
                return False
            img = img.backing
        return True

    def write_is_in_place(self, offset: int, length: int) -> bool:
        """True when writing this range changes no metadata at all: no allocation, no bitmap bit,
        no first-write header update. Such a write takes no lock and only copies into the file's
        page cache, so a front end may do it on its event loop (``aio.image``)."""
        return False

    def _discard(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` (inside the disk, non-empty) read as zeros."""
        raise UnsupportedError(f"{self.format} {self.type} images do not support discard", self.path)

    # -- generic behaviour ------------------------------------------------------------------

    @property
    def chain(self) -> list[Image]:
        """This image and its parents, top first."""
        out: list[Image] = []
        img: Image | None = self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        return max(0, min(length, self.size - offset))

    def extents(self, offset: int = 0, length: int | None = None, _layer: int = 0) -> Iterator[Extent]:
        """Where every byte of ``[offset, offset+length)`` comes from, down the whole chain.

        BACKING runs are resolved in the parent (zeros past its end, or with no parent).
        """
        if length is None:
            length = self.size - offset
        length = self._clip(offset, length)
        if length == 0:
            return iter(())
        return merge_extents(self._resolve(offset, length, _layer))

    def _resolve(self, offset: int, length: int, layer: int) -> Iterator[Extent]:
        """The one place a read falls through to the parent, so the one place it is clipped:
        past the parent's end a child reads zeros (a grown child, a smaller parent), and a
        larger parent is only ever asked for the child's range (its prefix)."""
        for ext in self.map_layer(offset, length):
            if ext.kind != Kind.BACKING:
                yield Extent(ext.offset, ext.length, ext.kind, ext.fd, ext.file_offset, layer)
                continue
            parent = self.backing
            inside = 0 if parent is None else max(0, min(ext.end, parent.size) - ext.offset)
            if parent is not None and inside:
                yield from parent._resolve(ext.offset, inside, layer + 1)
            if inside < ext.length:
                yield Extent(ext.offset + inside, ext.length - inside, Kind.ZERO, layer=layer)

    def seek_extent(self, offset: int, end: int, hole: bool) -> int | None:
        """The first offset in ``[offset, end)`` inside a hole (``hole``) or inside data, else
        None: ``SEEK_HOLE``/``SEEK_DATA``. Maps ``SEEK_SPAN`` at a time, so a seek across a
        huge sparse disk walks only as far as the answer."""
        pos = offset
        while pos < end:
            n = min(SEEK_SPAN, end - pos)
            for ext in self.extents(pos, n):
                if ext.is_hole == hole:
                    return max(ext.offset, offset)
            pos += n
        return None

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)``, short only at the end of the disk."""
        length = self._clip(offset, length)
        if length == 0:
            return b""
        exts = list(self.extents(offset, length))
        if len(exts) == 1 and exts[0].kind == Kind.DATA:
            return pread_exact(exts[0].fd, length, exts[0].file_offset, self.path)
        buf = bytearray(length)
        self.readinto_extents(exts, memoryview(buf), offset)
        return bytes(buf)

    def readinto_extents(self, exts: list[Extent], view: memoryview, base: int) -> None:
        """Fill ``view`` (virtual offset ``base``) from resolved extents; ZERO runs left as is."""
        for ext in exts:
            if ext.kind == Kind.DATA:
                start = ext.offset - base
                preadinto_exact(ext.fd, view[start : start + ext.length], ext.file_offset, self.path)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; a write past the end of the disk is refused."""
        if not self.writable:
            raise ReadOnlyError("image is open read-only", self.path)
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > self.size:
            raise FormatError(
                f"write of {len(view)} bytes at {offset} goes past the end of the disk ({self.size})",
                self.path,
            )
        if len(view):
            self._write(offset, view)
            if self.auto_commit and self.commit_due():
                self.commit()
        return len(view)

    def discard(self, offset: int, length: int) -> None:
        """Make the range read as zeros, releasing space where the format allows.

        In a differencing layer the range reads as zeros too, not as the parent's data.
        """
        if not self.writable:
            raise ReadOnlyError("image is open read-only", self.path)
        length = self._clip(offset, length)
        if length:
            self._discard(offset, length)

    def close(self) -> None:
        """Close this image and every parent it opened."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.writable:
                self.flush()
        finally:
            self._close_files()
            if self.backing is not None:
                self.backing.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} size={self.size}>"
