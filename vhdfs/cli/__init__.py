"""The ``vhdfs`` command: one subcommand per module, one place that turns errors into exits.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run`` where ``run(args) -> int``. Users see ``vhdfs: <file>: <what>`` and the exit code
of the error's class; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Sequence

from .. import __version__
from ..errors import UsageError, VhdfsError

if TYPE_CHECKING:
    from ..block.image import Image

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("info", "create", "check", "mount", "umount", "convert", "commit", "resize", "compact")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhdfs",
        description="Expose VHD and VDI virtual-disk images (and differencing chains) as flat raw files.")
    parser.add_argument("--version", action="version", version=f"vhdfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="vhdfs: %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except VhdfsError as exc:
        if args.debug:
            raise
        print(f"vhdfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # ``vhdfs info | head``: the reader left; say nothing, like any Unix filter.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("vhdfs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vhdfs: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that opens an image shares, each format's own ones included."""
    from ..block.driver import drivers

    parser.add_argument("--parent-dir", action="append", default=[], metavar="DIR",
                        help="extra folder to search for parent images (repeatable)")
    for d in drivers():
        for opt in d.options:
            parser.add_argument(opt.flag, dest=opt.name, choices=opt.choices, default=opt.default,
                                help=opt.help)
    parser.add_argument("--ignore-parent-id", action="store_true",
                        help="accept a parent whose UUID does not match the child's record")


def driver_options(args: argparse.Namespace) -> dict[str, str]:
    """The format options of ``add_image_options`` as ``open_image`` keywords."""
    from ..block.driver import drivers

    return {o.name: getattr(args, o.name) for d in drivers() for o in d.options if hasattr(args, o.name)}


def open_from_args(args: argparse.Namespace, path: str, writable: bool = False, *,
                   format: str | None = None, parent_dirs: Sequence[str] = ()) -> "Image":
    """``open_image`` with the shared options of ``add_image_options``."""
    from ..block import open_image

    return open_image(path, writable, parent_dirs=[*parent_dirs, *getattr(args, "parent_dir", ())],
                      force=getattr(args, "force", False), format=format,
                      ignore_parent_id=getattr(args, "ignore_parent_id", False), **driver_options(args))


__all__ = ["main", "UsageError", "add_image_options", "driver_options", "open_from_args"]
