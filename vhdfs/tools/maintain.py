"""Whole-image maintenance shared by every format: resize, compact, repair.

What is the same for VHD, VDI and VHDX lives here: the size argument (absolute or
``+N``/``-N``), the refusals (an image another process holds, a known differencing child, a
format without the hook, a differencing image: it has its parent's size), the rule that a
shrink cuts only bytes that read as zero (naming the first offset that holds data; checked on
a read-only open first, since a writable open may already write, as VHDX's header update),
and opening/closing the image around the driver's hook. Each driver only knows its own on-disk
steps (``Driver.resize``/``compact``/``repair``), each written so that a kill between any two
writes leaves an image that reads the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..block.chain import open_image, open_layer, probe_format
from ..block.driver import Driver, Severity, driver, drivers
from ..block.image import Image, OpenOptions
from ..block.maintain import first_nonzero
from ..errors import BusyError, FormatError, UnsupportedError, UsageError, VhdfsError, quiet

Progress = Callable[[int, int], None]


def new_size(text: str, current: int, parse: Callable[[str], int]) -> int:
    """``"20G"`` → 20 GiB; ``"+1G"``/``"-512M"`` relative to ``current``."""
    text = text.strip()
    if text[:1] in "+-":
        delta = parse(text[1:])
        size = current + delta if text[0] == "+" else current - delta
    else:
        size = parse(text)
    if size <= 0:
        raise UsageError(f"the new size would be {size} bytes: it must be positive")
    return size


def _hook_of(d: Driver, name: str, path: str) -> Callable[..., Any]:
    fn = getattr(d, name)
    if fn is None:
        raise UnsupportedError(f"{name} is not supported for {d.title} images yet", path)
    return fn


def _hook(path: str, name: str) -> tuple[Driver, Callable[..., Any]]:
    d = driver(probe_format(path))
    return d, _hook_of(d, name, path)


def children_of(path: str) -> list[str]:
    """Differencing images beside ``path`` whose parent reference names it (by path or UUID)."""
    with quiet():  # the neighbours' oddities are not what the user asked about
        return _children_of(path)


def _children_of(path: str) -> list[str]:
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    suffixes = tuple(s for d in drivers() if d.name != "raw" for s in d.suffixes)
    try:
        me = open_layer(path, OpenOptions())
    except VhdfsError:
        return []
    try:
        my_id = me.identity()
    finally:
        me.close()
    out: list[str] = []
    for name in sorted(os.listdir(folder)):
        cand = os.path.join(folder, name)
        if cand == path or not name.lower().endswith(suffixes) or not os.path.isfile(cand):
            continue
        try:
            child = open_layer(cand, OpenOptions())
        except VhdfsError:
            continue
        try:
            ref = child.parent_ref
            if ref is None:
                continue
            d = driver(ref.format)
            named = any(os.path.realpath(c) == path for c in d.parent_candidates(child, ref, ()))
            if (named and not ref.scan) or ref.expected_id == my_id:
                out.append(cand)
        finally:
            child.close()
    return out


def _refuse_children(path: str, force: bool, what: str) -> None:
    kids = children_of(path)
    if kids and not force:
        raise BusyError(
            f"is the parent of {', '.join(kids)}: {what} would break "
            f"{'it' if len(kids) == 1 else 'them'} (--force if you know better)",
            path,
        )


def _open_writable(path: str, **kw: Any) -> Image:
    """The image open for writing: the exclusive lock refuses one a mount or a writer holds."""
    return open_image(path, True, **kw)


def _refuse_parent_tail(img: Image, old: int, target: int) -> None:
    """A grown child's new tail must read as zeros; it falls through to the parent, which is
    zero past its own end, but a larger parent (the child was shrunk) may hold data there."""
    parent = img.backing
    if parent is None or target <= old:
        return
    hit = first_nonzero(parent, old, min(target, parent.size))
    if hit is not None:
        raise UsageError(
            f"cannot grow to {target} bytes: the parent {parent.path} holds data at offset {hit}, "
            f"past this child's end ({old}), and the new tail would show it instead of zeros",
            img.path,
        )


def _never_shrinks(cut_to: int) -> None:
    raise AssertionError(f"a grow asked to cut the disk to {cut_to} bytes")  # pragma: no cover


def grow_open(img: Image, target: int) -> list[str]:
    """Grow an image already open for writing (its chain attached) to at least ``target`` bytes.

    ``commit`` grows a parent smaller than its child this way; the image must be closed and
    opened again before it is used (the hook changes the file, not the open object's view).
    """
    hook = _hook_of(driver(img.format), "resize", img.path)
    _refuse_parent_tail(img, img.size, target)
    result: list[str] = hook(img, target, _never_shrinks)
    return result


def _refuse_damage(img: Image) -> None:
    """Resize and compact rewrite tables: refused (before any write) on a layer ``check`` finds
    damaged, e.g. a block past the end of a truncated file; ``check --repair`` comes first."""
    bad = [f.text for f in img.check() if f.severity is Severity.ERROR]
    if bad:
        raise FormatError(f"{bad[0]} (run vhdfs check; --repair fixes what it can)", img.path)


def _refuse_data(path: str, img: Image, cut_to: int) -> None:
    """A shrink to ``cut_to`` cuts only bytes that read as zeros; else the first other one named."""
    hit = first_nonzero(img, cut_to, img.size)
    if hit is not None:
        raise UsageError(
            f"cannot shrink to {cut_to} bytes: offset {hit} holds data "
            f"(everything from {cut_to} to {img.size} must read as zeros)",
            path,
        )


def resize_image(
    path: str,
    size_text: str,
    parse: Callable[[str], int],
    *,
    force: bool = False,
    open_kw: dict[str, Any] | None = None,
) -> tuple[int, int, list[str]]:
    """Resize the top layer; (old size, new size, what was done)."""
    path = os.path.abspath(path)
    _d, hook = _hook(path, "resize")
    _refuse_children(path, force, "changing its size")
    with quiet(), open_image(path, **(open_kw or {})) as ro:  # refuse before any write:
        old = ro.size  # a writable VHDX open rewrites its headers
        _refuse_damage(ro)
        target = new_size(size_text, old, parse)
        _refuse_data(path, ro, target)
        _refuse_parent_tail(ro, old, target)
    img = _open_writable(path, **(open_kw or {}))
    try:

        def ensure_zero(cut_to: int) -> None:
            _refuse_data(path, img, cut_to)

        done = hook(img, target, ensure_zero)
    finally:
        img.close()
    with open_image(path, **(open_kw or {})) as after:
        return old, after.size, done


def compact_image(
    path: str, progress: Progress, *, open_kw: dict[str, Any] | None = None
) -> tuple[int, int, list[str]]:
    """Release blocks that change nothing a reader sees and pack the rest; (bytes before, after, log)."""
    path = os.path.abspath(path)
    _d, hook = _hook(path, "compact")
    before = os.path.getsize(path)
    with quiet(), open_image(path, **(open_kw or {})) as ro:  # its warnings: at the writable open
        _refuse_damage(ro)
    img = _open_writable(path, **(open_kw or {}))
    try:
        done = hook(img, progress)
    finally:
        img.close()
    return before, os.path.getsize(path), done


def repair_image(path: str, dry_run: bool, say: Callable[[str], None]) -> list[str]:
    """Fix what the driver can fix in the top layer only (a parent is never opened for writing)."""
    path = os.path.abspath(path)
    _d, hook = _hook(path, "repair")
    return hook(path, dry_run, say)
