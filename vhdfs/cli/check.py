"""``vhdfs check``: verify an image and its chain without changing a byte.

Every layer's driver reports its own structural problems (footers, header, BAT bounds and
overlaps, bitmaps); this command adds what only the chain can tell, and walks each layer's
whole allocation map so that a table pointing past the end of the file is found here rather
than at the first read of a mount.

Exit status: 0 when clean; 0 too when every finding is a leak (a finding that starts with
``leak:``: space in the file that nothing uses, which wastes room but loses no data); 1 when
any other problem is found. An image that cannot be opened at all is an error line and the
error's own exit code (3 for a broken format or chain).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..block.base import Image, Kind
from ..errors import VhdfsError
from . import add_image_options, open_from_args


def _map_problems(layer: Image) -> list[str]:
    """Walk the layer's whole map: every DATA extent must lie inside the file."""
    try:
        file_size = os.path.getsize(layer.path)
        for ext in layer.map_layer(0, layer.size):
            if ext.kind == Kind.DATA and ext.file_offset + ext.length > file_size:
                return [f"data for virtual offset {ext.offset} lies past the end of the file "
                        f"({ext.file_offset + ext.length} > {file_size})"]
    except VhdfsError as exc:
        return [exc.message]
    return []


def check_image(img: Image) -> list[dict[str, str]]:
    """Findings for every layer of an open chain, top first: ``{"path", "problem", "severity"}``."""
    findings: list[dict[str, str]] = []
    chain = img.chain
    for depth, layer in enumerate(chain):
        problems: list[str] = []
        try:
            problems.extend(layer.check())
        except VhdfsError as exc:
            problems.append(exc.message)
        for p in _map_problems(layer):
            if p not in problems:
                problems.append(p)
        if depth + 1 < len(chain):
            parent = chain[depth + 1]
            ref = layer.parent_ref
            if ref is not None and not ref.matches(parent):
                problems.append(f"parent {parent.path} has id {parent.identity()}, "
                                f"the child expects {ref.expected_id}")
            if parent.size != layer.size:
                problems.append(f"parent {parent.path} is {parent.size} bytes, the child {layer.size}")
        for p in problems:
            findings.append({"path": layer.path, "problem": p,
                             "severity": "leak" if p.startswith("leak:") else "error"})
    return findings


def run(args: argparse.Namespace) -> int:
    with open_from_args(args, args.image) as img:
        chain = [layer.path for layer in img.chain]
        findings = check_image(img)
    errors = [f for f in findings if f["severity"] == "error"]
    if args.json:
        report: dict[str, Any] = {"path": chain[0], "chain": chain, "clean": not findings,
                                  "errors": len(errors), "leaks": len(findings) - len(errors),
                                  "findings": findings}
        print(json.dumps(report, indent=2))
    else:
        for f in findings:
            print(f"{f['path']}: {f['problem']}")
        what = f"{len(chain)} image{'s' if len(chain) > 1 else ''}"
        if not findings:
            print(f"{chain[0]}: no problems found ({what} checked)")
        else:
            print(f"{chain[0]}: {len(errors)} error(s), {len(findings) - len(errors)} leak(s) in {what}")
    return 1 if errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check", help="verify an image's structures and chain",
        description="Verify footers, headers, block tables, bitmaps and the parent chain of an "
                    "image; nothing is written. Exit 0 when clean, or when the only findings are "
                    "leaks (lines starting 'leak:': unused space, no data at risk); exit 1 when "
                    "problems are found; exit 3 when the image or its chain cannot be opened.")
    parser.add_argument("--json", action="store_true",
                        help="print JSON (keys: path, chain, clean, errors, leaks, findings)")
    parser.add_argument("image", metavar="IMAGE", help="a VHD or VDI image")
    add_image_options(parser)
    parser.set_defaults(func=run)
