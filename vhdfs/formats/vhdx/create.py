"""Create fixed, dynamic and differencing VHDX files laid out the way Hyper-V makes them.

Layout (every region 1 MiB aligned, as [MS-VHDX] §2.1 requires)::

    0        file type identifier, creator "vhdfs <version>"
    64 KiB   header 1 (sequence 1)        128 KiB  header 2 (sequence 2)
    192 KiB  region table 1               256 KiB  region table 2 (identical: a real backup)
    1 MiB    log, 1 MiB, empty (LogGuid zero: nothing to replay)
    2 MiB    metadata region (1 MiB): table, then the items from 64 KiB on
    3 MiB    BAT, its entry count × 8 bytes rounded up to 1 MiB
    then     a fixed disk's payload blocks, contiguous, in block order (a hole: ftruncate)

Like Hyper-V: the region table lists the BAT first, both regions Required; metadata items in
Windows' order (file parameters, virtual disk size, logical and physical sector size, page 83,
then the parent locator), the file parameters and locator IsRequired, the others
IsVirtualDisk|IsRequired. Defaults as Windows chose them (FORMATS-VHDX.md): 32 MiB blocks for
dynamic disks, 2 MiB for fixed disks and differencing (checkpoint) files; 512-byte logical and
4096-byte physical sectors. A fixed disk has every payload entry FULLY_PRESENT and sets
LeaveBlockAllocated; a dynamic or differencing one starts with every entry NOT_PRESENT (zero),
so the BAT is a hole too. No entry is ever ZERO with a non-zero offset (Hyper-V rejects it).

A differencing file takes its size and both sector sizes from the parent, and writes the parent
locator keys Hyper-V writes: ``parent_linkage`` (the parent's DataWriteGuid as ``{guid}``),
``parent_linkage2`` (the zero GUID, as in real checkpoints), ``relative_path`` (``.\\name`` or
``..\\dir\\name``), ``absolute_win32_path`` (the absolute path with backslashes). Hyper-V's
``volume_path`` (``\\\\?\\Volume{GUID}\\...``) names a Windows volume GUID, which cannot be
derived on Linux, so it is omitted (readers fall back to the other paths).

The file is created with O_EXCL (``rawfile.new_file``): nothing existing is overwritten, and a
failure removes the partial file.
"""

from __future__ import annotations

import array
import os
import sys
import uuid

from ... import __version__
from ...block.driver import CreateSpec, Limits
from ...block.rawfile import RawFile, new_file, write_all
from ...errors import UsageError, VhdfsError
from . import locator_spec, spec
from .spec import KiB, MiB

DEFAULT_BLOCK_SIZE = 32 * MiB  # dynamic, as Hyper-V
FIXED_BLOCK_SIZE = 2 * MiB  # fixed, as Windows
DIFFERENCING_BLOCK_SIZE = 2 * MiB  # checkpoints (.avhdx), as Hyper-V
DEFAULT_BLOCK_SIZES = {
    "fixed": FIXED_BLOCK_SIZE,
    "dynamic": DEFAULT_BLOCK_SIZE,
    "differencing": DIFFERENCING_BLOCK_SIZE,
}
DEFAULT_LOGICAL_SECTOR_SIZE = 512
DEFAULT_PHYSICAL_SECTOR_SIZE = 4096
CREATOR = f"vhdfs {__version__}"

LOG_OFFSET = 1 * MiB
LOG_LENGTH = 1 * MiB
METADATA_OFFSET = 2 * MiB
METADATA_LENGTH = 1 * MiB
BAT_OFFSET = 3 * MiB
ITEMS_OFFSET = 64 * KiB  # metadata items start after the 64 KiB table

LIMITS = Limits(
    max_size=spec.MAX_VIRTUAL_SIZE,
    block_sizes=(spec.MIN_BLOCK_SIZE, spec.MAX_BLOCK_SIZE),
    fixed_has_blocks=True,
    sector_sizes=spec.SECTOR_SIZES,
)

_REQUIRED = spec.META_IS_REQUIRED
_VIRTUAL_REQUIRED = spec.META_IS_VIRTUAL_DISK | spec.META_IS_REQUIRED
_BAT_CHUNK = 1 << 16  # BAT entries packed per write of a fixed disk


def create_from_spec(spec_: CreateSpec) -> None:
    """The driver's entry point: a new VHDX as ``spec_`` describes."""
    create_vhdx(
        spec_.path,
        spec_.size,
        spec_.type,
        parent=spec_.parent,
        block_size=spec_.block_size,
        sector_size=spec_.sector_size,
        parent_dirs=spec_.parent_dirs,
    )


def create_vhdx(
    path: str | os.PathLike[str],
    size: int | None = None,
    type: str = "dynamic",
    *,
    parent: str | os.PathLike[str] | None = None,
    block_size: int | None = None,
    sector_size: int | None = None,
    physical_sector_size: int | None = None,
    parent_dirs: tuple[str, ...] = (),
) -> None:
    """Create a new VHDX at ``path`` (UsageError for arguments the format cannot describe).

    ``size`` is required for fixed and dynamic disks and must be a multiple of the logical
    sector size; a differencing file takes size and sector sizes from ``parent``.
    """
    path = os.fspath(path)
    if type not in DEFAULT_BLOCK_SIZES:
        raise UsageError(f"unknown VHDX type {type!r} (fixed, dynamic or differencing)", path)
    bs = DEFAULT_BLOCK_SIZES[type] if block_size is None else block_size
    if not spec.MIN_BLOCK_SIZE <= bs <= spec.MAX_BLOCK_SIZE or bs & (bs - 1):
        raise UsageError(f"a VHDX block size must be a power of two from 1 MiB to 256 MiB, not {bs}", path)
    locator: dict[str, str] | None = None
    if type == "differencing":
        if parent is None:
            raise UsageError("a differencing VHDX needs a parent", path)
        vsize, logical, physical, locator = _parent_facts(path, os.fspath(parent), parent_dirs)
        if size is not None and size != vsize:
            raise UsageError(f"a differencing VHDX has its parent's size ({vsize}), not {size}", path)
        if sector_size is not None and sector_size != logical:
            raise UsageError(
                f"a differencing VHDX has its parent's {logical}-byte sectors, not {sector_size}", path
            )
    else:
        if parent is not None:
            raise UsageError(f"a {type} VHDX takes no parent", path)
        logical = DEFAULT_LOGICAL_SECTOR_SIZE if sector_size is None else sector_size
        physical = physical_sector_size or max(logical, DEFAULT_PHYSICAL_SECTOR_SIZE)
        if size is None or size <= 0:
            raise UsageError("size must be a positive number of bytes", path)
        vsize = size
    for what, v in (("logical", logical), ("physical", physical)):
        if v not in spec.SECTOR_SIZES:
            raise UsageError(f"{what} sector size must be 512 or 4096, not {v}", path)
    if vsize % logical:
        raise UsageError(f"size must be a whole number of {logical}-byte sectors, not {vsize}", path)
    if vsize > spec.MAX_VIRTUAL_SIZE:
        raise UsageError(f"size {vsize} exceeds the VHDX maximum of 64 TiB", path)
    _write(path, type, vsize, bs, logical, physical, locator)


def _parent_facts(
    path: str, parent: str, parent_dirs: tuple[str, ...]
) -> tuple[int, int, int, dict[str, str]]:
    """(virtual size, logical, physical sector size, locator keys) of a VHDX parent.

    The parent's own chain is opened when the VHDX driver is registered (a child of a broken
    chain is refused); its facts come from ``layout.open_layout``, which reads a dirty parent
    through its log without writing it.
    """
    from ...block.driver import format_names
    from . import layout as vlayout

    parent_abs = os.path.abspath(parent)
    if "vhdx" in format_names():
        from ...block.chain import open_image

        with open_image(parent_abs, parent_dirs=parent_dirs) as top:
            if top.format != "vhdx":
                raise UsageError(f"parent {parent_abs} is a {top.format} image, not a VHDX", path)
    f = RawFile(parent_abs)
    try:
        lay, _, _ = vlayout.open_layout(f.pread, f.size())
    except VhdfsError as exc:
        raise exc.with_path(parent_abs) from None
    finally:
        f.close()
    child_dir = os.path.dirname(os.path.abspath(path))
    relative = os.path.relpath(parent_abs, child_dir).replace("/", "\\")
    if not relative.startswith(".."):
        relative = ".\\" + relative
    locator = {
        "parent_linkage": "{" + str(lay.header.data_write_guid) + "}",
        "parent_linkage2": "{" + str(spec.NULL_GUID) + "}",
        "relative_path": relative,
        "absolute_win32_path": parent_abs.replace("/", "\\"),
    }
    return lay.virtual_size, lay.logical_sector_size, lay.physical_sector_size, locator


def metadata_region(
    block_size: int,
    virtual_size: int,
    logical: int,
    physical: int,
    *,
    fixed: bool,
    locator: dict[str, str] | None,
    page83: uuid.UUID,
) -> bytes:
    """The metadata region's used part: table at 0, items packed from 64 KiB in table order."""
    items: list[tuple[uuid.UUID, bytes, int]] = [
        (
            spec.FILE_PARAMETERS,
            spec.pack_file_parameters(
                spec.FileParameters(block_size, leave_block_allocated=fixed, has_parent=locator is not None)
            ),
            _REQUIRED,
        ),
        (spec.VIRTUAL_DISK_SIZE, spec.pack_u64(virtual_size), _VIRTUAL_REQUIRED),
        (spec.LOGICAL_SECTOR_SIZE, spec.pack_u32(logical), _VIRTUAL_REQUIRED),
        (spec.PHYSICAL_SECTOR_SIZE, spec.pack_u32(physical), _VIRTUAL_REQUIRED),
        (spec.PAGE83, spec.pack_page83(page83), _VIRTUAL_REQUIRED),
    ]
    if locator is not None:
        items.append((spec.PARENT_LOCATOR, locator_spec.pack_parent_locator(locator), _REQUIRED))
    entries, blob, pos = [], bytearray(), ITEMS_OFFSET
    for item_id, data, flags in items:
        entries.append(
            spec.MetadataEntry(
                item_id,
                pos,
                len(data),
                False,
                bool(flags & spec.META_IS_VIRTUAL_DISK),
                bool(flags & spec.META_IS_REQUIRED),
            )
        )
        blob += data
        pos += len(data)
    if pos > METADATA_LENGTH:
        raise UsageError("parent locator too long for the metadata region")
    return spec.pack_metadata_table(entries) + bytes(blob)


def _write(
    path: str, type: str, vsize: int, bs: int, logical: int, physical: int, locator: dict[str, str] | None
) -> None:
    geometry = spec.bat_geometry(vsize, bs, logical, locator is not None)
    bat_length = -(-geometry.entry_count * 8 // MiB) * MiB
    data_offset = BAT_OFFSET + bat_length
    fixed = type == "fixed"
    file_size = data_offset + (geometry.payload_blocks * bs if fixed else 0)
    regions = [
        spec.RegionEntry(spec.BAT_REGION, BAT_OFFSET, bat_length, True),
        spec.RegionEntry(spec.METADATA_REGION, METADATA_OFFSET, METADATA_LENGTH, True),
    ]
    table = spec.pack_region_table(regions)
    fwg, dwg = uuid.uuid4(), uuid.uuid4()
    headers = [
        spec.pack_header(spec.Header(seq, fwg, dwg, spec.NULL_GUID, 0, 1, LOG_LENGTH, LOG_OFFSET))
        for seq in (1, 2)
    ]
    meta = metadata_region(bs, vsize, logical, physical, fixed=fixed, locator=locator, page83=uuid.uuid4())
    with new_file(path) as fd:
        os.ftruncate(fd, file_size)
        write_all(fd, spec.pack_file_identifier(CREATOR), spec.FILE_ID_OFFSET)
        write_all(fd, headers[0], spec.HEADER1_OFFSET)
        write_all(fd, headers[1], spec.HEADER2_OFFSET)
        write_all(fd, table, spec.REGION_TABLE1_OFFSET)
        write_all(fd, table, spec.REGION_TABLE2_OFFSET)
        write_all(fd, meta, METADATA_OFFSET)
        if fixed:
            _write_fixed_bat(fd, geometry, bs, data_offset)


def _write_fixed_bat(fd: int, geometry: spec.BatGeometry, bs: int, data_offset: int) -> None:
    """Every payload entry FULLY_PRESENT at data_offset + block × block size; bitmap slots 0.

    A FULLY_PRESENT entry is its MiB-aligned offset with the state in bits 0-2, so a chunk's
    entries are an arithmetic run (checked against ``pack_bat_entry`` at both ends).
    """
    ratio, payload = geometry.chunk_ratio, geometry.payload_blocks
    at = BAT_OFFSET
    for first in range(0, payload, ratio):
        last = min(payload, first + ratio)
        for start in range(first, last, _BAT_CHUNK):
            stop = min(last, start + _BAT_CHUNK)
            lo = spec.pack_bat_entry(spec.PAYLOAD_FULLY_PRESENT, data_offset + start * bs)
            run = array.array("Q", range(lo, lo + (stop - start) * bs, bs))
            assert run[-1] == spec.pack_bat_entry(spec.PAYLOAD_FULLY_PRESENT, data_offset + (stop - 1) * bs)
            if sys.byteorder != "little":
                run.byteswap()
            write_all(fd, run.tobytes(), at)
            at += 8 * len(run)
        at += 8  # this chunk's sector-bitmap slot: NOT_PRESENT (0, a hole)
