"""``create_image``: one entry point for every kind of new image, whatever the format.

The two format creators (``vhd_create.create_vhd``, ``vdi_create.create_vdi``) each know their
own on-disk layout; this module owns the decisions a user should not have to make twice:
which format (from the parent or the file name), which type name the format uses (VDI calls a
fixed image "static"), what size a differencing child gets (its parent's, always), and that an
existing file is never silently replaced. A creation that fails leaves no half-written file.
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import UsageError, VhdfsError

FORMATS = ("vhd", "vdi")
TYPES = ("fixed", "dynamic", "differencing")
SECTOR = 512
# The largest disk the VHD format can describe (FORMATS.md §1: 2040 GiB).
VHD_MAX_SIZE = 2040 * 1024 ** 3


def format_from_name(path: str | os.PathLike[str]) -> Optional[str]:
    """The format a file name suggests (``.vhd``/``.avhd`` → vhd, ``.vdi`` → vdi), else None."""
    name = os.fspath(path).lower()
    if name.endswith((".vhd", ".avhd")):
        return "vhd"
    if name.endswith(".vdi"):
        return "vdi"
    return None


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _parent_facts(parent: str) -> tuple[str, int]:
    """Format and virtual size of the parent (opened with its whole chain, read-only).

    The whole chain is opened so that a child is never made on top of a parent that cannot
    itself be read: the error then names the broken file now, not at the child's first mount.
    """
    from .chain import open_image

    with open_image(parent) as img:
        return img.format, img.size


def create_image(
    path: str | os.PathLike[str],
    *,
    format: Optional[str] = None,
    type: Optional[str] = None,
    size: Optional[int] = None,
    parent: str | os.PathLike[str] | None = None,
    block_size: Optional[int] = None,
    overwrite: bool = False,
) -> None:
    """Create a new, empty image at ``path``.

    ``type`` defaults to "differencing" when a parent is given, else "dynamic". The format is
    taken from ``format``, else the parent's format, else the file name, else VHD. A
    differencing child always gets its parent's virtual size (a ``size`` that differs is an
    error rather than silently ignored). Bad arguments raise ``UsageError``.
    """
    path = os.fspath(path)
    parent = os.fspath(parent) if parent is not None else None
    if type is None:
        type = "differencing" if parent else "dynamic"
    if type == "static":
        type = "fixed"  # VirtualBox's word for it
    if type not in TYPES:
        raise UsageError(f"unknown image type {type!r} (choose fixed, dynamic or differencing)", path)
    if type == "differencing" and not parent:
        raise UsageError("a differencing image needs a parent (--parent PARENT)", path)
    if type != "differencing" and parent:
        raise UsageError(f"a {type} image has no parent (use --type differencing)", path)

    parent_format: Optional[str] = None
    if parent:
        parent_format, parent_size = _parent_facts(parent)
        if size is not None and size != parent_size:
            raise UsageError(
                f"a differencing image has its parent's size ({parent_size} bytes), not {size}", path)
        size = parent_size
    fmt = format or parent_format or format_from_name(path) or "vhd"
    if fmt not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r} (choose vhd or vdi)", path)
    if parent_format is not None and parent_format != fmt:
        raise UsageError(f"a {fmt} child cannot have a {parent_format} parent ({parent})", path)

    if size is None:
        raise UsageError("the size of the new image is required (--size SIZE)", path)
    if size <= 0:
        raise UsageError(f"size must be positive, not {size}", path)
    if size % SECTOR:
        raise UsageError(f"size must be a whole number of {SECTOR}-byte sectors, not {size}", path)
    if fmt == "vhd" and size > VHD_MAX_SIZE:
        raise UsageError(f"a VHD holds at most 2040 GiB ({VHD_MAX_SIZE} bytes), not {size}", path)
    if block_size is not None:
        if not _is_power_of_two(block_size) or block_size < SECTOR:
            raise UsageError(f"block size must be a power of two of at least 512, not {block_size}", path)
        if type == "fixed" and fmt == "vhd":
            raise UsageError("a fixed VHD has no blocks: --block-size does not apply", path)

    if os.path.lexists(path):
        if not overwrite:
            raise UsageError("already exists (refusing to overwrite it)", path)
        if parent and os.path.exists(path) and os.path.samefile(path, parent):
            raise UsageError("the new image would replace its own parent", path)
        os.unlink(path)

    try:
        if fmt == "vhd":
            from .vhd_create import create_vhd

            kwargs: dict = {"parent": parent} if parent else {}
            if block_size is not None:
                kwargs["block_size"] = block_size
            create_vhd(path, size, type, **kwargs)
        else:
            from .vdi_create import create_vdi

            kwargs = {"parent": parent} if parent else {}
            if block_size is not None:
                kwargs["block_size"] = block_size
            create_vdi(path, size, "static" if type == "fixed" else "dynamic", **kwargs)
    except BaseException as exc:
        # The creators open with O_EXCL and remove their own partial file; removing here
        # could delete a file another process created between our check and theirs.
        if isinstance(exc, ValueError):  # a creator's argument check: the user's input is wrong
            raise UsageError(str(exc), path) from None
        if isinstance(exc, OSError) and not isinstance(exc, VhdfsError):
            raise VhdfsError(f"cannot create: {exc.strerror or exc}", path) from None
        raise

