"""``open_image``: probe the format, open the top layer, then find and check every parent.

Parent resolution lives here and not in the drivers because the rules that make a chain safe
are the same for every format: the first candidate that exists *and* carries the expected
identity wins; a loop, a missing parent or a parent of another format is refused by name;
parents are always opened read-only, so the kernel itself keeps them unchanged.

A parent of another size is accepted, as Hyper-V (Resize-VHD on a differencing disk) and QEMU
(a backing file shorter than its overlay) accept it: ``Image._resolve`` reads zeros for what
falls through past the parent's end, and a larger parent contributes only its prefix.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from ..errors import ChainError, NotAnImageError, UsageError, VhdfsError
from .driver import CERTAIN, Driver, ProbeData, driver, drivers, image_titles
from .image import Image, OpenOptions, ParentRef
from .rawfile import fd_size, open_image_fd, stat_image

MAX_DEPTH = 256


def probe_format(path: str) -> str:
    """Which driver reads ``path`` (the highest probe score wins); NotAnImageError when none does."""
    fd, st = open_image_fd(path)  # refuses FIFOs, sockets, character devices, directories
    try:
        size = fd_size(fd, st)
        if size == 0:
            what = "empty block device" if stat.S_ISBLK(st.st_mode) else "empty file"
            raise NotAnImageError(f"{what}: not a {image_titles()} image", path)
        try:
            head = os.pread(fd, ProbeData.HEAD_BYTES, 0)
            tail = os.pread(fd, ProbeData.TAIL_BYTES, max(0, size - ProbeData.TAIL_BYTES))
        except OSError as exc:
            raise VhdfsError(f"cannot read: {exc.strerror or exc}", path) from None
        data = ProbeData(head, tail, size, fd)
        best: Driver | None = None
        best_score = 0
        for d in drivers():
            score = d.probe(data)
            if score > best_score:
                best, best_score = d, score
            if score >= CERTAIN:
                break  # ties go to the earlier driver anyway; the later ones stay unimported
        for d in drivers() if best_score < CERTAIN else ():
            score = d.probe_slow(data) if d.probe_slow else 0
            if score > best_score:
                best, best_score = d, score
    finally:
        os.close(fd)
    if best is None:
        raise NotAnImageError(f"not a {image_titles()} image (no format's signature found)", path)
    return best.name


def open_layer(path: str, options: OpenOptions, fmt: str | None = None) -> Image:
    """One layer, parents not attached."""
    return driver(fmt or probe_format(path)).open_layer(path, options)


def make_options(
    writable: bool = False,
    *,
    parent_dirs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
    ignore_parent_id: bool = False,
    **driver_options: str,
) -> OpenOptions:
    """``OpenOptions`` from keywords; ``driver_options`` are format options such as VHD's size_rule."""
    known = {o.name: o for d in drivers() for o in d.options}
    extra: dict[str, str] = {}
    for name, value in driver_options.items():
        opt = known.get(name)
        if opt is None:
            raise TypeError(f"unknown image option {name!r}")
        if value not in opt.choices:
            raise UsageError(f"{opt.flag} must be one of {', '.join(opt.choices)}, not {value!r}")
        extra[name] = value
    return OpenOptions(
        writable=writable,
        force=force,
        parent_dirs=tuple(os.path.abspath(os.fspath(d)) for d in parent_dirs),
        ignore_parent_id=ignore_parent_id,
        extra=extra,
    )


def open_image(
    path: str | os.PathLike[str],
    writable: bool = False,
    *,
    parent_dirs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
    ignore_parent_id: bool = False,
    format: str | None = None,
    **driver_options: str,
) -> Image:
    """Open an image for reading (or writing its top layer) with its whole parent chain.

    ``format`` names a driver (default: probe); ``driver_options`` are format options such as
    VHD's ``size_rule="chs"``.
    """
    options = make_options(
        writable, parent_dirs=parent_dirs, force=force, ignore_parent_id=ignore_parent_id, **driver_options
    )
    path = os.path.abspath(os.fspath(path))  # every message names the file the same way
    top = open_layer(path, options, format)
    try:
        attach_parents(top, options)
    except BaseException:
        top.close()
        raise
    return top


def _file_key(path: str) -> tuple[int, int]:
    """What makes two paths the same image: the inode, or for a block device the device itself
    (``/dev/dm-3`` and ``/dev/VG/lv`` may be distinct nodes of one volume)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def attach_parents(top: Image, options: OpenOptions) -> None:
    """Walk ``parent_ref`` links from ``top``, opening each parent read-only."""
    parent_options = options.for_parent()
    seen = {_file_key(top.path): top.path}
    img = top
    while img.parent_ref is not None:
        if len(seen) > MAX_DEPTH:
            raise ChainError(f"chain is deeper than {MAX_DEPTH} images", top.path)
        parent = _open_parent(img, img.parent_ref, parent_options, seen)
        img.backing = parent
        seen[_file_key(parent.path)] = parent.path
        img = parent


def _candidates(child: Image, ref: ParentRef, options: OpenOptions) -> list[str]:
    unique: list[str] = []
    for cand in driver(ref.format).parent_candidates(child, ref, options.parent_dirs):
        cand = os.path.abspath(cand)
        if cand not in unique:
            unique.append(cand)
    return unique


def _open_parent(
    child: Image, ref: ParentRef, options: OpenOptions, seen: dict[tuple[int, int], str]
) -> Image:
    tried: list[str] = []
    mismatches: list[str] = []
    problems: list[str] = []
    for cand in _candidates(child, ref, options):
        if not os.path.exists(cand):
            tried.append(cand)
            continue
        try:
            stat_image(cand)  # a FIFO, socket, character device or folder is refused by name
        except VhdfsError as exc:
            if not ref.scan:
                problems.append(str(exc))
            continue
        key = _file_key(cand)
        if key in seen:
            if ref.scan:
                continue  # scanning a folder finds the child itself and its descendants
            raise ChainError(f"chain loops: parent {cand} is already in the chain above it", child.path)
        try:
            parent = open_layer(cand, options)
        except VhdfsError as exc:
            if ref.scan:
                continue
            problems.append(str(exc))
            continue
        if parent.format != ref.format:
            problems.append(
                f"{cand} is a {parent.format} image; a {ref.format} child needs a {ref.format} parent"
            )
            parent.close()
            continue
        if ref.matches(parent) or (options.ignore_parent_id and not ref.scan):
            return parent
        mismatches.append(f"{cand} has id {parent.identity()}")
        parent.close()
    if mismatches:
        raise ChainError(
            f"parent {ref.name} not found with id {ref.expected_id}: "
            + "; ".join(mismatches)
            + " (pass --ignore-parent-id to accept it anyway)",
            child.path,
        )
    if problems:
        raise ChainError(f"parent {ref.name} cannot be opened: " + "; ".join(problems), child.path)
    where = ", ".join(tried) if tried else "no candidate paths"
    raise ChainError(f"parent {ref.name} not found (tried {where}; use --parent-dir DIR)", child.path)
