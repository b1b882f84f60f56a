"""``vhdfs compact IMAGE``: release blocks that read as zeros (or as the parent) and shrink the file.

Zero the guest's free space first (README: zerofree, sdelete -z, fstrim); then every block
whose content a reader would see anyway without it is released and the rest packed down.
"""

from __future__ import annotations

import argparse

from ..tools.maintain import compact_image
from . import add_image_options, driver_options
from .convert import progress_bar
from .maintain import refuse_if_mounted


def run(args: argparse.Namespace) -> int:
    refuse_if_mounted(args.image)
    kw = {"parent_dirs": args.parent_dir, "ignore_parent_id": args.ignore_parent_id, **driver_options(args)}
    with progress_bar("compact", quiet=args.quiet) as progress:
        before, after, done = compact_image(args.image, progress, open_kw=kw)
    for line in done:
        print(f"{args.image}: {line}")
    print(f"{args.image}: {before} → {after} bytes")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compact",
        help="release zero blocks and shrink the image file",
        description="Release every block that reads the same without it (zeros, or the parent's "
        "data for a differencing image) and move the remaining blocks down so the "
        "file gets smaller. Crash-safe at every step; a second run finishes an "
        "interrupted one.",
    )
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_image_options(parser)
    parser.set_defaults(func=run)
