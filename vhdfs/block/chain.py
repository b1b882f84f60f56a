"""``open_image``: probe the format, open the top layer, then find and check every parent.

Parent resolution lives here and not in the drivers because the rules that make a chain safe
are the same for every format: the first candidate that exists *and* carries the expected
identity wins; a loop, a missing parent or a parent of another size is refused by name; parents
are always opened read-only, so the kernel itself keeps them unchanged.
"""

from __future__ import annotations

import importlib
import os
from typing import Iterable

from ..errors import ChainError, FormatError, VhdfsError
from .base import Image, OpenOptions, ParentRef

MAX_DEPTH = 256
# Format name -> module with ``probe(head, tail, file_size)`` and ``open_layer(path, options)``.
DRIVERS = {"vhd": "vhdfs.block.vhd", "vdi": "vhdfs.block.vdi"}
IMAGE_SUFFIXES = {"vhd": (".vhd", ".avhd"), "vdi": (".vdi",)}


def _driver(fmt: str):  # noqa: ANN202 - a module
    return importlib.import_module(DRIVERS[fmt])


def probe_format(path: str) -> str:
    """Which driver reads ``path``; a FormatError when none does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VhdfsError("no such file", path) from None
    except IsADirectoryError:
        raise VhdfsError("is a directory, not an image file", path) from None
    except OSError as exc:
        raise VhdfsError(exc.strerror or str(exc), path) from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 1024, 0)
        tail = os.pread(fd, 1024, max(0, size - 1024)) if size else b""
    finally:
        os.close(fd)
    if size == 0:
        raise FormatError("empty file: not a VHD or VDI image", path)
    for fmt in DRIVERS:
        if _driver(fmt).probe(head, tail, size):
            return fmt
    for fmt in DRIVERS:  # slower second looks (e.g. a footer followed by padding)
        probe_slow = getattr(_driver(fmt), "probe_slow", None)
        if probe_slow is not None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if probe_slow(fd, size):
                    return fmt
            finally:
                os.close(fd)
    raise FormatError("not a VHD or VDI image (no VHD footer, no VDI signature)", path)


def open_layer(path: str, options: OpenOptions, fmt: str | None = None) -> Image:
    """One layer, parents not attached."""
    fmt = fmt or probe_format(path)
    return _driver(fmt).open_layer(path, options)


def open_image(
    path: str | os.PathLike[str],
    writable: bool = False,
    *,
    parent_dirs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
    size_rule: str = "auto",
    ignore_parent_id: bool = False,
    format: str | None = None,
) -> Image:
    """Open an image for reading (or writing its top layer) with its whole parent chain."""
    options = OpenOptions(
        writable=writable, force=force, size_rule=size_rule,
        parent_dirs=tuple(os.path.abspath(os.fspath(d)) for d in parent_dirs),
        ignore_parent_id=ignore_parent_id)
    path = os.path.abspath(os.fspath(path))   # every message names the file the same way
    if format == "raw":
        from .raw import RawImage
        return RawImage(path, writable)
    top = open_layer(path, options, format)
    try:
        attach_parents(top, options)
    except BaseException:
        top.close()
        raise
    return top


def _file_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def attach_parents(top: Image, options: OpenOptions) -> None:
    """Walk ``parent_ref`` links from ``top``, opening each parent read-only."""
    parent_options = OpenOptions(
        writable=False, force=options.force, size_rule=options.size_rule,
        parent_dirs=options.parent_dirs, ignore_parent_id=options.ignore_parent_id)
    seen = {_file_key(top.path): top.path}
    img = top
    while img.parent_ref is not None:
        if len(seen) > MAX_DEPTH:
            raise ChainError(f"chain is deeper than {MAX_DEPTH} images", top.path)
        parent = _open_parent(img, img.parent_ref, parent_options, seen)
        img.backing = parent
        if parent.size != img.size:
            raise ChainError(
                f"parent {parent.path} is {parent.size} bytes but the child expects {img.size}",
                img.path)
        seen[_file_key(parent.path)] = parent.path
        img = parent


def _candidates(child: Image, ref: ParentRef, options: OpenOptions) -> list[str]:
    out: list[str] = list(ref.candidates)
    for folder in options.parent_dirs:
        out.extend(os.path.join(folder, name) for name in ref.search_names)
    if ref.match_by_id_in_dirs:
        for folder in (os.path.dirname(child.path), *options.parent_dirs):
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                continue
            out.extend(os.path.join(folder, n) for n in names
                       if n.lower().endswith(IMAGE_SUFFIXES[ref.format]))
    unique: list[str] = []
    for cand in out:
        cand = os.path.abspath(cand)
        if cand not in unique:
            unique.append(cand)
    return unique


def _open_parent(child: Image, ref: ParentRef, options: OpenOptions,
                 seen: dict[tuple[int, int], str]) -> Image:
    tried: list[str] = []
    mismatches: list[str] = []
    problems: list[str] = []
    for cand in _candidates(child, ref, options):
        if not os.path.isfile(cand):
            tried.append(cand)
            continue
        key = _file_key(cand)
        if key in seen:
            if ref.match_by_id_in_dirs:
                continue  # scanning a folder finds the child itself and its descendants
            raise ChainError(f"chain loops: parent {cand} is already in the chain above it", child.path)
        try:
            parent = open_layer(cand, options)
        except VhdfsError as exc:
            if ref.match_by_id_in_dirs:
                continue
            problems.append(str(exc))
            continue
        if parent.format != ref.format:
            problems.append(f"{cand} is a {parent.format} image; a {ref.format} child needs a {ref.format} parent")
            parent.close()
            continue
        if ref.matches(parent) or (options.ignore_parent_id and not ref.match_by_id_in_dirs):
            return parent
        mismatches.append(f"{cand} has id {parent.identity()}")
        parent.close()
    if mismatches:
        raise ChainError(
            f"parent {ref.name} not found with id {ref.expected_id}: " + "; ".join(mismatches)
            + " (pass --ignore-parent-id to accept it anyway)", child.path)
    if problems:
        raise ChainError(f"parent {ref.name} cannot be opened: " + "; ".join(problems), child.path)
    where = ", ".join(tried) if tried else "no candidate paths"
    raise ChainError(f"parent {ref.name} not found (tried {where}; use --parent-dir DIR)", child.path)
