"""``vhdfs create``: a new fixed, dynamic or differencing VHD, or a dynamic/static VDI.

Sizes are read the way people write them (``10G``, ``512M``, ``1.5T``, plain bytes), always in
binary units, since disk tools (qemu-img, VirtualBox) mean GiB when they say G.
"""

from __future__ import annotations

import argparse
import os
import re

from ..block.driver import drivers
from ..errors import UsageError
from ..tools.create import create_image
from .info import amount

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """``"10G"`` → 10737418240. Suffixes K/M/G/T/P (optionally ``iB``/``B``) are powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"bad {what} {text!r}: use a number of bytes or a K/M/G/T suffix (e.g. 10G)")
    number, unit = m.group(1), m.group(2).upper()
    scale = _UNITS[unit]
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * scale + int(frac) * scale // 10 ** len(frac)
        if int(frac) * scale % 10 ** len(frac):
            raise UsageError(f"bad {what} {text!r}: not a whole number of bytes")
    else:
        value = int(number) * scale
    return value


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size is not None else None
    block_size = parse_size(args.block_size, "block size") if args.block_size is not None else None
    create_image(
        args.image,
        format=args.format,
        type=args.type,
        size=size,
        parent=args.parent,
        block_size=block_size,
        sector_size=args.sector_size,
        overwrite=args.overwrite,
    )
    from ..block import open_image

    with open_image(args.image, parent_dirs=()) as img:
        print(f"created {os.path.abspath(args.image)}: {img.format} {img.type}, {amount(img.size)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "create",
        help="create a new empty image",
        description="Create a new empty image: a fixed, dynamic or differencing VHD, or a "
        "dynamic or fixed (static) VDI. The format comes from --format, else the "
        "parent's format, else the file name (.vhd/.vdi), else VHD. A differencing "
        "image takes its size from its parent. An existing file is never replaced "
        "unless --overwrite is given.",
    )
    parser.add_argument(
        "--format",
        choices=[d.name for d in drivers() if d.create is not None],
        help="image format (default: from the parent, else the name, else vhd)",
    )
    parser.add_argument(
        "--type",
        choices=("fixed", "dynamic", "differencing"),
        help="image type (default: differencing with --parent, else dynamic)",
    )
    parser.add_argument(
        "--size",
        metavar="SIZE",
        help="virtual size: bytes, or with a K/M/G/T suffix (powers of 1024), e.g. 10G",
    )
    parser.add_argument("--parent", metavar="PARENT", help="parent image of a differencing child")
    parser.add_argument(
        "--block-size",
        metavar="N",
        help="block size of a dynamic image, a power of two (K/M suffixes; default 2M for VHD, 1M for VDI)",
    )
    parser.add_argument(
        "--sector-size",
        type=int,
        metavar="N",
        help="logical sector size where the format has a choice (VHDX: 512 or 4096)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace IMAGE if it exists")
    parser.add_argument("image", metavar="IMAGE", help="the file to create")
    parser.set_defaults(func=run)
