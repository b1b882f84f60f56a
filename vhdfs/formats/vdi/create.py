"""Create new VDI images: dynamic, static ("fixed") and differencing (VirtualBox snapshot).

The layout follows QEMU's ``qemu-img create -f vdi`` (header v1.1 of 0x180 bytes, block map
at 0x200) so qemu-img 7.2 reads what we write; the data area starts on a 4 KiB boundary so
data blocks stay page-aligned for direct I/O.
"""

from __future__ import annotations

import os
import uuid

from ...block.driver import CreateSpec, Limits
from ...block.image import OpenOptions
from ...block.rawfile import new_file, write_all
from ...errors import ChainError, VhdfsError
from . import spec as fmt

MAP_OFFSET = 0x200
DATA_ALIGN = 4096


LIMITS = Limits(
    max_size=fmt.MAX_BLOCK_INDEX * fmt.MAX_BLOCK_SIZE,
    block_sizes=(fmt.MIN_BLOCK_SIZE, fmt.MAX_BLOCK_SIZE),
    fixed_has_blocks=True,
)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def create_from_spec(spec: CreateSpec) -> None:
    """The driver's entry point: a new VDI as ``spec`` describes (already validated by tools)."""
    create_vdi(
        spec.path,
        spec.size,
        "static" if spec.type == "fixed" else "dynamic",
        block_size=spec.block_size,
        parent=spec.parent,
    )


def create_vdi(
    path: str | os.PathLike[str],
    size: int,
    type: str = "dynamic",
    *,
    block_size: int | None = None,
    parent: str | os.PathLike[str] | None = None,
    description: str = "",
) -> None:
    """Create a new image at ``path`` (which must not exist).

    ``type`` is "dynamic" or "static"/"fixed"; with ``parent`` (a VDI) the image is a
    differencing child whatever ``type`` says ("dynamic"/"differencing"): its link UUID is the
    parent's image UUID, its parent-modification UUID the parent's modification UUID, and its
    size and default block size the parent's. Bad arguments raise ``ValueError``; a partial
    file is removed on any failure.
    """
    path = os.fspath(path)
    code = fmt.TYPE_CODES.get(type)
    if code is None:
        raise ValueError(f"unknown VDI image type {type!r} (choose dynamic, static or differencing)")
    link = parent_modify = fmt.NULL_UUID
    if parent is not None:
        if code == fmt.TYPE_FIXED:
            raise ValueError("a static VDI cannot have a parent")
        code = fmt.TYPE_DIFF
        size, parent_bs, link, parent_modify = _parent_facts(os.fspath(parent))
        block_size = block_size or parent_bs
    elif code == fmt.TYPE_DIFF:
        raise ValueError("a differencing VDI needs a parent")
    block_size = block_size or fmt.DEFAULT_BLOCK_SIZE
    if size <= 0:
        raise ValueError(f"size must be positive, not {size}")
    if not (block_size & (block_size - 1) == 0 and fmt.MIN_BLOCK_SIZE <= block_size <= fmt.MAX_BLOCK_SIZE):
        raise ValueError(f"VDI block size must be a power of two from 512 bytes to 128 MiB, not {block_size}")
    blocks = -(-size // block_size)
    if blocks > fmt.MAX_BLOCK_INDEX:
        raise ValueError(f"{size} bytes needs {blocks} blocks of {block_size}: too many for a VDI")

    offset_data = _round_up(MAP_OFFSET + 4 * blocks, DATA_ALIGN)
    static = code == fmt.TYPE_FIXED
    header = fmt.VdiHeader(
        text=fmt.PRE_HEADER_TEXT,
        header_size=fmt.HEADER_V1,
        image_type=code,
        description=description.encode("utf-8")[: fmt.DESCRIPTION_SIZE - 1],
        offset_bmap=MAP_OFFSET,
        offset_data=offset_data,
        disk_size=size,
        block_size=block_size,
        blocks_in_image=blocks,
        blocks_allocated=blocks if static else 0,
        uuid_create=uuid.uuid4(),
        uuid_modify=uuid.uuid4(),
        uuid_link=link,
        uuid_parent_modify=parent_modify,
    )
    head = fmt.pack_header(header)
    entries = fmt.pack_entries(range(blocks)) if static else b"\xff" * (4 * blocks)

    with new_file(path) as fd:
        write_all(fd, head + bytes(MAP_OFFSET - len(head)), 0)
        write_all(fd, entries, MAP_OFFSET)
        # Static: the data area is a hole of zeros; dynamic: the file ends where data starts.
        os.ftruncate(fd, offset_data + (blocks * block_size if static else 0))


def _parent_facts(parent: str) -> tuple[int, int, uuid.UUID, uuid.UUID]:
    """Size, block size, image UUID and modification UUID of a VDI parent."""
    from ...block.chain import probe_format
    from .image import open_layer

    if probe_format(parent) != "vdi":
        raise ChainError("the parent of a VDI must be a VDI image", parent)
    img = open_layer(parent, OpenOptions())
    try:
        h = img.header
        if h.uuid_create == fmt.NULL_UUID:
            raise VhdfsError("the parent has a null image UUID: a child could not find it", parent)
        return h.disk_size, h.block_size, h.uuid_create, h.uuid_modify
    finally:
        img.close()
