"""``commit``: merge a differencing child's own sectors into its parent.

Crash safety comes from the order, not from a journal: the child is only ever read, the parent
is written and made durable, and only then (with ``remove``) is the child deleted. A crash at
any point leaves the child intact and still correct on top of the parent (every sector the
child stores still comes from the child, every other sector is unchanged in the parent), so
running the same commit again simply finishes it.

Only the child's *own* layer is copied (``map_layer``: the sectors whose bitmap bits are set in
a VHD, the allocated blocks of a VDI), never the merged chain: the parent must end up reading
as the child did, and anything else would bloat it with data it already holds.

A child of another size than its parent (``vhdfs resize`` of a differencing image): a parent
smaller than the child is grown to the child's size first (a resize, itself crash-safe, that
changes nothing the child reads); a larger parent is accepted only when its bytes past the
child's end read as zeros, since otherwise the committed parent would not read as the child.
A crash during that growth leaves a parent that reads right but may refuse a writable open
until ``vhdfs check --repair`` (a stale footer copy, as after any interrupted resize).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..block.chain import make_options, open_image, open_layer
from ..block.extent import Extent, Kind, preadinto_exact
from ..block.image import Image
from ..block.maintain import first_nonzero
from ..errors import ChainError, UsageError
from .maintain import grow_open

CHUNK = 4 * 1024 * 1024
_ZEROS = bytes(CHUNK)

#: ``progress(done_bytes, total_bytes)``, as in ``convert``.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CommitResult:
    """What a commit did, for the CLI's summary line."""

    child: str
    parent: str
    bytes_copied: int
    removed: bool
    parent_grown: list[str] = field(default_factory=list)  # the resize's report, when it grew


def _pieces(exts: list[Extent]) -> Iterator[Extent]:
    """Split extents into pieces of at most CHUNK bytes (one read and one write each)."""
    for ext in exts:
        off, foff, end = ext.offset, ext.file_offset, ext.end
        while off < end:
            n = min(CHUNK, end - off)
            yield Extent(off, n, ext.kind, ext.fd, foff)
            off += n
            foff += n


def _parent_is_zero(parent: Image, offset: int, length: int) -> bool:
    return all(e.kind == Kind.ZERO for e in parent.extents(offset, length))


def commit(
    child_path: str | os.PathLike[str],
    *,
    parent_dirs: Iterable[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
    remove: bool = False,
    ignore_parent_id: bool = False,
    force: bool = False,
    driver_options: Mapping[str, str] | None = None,
) -> CommitResult:
    """Copy the child's own sectors into its parent, make the parent durable, then maybe delete the child.

    Refuses (``UsageError``) an image with no parent. The parent (the next layer down) is the
    only file written; the layers below it stay read-only as in any open.
    """
    child_path = os.path.abspath(os.fspath(child_path))
    dirs = tuple(os.path.abspath(os.fspath(d)) for d in parent_dirs)
    common: dict[str, Any] = dict(
        parent_dirs=dirs, ignore_parent_id=ignore_parent_id, force=force, **(driver_options or {})
    )

    # 1. Find the parent by opening the whole chain read-only (this checks UUIDs).
    with open_image(child_path, **common) as probe:
        if probe.backing is None:
            raise UsageError(
                f"is a {probe.format} {probe.type} image, not a differencing one: nothing to commit",
                child_path,
            )
        parent_path = probe.backing.path
        expected_id = probe.parent_ref.expected_id if probe.parent_ref else None
        child_size, parent_size = probe.size, probe.backing.size

    def check_id(parent: Image) -> None:
        if expected_id is not None and parent.identity() != expected_id and not ignore_parent_id:
            raise ChainError(
                f"parent {parent_path} changed while opening it (id {parent.identity()}, "
                f"expected {expected_id})",
                child_path,
            )

    # 1b. A grown child: the parent grows first (a crash-safe resize; the child reads the same
    # over either size, zeros past the parent's end), so the child's tail has somewhere to go.
    grown: list[str] = []
    if child_size > parent_size:
        with open_image(parent_path, writable=True, **common) as parent:
            check_id(parent)
            grown = grow_open(parent, child_size)

    # 2. Parent chain writable, child layer alone read-only: no lock of ours blocks the other.
    parent = open_image(parent_path, writable=True, **common)
    try:
        check_id(parent)
        child = open_layer(child_path, make_options(**common))
        try:
            _refuse_smaller_child(child, parent)
            copied = _merge(child, parent, progress)
        finally:
            child.close()
        # 3. Durable before anything else happens to the child.
        parent.flush()
    finally:
        parent.close()

    if remove:
        os.unlink(child_path)
        _sync_dir(os.path.dirname(child_path))
    return CommitResult(child_path, parent_path, copied, remove, grown)


def _refuse_smaller_child(child: Image, parent: Image) -> None:
    """The parent must end up reading as the child did: past a (shrunk) child's end, zeros.

    A parent larger than the child (or rounded up by its size rule when it grew) is fine as long
    as nothing it holds there would show; otherwise the commit is refused by name.
    """
    if child.size > parent.size:
        raise ChainError(
            f"parent {parent.path} is {parent.size} bytes, smaller than the child ({child.size})", child.path
        )
    hit = first_nonzero(parent, child.size, parent.size)
    if hit is not None:
        raise ChainError(
            f"the child is {child.size} bytes but its parent {parent.path} ({parent.size} bytes) "
            f"holds data at offset {hit}, past the child's end: after a commit the parent would "
            "not read as the child does (shrink or clear the parent's tail first)",
            child.path,
        )


def _merge(child: Image, parent: Image, progress: Progress | None) -> int:
    """Write every DATA (and explicit ZERO) run of the child's own layer into the parent.

    A ZERO run in a child layer (a discarded range, a VDI zero block) means "zeros, not the
    parent's data", so it is committed as zeros, except where the parent already reads zero.
    """
    own = [e for e in child.map_layer(0, child.size) if e.kind != Kind.BACKING and e.length > 0]
    total = sum(e.length for e in own)
    if progress is not None:
        progress(0, total)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    for piece in _pieces(own):
        data = view[: piece.length]
        if piece.kind == Kind.DATA:
            preadinto_exact(piece.fd, data, piece.file_offset, child.path)
            # Zeros over a parent that is already zero there: nothing to write, nothing allocated.
            # (``startswith``: a memcmp with no copy.)
            if not (_ZEROS.startswith(data) and _parent_is_zero(parent, piece.offset, piece.length)):
                parent.write(piece.offset, data)
        elif not _parent_is_zero(parent, piece.offset, piece.length):
            parent.write(piece.offset, memoryview(_ZEROS)[: piece.length])
        done += piece.length
        if progress is not None:
            progress(done, total)
    return total


def _sync_dir(folder: str) -> None:
    """Make the removal of the child durable too (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
