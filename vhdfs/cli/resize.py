"""``vhdfs resize IMAGE SIZE``: grow or shrink an image in place, crash-safely.

``SIZE`` is absolute (``20G``) or relative (``+1G``, ``-512M``); a shrink cuts only bytes that
read as zeros. Refused on an image in use or one with a known differencing child (``--force``).
Each format's size rules apply and are reported (VHD: sectors, Azure whole MiB, CHS).
"""

from __future__ import annotations

import argparse

from ..tools.maintain import resize_image
from . import add_image_options, driver_options
from .create import parse_size
from .maintain import refuse_if_mounted


def run(args: argparse.Namespace) -> int:
    refuse_if_mounted(args.image)
    kw = {"parent_dirs": args.parent_dir, "ignore_parent_id": args.ignore_parent_id, **driver_options(args)}
    old, new, done = resize_image(args.image, args.size, parse_size, force=args.force, open_kw=kw)
    for line in done:
        print(f"{args.image}: {line}")
    print(f"{args.image}: {old} → {new} bytes")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "resize",
        help="grow or shrink an image in place",
        description="Change an image's virtual size in place. SIZE is absolute (20G) or relative "
        "(+1G, -512M; K/M/G/T suffixes). Growing adds a tail that reads as zeros; "
        "shrinking is refused unless every byte cut away reads as zero. A kill at any "
        "point leaves the old or the new size with the same content.",
    )
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("size", metavar="SIZE")
    parser.add_argument(
        "--force", action="store_true", help="resize even though a differencing child names this image"
    )
    add_image_options(parser)
    parser.set_defaults(func=run)
