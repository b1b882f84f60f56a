"""``create_image``: one entry point for every kind of new image, whatever the format.

Each driver's ``create`` knows its own on-disk layout; this module owns the decisions a user
should not have to make twice, for every format alike: which format (from the parent or the
file name), what size a differencing child gets (its parent's, always), the limits a format can
describe (``Driver.limits``, checked here once), and that an existing file is never silently
replaced. A creation that fails leaves no half-written file (``rawfile.new_file``).
"""

from __future__ import annotations

import os

from ..block.chain import open_image
from ..block.driver import CreateSpec, Driver, Limits, driver, format_from_name
from ..errors import UsageError, VhdfsError

TYPES = ("fixed", "dynamic", "differencing")
SECTOR = 512


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _parent_facts(parent: str) -> tuple[str, int]:
    """Format and virtual size of the parent (opened with its whole chain, read-only).

    The whole chain is opened so that a child is never made on top of a parent that cannot
    itself be read: the error then names the broken file now, not at the child's first mount.
    """
    with open_image(parent) as img:
        return img.format, img.size


def _amount(n: int) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def check_limits(
    d: Driver, type: str, size: int, block_size: int | None, sector_size: int | None, path: str
) -> None:
    """Refuse what format ``d`` cannot describe, naming the limit (one rule for every format)."""
    lim: Limits = d.limits()
    if type not in lim.types:
        names = ", ".join(d.type_names.get(t, t) for t in lim.types)
        raise UsageError(f"a {d.title} image cannot be {type} (choose {names})", path)
    unit = sector_size or SECTOR
    if size <= 0:
        raise UsageError(f"size must be positive, not {size}", path)
    if size % unit:
        raise UsageError(f"size must be a whole number of {unit}-byte sectors, not {size}", path)
    if size > lim.max_size:
        raise UsageError(
            f"a {d.title} holds at most {_amount(lim.max_size)} ({lim.max_size} bytes), not {size}", path
        )
    if sector_size is not None and sector_size not in lim.sector_sizes:
        raise UsageError(
            f"a {d.title} has {' or '.join(map(str, lim.sector_sizes))}-byte sectors, not {sector_size}", path
        )
    if block_size is not None:
        if not _is_power_of_two(block_size) or block_size < SECTOR:
            raise UsageError(f"block size must be a power of two of at least 512, not {block_size}", path)
        if lim.block_sizes is None or (type == "fixed" and not lim.fixed_has_blocks):
            raise UsageError(f"a {type} {d.title} has no blocks: --block-size does not apply", path)
        lo, hi = lim.block_sizes
        if not lo <= block_size <= hi:
            raise UsageError(
                f"a {d.title} block size must be from {_amount(lo)} to {_amount(hi)}, not {block_size}", path
            )


def create_image(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    type: str | None = None,
    size: int | None = None,
    parent: str | os.PathLike[str] | None = None,
    block_size: int | None = None,
    sector_size: int | None = None,
    overwrite: bool = False,
) -> None:
    """Create a new, empty image at ``path``.

    ``type`` defaults to "differencing" when a parent is given, else "dynamic". The format is
    taken from ``format``, else the parent's format, else the file name, else VHD. A
    differencing child always gets its parent's virtual size (a ``size`` that differs is an
    error rather than silently ignored). Bad arguments raise ``UsageError``.
    """
    path = os.fspath(path)
    parent = os.path.abspath(os.fspath(parent)) if parent is not None else None
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

    parent_format: str | None = None
    if parent:
        parent_format, parent_size = _parent_facts(parent)
        if size is not None and size != parent_size:
            raise UsageError(
                f"a differencing image has its parent's size ({parent_size} bytes), not {size}", path
            )
        size = parent_size
    fmt = format or parent_format or format_from_name(path) or "vhd"
    try:
        d = driver(fmt)
    except KeyError:
        raise UsageError(f"unknown image format {fmt!r}", path) from None
    if d.create is None:
        raise UsageError(f"vhdfs cannot create {d.title} images (use convert --to {d.name})", path)
    if parent_format is not None and parent_format != fmt:
        raise UsageError(f"a {fmt} child cannot have a {parent_format} parent ({parent})", path)
    if size is None:
        raise UsageError("the size of the new image is required (--size SIZE)", path)
    check_limits(d, type, size, block_size, sector_size, path)

    if os.path.lexists(path):
        if not overwrite:
            raise UsageError("already exists (refusing to overwrite it)", path)
        if parent and os.path.exists(path) and os.path.samefile(path, parent):
            raise UsageError("the new image would replace its own parent", path)
        os.unlink(path)

    try:
        d.create(
            CreateSpec(
                path=path, type=type, size=size, block_size=block_size, sector_size=sector_size, parent=parent
            )
        )
    except ValueError as exc:  # a creator's own argument check: the user's input is wrong
        raise UsageError(str(exc), path) from None
    except OSError as exc:
        if isinstance(exc, VhdfsError):
            raise
        raise VhdfsError(f"cannot create: {exc.strerror or exc}", path) from None
