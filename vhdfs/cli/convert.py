"""``vhdfs convert``: any readable image or chain (or a raw file) to a new VHD, VDI or raw file.

Also home of ``progress_bar``, shared with ``commit``: a tqdm bar on stderr that stays silent
when stderr is not a terminal (``disable=None``), so scripts and logs get no control codes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..block.driver import driver, format_names
from ..block.image import Image
from ..errors import NotAnImageError
from ..tools.convert import convert, output_format
from . import add_image_options, open_from_args
from .info import amount

RAW_SUFFIXES = (".bin", ".dd", ".iso")  # besides the raw driver's own suffixes


@contextmanager
def progress_bar(desc: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a byte-counting tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(
        total=0,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=True if quiet else None,
        leave=False,
        dynamic_ncols=True,
    )
    state = {"done": 0}

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - state["done"])
        state["done"] = done

    try:
        yield update
    finally:
        bar.close()


def _open_source(args: argparse.Namespace) -> Image:
    """The source image; a file that is no image is read as raw when asked or named so."""
    from ..block import open_image, probe_format

    src_format = args.source_format
    if src_format == "auto":
        try:
            probe_format(args.src)
        except NotAnImageError as exc:
            if not driver("raw").suffix_matches(args.src) and not args.src.lower().endswith(RAW_SUFFIXES):
                raise NotAnImageError(
                    exc.message + "; pass --from raw to read it as a raw disk", exc.path
                ) from None
            src_format = "raw"
    if src_format == "raw":
        return open_image(args.src, format="raw")
    return open_from_args(args, args.src, format=None if src_format == "auto" else src_format)


def run(args: argparse.Namespace) -> int:
    from .create import parse_size

    fmt = output_format(args.dst, args.to)
    block_size = parse_size(args.block_size, "block size") if args.block_size else None
    with _open_source(args) as src:
        with progress_bar(f"convert {os.path.basename(args.src)}", args.quiet) as progress:
            written = convert(
                src,
                args.dst,
                to=fmt,
                type=args.type,
                progress=progress,
                overwrite=args.overwrite,
                block_size=block_size,
            )
        size = src.size
    if not args.quiet:
        print(
            f"converted {args.src} -> {args.dst} ({fmt}): {amount(size)} virtual, "
            f"{amount(written)} of data written"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="copy an image or chain into a new VHD, VDI or raw file",
        description="Copy the whole virtual disk of SRC (an image, a differencing chain read "
        "through all its parents, or a raw file) into a new file DST. Unallocated "
        "and all-zero ranges are skipped, so a dynamic or raw output stays sparse. "
        "A progress bar is drawn on stderr when it is a terminal. DST must not "
        "exist unless --overwrite is given; a failed conversion leaves no DST.",
    )
    parser.add_argument("src", metavar="SRC", help="source image (or raw file)")
    parser.add_argument("dst", metavar="DST", help="new file to write")
    parser.add_argument("--to", choices=format_names(), help="output format (default: from DST's name)")
    parser.add_argument(
        "--type",
        choices=("dynamic", "fixed"),
        default="dynamic",
        help="output type for vhd/vdi (default dynamic; fixed VDI = static)",
    )
    parser.add_argument("--block-size", metavar="N", help="block size of a dynamic output")
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=("auto", *format_names()),
        default="auto",
        help="source format (default: probe; raw for .raw/.img names)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    add_image_options(parser)
    parser.set_defaults(func=run)
