"""Create fixed, dynamic and differencing VHDs that every reader sizes the same way.

Creator app is ``win `` (Windows 10.0, host ``Wi2k``): qemu-img 7.2 and QEMU 10 both take
current_size for it, as do libvhdi, VirtualBox and Windows; so current_size is the exact
(sector-rounded) size and the CHS geometry is informational. A whole-MiB fixed image thus meets
Azure's rules. The file is created with O_EXCL (user data is never overwritten) and removed
again if anything fails before it is complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ...block.driver import CreateSpec, Limits
from ...block.rawfile import new_file, write_all
from ...errors import UsageError, VhdfsError
from . import spec as fmt
from . import spec_locators as vloc

DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
# Below 4 KiB the spec's bitmap is ceil(B/4096) bytes padded to a sector, but QEMU, VirtualBox
# and blktap compute floor(B/4096) padded = 0 bytes: such images read differently everywhere.
MIN_BLOCK_SIZE = 4096
LIMITS = Limits(max_size=fmt.MAX_VIRTUAL_SIZE, block_sizes=(MIN_BLOCK_SIZE, 1 << 30))
TYPES = {"fixed": fmt.DISK_FIXED, "dynamic": fmt.DISK_DYNAMIC, "differencing": fmt.DISK_DIFFERENCING}


def create_from_spec(spec: CreateSpec) -> None:
    """The driver's entry point: a new VHD as ``spec`` describes (already validated by tools)."""
    create_vhd(
        spec.path,
        spec.size,
        spec.type,
        parent=spec.parent,
        block_size=spec.block_size or DEFAULT_BLOCK_SIZE,
        parent_dirs=spec.parent_dirs,
    )


def create_vhd(
    path: str | os.PathLike[str],
    size: int | None = None,
    type: str = "dynamic",
    *,
    parent: str | os.PathLike[str] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    parent_dirs: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Create a new VHD at ``path``.

    ``size`` (bytes, rounded up to a sector) is required for fixed and dynamic disks; a
    differencing disk takes its size from ``parent`` (any VHD, opened read-only with its own
    chain, searching ``parent_dirs``).
    """
    path = os.fspath(path)
    if type not in TYPES:
        raise UsageError(f"unknown VHD type {type!r} (fixed, dynamic or differencing)", path)
    try:
        fmt.check_block_size(block_size)
    except VhdfsError as exc:
        raise UsageError(exc.message, path) from None
    if block_size < MIN_BLOCK_SIZE:
        raise UsageError(
            f"block size {block_size} is below 4 KiB: QEMU, VirtualBox and blktap "
            "would misplace the sector bitmap of such blocks",
            path,
        )
    if type == "differencing":
        if parent is None:
            raise UsageError("a differencing VHD needs a parent", path)
        layout = _differencing_layout(path, os.fspath(parent), block_size, parent_dirs, size)
    else:
        if parent is not None:
            raise UsageError(f"a {type} VHD takes no parent", path)
        if size is None or size <= 0:
            raise UsageError("size must be a positive number of bytes", path)
        size = (size + fmt.SECTOR - 1) // fmt.SECTOR * fmt.SECTOR
        if size > fmt.MAX_VIRTUAL_SIZE:
            raise UsageError(f"size {size} exceeds the VHD maximum of 2040 GiB", path)
        if type == "fixed":
            layout = [(size, fmt.make_footer(size, fmt.DISK_FIXED).pack())]
        else:
            layout = _sparse_layout(fmt.make_footer(size, fmt.DISK_DYNAMIC), block_size, None, [])
    _write_new_file(path, layout)


def _sparse_layout(
    footer: fmt.Footer,
    block_size: int,
    parent_info: tuple[bytes, int, bytes] | None,
    locator_paths: list[tuple[int, str]],
) -> list[tuple[int, bytes]]:
    """(offset, bytes) pieces: footer copy, header, empty BAT, locators, footer."""
    entries = (footer.current_size + block_size - 1) // block_size
    table_offset = fmt.FOOTER_SIZE + fmt.HEADER_SIZE
    pos = table_offset + fmt.bat_bytes(entries)
    pieces: list[tuple[int, bytes]] = [(table_offset, b"\xff" * fmt.bat_bytes(entries))]
    locators: list[fmt.Locator] = []
    for code, value in locator_paths:
        data = vloc.encode_w2_locator(value)
        space = (len(data) + fmt.SECTOR - 1) // fmt.SECTOR * fmt.SECTOR
        locators.append(fmt.Locator(code, space, len(data), 0, pos))
        pieces.append((pos, data.ljust(space, b"\0")))
        pos += space
    parent_id, parent_ts, parent_name = parent_info or (bytes(16), 0, b"")
    header = fmt.DynamicHeader(
        data_offset=fmt.HEADER_DATA_OFFSET,
        table_offset=table_offset,
        header_version=fmt.HEADER_VERSION,
        max_table_entries=entries,
        block_size=block_size,
        checksum=0,
        parent_id=parent_id,
        parent_timestamp=parent_ts,
        parent_name_raw=parent_name,
        locators=locators,
    )
    raw_footer = footer.pack()
    return [(0, raw_footer), (fmt.FOOTER_SIZE, header.pack()), *pieces, (pos, raw_footer)]


def _differencing_layout(
    path: str, parent: str, block_size: int, parent_dirs: Iterable[str | os.PathLike[str]], size: int | None
) -> list[tuple[int, bytes]]:
    from ...block.chain import open_image

    parent_abs = os.path.abspath(parent)
    with open_image(parent_abs, parent_dirs=parent_dirs) as top:
        if top.format != "vhd":
            raise UsageError(f"parent {parent_abs} is a {top.format} image, not a VHD", path)
        pfoot: fmt.Footer = top.footer  # type: ignore[attr-defined]
        vsize = top.size
    if vsize > fmt.MAX_VIRTUAL_SIZE:
        raise UsageError(f"parent {parent_abs} is larger than 2040 GiB", path)
    if size is not None and size != vsize:
        raise UsageError(f"a differencing VHD has its parent's size ({vsize}), not {size}", path)
    footer = fmt.make_footer(
        vsize, fmt.DISK_DIFFERENCING, geometry=(pfoot.cylinders, pfoot.heads, pfoot.sectors)
    )
    name = os.path.basename(parent_abs)
    name_raw = name.encode("utf-16-be", errors="surrogatepass")
    if len(name_raw) > 512:
        raise UsageError(f"parent name {name!r} is too long for the VHD header (256 UTF-16 units)", path)
    mtime = os.stat(parent_abs).st_mtime
    child_dir = os.path.dirname(os.path.abspath(path))
    relative = os.path.relpath(parent_abs, child_dir).replace("/", "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    absolute = parent_abs.replace("/", "\\")
    return _sparse_layout(
        footer,
        block_size,
        (pfoot.unique_id, fmt.vhd_timestamp(mtime), name_raw),
        [(fmt.PLAT_W2KU, absolute), (fmt.PLAT_W2RU, relative)],
    )


def _write_new_file(path: str, pieces: list[tuple[int, bytes]]) -> None:
    """Create ``path`` exclusively with every piece written (a fixed disk's data area a hole)."""
    with new_file(path) as fd:
        os.ftruncate(fd, max(off + len(data) for off, data in pieces))
        for off, data in pieces:
            write_all(fd, data, off)
