"""``vhdfs info``: what an image is, without mounting it.

The JSON form is a contract for scripts and tests (``format``, ``type``, ``virtual_size``,
``chain`` as absolute paths top first, ``layers`` with each layer's details); the text form is
the same facts for a person, one ``key: value`` per line.

Timestamps: a driver's ``describe()`` gives every date as Unix seconds under a key ending in
``timestamp`` (VHD: ``timestamp``, ``parent_timestamp``; VDI headers hold none). JSON keeps
that number and adds ``<key>_iso`` beside it; the text form shows the ISO 8601 UTC date.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from . import add_image_options, open_from_args

# Keys of ``describe()`` shown first in the text form, in this order, when a driver gives them.
_TEXT_ORDER = (
    "block_size",
    "allocated_blocks",
    "total_blocks",
    "creator_app",
    "creator_version",
    "creator_os",
    "uuid",
    "parent_uuid",
    "parent_name",
)


def human_size(n: int) -> str:
    """``1.5 GiB`` style: binary units, because disk sizes are powers of two."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "bytes":
                return f"{n} bytes"
            text = f"{value:.1f}"
            if text.endswith(".0") and value != int(value):
                text = f"{value:.2f}"  # 2040 GiB is 1.99 TiB, not "2 TiB"
            return f"{text} {unit}".replace(".0 ", " ")
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def amount(n: int) -> str:
    """``5606400 bytes (5.3 MiB)``, or just ``512 bytes`` when the human form adds nothing."""
    return f"{n} bytes ({human_size(n)})" if n >= 1024 else f"{n} bytes"


def iso_utc(unix_seconds: int) -> str:
    """``2021-07-22T14:07:35Z``: ISO 8601 in UTC, as qemu-img and Windows tools show dates."""
    try:
        when = datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return str(unix_seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_timestamp(key: str, value: Any) -> bool:
    return key.endswith("timestamp") and isinstance(value, int) and not isinstance(value, bool)


def layer_info(img: Any) -> dict[str, Any]:
    """One layer's facts: the generic ones every Image has, plus its driver's ``describe()``."""
    details = dict(img.describe())
    out: dict[str, Any] = {
        "path": img.path,
        "format": img.format,
        # One vocabulary across formats (VirtualBox says "static" for fixed).
        "type": "fixed" if img.type == "static" else img.type,
        "virtual_size": img.size,
        "uuid": img.identity() or None,
        "allocated_bytes": img.allocated_bytes(),
    }
    for key, value in details.items():
        out.setdefault(key, value)
        if _is_timestamp(key, value):
            out.setdefault(f"{key}_iso", iso_utc(value))
    return out


def image_info(img: Any) -> dict[str, Any]:
    """The whole report: the top layer's facts at the top level, every layer under ``layers``."""
    layers = [layer_info(layer) for layer in img.chain]
    top = dict(layers[0])
    top.pop("path")
    info: dict[str, Any] = {"path": img.path, **top}
    info["virtual_size_human"] = human_size(img.size)
    info["chain"] = [layer["path"] for layer in layers]
    info["layers"] = layers
    return info


def _fmt_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if _is_timestamp(key, value):
        return iso_utc(value)
    if isinstance(value, int) and (key.endswith("_size") or key.endswith("_bytes")) and value >= 1024:
        return f"{value} ({human_size(value)})"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _text(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['path']}",
        f"format: {info['format']}",
        f"type: {info['type']}",
        f"virtual size: {info['virtual_size']} ({info['virtual_size_human']})",
        f"allocated: {_fmt_value('allocated_bytes', info['allocated_bytes'])}",
    ]
    skip = {
        "path",
        "format",
        "type",
        "virtual_size",
        "virtual_size_human",
        "allocated_bytes",
        "chain",
        "layers",
    }
    keys = [k for k in _TEXT_ORDER if k in info] + sorted(k for k in info if k not in _TEXT_ORDER)
    for key in keys:
        if key not in skip and not (key.endswith("timestamp_iso") and key[:-4] in info):
            lines.append(f"{key.replace('_', ' ')}: {_fmt_value(key, info[key])}")
    if len(info["layers"]) > 1:
        lines.append(f"chain ({len(info['layers'])} images, top first):")
        for depth, layer in enumerate(info["layers"]):
            lines.append(
                f"  [{depth}] {layer['path']}  {layer['format']} {layer['type']}"
                f"  uuid {layer['uuid'] or '-'}  allocated {human_size(layer['allocated_bytes'])}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with open_from_args(args, args.image) as img:
        info = image_info(img)
    print(json.dumps(info, indent=2, default=str) if args.json else _text(info))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show an image's format, size and chain",
        description="Show what an image is: format, type, virtual size, block size, allocated "
        "blocks, creator, UUID and, for a differencing image, the whole chain of "
        "parents (top first). Nothing is written.",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (keys: format, type, virtual_size, chain, layers, ...)",
    )
    parser.add_argument("image", metavar="IMAGE", help="a VHD or VDI image")
    add_image_options(parser)
    parser.set_defaults(func=run)
