"""``vhdfs commit``: merge a differencing child into its parent (see ``vhdfs.block.commit``)."""

from __future__ import annotations

import argparse
import os

from ..tools.commit import commit
from . import add_image_options, driver_options
from .convert import progress_bar
from .info import amount


def run(args: argparse.Namespace) -> int:
    with progress_bar(f"commit {os.path.basename(args.child)}", args.quiet) as progress:
        result = commit(
            args.child,
            parent_dirs=args.parent_dir,
            progress=progress,
            remove=args.remove,
            ignore_parent_id=args.ignore_parent_id,
            driver_options=driver_options(args),
        )
    if not args.quiet:
        tail = "; child removed" if result.removed else ""
        if result.parent_grown:
            print(f"grew {result.parent} to the child's size: {'; '.join(result.parent_grown)}")
        print(f"committed {amount(result.bytes_copied)} from {result.child} into {result.parent}{tail}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "commit",
        help="merge a differencing child into its parent",
        description="Write exactly the sectors a differencing CHILD stores itself into its parent, "
        "so the parent afterwards reads as the child did. Crash-safe: the child is "
        "only read, and is removed (with --remove) only after the parent is on disk; "
        "after a crash, run the same command again. Other children of the same "
        "parent become invalid, as with any change to a parent.",
    )
    parser.add_argument("child", metavar="CHILD", help="the differencing image to commit")
    parser.add_argument("--remove", action="store_true", help="delete CHILD after a successful commit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    add_image_options(parser)
    parser.set_defaults(func=run)
