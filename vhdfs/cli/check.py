"""``vhdfs check``: verify an image and its chain without changing a byte.

Every layer's driver reports its own structural problems (footers, header, BAT bounds and
overlaps, bitmaps); this command adds what only the chain can tell, and walks each layer's
whole allocation map so that a table pointing past the end of the file is found here rather
than at the first read of a mount.

Findings are errors (damage that loses or hides data), leaks (space nothing uses) or notes
(harmless habits of real writers, shown with ``--verbose``). Exit status: 0 when there is no
error; 1 when there is. An image that cannot be opened at all is an error line and the
error's own exit code (3 for a broken format or chain).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..block.driver import Severity
from ..errors import UsageError
from ..tools.check import check_image, count
from . import add_image_options, open_from_args


def run(args: argparse.Namespace) -> int:
    if args.dry_run and not args.repair:
        raise UsageError("--dry-run goes with --repair")
    if args.repair:
        from ..tools.maintain import repair_image
        from .maintain import refuse_if_mounted

        refuse_if_mounted(args.image)
        label = "would change" if args.dry_run else "changing"
        changes = repair_image(args.image, args.dry_run, lambda text: print(f"{args.image}: {label}: {text}"))
        if not changes:
            print(f"{args.image}: nothing to repair")
        if args.dry_run:
            return 0
    with open_from_args(args, args.image) as img:
        chain = [layer.path for layer in img.chain]
        found = check_image(img)
    errors, leaks, notes = (count(found, sev) for sev in (Severity.ERROR, Severity.LEAK, Severity.NOTE))
    if args.json:
        report: dict[str, Any] = {
            "path": chain[0],
            "chain": chain,
            "clean": errors + leaks == 0,
            "errors": errors,
            "leaks": leaks,
            "notes": notes,
            "findings": [f.as_dict() for f in found],
        }
        print(json.dumps(report, indent=2))
    else:
        for f in found:
            if f.finding.severity is not Severity.NOTE or args.verbose:
                tag = "note: " if f.finding.severity is Severity.NOTE else ""
                print(f"{f.path}: {tag}{f.finding.text}")
        what = f"{len(chain)} image{'s' if len(chain) > 1 else ''}"
        if errors + leaks == 0:
            extra = f"; {notes} note(s), see --verbose" if notes and not args.verbose else ""
            print(f"{chain[0]}: no problems found ({what} checked{extra})")
        else:
            print(f"{chain[0]}: {errors} error(s), {leaks} leak(s) in {what}")
    return 1 if errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="verify an image's structures and chain",
        description="Verify footers, headers, block tables, bitmaps and the parent chain of an "
        "image; nothing is written. Exit 0 when clean, or when the only findings are "
        "leaks (unused space, no data at risk); exit 1 when "
        "problems are found; exit 3 when the image or its chain cannot be opened.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (keys: path, chain, clean, errors, leaks, findings)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show notes (harmless habits of the writing tool)"
    )
    parser.add_argument("image", metavar="IMAGE", help="an image of any format vhdfs reads")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="fix what can be fixed safely in this image (never its parent), "
        "printing each change first, then check again",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --repair: show the changes only")
    add_image_options(parser)
    parser.set_defaults(func=run)
